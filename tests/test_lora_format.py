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
        # diffusers' old spelling (convert_state_dict_to_diffusers) and LyCORIS LoCon
        ("transformer.transformer_blocks.1.attn1.to_k.lora.down.weight", "transformer_blocks.1.attn1.to_k", "A", None),
        ("transformer_blocks.1.attn1.to_out.0.lora.up.weight", "transformer_blocks.1.attn1.to_out.0", "B", None),
        ("lycoris_transformer_blocks_2_ff_net_0_proj.lora_down.weight", "transformer_blocks.2.ff.net.0.proj", "A", None),
        ("lycoris_transformer_blocks_2_attn1_to_out_0.lora_up.weight", "transformer_blocks.2.attn1.to_out.0", "B", None),
        ("lycoris_norm_out_linear.alpha", "norm_out.linear", "alpha", None),
        # PEFT lora_bias=True and DoRA, as saved and in a model's raw state_dict
        ("transformer_blocks.0.attn1.to_q.lora_B.bias", "transformer_blocks.0.attn1.to_q", "bias", None),
        ("transformer_blocks.0.attn1.to_q.lora_B.default.bias", "transformer_blocks.0.attn1.to_q", "bias", "default"),
        ("transformer_blocks.0.attn1.to_q.lora_magnitude_vector", "transformer_blocks.0.attn1.to_q", "magnitude", None),
        ("x.to_q.lora_magnitude_vector.default.weight", "x.to_q", "magnitude", "default"),
    ],
)
def test_parse_lora_key(key, module, part, adapter):
    parsed = parse_lora_key(key)
    assert (parsed.module, parsed.part, parsed.adapter) == (module, part, adapter)


@pytest.mark.parametrize("key", ["transformer_blocks.0.attn1.to_q.weight", "x.dora_scale",
                                 "transformer_blocks.0.attn1.to_q.lora_A.bias"])
def test_non_lora_keys_are_not_parsed(key):
    assert parse_lora_key(key) is None


def test_lycoris_lokr_and_loha_keys_are_named_not_lora():
    from cogsurgeon.tools.lora.keys import not_lora_algorithm

    assert not_lora_algorithm("lycoris_transformer_blocks_0_attn1_to_q.lokr_w1").startswith("LoKr")
    assert not_lora_algorithm("lycoris_transformer_blocks_0_attn1_to_q.lokr_w2_b").startswith("LoKr")
    assert not_lora_algorithm("lycoris_transformer_blocks_0_attn1_to_q.hada_w1_a").startswith("LoHa")
    assert not_lora_algorithm("lycoris_transformer_blocks_0_attn1_to_q.lora_down.weight") is None
    assert parse_lora_key("lycoris_transformer_blocks_0_attn1_to_q.lokr_w1") is None


def test_detect_format_names_the_trainer_table_rows():
    base = dict(file_name="pytorch_lora_weights.safetensors", adapters={None}, accelerate_state=False)
    transformer = {**base, "prefixes": {"transformer."}}
    assert detect_format(**transformer, metadata_keys={"format"}) == "diffusers-lora"
    assert detect_format(**{**transformer, "accelerate_state": True}) == "diffusers-checkpoint"
    assert detect_format(**transformer, metadata_keys={"format", "lora_adapter_metadata"}) == "diffusers-metadata"
    assert detect_format(**transformer, metadata_keys={"format", "lora_config"}) == "finetrainers"
    unprefixed = {**base, "prefixes": {""}}
    assert detect_format(**{**unprefixed, "file_name": "adapter_model.safetensors"}, folder_name="checkpoint-500") == "cogkit"
    # the name alone is not CogKit's layout: anyone can save an unprefixed adapter_model.safetensors
    assert detect_format(**{**unprefixed, "file_name": "adapter_model.safetensors"}, folder_name="my-lora") == "peft-unprefixed"
    # the same name with PEFT's config beside is a PEFT folder saved without the prefix, not CogKit
    assert detect_format(**{**unprefixed, "file_name": "adapter_model.safetensors"}, folder_name="checkpoint-500",
                         peft_config_beside=True) == "peft-unprefixed"
    assert detect_format(**{**unprefixed, "file_name": "checkpoint-500.safetensors"}) == "videox-fun"
    assert detect_format(**{**unprefixed, "file_name": "my_lora.safetensors"}) == "peft-unprefixed"
    assert detect_format(**{**base, "prefixes": {"lora_unet_"}}) == "kohya"
    assert detect_format(**{**base, "prefixes": {"base_model.model."}}) == "peft"
    assert detect_format(**{**unprefixed, "adapters": {"default"}}) == "peft-adapter-name"
    assert detect_format(**{**unprefixed, "adapters": {"default"}, "file_name": "model.safetensors"},
                         folder_name="finetrainers_step_100") == "finetrainers-state"


def test_kohya_keys_map_back_to_cogvideox_modules():
    from cogsurgeon.tools.lora.keys import kohya_key

    parsed = parse_lora_key("lora_unet__transformer_blocks_11_attn1_to_out_0.lora_up.weight")
    assert (parsed.module, parsed.part, parsed.style) == ("transformer_blocks.11.attn1.to_out.0", "B", "kohya")
    assert parse_lora_key("lora_unet_transformer_blocks_0_ff_net_0_proj.alpha").module == "transformer_blocks.0.ff.net.0.proj"
    assert parse_lora_key("lora_unet__time_embedding_linear_1.lora_down.weight").module == "time_embedding.linear_1"
    assert parse_lora_key("lora_unet__not_a_cogvideox_layer.lora_down.weight") is None
    assert kohya_key("transformer_blocks.3.attn1.to_out.0", "alpha") == "lora_unet__transformer_blocks_3_attn1_to_out_0.alpha"
    for module in ("transformer_blocks.7.norm1.linear", "proj_out", "patch_embed.text_proj"):
        assert parse_lora_key(kohya_key(module, "A")).module == module


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
                  format_name="cogkit", rank=128)
    everything = dict(common, flag=32.0, metadata_alpha=16.0, config_alpha=8.0)
    # --alpha sets only what is not stored: a contradiction is handed back to be refused, an override replaces
    # lora_alpha and keeps the stored per-module alphas, an equal flag changes nothing
    refused = resolve_alpha(**dict(everything, metadata_alpha_pattern={"to_v": 2.0}))
    assert (refused.lora_alpha, refused.source, refused.refused_flag, refused.alpha_pattern) == (16, "metadata", 32, {"to_v": 2.0})
    overridden = resolve_alpha(**dict(everything, metadata_alpha_pattern={"to_v": 2.0}), override_stored=True)
    assert (overridden.lora_alpha, overridden.source, overridden.alpha_pattern) == (32, "flag", {"to_v": 2.0})
    assert overridden.stored_alpha == 16 and overridden.refused_flag is None
    agreed = resolve_alpha(**dict(everything, flag=16, metadata_alpha_pattern={"to_v": 2.0}))
    assert (agreed.source, agreed.alpha_pattern, agreed.refused_flag) == ("metadata", {"to_v": 2.0}, None)
    flag_only = resolve_alpha(**dict(everything, metadata_alpha=None, config_alpha=None))
    assert (flag_only.lora_alpha, flag_only.source) == (32, "flag")
    assert resolve_alpha(**dict(everything, flag=None)).source == "metadata"
    assert resolve_alpha(**dict(everything, flag=None, metadata_alpha=None)).lora_alpha == 8
    default = resolve_alpha(**dict(common, flag=None, metadata_alpha=None, config_alpha=None))
    assert (default.source, default.lora_alpha) == ("default", 64)  # CogKit alone writes this layout
    sat = resolve_alpha(**dict(common, flag=None, metadata_alpha=None, config_alpha=None, format_name="sat"))
    assert sat.lora_alpha == 1


def test_several_trainers_give_candidates_not_a_guess():
    nothing = dict(flag=None, metadata_alpha=None, metadata_alpha_pattern=None, config_alpha=None,
                   config_alpha_pattern=None, config_file=None, rank=16)
    checkpoint = resolve_alpha(**nothing, format_name="diffusers-checkpoint")
    assert (checkpoint.lora_alpha, checkpoint.source) == (None, None)
    assert [(c.alpha, c.trainer) for c in checkpoint.candidates] == [
        (64, "cogvideo-finetune"), (128, "diffusers-scripts"), (64, "cogvideox-factory")]
    bare = resolve_alpha(**nothing, format_name="diffusers-lora")
    assert {c.trainer: c.alpha for c in bare.candidates}["sat-export"] == 1
    kohya = resolve_alpha(**nothing, format_name="kohya")
    assert {c.trainer: c.alpha for c in kohya.candidates}["alpha-equals-rank"] == 16
    settled = resolve_alpha(**nothing, format_name="diffusers-checkpoint", trainer="diffusers-scripts")
    assert (settled.lora_alpha, settled.source) == (128, "trainer")
    for candidate in checkpoint.candidates + bare.candidates:
        assert candidate.source  # each says which trainer and where its default is written


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


@pytest.mark.parametrize("dtype,name", [("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_kohya_alpha_reads_in_every_float_dtype(dtype, name):
    """VideoX-Fun's save_weights casts the .alpha buffers to the weight dtype (bf16 in practice)."""
    import torch

    from cogsurgeon.tools.lora.checkpoint import LoraTensor, scalar_value

    value = torch.tensor(32.0, dtype=getattr(torch, dtype))
    data = value.reshape(1).view(torch.uint8).numpy().tobytes()
    assert scalar_value(LoraTensor("m", "alpha", name, (), len(data)), data) == 32.0


def test_whose_torch_dcp_a_folder_is():
    from cogsurgeon.tools.lora.keys import dcp_format

    lora = ["transformer_blocks.0.attn1.to_q.lora_A.default.weight",
            "transformer_blocks.0.attn1.to_q.lora_B.default.weight"]
    whole = [*lora, "transformer_blocks.0.attn1.to_q.base_layer.weight", "proj_out.weight"]
    assert dcp_format("finetrainers_step_30", lora) == "finetrainers-ptd"  # finetrainers' own checkpoint prefix
    assert dcp_format("checkpoint-30", whole) == "finetrainers-ptd"  # a whole PEFT-injected model, renamed
    assert dcp_format("checkpoint-30", [key.replace(".default", "") for key in lora]) == "cogkit-dcp"
