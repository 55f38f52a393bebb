"""Causal video on real tiny CogVideoX models: block-causal / window attention with parameters, per-frame timesteps,
their composition, a LoRA training step through a tiny `CogVideoXPipeline`, and the README's worked example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.inspector.loading import build_tiny
from cogsurgeon.patches.errors import PatchConflictError, PatchParameterError
from cogsurgeon.patches.reference import per_frame_modulation_error, reference_processors
from cogsurgeon.patches.timesteps import PerFrameTimestepError
from cogsurgeon.patches.verify import combined_reference_mask, forward, tiny_inputs
from cogsurgeon.inspector.geometry import layout_of_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("tiny", "tiny-i2v", "tiny-1.5")


def tiny_1_5_i2v():
    """CogVideoX1.5-I2V's shape in small: temporal patches of 2 frames, image channels and an ofs embedding."""
    from diffusers import CogVideoXTransformer3DModel

    from cogsurgeon.inspector.model_specs import TINY_CONFIGS

    config = {**TINY_CONFIGS["tiny-1.5"], "in_channels": 8, "ofs_embed_dim": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CogVideoXTransformer3DModel.from_config(config).eval()


def model_of(variant: str):
    return tiny_1_5_i2v() if variant == "tiny-1.5-i2v" else build_tiny(variant)


def frame_timesteps(model, inputs, values) -> torch.Tensor:
    """(B, F) latent-frame timesteps from one value per frame (per temporal patch for CogVideoX1.5)."""
    patch_frames = model.config.patch_size_t or 1
    per_patch = torch.as_tensor(values)
    if per_patch.dim() == 1:
        per_patch = per_patch.expand(inputs["hidden_states"].shape[0], -1)
    return per_patch.repeat_interleave(patch_frames, dim=1)


# -- per-frame timesteps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*VARIANTS, "tiny-1.5-i2v"])
def test_batch_timesteps_and_equal_frames_are_bit_identical_to_unpatched(variant):
    model = model_of(variant)
    inputs = tiny_inputs(model)
    if variant == "tiny-1.5-i2v":
        inputs["ofs"] = torch.tensor([2.0, 3.0])  # one ofs per item: repeated per frame column
    unpatched = forward(model, inputs)
    frames = inputs["hidden_states"].shape[1]
    with patches.patched(model, "per-frame-timesteps"):
        assert torch.equal(forward(model, inputs), unpatched)
        equal = {**inputs, "timestep": inputs["timestep"][:, None].expand(-1, frames).contiguous()}
        assert torch.equal(forward(model, equal), unpatched)
        different = {**inputs, "timestep": frame_timesteps(model, inputs, torch.arange(frames // (model.config.patch_size_t or 1)) * 300)}
        assert not torch.equal(forward(model, different), unpatched)
    assert torch.equal(forward(model, inputs), unpatched)  # reverted


@pytest.mark.parametrize("variant", [*VARIANTS, "tiny-1.5-i2v"])
def test_changing_frame_j_changes_frames_from_j_on_only(variant):
    """block-causal(chunk=1) + per-frame timesteps (text at a fixed timestep, as a KV cache needs): frame j's
    timestep reaches frames >= j and leaves frames < j bit-identical."""
    model = model_of(variant)
    inputs = tiny_inputs(model)
    patch_frames = model.config.patch_size_t or 1
    frames = inputs["hidden_states"].shape[1] // patch_frames
    base_values = torch.tensor([[900, 600, 300], [800, 500, 100]])[:, :frames]
    patches.apply(model, "block-causal-attention", chunk=1)
    patches.apply(model, "per-frame-timesteps", text_timestep=999)
    base = forward(model, {**inputs, "timestep": frame_timesteps(model, inputs, base_values)})
    for j in range(frames):
        changed_values = base_values.clone()
        changed_values[:, j] -= 50
        changed = forward(model, {**inputs, "timestep": frame_timesteps(model, inputs, changed_values)})
        first = j * patch_frames  # output frames are latent frames
        assert torch.equal(changed[:, :first], base[:, :first]), f"frames before {j} changed"
        for later in range(j, frames):
            rows = slice(later * patch_frames, (later + 1) * patch_frames)
            assert not torch.equal(changed[:, rows], base[:, rows]), f"frame {later} did not see frame {j}'s change"


@pytest.mark.parametrize("text_timestep", ["max", "min", "first", "last", 0, 412.5])
@pytest.mark.parametrize("variant", [*VARIANTS, "tiny-1.5-i2v"])
def test_per_token_modulation_equals_the_reference_from_the_definition(variant, text_timestep):
    model = model_of(variant)
    inputs = tiny_inputs(model)
    frames = inputs["hidden_states"].shape[1] // (model.config.patch_size_t or 1)
    values = torch.tensor([[17, 512, 999], [640, 3, 250]])[:, :frames]
    with patches.patched(model, "per-frame-timesteps", text_timestep=text_timestep):
        run = {**inputs, "timestep": frame_timesteps(model, inputs, values)}
        assert per_frame_modulation_error(model, run, text_timestep) <= 1e-5
        # the reference tells the choices apart: it is not blind to which timestep text gets
        wrong = "min" if text_timestep != "min" else "max"
        assert per_frame_modulation_error(model, run, wrong) > 1e-3


def test_cogvideox_1_5_frames_of_one_temporal_patch_must_share_a_timestep():
    model = build_tiny("tiny-1.5")
    inputs = tiny_inputs(model)
    frames = inputs["hidden_states"].shape[1]
    with patches.patched(model, "per-frame-timesteps"):
        split = torch.arange(frames).expand(2, -1) * 10  # frames 0 and 1 (one temporal patch) differ
        with pytest.raises(PerFrameTimestepError, match="share a timestep"):
            forward(model, {**inputs, "timestep": split})
        with pytest.raises(PerFrameTimestepError, match=f"\\(B, {frames}\\)"):
            forward(model, {**inputs, "timestep": torch.zeros(2, frames + 1, dtype=torch.long)})


def test_per_frame_timesteps_refuse_a_bad_text_timestep_naming_it():
    model = build_tiny("tiny")
    with pytest.raises(PatchParameterError, match="text_timestep") as caught:
        patches.apply(model, "per-frame-timesteps", text_timestep="median")
    assert caught.value.parameter == "text_timestep"
    assert patches.applied(model) == [] and "forward" not in vars(model.transformer_blocks[0].norm1)


# -- attention patterns with parameters on the models --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, parameter",
    [
        ("block-causal-attention", {"chunk": 0}, "chunk"),
        ("block-causal-attention", {"window": 0}, "window"),
        ("block-causal-attention", {"window": 2, "sink": 3}, "sink"),
        ("block-causal-attention", {"stride": 2}, "stride"),
        ("block-causal-attention", {"chunk": "3"}, "chunk"),
        ("window-attention", {"window": 0}, "window"),
        ("window-attention", {"chunk": -1}, "chunk"),
    ],
)
def test_invalid_parameters_are_a_typed_error_naming_the_parameter(name, options, parameter):
    model = build_tiny("tiny")
    original = model.transformer_blocks[0].attn1.processor
    with pytest.raises(PatchParameterError, match=parameter) as caught:
        patches.apply(model, name, **options)
    assert caught.value.parameter == parameter
    assert patches.applied(model) == [] and model.transformer_blocks[0].attn1.processor is original


def test_patterns_compose_with_masks_and_timesteps_but_not_with_each_other():
    model = build_tiny("tiny")
    patches.apply(model, "block-causal-attention", chunk=2, window=1, sink=1)
    patches.apply(model, "attention-mask")
    patches.apply(model, "per-frame-timesteps")
    for other in ("window-attention", "frame-causal-attention", "causal-attention"):
        with pytest.raises(PatchConflictError):
            patches.apply(model, other)
    assert patches.applied_options(model)["block-causal-attention"] == {"chunk": 2, "window": 1, "sink": 1}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "name, options",
    [
        ("block-causal-attention", {"chunk": 1, "window": 1, "sink": 1}),
        ("block-causal-attention", {"chunk": 2, "window": 1, "sink": 0}),
        ("window-attention", {"window": 2, "chunk": 1}),
    ],
)
def test_a_pattern_and_a_text_padding_mask_match_the_composed_reference(variant, name, options):
    """More frames than verify's default, so windows slide past the sinks; the mask drops padded text keys."""
    from cogsurgeon.patches.reference import rule_mask

    model = build_tiny(variant)
    size = (21, 64, 64) if variant != "tiny-i2v" else None  # 6 latent frames (3 temporal patches for 1.5)
    inputs = tiny_inputs(model, size=size)
    layout = layout_of_inputs(model.config, inputs)
    text_keep = torch.ones(2, layout.text_tokens, dtype=torch.bool)
    text_keep[0, 3:] = False
    user = combined_reference_mask((), layout, text_keep)
    reference = rule_mask(name, layout, **options) & user
    with reference_processors(model, reference):
        expected = forward(model, inputs)
    with patches.patched(model, name, "attention-mask", **options):
        actual = forward(model, inputs, text_keep)
    assert (actual - expected).abs().max() <= 1e-4


# -- training ------------------------------------------------------------------------------------------------------


@pytest.mark.diffusers_versions
def test_a_tiny_pipeline_trains_one_lora_step_with_both_patches_on():
    """Diffusion-forcing style: a noise level per latent frame, block-causal attention, v-prediction loss."""
    from peft import LoraConfig
    from test_patches_registry import tiny_pipeline

    pipe, prompt_embeds, _ = tiny_pipeline()
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    patches.apply(pipe, "block-causal-attention", chunk=1, window=2, sink=1)
    patches.apply(pipe, "per-frame-timesteps")
    transformer.train()

    generator = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 9, 64, 64, generator=generator) * 2 - 1  # (B, C, frames, H, W), as the VAE takes it
    with torch.no_grad():
        latents = pipe.vae.encode(video).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    latents = latents.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W), as the transformer takes it
    frames = latents.shape[1]
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1, frames), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = torch.stack([pipe.scheduler.add_noise(latents[:, f], noise[:, f], timesteps[:, f]) for f in range(frames)], 1)
    target = torch.stack([pipe.scheduler.get_velocity(latents[:, f], noise[:, f], timesteps[:, f]) for f in range(frames)], 1)

    prediction = transformer(
        hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=timesteps, return_dict=False
    )[0]
    loss = torch.nn.functional.mse_loss(prediction, target)
    loss.backward()

    assert torch.isfinite(loss)
    with_grad = {name for name, p in transformer.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert all(p.grad is None for name, p in transformer.named_parameters() if "lora_" not in name)
    assert any(float(p.grad.abs().sum()) > 0 for name, p in transformer.named_parameters() if "lora_B" in name)


def readme_causal_video_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Causal video") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_causal_video_example_runs_as_written():
    namespace: dict = {}
    exec(compile(readme_causal_video_example(), "README.md (Causal video)", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, settings",
    [
        ("block-causal-attention", 4),  # no parameters given: the representative settings
        ("block-causal-attention:chunk=2,window=1,sink=1", 1),
        ("window-attention:window=2,text_sees_video=true", 1),
        ("per-frame-timesteps:text_timestep=first", 1),
    ],
)
def test_patch_verify_covers_the_new_patches_on_every_tiny_variant(cli, spec, settings):
    import json

    result = cli("patch", "verify", spec, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["revert_bit_exact"] and report["max_error"] <= 1e-4
    variants = {case["variant"] for case in report["details"]}
    assert variants == set(VARIANTS)
    assert len({case["case"].split(": ")[0] for case in report["details"]}) == settings


@pytest.mark.parametrize(
    "spec, parameter",
    [("block-causal-attention:chunk=0", "chunk"), ("block-causal-attention:window=2,sink=3", "sink"),
     ("window-attention:size=2", "size"), ("per-frame-timesteps:text_timestep=median", "text_timestep")],
)
def test_patch_verify_refuses_bad_parameters_in_one_line(cli, spec, parameter):
    result = cli("patch", "verify", spec)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and parameter in result.stderr and "Traceback" not in result.stderr
