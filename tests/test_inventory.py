"""The module inventory on the real 5B-I2V architecture (meta) and on tiny models."""

import inspect

import pytest
import torch

from cogsurgeon.inspector import load_transformer, module_inventory
from cogsurgeon.inspector.inventory import filter_inventory, source_location

# Loading and reading models goes through diffusers internals that change between releases.
pytestmark = pytest.mark.diffusers_versions


def test_cogvideox_5b_i2v_lists_all_1067_modules_with_file_and_line():
    infos = module_inventory(load_transformer("cogvideox-5b-i2v"))
    assert len(infos) == 1067
    assert all(info.file and info.line for info in infos)
    assert infos[0].name == "" and infos[0].params == 5_570_479_680

    attn = next(info for info in infos if info.name == "transformer_blocks.0.attn1")
    assert attn.class_name == "Attention"
    assert attn.file.endswith("attention_processor.py")
    assert attn.processor == "CogVideoXAttnProcessor2_0"
    assert attn.params == 4 * (3072 * 3072 + 3072) + 2 * 2 * 64  # q, k, v, out + the two qk LayerNorms


def test_source_lines_match_inspect():
    model = load_transformer("cogvideox-5b-i2v")
    for cls in {type(module) for module in model.modules()}:
        expected = inspect.getsourcelines(cls)[1]
        assert source_location(cls).line == expected, cls


def test_reading_never_moves_casts_or_materialises(tiny_model):
    before = {name: (p.data_ptr(), p.dtype, p.device) for name, p in tiny_model.named_parameters()}
    module_inventory(tiny_model)
    after = {name: (p.data_ptr(), p.dtype, p.device) for name, p in tiny_model.named_parameters()}
    assert before == after


def test_totals_add_up_and_mixed_dtypes_are_reported(tiny_model):
    tiny_model.proj_out.to(torch.bfloat16)
    infos = {info.name: info for info in module_inventory(tiny_model)}
    assert infos[""].params == sum(p.numel() for p in tiny_model.parameters())
    assert infos[""].dtype == "bfloat16+float32"
    assert infos["proj_out"].dtype == "bfloat16"
    assert infos["transformer_blocks"].params == sum(infos[f"transformer_blocks.{i}"].params for i in range(2))


def test_filter_matches_name_class_and_file(tiny_model):
    infos = module_inventory(tiny_model)
    assert {info.name for info in filter_inventory(infos, "attn1")} >= {"transformer_blocks.0.attn1"}
    assert all(info.class_name == "CogVideoXBlock" for info in filter_inventory(infos, "cogvideoxblock"))
    by_file = filter_inventory(infos, "attention_processor.py")
    assert by_file and all(info.file.endswith("attention_processor.py") for info in by_file)


def test_cached_inventory_equals_a_fresh_one_and_goes_stale_when_a_source_file_changes(tmp_path, monkeypatch):
    from cogsurgeon.inspector import inventory_cache
    from cogsurgeon.inspector.inventory import inventory_for_spec

    monkeypatch.setenv("COGSURGEON_CACHE_DIR", str(tmp_path / "cache"))
    fresh = inventory_for_spec("cogvideox-2b", use_cache=False)
    assert inventory_cache.load_cached_inventory("cogvideox-2b") is None
    assert inventory_for_spec("cogvideox-2b") == fresh  # built, then stored
    assert inventory_cache.load_cached_inventory("cogvideox-2b") == fresh

    edited = tmp_path / "edited_attention_processor.py"
    edited.write_text("class Attention: ...\n")
    pointing_at_edited = [info.__class__(**{**info.__dict__, "file": str(edited)}) for info in fresh]
    inventory_cache.store_inventory("cogvideox-2b", None, pointing_at_edited)
    assert inventory_cache.load_cached_inventory("cogvideox-2b") == pointing_at_edited
    edited.write_text("class Attention:  # edited in site-packages\n    ...\n")
    assert inventory_cache.load_cached_inventory("cogvideox-2b") is None
