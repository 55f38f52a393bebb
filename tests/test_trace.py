"""The shape trace: size arithmetic directly, meta-device forwards of the published models at real sizes, tiny
CPU models traced without being touched, and the `trace` CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cogsurgeon.inspector.geometry import FrameLayout, VideoSizeError, latent_geometry
from cogsurgeon.inspector.model_specs import published_config, tiny_config
from cogsurgeon.inspector.trace import (
    PatchMemoryModel,
    dense_mask_bytes,
    format_bytes,
    format_shape,
    mask_memory_table,
    patch_memory_model,
    shape_of,
    shape_to_json,
    size_notes,
)

def test_size_notes_say_what_a_person_should_know():
    i2v = published_config("cogvideox-5b-i2v")
    assert size_notes(i2v, latent_geometry(i2v, 49, 480, 720)) == ()
    notes = size_notes(i2v, latent_geometry(i2v, 50, 480, 720))
    assert notes == ("50 frames is not 4k+1: the VAE keeps 49",)
    assert any("sin-cos" in note for note in size_notes(i2v, latent_geometry(i2v, 81, 480, 720)))
    one_five = published_config("cogvideox1.5-5b")
    assert any("padding" in note for note in size_notes(one_five, latent_geometry(one_five, 81, 768, 1360)))


def test_dense_mask_bytes():
    assert dense_mask_bytes((1, 1, 17776, 17776), "bool") == 17776 * 17776
    assert dense_mask_bytes((96, 17776, 17776), "bfloat16") == 96 * 17776 * 17776 * 2
    assert dense_mask_bytes((2, 3), "float32") == 24


SPLIT_5B = FrameLayout(text_tokens=226, frames=13, tokens_per_frame=1350)


def test_mask_memory_table_without_patch_estimates():
    rows = mask_memory_table(SPLIT_5B, 2, 48, 64, "bfloat16", PatchMemoryModel(("causal-attention", "other")))
    assert [row.patch for row in rows] == ["causal-attention", "other"]
    for row in rows:
        assert row.explicit_mask_shape == (96, 17776, 17776)
        assert row.explicit_mask_bytes == 60_669_345_792  # diffusers' head-repeated mask at the 5B shape: 56.5 GiB
        assert row.broadcast_mask_bytes == 315_986_176
        assert row.patch_bytes is None  # no estimate is invented


def test_mask_memory_table_reads_the_patch_estimates():
    calls = []

    def estimate(name, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, *, head_dim):
        calls.append((name, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, head_dim))
        return None if name == "unknown" else 1000 + len(name)

    rows = mask_memory_table(SPLIT_5B, 2, 48, 64, "bfloat16",
                             PatchMemoryModel(("causal-attention", "unknown"), patch_bytes=estimate))
    assert [row.patch_bytes for row in rows] == [1000 + len("causal-attention"), None]
    assert calls[0] == ("causal-attention", 2, 48, 226, 17550, 13, 2, 64)


def test_trace_memory_comes_from_the_patches_package():
    from cogsurgeon import patches

    model = patch_memory_model()
    assert model.names == tuple(info.name for info in patches.available())
    rows = {row.patch: row for row in mask_memory_table(SPLIT_5B, 2, 48, 64, "bfloat16", model)}
    for name, row in rows.items():
        assert row.explicit_mask_bytes == patches.explicit_mask_bytes(2, 48, 226, 17550, 2)
        assert row.explicit_mask_bytes == dense_mask_bytes((96, 17776, 17776), "bfloat16")
        assert row.patch_bytes == patches.memory_estimate(name, 2, 48, 226, 17550, 13, 2, head_dim=64)
    assert rows["causal-attention"].patch_bytes == 0  # SDPA's is_causal: no mask at all


def test_shape_of_reduces_nested_values():
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    value = (torch.zeros(2, 3), [None, torch.zeros(4)], {"a": torch.zeros(1), "b": 3})
    assert shape_of(value) == ((2, 3), (None, (4,)), {"a": (1,)})
    assert shape_of(Transformer2DModelOutput(sample=torch.zeros(5, 6))) == {"sample": (5, 6)}
    assert shape_of(3) is None and shape_of((1, "x")) is None
    assert shape_to_json(shape_of(value)) == [[2, 3], [None, [4]], {"a": [1]}]


def test_format_shape_and_bytes_for_people():
    assert format_shape((2, 17776, 3072)) == "(2, 17776, 3072)"
    assert format_shape((2,)) == "(2,)"
    assert format_shape(((2, 3), None)) == "[(2, 3), -]"
    assert format_shape({"hidden_states": (1, 4), "temb": (1,)}) == "hidden_states=(1, 4), temb=(1,)"
    assert format_bytes(60_669_345_792) == "56.5 GiB"
    assert format_bytes(315_986_176) == "301.3 MiB"
    assert format_bytes(12) == "12 B" and format_bytes(None) == "-"


# ---------------------------------------------------------------------------------------------------------------
# Meta forwards of the published models


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.slow
@pytest.mark.diffusers_versions
def test_trace_5b_i2v_at_49x480x720():
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    model = load_transformer("cogvideox-5b-i2v")
    result = trace_shapes(model, frames=49, height=480, width=720, batch=2)
    assert len(result.attention) == 42
    assert {(call.query, call.key, call.value) for call in result.attention} == {((2, 48, 17776, 64),) * 3}
    assert [call.module for call in result.attention] == [f"transformer_blocks.{i}.attn1" for i in range(42)]
    assert result.sequence.sequence_length == 17776 and result.sequence.tokens_per_frame == 1350
    assert result.output == (2, 13, 16, 60, 90)
    assert result.inputs["hidden_states"] == (2, 13, 32, 60, 90)  # noise and image latents on channels
    assert result.inputs["image_rotary_emb"] == ((17550, 64), (17550, 64))
    block = result.modules["transformer_blocks.0"]
    assert block.inputs["hidden_states"] == (2, 17550, 3072)
    assert block.inputs["encoder_hidden_states"] == (2, 226, 3072)
    assert block.outputs == ((2, 17550, 3072), (2, 226, 3072))
    assert result.modules["patch_embed"].outputs == (2, 17776, 3072)
    assert result.modules[""].outputs == ((2, 13, 16, 60, 90),)  # called with return_dict=False
    # inspection has no side effects: no hooks left, nothing materialised
    assert _hook_count(model) == 0
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.slow
@pytest.mark.diffusers_versions
@pytest.mark.parametrize("spec", ["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def test_trace_1_5_at_81x768x1360(spec):
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    result = trace_shapes(load_transformer(spec), frames=81, height=768, width=1360, batch=2)
    assert len(result.attention) == 42
    assert {(call.query, call.key, call.value) for call in result.attention} == {((2, 48, 45106, 64),) * 3}
    assert result.sequence.frames == 11 and result.sequence.video_tokens == 44880
    assert result.output == (2, 22, 16, 96, 170)
    if spec.endswith("i2v"):
        assert result.inputs["ofs"] == (1,)  # the pipeline's `latents.new_full((1,), 2.0)`
        assert "ofs_embedding" in result.modules
    else:
        assert "ofs" not in result.inputs


@pytest.mark.slow
def test_trace_2b_at_another_size_recomputes_sincos_positions():
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    result = trace_shapes(load_transformer("cogvideox-2b"), frames=33, height=320, width=512, batch=1)
    assert len(result.attention) == 30
    assert result.attention[0].query == (1, 30, 226 + 9 * 20 * 32, 64)
    assert "image_rotary_emb" not in result.inputs


def test_trace_refuses_a_size_before_running():
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    model = load_transformer("cogvideox-5b-i2v")
    with pytest.raises(VideoSizeError):
        trace_shapes(model, frames=49, height=512, width=720)
    with pytest.raises(VideoSizeError, match="batch"):
        trace_shapes(model, frames=49, height=480, width=720, batch=0)
    assert _hook_count(model) == 0


# ---------------------------------------------------------------------------------------------------------------
# Tiny CPU models: traced through a meta twin, left untouched


def test_tiny_model_is_traced_without_compute_or_change(tiny_model):
    import torch

    from cogsurgeon.inspector.trace import trace_shapes

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    calls_seen: list[str] = []

    class RecordingProcessor:
        """A user's processor: the trace must run it (a patched model traces as patched), on meta."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            calls_seen.append(hidden_states.device.type)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                              image_rotary_emb=image_rotary_emb)

    for block in tiny_model.transformer_blocks:
        block.attn1.set_processor(RecordingProcessor(block.attn1.processor))
    result = trace_shapes(tiny_model, frames=9, height=64, width=64, batch=2)
    config = tiny_config("tiny")
    assert calls_seen == ["meta"] * config["num_layers"]
    assert result.sequence.sequence_length == 8 + 3 * 16
    assert result.attention[0].query == (2, 2, 56, 16)
    assert result.dtype == "float32"
    assert _hook_count(tiny_model) == 0
    for name, parameter in tiny_model.named_parameters():
        assert parameter.device.type == "cpu"
        assert torch.equal(parameter, before[name])


@pytest.mark.parametrize("patch_name", ["causal-attention", "frame-causal-attention"])
def test_patched_tiny_model_traces_as_patched(tiny_model, patch_name):
    from cogsurgeon import patches

    from cogsurgeon.inspector.trace import trace_shapes

    patches.apply(tiny_model, patch_name)
    result = trace_shapes(tiny_model, frames=9, height=64, width=64, batch=2)
    assert patches.applied(tiny_model) == [patch_name]
    if patch_name == "causal-attention":
        assert [call.is_causal for call in result.attention] == [True, True]
    else:  # frame by frame: text, then each of the 3 latent frames over its key prefix, in both blocks
        assert len(result.attention) > 2
        assert {call.module for call in result.attention} == {f"transformer_blocks.{i}.attn1" for i in range(2)}


def test_tiny_1_5_pads_to_whole_temporal_patches():
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    result = trace_shapes(load_transformer("tiny-1.5"), frames=9, height=64, width=64, batch=1)
    assert (result.geometry.latent_frames, result.geometry.padding_frames, result.sequence.frames) == (4, 1, 2)
    assert len(result.attention) == 3


# ---------------------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_trace_json(cli):
    completed = cli("trace", "cogvideox-5b-i2v", "--frames", "49", "--height", "480", "--width", "720",
                    "--batch", "2", "--json")
    assert completed.returncode == 0, completed.stderr
    payload = json.loads(completed.stdout)
    assert len(payload["attention"]) == 42
    first = payload["attention"][0]
    assert first["module"] == "transformer_blocks.0.attn1"
    assert first["query"] == first["key"] == first["value"] == [2, 48, 17776, 64]
    assert payload["sequence"] == {"text_tokens": 226, "video_tokens": 17550, "frames": 13,
                                   "tokens_per_frame": 1350, "total": 17776}
    rows = {row["name"]: row for row in payload["modules"]}
    assert rows["transformer_blocks.0.attn1.to_q"]["outputs"] == [2, 17776, 3072]
    assert {entry["patch"] for entry in payload["mask_memory"]} >= {"causal-attention", "frame-causal-attention"}


def test_cli_trace_table_for_people(cli):
    completed = cli("trace", "tiny", "--frames", "9", "--height", "64", "--width", "64")
    assert completed.returncode == 0, completed.stderr
    assert "56 tokens = 8 text + 48 video (3 frames × 16 tokens)" in completed.stdout
    assert "2 attention calls" in completed.stdout
    assert "transformer_blocks.0.attn1" in completed.stdout


@pytest.mark.parametrize("args", [
    ("cogvideox-5b-i2v", "--height", "768", "--width", "1360"),
    ("cogvideox-5b", "--height", "500"),
    ("cogvideox-5b", "--frames", "0"),
])
def test_cli_trace_bad_size_is_one_line_exit_2(cli, args):
    completed = cli("trace", *args)
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "Traceback" not in completed.stderr


def test_cli_modules_stay_light():
    code = ("import sys, cogsurgeon.inspector.cli, cogsurgeon.inspector.trace, cogsurgeon.inspector.doctor, "
            "cogsurgeon.inspector.geometry; "
            "print(sorted(m for m in ('torch', 'diffusers', 'peft', 'textual') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"
