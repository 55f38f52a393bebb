"""The context-parallel cases of tests/test_parallel.py, run on every rank under `torchrun --nproc-per-node N` (CPU,
gloo): each case's one-process output (computed on this rank before context parallelism is on) beside its output
under `cogsurgeon.parallel` with Ulysses degree N, saved to OUT/rank{r}.pt for the test to compare.

    torchrun --nproc-per-node 2 tests/parallel_cases.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import CogVideoXTransformer3DModel

from cogsurgeon import parallel, patches
from cogsurgeon.inspector.geometry import layout_of_inputs, pipeline_inputs
from cogsurgeon.inspector.model_specs import tiny_config

BATCH = 2
# (name, options) of each patch case; "mask" adds a text padding mask, "keys" a mask over all keys, "frames" (B, F)
# timesteps. Applied in order, on top of one another within a case.
PATCH_CASES: dict[str, list[tuple[str, dict]]] = {
    "none": [],
    "causal": [("causal-attention", {})],
    "frame-causal": [("frame-causal-attention", {})],
    "block-causal-chunk2": [("block-causal-attention", {"chunk": 2})],
    "block-causal-window-sink": [("block-causal-attention", {"chunk": 1, "window": 2, "sink": 1})],
    "window": [("window-attention", {"window": 1})],
    "text-mask": [("attention-mask", {})],
    "key-mask+causal": [("causal-attention", {}), ("attention-mask", {})],
    "frame-causal+text-mask": [("frame-causal-attention", {}), ("attention-mask", {})],
    "per-frame-timesteps+block-causal": [("block-causal-attention", {"chunk": 1}),
                                          ("per-frame-timesteps", {"text_timestep": "max"})],
}
# video sizes (frames, height, width) per model: the first splits evenly over 2 and 4 ranks; the second does not
# (27 video tokens for tiny, 18 for tiny-1.5) and comes with 7 text tokens, so both are padded
SIZES = {"tiny": [(13, 64, 64), (9, 48, 48)], "tiny-1.5": [(17, 64, 64), (9, 48, 48)], "tiny-i2v": [(9, 64, 64)]}
UNEVEN_TEXT_TOKENS = 7  # the text of the second size: 7 tokens, padded to 8 over 2 and 4 ranks


def build(name: str, heads: int) -> CogVideoXTransformer3DModel:
    """A tiny model with `heads` heads (the tiny specs have 2; degree 4 needs 4), seeded."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel.from_config({**tiny_config(name), "num_attention_heads": heads}).eval()


def case_inputs(model, size, case: str, seed: int) -> dict:
    inputs = pipeline_inputs(model.config, size, batch=BATCH, seed=seed)
    if size != SIZES[next(iter(SIZES))][0] and size in SIZES["tiny"][1:]:
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :UNEVEN_TEXT_TOKENS]
    layout = layout_of_inputs(model.config, inputs)
    text, video_tokens = layout.text_tokens, layout.video_tokens
    generator = torch.Generator().manual_seed(seed + 1)
    if "text-mask" in case:
        mask = torch.ones(BATCH, text, dtype=torch.bool)
        mask[0, 3:] = False
        inputs["attention_kwargs"] = {"attention_mask": mask}
    if "key-mask" in case:
        mask = torch.rand(BATCH, text + video_tokens, generator=generator) > 0.3
        mask[:, 0] = True
        inputs["attention_kwargs"] = {"attention_mask": mask}
    if "per-frame" in case:
        frames = inputs["hidden_states"].shape[1]
        patch = model.config.patch_size_t or 1
        steps = torch.randint(0, 1000, (BATCH, frames // patch), generator=generator)
        inputs["timestep"] = steps.repeat_interleave(patch, dim=1)
    return inputs


def run_cases(model, name: str, results: dict) -> None:
    for size_index, size in enumerate(SIZES[name]):
        for case_index, (case, patch_list) in enumerate(PATCH_CASES.items()):
            inputs = case_inputs(model, size, case, seed=100 * size_index + case_index)
            with torch.no_grad():
                with patches.patched(model) if not patch_list else _patched(model, patch_list):
                    output = model(**inputs, return_dict=False)[0]
            results[(name, size, case)] = output


def _patched(model, patch_list):
    from contextlib import ExitStack

    stack = ExitStack()
    for patch_name, options in patch_list:
        stack.enter_context(patches.patched(model, patch_name, **options))
    return stack


def fused_output(model) -> torch.Tensor:
    """frame-causal attention with fused QKV projections (diffusers' fuse_qkv_projections), then unfused again."""
    inputs = case_inputs(model, SIZES["tiny"][0], "frame-causal", seed=11)
    model.fuse_qkv_projections()
    try:
        with torch.no_grad(), patches.patched(model, "frame-causal-attention"):
            return model(**inputs, return_dict=False)[0]
    finally:
        model.unfuse_qkv_projections()


def stream_outputs(model, size) -> tuple[list[torch.Tensor], int]:
    """Every step's and the cache's size of a short stream (3 chunks of 1 frame, window 2, sink 1)."""
    frames, height, width = size
    latent = model.config.patch_size_t or 1
    generator = torch.Generator().manual_seed(7)
    text = torch.randn(BATCH, model.config.max_text_seq_length, model.config.text_embed_dim, generator=generator)
    outputs = []
    with torch.no_grad(), patches.streaming(model, chunk=1, window=2, sink=1, text_timestep=0, height=height,
                                            width=width, frames=3) as stream:
        stream.prefill(text)
        for _ in range(3):
            latents = torch.randn(BATCH, latent, model.config.in_channels, height // 8, width // 8, generator=generator)
            for t in (900, 500):
                prediction = stream.step(latents, t)
                outputs.append(prediction)
                noise = latents[:, :, : prediction.shape[2]] - prediction / 4  # I2V: the image channels stay
                latents = torch.cat([noise, latents[:, :, prediction.shape[2]:]], dim=2)
            stream.commit(latents, timestep=0)
        cache_bytes = stream.cache_bytes()
    return outputs, cache_bytes


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, degree = dist.get_rank(), dist.get_world_size()
    heads = max(2, degree)
    saved: dict = {"one_process": {}, "parallel": {}, "stream": {}, "restored": {}, "route": None, "block_tokens": {}}
    for name in SIZES:
        model = build(name, heads)
        run_cases(model, name, saved["one_process"])
        first = (name, SIZES[name][0], "none")
        saved["stream"][(name, "one_process")] = stream_outputs(model, (9, 64, 64))
        if name == "tiny":
            saved["one_process"][(name, "fused")] = fused_output(model)
        if name == "tiny":  # a patch on before context parallelism is enabled: it must keep its meaning too
            patches.apply(model, "frame-causal-attention")
            handle = parallel.enable(model, ulysses=degree)
            with torch.no_grad():
                frame_causal = list(PATCH_CASES).index("frame-causal")
                inputs = case_inputs(model, SIZES[name][0], "frame-causal", seed=frame_causal)
                saved["parallel"][(name, "patched-before-enable")] = model(**inputs, return_dict=False)[0]
            patches.revert(model)
        else:
            handle = parallel.enable(model, ulysses=degree)
        saved["route"] = handle.route
        seen: list[int] = []  # the video tokens the second block gets: this rank's shard
        video_tokens = layout_of_inputs(model.config, case_inputs(model, SIZES[name][0], "none", 0)).video_tokens
        padded = [layout_of_inputs(model.config, case_inputs(model, size, "none", 0)).video_tokens
                  for size in SIZES[name][1:]]
        saved["block_tokens"][name] = {"seen": seen, "video_tokens": video_tokens,
                                       "padded_video_tokens": -(-padded[0] // degree) * degree if padded else 0}
        hook = model.transformer_blocks[1].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
        run_cases(model, name, saved["parallel"])
        hook.remove()
        if name == "tiny":  # fuse_qkv_projections() swaps every processor: the Ulysses route must stay
            saved["parallel"][(name, "fused")] = fused_output(model)
        saved["stream"][(name, "parallel")] = stream_outputs(model, (9, 64, 64))
        parallel.disable(model)
        with torch.no_grad():
            inputs = case_inputs(model, SIZES[name][0], "none", seed=0)
            saved["restored"][name] = (model(**inputs, return_dict=False)[0], saved["one_process"][first])
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
