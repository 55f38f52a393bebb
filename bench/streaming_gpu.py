"""GPU bench of `patches.streaming`: an autoregressive rollout with a KV cache against the same rollout without one.

The 5B transformer's dimensions with random weights (bf16, on one GPU), B=2 (guidance), 13 latent frames of 60x90
(49 x 480 x 720 video), 4 denoising steps per chunk (a distilled causal sampler's count), chunk 1 and chunk 3:
- cached: `stream.prefill` once, then per chunk 4 `stream.step`s and one `stream.commit`;
- uncached: per chunk 4 forwards of `[committed frames ; this chunk]` with `block-causal-attention(chunk)` +
  `per-frame-timesteps(text_timestep=0)` (what a causal sampler without a cache runs).
Both are timed in the same process, alternating, and the median of the repeats is reported. Beside each measured
ratio: the ideal ratio from token counts, linear work proportional to query tokens and attention work to allowed
query-key pairs, weighted by the split of one block's time into attention and the rest measured in the same run.
Also the cache's memory (`torch.cuda.memory_allocated` growth over the rollout, `frames=` given) against
`stream.cache_bytes()`.

    python bench/streaming_gpu.py --out bench/results/streaming_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT, FRAMES, LATENT_HW, STEPS, BATCH = 226, 13, (60, 90), 4, 2


def import_cogsurgeon():
    """The installed cogsurgeon, or this checkout's folders under the `cogsurgeon` name (a machine without it)."""
    try:
        import cogsurgeon.patches  # noqa: F401
    except ImportError:
        import types

        namespace = types.ModuleType("cogsurgeon")
        namespace.__path__ = [str(ROOT)]
        sys.modules["cogsurgeon"] = namespace


def chunks(frames: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(frames, start + chunk)) for start in range(0, frames, chunk)]


def work(chunk: int, tokens_per_frame: int) -> dict[str, float]:
    """Query tokens and allowed query-key pairs of both rollouts (block-causal, no window), prefill included."""
    n, text = tokens_per_frame, TEXT
    cached_tokens = text + n  # prefill: text beside one blank frame
    cached_pairs = text * text + n * (text + n)
    uncached_tokens = uncached_pairs = 0
    for start, end in chunks(FRAMES, chunk):
        queries = (end - start) * n
        cached_tokens += (STEPS + 1) * queries
        cached_pairs += (STEPS + 1) * queries * (text + end * n)
        length = text + end * n
        pairs = text * text + sum((e - s) * n * (text + e * n) for s, e in chunks(end, chunk))
        uncached_tokens += STEPS * length
        uncached_pairs += STEPS * pairs
    return dict(cached_tokens=cached_tokens, cached_pairs=cached_pairs, uncached_tokens=uncached_tokens,
                uncached_pairs=uncached_pairs)


def block_split(model, torch) -> dict[str, float]:
    """Seconds of one block's forward at the whole video's length, and of its attention (SDPA) alone."""
    import torch.nn.functional as F

    from cogsurgeon.inspector.geometry import rotary_embedding

    config = model.config
    n = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    length = FRAMES * n
    dim = config.num_attention_heads * config.attention_head_dim
    block = model.transformer_blocks[0]
    hidden = torch.randn(BATCH, length, dim, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(BATCH, TEXT, dim, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(BATCH, config.time_embed_dim, device="cuda", dtype=torch.bfloat16)
    rotary = rotary_embedding(config, FRAMES, *LATENT_HW, device="cuda")
    q = torch.randn(BATCH, config.num_attention_heads, TEXT + length, config.attention_head_dim, device="cuda",
                    dtype=torch.bfloat16)

    def timed(function, repeats=10):
        for _ in range(3):
            function()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        block_seconds = timed(lambda: block(hidden, text, temb, image_rotary_emb=rotary))
        attention_seconds = timed(lambda: F.scaled_dot_product_attention(q, q, q))
    return dict(block_s=block_seconds, attention_s=attention_seconds, length=TEXT + length)


def ideal_ratio(counts: dict[str, float], split: dict[str, float]) -> float:
    length = split["length"]
    per_pair = split["attention_s"] / length**2
    per_token = (split["block_s"] - split["attention_s"]) / length
    cached = per_token * counts["cached_tokens"] + per_pair * counts["cached_pairs"]
    uncached = per_token * counts["uncached_tokens"] + per_pair * counts["uncached_pairs"]
    return cached / uncached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="1,3")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import_cogsurgeon()
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from cogsurgeon import patches
    from cogsurgeon.inspector.geometry import rotary_embedding
    from cogsurgeon.inspector.model_specs import published_config

    config = published_config("cogvideox-5b")
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel.from_config(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    n = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    height, width = LATENT_HW[0] * 8, LATENT_HW[1] * 8
    generator = torch.Generator(device="cuda").manual_seed(0)
    latents = torch.randn(BATCH, FRAMES, 16, *LATENT_HW, device="cuda", dtype=torch.bfloat16, generator=generator)
    text = torch.randn(BATCH, TEXT, 4096, device="cuda", dtype=torch.bfloat16, generator=generator)
    timesteps = [999, 750, 500, 250]

    def cached_rollout(chunk: int) -> dict:
        before = torch.cuda.memory_allocated()
        with patches.streaming(model, chunk=chunk, text_timestep=0, height=height, width=width,
                               frames=FRAMES) as stream:
            stream.prefill(text)
            for start, end in chunks(FRAMES, chunk):
                for t in timesteps:
                    stream.step(latents[:, start:end], t)
                stream.commit(latents[:, start:end], timestep=0)
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            return dict(cache_bytes=stream.cache_bytes(), allocated_growth=held)

    def uncached_rollout(chunk: int) -> None:
        with patches.patched(model, "block-causal-attention", chunk=chunk), \
                patches.patched(model, "per-frame-timesteps", text_timestep=0), torch.no_grad():
            for start, end in chunks(FRAMES, chunk):
                rotary = rotary_embedding(model.config, end, *LATENT_HW, device="cuda")
                for t in timesteps:
                    frame_timesteps = torch.zeros(BATCH, end, dtype=torch.long, device="cuda")
                    frame_timesteps[:, start:] = t
                    model(hidden_states=latents[:, :end], encoder_hidden_states=text, timestep=frame_timesteps,
                          image_rotary_emb=rotary, return_dict=False)

    def timed(function, chunk):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(chunk)
        torch.cuda.synchronize()
        return time.perf_counter() - start, result

    split = block_split(model, torch)
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        timed(cached_rollout, chunk), timed(uncached_rollout, chunk)  # warm-up (kernels, allocator)
        cached_times, uncached_times = [], []
        memory = None
        for _ in range(args.repeats):
            seconds, memory = timed(cached_rollout, chunk)
            cached_times.append(seconds)
            uncached_times.append(timed(uncached_rollout, chunk)[0])
        cached_s, uncached_s = statistics.median(cached_times), statistics.median(uncached_times)
        ideal = ideal_ratio(work(chunk, n), split)
        row = dict(chunk=chunk, cached_s=round(cached_s, 4), uncached_s=round(uncached_s, 4),
                   ratio=round(cached_s / uncached_s, 4), ideal_ratio=round(ideal, 4),
                   ratio_over_ideal=round(cached_s / uncached_s / ideal, 3),
                   cache_bytes=memory["cache_bytes"], allocated_growth=memory["allocated_growth"],
                   memory_ratio=round(memory["allocated_growth"] / memory["cache_bytes"], 4),
                   cached_times=[round(x, 4) for x in cached_times],
                   uncached_times=[round(x, 4) for x in uncached_times])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, block_split=split, rows=rows,
                  command="python bench/streaming_gpu.py " + " ".join(sys.argv[1:]))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
