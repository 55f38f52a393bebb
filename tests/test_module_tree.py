"""The TUI's pure core: the folded module tree (the one fold and filter of the TUI's rows and the CLI's table),
the rows as drawn, the filter's narrowing, source lookups, display paths, counts."""

from __future__ import annotations

import pytest
import torch

from cogsurgeon.inspector.browse import format_count, model_title, open_model
from cogsurgeon.inspector.inventory import ModuleInfo, module_inventory
from cogsurgeon.inspector.module_tree import (
    build_module_tree,
    keys_to,
    listed_rows,
    narrow_inventory,
    opened_for_filter,
    path_to,
    visible_rows,
)
from cogsurgeon.inspector.source import class_source, display_path, processor_call_source

pytestmark = pytest.mark.diffusers_versions  # the tree and the sources read what each diffusers release builds


@pytest.fixture(scope="module")
def five_b_infos() -> list[ModuleInfo]:
    from cogsurgeon.inspector import load_transformer

    return module_inventory(load_transformer("cogvideox-5b-i2v"))


def _info(name: str, class_name: str = "Linear", params: int = 1) -> ModuleInfo:
    return ModuleInfo(name, class_name, "torch.nn", None, None, params, params, "float32", "cpu", None)


def test_the_42_blocks_of_5b_fold_into_the_module_list_row(five_b_infos):
    root = build_module_tree(five_b_infos)
    blocks = next(child for child in root.children if child.label == "transformer_blocks")
    assert blocks.fold is not None
    assert blocks.fold.describe() == "(0-41): 42 × CogVideoXBlock"
    assert [member.label for member in blocks.children] == [str(index) for index in range(42)]
    assert sum(1 for _ in root.walk()) == len(five_b_infos)  # folding hides nothing


def test_the_listing_folds_as_the_tree_does_and_filters_without_ancestors(tiny_model):
    """`listed_rows` (the CLI's `modules` table) is the tree's fold flattened: one member per run, named by the
    index range; a filter keeps only the matches, folded the same way."""
    rows = listed_rows(module_inventory(tiny_model))
    names = [row.display_name for row in rows]
    assert names[:2] == ["", "patch_embed"]
    assert "transformer_blocks.(0-1).attn1" in names
    assert not any(name.startswith("transformer_blocks.1") for name in names)
    assert {row.repeat for row in rows if row.display_name.startswith("transformer_blocks.(0-1)")} == {2}

    matched = listed_rows(module_inventory(tiny_model), "to_q")
    assert [(row.display_name, row.repeat) for row in matched] == [("transformer_blocks.(0-1).attn1.to_q", 2)]
    assert [row.display_name for row in listed_rows(module_inventory(tiny_model), "to_q", fold=False)] == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"]
    assert listed_rows(module_inventory(tiny_model), "no-such-module") == []

    tiny_model.transformer_blocks[1].attn1.to_q.to(torch.bfloat16)  # block 1 now differs: both listed
    names = [row.display_name for row in listed_rows(module_inventory(tiny_model))]
    assert "transformer_blocks.0.attn1" in names and "transformer_blocks.1.attn1" in names


def test_a_differing_member_breaks_the_run_into_groups():
    infos = [
        _info("", "Root", 0),
        _info("blocks", "ModuleList", 0),
        *[_info(f"blocks.{index}", "Block", 10) for index in range(3)],
        _info("blocks.3", "Block", 99),  # different parameters: must stay visible on its own
        *[_info(f"blocks.{index}", "Block", 10) for index in range(4, 6)],
    ]
    root = build_module_tree(infos)
    blocks = root.children[0]
    assert blocks.fold is None
    labels = [child.label for child in blocks.children]
    assert labels == ["(0-2)", "3", "(4-5)"]
    assert blocks.children[0].info is None and blocks.children[0].fold.repeat == 3
    assert blocks.children[1].info.params == 99


def test_blocks_with_different_inner_processors_do_not_fold():
    infos = [_info("", "Root", 0), _info("blocks", "ModuleList", 0)]
    for index, processor in enumerate(["A", "A", "B"]):
        infos.append(_info(f"blocks.{index}", "Block", 5))
        infos.append(ModuleInfo(f"blocks.{index}.attn", "Attention", "m", None, None, 5, 5, None, None, processor))
    labels = [child.label for child in build_module_tree(infos).children[0].children]
    assert labels == ["(0-1)", "2"]


def test_narrowing_keeps_matches_and_their_ancestors(five_b_infos):
    rows, matched = narrow_inventory(five_b_infos, "attn1")
    assert len(matched) == 42 * 9  # attn1 and its 8 submodules in each block
    names = {info.name for info in rows}
    assert {"", "transformer_blocks", "transformer_blocks.7", "transformer_blocks.7.attn1.to_q"} <= names
    assert "transformer_blocks.7.ff" not in names
    root = build_module_tree(rows)
    assert root.children[0].fold.describe() == "(0-41): 42 × CogVideoXBlock"


def test_narrowing_matches_class_and_file_case_insensitively(five_b_infos):
    _, by_class = narrow_inventory(five_b_infos, "cogvideoxpatchembed")
    assert by_class == {"patch_embed"}
    _, by_file = narrow_inventory(five_b_infos, "ATTENTION_PROCESSOR.PY")
    assert "transformer_blocks.0.attn1" in by_file
    assert narrow_inventory(five_b_infos, "  ") == (five_b_infos, set())
    assert narrow_inventory(five_b_infos, "no-such-module")[1] == set()


def test_the_listing_names_group_rows_by_their_range():
    infos = [
        _info("", "Root", 0),
        _info("blocks", "ModuleList", 0),
        *[_info(f"blocks.{index}", "Block", 10) for index in range(3)],
        _info("blocks.3", "Block", 99),
    ]
    assert [(row.display_name, row.repeat) for row in listed_rows(infos)] == [
        ("", 1), ("blocks", 1), ("blocks.(0-2)", 3), ("blocks.3", 1)]


def test_visible_rows_follow_the_open_rows_and_draw_the_guides(five_b_infos):
    root = build_module_tree(five_b_infos)
    closed = visible_rows(root, set())
    assert [row.key for row in closed] == [""] and not closed[0].expanded and closed[0].expandable
    top = visible_rows(root, {""})
    assert [row.key for row in top][:3] == ["", "/patch_embed", "/embedding_dropout"]
    assert len(top) == 1 + len(root.children) and top[-1].lasts == (True,) and top[1].lasts == (False,)
    blocks = next(row for row in top if row.key == "/transformer_blocks")
    assert blocks.node.fold.describe() == "(0-41): 42 × CogVideoXBlock" and not blocks.expanded

    opened = visible_rows(root, {"", "/transformer_blocks", "/transformer_blocks/41"})
    last_block = [row for row in opened if row.key.startswith("/transformer_blocks/41/")]
    assert [row.node.label for row in last_block][:2] == ["norm1", "attn1"]
    assert last_block[0].lasts == (False, True, False) and last_block[0].depth == 3
    assert keys_to(root, "transformer_blocks.3.attn1") == [
        "", "/transformer_blocks", "/transformer_blocks/3", "/transformer_blocks/3/attn1"]
    assert keys_to(root, "no.such") == []


def test_a_narrowed_tree_opens_every_row_but_a_run_only_through_its_first_member(five_b_infos):
    infos, _ = narrow_inventory(five_b_infos, "to_q")
    root = build_module_tree(infos)
    rows = visible_rows(root, opened_for_filter(root))
    assert [row.key for row in rows][:5] == [
        "", "/transformer_blocks", "/transformer_blocks/0", "/transformer_blocks/0/attn1",
        "/transformer_blocks/0/attn1/to_q"]
    assert rows[5].key == "/transformer_blocks/1" and not rows[5].expanded  # the run's other members: one row each
    assert len(rows) == 5 + 41
    assert rows[2].module.name == "transformer_blocks.0"


def test_path_to_reaches_into_a_folded_run(five_b_infos):
    root = build_module_tree(five_b_infos)
    path = path_to(root, "transformer_blocks.3.attn1.to_q")
    assert [node.label for node in path] == ["(root)", "transformer_blocks", "3", "attn1", "to_q"]
    assert path_to(root, "transformer_blocks.99") == []
    assert path_to(root, "") == [root]


def test_source_of_a_class_and_of_a_processor_call(tiny_model):
    infos = {info.name: info for info in module_inventory(tiny_model)}
    attn = infos["transformer_blocks.0.attn1"]
    source = processor_call_source(attn.processor_module, attn.processor)
    assert source.title == f"{attn.processor}.__call__"
    assert source.text.lstrip().startswith("def __call__")
    assert display_path(source.file) == "diffusers/models/attention_processor.py"
    block = class_source(infos["transformer_blocks.0"].class_module, "CogVideoXBlock")
    assert "\nclass CogVideoXBlock(" in "\n" + block.text  # decorators included, as inspect counts the line
    assert block.start_line == infos["transformer_blocks.0"].line
    assert class_source("no.such.module", "Nothing") is None


def test_display_path_is_machine_independent():
    from cogsurgeon import inspector

    assert display_path(inspector.__file__) == "inspector/__init__.py"
    assert display_path("/opt/x/lib/python3.11/site-packages/torch/nn/modules/linear.py") == "torch/nn/modules/linear.py"
    assert display_path(None) == "-"


def test_open_model_records_config_and_processors():
    loaded = open_model("tiny")
    assert loaded.title == "tiny"
    assert loaded.config["num_layers"] == 2 and "_class_name" not in loaded.config
    assert loaded.original_processors["transformer_blocks.1.attn1"].endswith("CogVideoXAttnProcessor2_0")
    assert loaded.changed_modules() == set()


def test_titles_and_counts(tmp_path):
    assert model_title("cogvideox-5b-i2v") == "cogvideox-5b-i2v (meta)"
    folder = tmp_path / "runs" / "my-model"
    folder.mkdir(parents=True)
    assert model_title(str(folder)) == "runs/my-model (folder)"
    assert [format_count(n) for n in (0, 128, 6_144, 37_761_280, 5_570_479_680)] == ["0", "128", "6.14K", "37.8M", "5.57B"]


def test_preview_comes_from_the_inventory_cache_without_a_model():
    from cogsurgeon.inspector.browse import preview_model
    from cogsurgeon.inspector.inventory_cache import load_cached_inventory

    # conftest points the cache at a fresh folder per session; opening stores the entry the preview reads
    opened = open_model("cogvideox-2b")
    assert load_cached_inventory("cogvideox-2b") == list(opened.infos)
    preview = preview_model("cogvideox-2b")
    assert preview.model is None and preview.infos == opened.infos
    assert preview.title == "cogvideox-2b (meta)" and preview.config["num_layers"] == 30
    assert preview_model("tiny") is None


def test_a_filtered_tree_folds_runs_as_modules_filter_does(five_b_infos):
    """`attn1` on the 5B model: the TUI showed 42 block rows (block 0 opened), `modules --filter` one folded run.
    Now both read `transformer_blocks (0-41): 42 × CogVideoXBlock` with block 0's matches once."""
    from cogsurgeon.inspector.module_tree import fold_for_filter, listed_rows, opened_for_filter

    infos = five_b_infos
    narrowed, matched = narrow_inventory(infos, "attn1")
    unfolded = build_module_tree(narrowed)
    root = fold_for_filter(unfolded)
    rows = visible_rows(root, opened_for_filter(root))
    assert len(visible_rows(unfolded, opened_for_filter(unfolded))) == 53  # what the TUI listed before
    assert [row.node.label for row in rows] == ["(root)", "transformer_blocks", "0", "attn1", "norm_q", "norm_k",
                                                 "to_q", "to_k", "to_v", "to_out", "0", "1"]
    assert rows[1].node.fold.describe() == "(0-41): 42 × CogVideoXBlock"
    assert len(listed_rows(infos, "attn1")) == len(rows) - 3  # the CLI lists the 9 matching modules; the tree adds root, run and block
    assert len(matched) == 378
