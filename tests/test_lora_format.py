"""The pure parts of the LoRA tools: key names, format detection, ranks and rank_pattern, alpha resolution, SAT
key splitting, and the safetensors writer (read back by the real safetensors library)."""

from __future__ import annotations

import json
import struct

import pytest

from cogsurgeon.tools.lora.keys import (
    detect_format,
    module_ranks,
    parse_lora_key,
    rank_and_pattern,
    resolve_alpha,
    short_target,
)
from cogsurgeon.tools.lora.safetensors_io import (
    OutputTensor,
    SafetensorsFormatError,
    byte_runs,
    encode_header,
    read_header,
    write_safetensors,
)


@pytest.mark.parametrize(
    ("key", "module", "part", "adapter"),
    [
        ("transformer.transformer_blocks.3.attn1.to_q.lora_A.weight", "transformer_blocks.3.attn1.to_q", "A", None),
        ("transformer_blocks.3.attn1.to_out.0.lora_B.weight", "transformer_blocks.3.attn1.to_out.0", "B", None),
        ("base_model.model.transformer_blocks.0.attn1.to_k.lora_B.weight", "transformer_blocks.0.attn1.to_k", "B", None),
        ("transformer_blocks.0.attn1.to_v.lora_A.default.weight", "transformer_blocks.0.attn1.to_v", "A", "default"),
    ],
)
def test_parse_lora_key(key, module, part, adapter):
    parsed = parse_lora_key(key)
    assert (parsed.module, parsed.part, parsed.adapter) == (module, part, adapter)


@pytest.mark.parametrize("key", ["transformer_blocks.0.attn1.to_q.weight", "x.lora_magnitude_vector.default.weight",
                                 "transformer_blocks.0.attn1.to_q.lora_B.bias"])
def test_non_lora_keys_are_not_parsed(key):
    assert parse_lora_key(key) is None


def test_detect_format():
    base = dict(file_name="pytorch_lora_weights.safetensors", adapters={None}, has_metadata=False, accelerate_state=False)
    assert detect_format(**{**base, "prefixes": {"transformer."}, "accelerate_state": True}) == "cogvideo-finetune"
    assert detect_format(**{**base, "prefixes": {"transformer."}}) == "diffusers-script"
    assert detect_format(**{**base, "prefixes": {"transformer."}, "has_metadata": True}) == "diffusers-metadata"
    assert detect_format(**{**base, "prefixes": {""}, "file_name": "adapter_model.safetensors"}) == "cogkit"
    assert detect_format(**{**base, "prefixes": {"base_model.model."}}) == "peft"
    assert detect_format(**{**base, "prefixes": {""}, "adapters": {"default"}}) == "peft-adapter-name"


def test_module_ranks_find_missing_halves_and_clashes():
    ranks, problems = module_ranks(
        {"q": (4, 32), "k": (4, 32), "v": (2, 32), "o": (4, 32)},
        {"q": (32, 4), "v": (32, 2), "o": (32, 3), "x": (32, 4)},
    )
    assert ranks == {"q": 4, "v": 2}
    assert problems == [
        "k: lora_A without lora_B",
        "o: rank clash, lora_A has 4 rows but lora_B has 3 columns",
        "x: lora_B without lora_A",
    ]


def test_rank_pattern_holds_the_modules_off_the_common_rank():
    assert rank_and_pattern({"a.to_q": 8, "a.to_k": 8, "a.to_v": 4}) == (8, {"a.to_v": 4})
    assert rank_and_pattern({"a": 4, "b": 8}) == (8, {"a": 4})  # a tie goes to the larger rank
    assert rank_and_pattern({}) == (None, {})


def test_alpha_resolution_order():
    common = dict(metadata_alpha_pattern=None, config_alpha_pattern=None, config_file="adapter_config.json",
                  format_name="cogvideo-finetune", rank=128)
    everything = dict(common, flag=32.0, metadata_alpha=16.0, config_alpha=8.0)
    assert resolve_alpha(**everything).source == "flag" and resolve_alpha(**everything).lora_alpha == 32
    assert resolve_alpha(**dict(everything, flag=None)).source == "metadata"
    assert resolve_alpha(**dict(everything, flag=None, metadata_alpha=None)).lora_alpha == 8
    default = resolve_alpha(**dict(common, flag=None, metadata_alpha=None, config_alpha=None))
    assert (default.source, default.lora_alpha) == ("default", 64)
    sat = resolve_alpha(**dict(common, flag=None, metadata_alpha=None, config_alpha=None, format_name="sat"))
    assert sat.lora_alpha == 1
    metadata_format = resolve_alpha(**dict(common, flag=None, metadata_alpha=None, config_alpha=None,
                                           format_name="diffusers-metadata"))
    assert metadata_format.lora_alpha == 128  # alpha = rank, what diffusers assumes


def test_short_target():
    assert short_target("transformer_blocks.4.attn1.to_out.0") == "to_out.0"
    assert short_target("transformer_blocks.4.attn1.to_q") == "to_q"


def test_sat_keys_split_the_fused_qkv():
    from cogsurgeon.tools.lora.sat import sat_module_name

    prefix = "model.diffusion_model.transformer.layers.7.attention."
    assert sat_module_name(prefix + "query_key_value.matrix_A.0") == ("transformer_blocks.7.attn1.to_q", "A")
    assert sat_module_name(prefix + "query_key_value.matrix_B.1") == ("transformer_blocks.7.attn1.to_k", "B")
    assert sat_module_name(prefix + "query_key_value.matrix_A.2") == ("transformer_blocks.7.attn1.to_v", "A")
    assert sat_module_name(prefix + "dense.matrix_B.0") == ("transformer_blocks.7.attn1.to_out.0", "B")
    assert sat_module_name(prefix + "dense.matrix_B.1") is None
    assert sat_module_name(prefix + "dense.weight") is None


def test_written_file_reads_back_with_safetensors(tmp_path):
    """Our writer copies byte ranges out of a source file under new names; the real library must read the result."""
    import torch
    from safetensors.torch import load_file, save_file

    source_tensors = {"a": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
                      "c": torch.randn(4)}
    save_file(source_tensors, str(tmp_path / "source.safetensors"))
    header = read_header(tmp_path / "source.safetensors")
    outputs = [OutputTensor(f"renamed.{e.name}", e.dtype, e.shape, e.nbytes, source_start=e.start) for e in header.tensors]
    with (tmp_path / "source.safetensors").open("rb") as source:
        write_safetensors(tmp_path / "out.safetensors", outputs, {"format": "pt", "note": "x"}, source=source)
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert set(loaded) == {"renamed.a", "renamed.b", "renamed.c"}
    for name, tensor in source_tensors.items():
        assert torch.equal(loaded[f"renamed.{name}"], tensor)
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt", "note": "x"}


def test_adjacent_ranges_copy_as_one_run():
    tensors = [OutputTensor("a", "F32", (2,), 8, source_start=100), OutputTensor("b", "F32", (2,), 8, source_start=108),
               OutputTensor("c", "F32", (1,), 4, source_start=200)]
    assert byte_runs(tensors) == [(100, 16), (200, 4)]


def test_header_is_padded_to_eight_bytes():
    encoded = encode_header([OutputTensor("abc", "F32", (1,), 4, source_start=0)], {})
    (length,) = struct.unpack("<Q", encoded[:8])
    assert length % 8 == 0 and len(encoded) == 8 + length
    assert json.loads(encoded[8:])["abc"]["data_offsets"] == [0, 4]


def test_overlapping_offsets_are_rejected(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(SafetensorsFormatError, match="overlap or gap"):
        read_header(path)
