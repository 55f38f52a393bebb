"""The registry beyond the built-ins: third-party patches through a real entry point, the memory estimates, a
tiny `CogVideoXPipeline` generating with patches applied through the pipeline, and the torch-free import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.patches import registry
from cogsurgeon.patches.errors import UnknownPatchError
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PLUGIN_MODULE = '''
"""A third-party patch: doubles the transformer's output projection while applied."""
from cogsurgeon import patches


class DoubleOutput(patches.Patch):
    name = "double-output"
    summary = "doubles proj_out (a test plugin)"

    def apply(self, transformer, **options):
        return transformer.proj_out.register_forward_hook(lambda m, a, out: out * 2)  # the record: what to undo

    def revert(self, transformer, record):
        record.remove()


class Broken(patches.Patch):
    name = "broken"

    def __init__(self):
        raise RuntimeError("this plugin is broken")
'''


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """A distribution installed the way pip leaves it: a module and a dist-info with entry_points.txt."""
    (tmp_path / "cogsurgeon_demo_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "cogsurgeon_demo_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cogsurgeon-demo-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[cogsurgeon.patches]\n"
        "double-output = cogsurgeon_demo_plugin:DoubleOutput\n"
        "broken = cogsurgeon_demo_plugin:Broken\n"
        "clash = cogsurgeon_demo_plugin:DoubleOutput\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_loaded", False)
    return tmp_path


def test_a_third_party_patch_registers_through_the_entry_point_group(plugin_on_path, tiny_model):
    from cogsurgeon.patches.verify import forward, tiny_inputs

    with pytest.warns(UserWarning) as warnings_seen:
        names = [info.name for info in patches.available()]
    assert names == [
        "causal-attention",
        "frame-causal-attention",
        "attention-mask",
        "block-causal-attention",
        "window-attention",
        "per-frame-timesteps",
        "double-output",
    ]
    messages = " ".join(str(w.message) for w in warnings_seen)
    assert "skipped patch entry point 'broken'" in messages and "this plugin is broken" in messages
    assert "skipped patch entry point 'clash'" in messages and "already registered" in messages

    inputs = tiny_inputs(tiny_model)
    unpatched = forward(tiny_model, inputs)
    with patches.patched(tiny_model, "double-output", "causal-attention"):
        assert patches.applied(tiny_model) == ["double-output", "causal-attention"]
        assert not torch.equal(forward(tiny_model, inputs), unpatched)
    assert torch.equal(forward(tiny_model, inputs), unpatched)
    assert patches.memory_estimate("double-output", 1, 1, 1, 1, 1, 2) is None  # it gives no estimate


def test_register_refuses_a_second_patch_of_the_same_name(monkeypatch):
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_loaded", False)

    class Impostor(patches.Patch):
        name = "causal-attention"

    with pytest.raises(patches.PatchError, match="already registered"):
        patches.register(Impostor())


def test_memory_estimates_at_the_5b_shape():
    shape = {"batch": 2, "heads": 48, "text_tokens": 226, "video_tokens": 17_550, "dtype_bytes": 2}
    length = 17_776
    assert patches.explicit_mask_bytes(**shape) == 2 * 48 * length * length * 2 == 60_669_345_792
    assert patches.memory_estimate("causal-attention", frames=13, **shape) == 0
    assert patches.memory_estimate("frame-causal-attention", frames=13, **shape) == 2 * 48 * 1350 * 64 * 2
    # a window past the sinks: a saved copy of the prefix's keys and values (text and the sink frame)
    sink = {"chunk": 1, "window": 4, "sink": 1}
    assert patches.memory_estimate("block-causal-attention", frames=13, **shape, options=sink) == (
        2 * 48 * 1350 * 64 * 2 + 2 * (226 + 1350) * 2 * 48 * 64 * 2
    )
    assert patches.memory_estimate("block-causal-attention", frames=13, training=True, **shape, options=sink) == (
        2 * 48 * 1350 * 64 * 2 + 2 * (226 + 1350 + 4 * 1350) * 2 * 48 * 64 * 2
    )
    local = patches.memory_estimate("window-attention", frames=13, **shape, options={"window": 3})
    assert local == 2 * 48 * 1350 * 64 * 2 + 2 * 226 * 2 * 48 * 64 * 2  # a saved copy of the text's keys and values
    row = 48 * length * 64 * 2  # one item's K (or V, or output) over the whole sequence
    assert patches.memory_estimate("attention-mask", frames=13, **shape) == row + 2 * 2 * 48 * 226 * 64 * 2 + 2 * length
    assert patches.memory_estimate("attention-mask", frames=13, training=True, **shape) == 4 * row + 2 * length
    with pytest.raises(UnknownPatchError):
        patches.memory_estimate("nope", frames=13, **shape)


def test_importing_patches_loads_neither_torch_nor_diffusers_nor_textual():
    code = textwrap.dedent(
        """
        import sys
        from cogsurgeon import patches
        from cogsurgeon.patches import *
        import cogsurgeon.inspector.cli
        patches.available()
        print(sorted(m for m in ("torch", "diffusers", "textual") if m in sys.modules))
        """
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.strip() == "[]"


def tiny_pipeline():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from transformers import T5Config, T5EncoderModel

    from cogsurgeon.inspector.loading import build_tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        )
        text_encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    # No tokenizer can be built offline: prompts are given as embeddings of the tiny T5.
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=text_encoder, vae=vae, transformer=build_tiny("tiny"),
        scheduler=CogVideoXDDIMScheduler(),
    )
    token_ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prompt_embeds = text_encoder(token_ids)[0]
        negative_embeds = text_encoder(torch.zeros_like(token_ids))[0]
    return pipe, prompt_embeds, negative_embeds


@pytest.mark.diffusers_versions
def test_a_tiny_pipeline_generates_with_patches_applied_through_it():
    from cogsurgeon.patches.reference import reference_processors
    from cogsurgeon.patches.verify import combined_reference_mask
    from cogsurgeon.inspector.geometry import FrameLayout

    pipe, prompt_embeds, negative_embeds = tiny_pipeline()
    text_mask = torch.tensor([[True] * 5 + [False] * 3])  # batch 1: broadcast over the guidance batch

    def generate(output_type="latent", **kwargs):
        return pipe(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_frames=9, height=64, width=64,
            num_inference_steps=2, max_sequence_length=8, generator=torch.Generator().manual_seed(0),
            output_type=output_type, **kwargs,
        ).frames

    layout = FrameLayout(text_tokens=8, frames=3, tokens_per_frame=16)
    with reference_processors(pipe.transformer, combined_reference_mask(("frame-causal-attention",), layout, text_mask)):
        expected = generate()
    unpatched = generate()

    patches.apply(pipe, "frame-causal-attention")
    patches.apply(pipe, "attention-mask")
    assert patches.applied(pipe) == ["frame-causal-attention", "attention-mask"]
    latents = generate(attention_kwargs={"attention_mask": text_mask})
    video = generate(output_type="pt", attention_kwargs={"attention_mask": text_mask})
    patches.revert(pipe)

    assert (latents - expected).abs().max() <= 1e-4
    assert (latents - unpatched).abs().max() > 1e-3
    assert video.shape == (1, 9, 3, 64, 64) and torch.isfinite(video).all()
    assert torch.equal(generate(), unpatched)
