"""Bad LoRA inputs through the real CLI: exit 2, one line on stderr, no traceback, the input byte-identical and no
output (nor a staging folder) left behind."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_helpers import tree_digest


def lora_pair(rank: int = 4, features: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, features), torch.randn(features, rank)


def valid_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    a, b = lora_pair()
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": b},
              str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def truncated(tmp: Path) -> Path:
    path = valid_checkpoint(tmp / "ckpt") / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def broken_header(tmp: Path) -> Path:
    path = valid_checkpoint(tmp / "ckpt") / "pytorch_lora_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))
    return path.parent


def header_length_beyond_file(tmp: Path) -> Path:
    path = tmp / "lora.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    return path


def a_without_b(tmp: Path) -> Path:
    (tmp / "ckpt").mkdir()
    a, b = lora_pair()
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
               "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": a.clone()},
              str(tmp / "ckpt" / "pytorch_lora_weights.safetensors"))
    return tmp / "ckpt"


def rank_clash(tmp: Path) -> Path:
    (tmp / "ckpt").mkdir()
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 3)},
              str(tmp / "ckpt" / "adapter_model.safetensors"))
    return tmp / "ckpt"


def dora(tmp: Path) -> Path:
    """kohya/ComfyUI-style DoRA (`dora_scale`); PEFT's lora_magnitude_vector is repaired (test_lora_dora_bias.py)."""
    (tmp / "ckpt").mkdir()
    a, b = lora_pair()
    name = "lora_unet__transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.dora_scale": torch.ones(1, 32)},
              str(tmp / "ckpt" / "adapter_model.safetensors"))
    return tmp / "ckpt"


def lora_mixed_with_model_weights(tmp: Path) -> Path:
    (tmp / "ckpt").mkdir()
    a, b = lora_pair()
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": a, "transformer_blocks.0.attn1.to_q.lora_B.weight": b,
               "transformer_blocks.0.attn1.to_q.weight": torch.randn(32, 32)},
              str(tmp / "ckpt" / "adapter_model.safetensors"))
    return tmp / "ckpt"


def empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def no_lora(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.randn(32, 32)}, str(path))
    return path


def a_pickle(tmp: Path) -> Path:
    path = tmp / "pytorch_lora_weights.bin"
    torch.save({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32)}, path)
    return path


def a_plain_pickle(tmp: Path) -> Path:
    path = tmp / "lora.pkl"
    path.write_bytes(pickle.dumps({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": [1.0, 2.0]}))
    return path


def a_pickle_named_safetensors(tmp: Path) -> Path:
    path = tmp / "pytorch_lora_weights.safetensors"
    path.write_bytes(pickle.dumps({"lora": [1, 2, 3]}))
    return path


class NotATensor:  # what weights_only=True must refuse to rebuild
    pass


def sat_with_objects(tmp: Path) -> Path:
    folder = tmp / "sat" / "100"
    folder.mkdir(parents=True)
    a, _ = lora_pair()
    torch.save({"module": {"layers.0.attention.dense.matrix_A.0": a}, "args": NotATensor()},
               folder / "mp_rank_00_model_states.pt")
    return tmp / "sat"


def nonexistent(tmp: Path) -> Path:
    return tmp / "no-such-checkpoint"


BAD_INPUTS = {
    "truncated": (truncated, "truncated"),
    "broken-header": (broken_header, "broken safetensors header"),
    "header-length-beyond-file": (header_length_beyond_file, "header"),
    "a-without-b": (a_without_b, "lora_A without lora_B"),
    "rank-clash": (rank_clash, "rank clash"),
    "dora": (dora, "kohya-style DoRA scales"),
    "non-lora-keys": (lora_mixed_with_model_weights, "not LoRA weights"),
    "empty-folder": (empty_folder, "holds no LoRA checkpoint"),
    "no-lora": (no_lora, "holds no LoRA weights"),
    "pickle": (a_pickle, "lora_A without lora_B"),  # read with weights_only=True, then refused for what it holds
    "plain-pickle": (a_plain_pickle, "never unpickles"),
    "pickle-named-safetensors": (a_pickle_named_safetensors, "safetensors"),
    "sat-with-objects": (sat_with_objects, "weights_only"),
    "nonexistent": (nonexistent, "does not exist"),
}


def assert_one_line_error(result, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("cogsurgeon: error:")
    assert expected in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_repair_refuses_bad_input(name, tmp_path, cli):
    make, expected = BAD_INPUTS[name]
    source = tmp_path / "input"
    source.mkdir()
    checkpoint = make(source)
    before = tree_digest(source)
    out = tmp_path / "out"
    result = cli("lora", "repair", str(checkpoint), "--out", str(out))
    assert_one_line_error(result, expected)
    assert tree_digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]  # no output, no staging folder


@pytest.mark.parametrize("name", ["truncated", "broken-header", "empty-folder", "no-lora", "plain-pickle", "nonexistent"])
def test_inspect_refuses_what_is_not_a_lora_checkpoint(name, tmp_path, cli):
    make, expected = BAD_INPUTS[name]
    checkpoint = make(tmp_path)
    result = cli("lora", "inspect", str(checkpoint), "--json")
    assert_one_line_error(result, expected)


def test_inspect_lists_problems_of_a_damaged_lora(tmp_path, cli):
    import json

    result = cli("lora", "inspect", str(rank_clash(tmp_path)), "--json")
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems == ["transformer_blocks.0.attn1.to_q: rank clash, lora_A has 4 rows but lora_B has 3 columns"]


def test_existing_output_is_refused_and_kept(tmp_path, cli):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before_input, before_output = tree_digest(checkpoint), tree_digest(out)
    result = cli("lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "4")
    assert_one_line_error(result, "already exists")
    assert tree_digest(checkpoint) == before_input and tree_digest(out) == before_output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_output_over_the_input_is_refused_even_with_force(tmp_path, cli):
    checkpoint = valid_checkpoint(tmp_path / "run" / "checkpoint-1")
    before = tree_digest(tmp_path / "run")
    result = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "run"), "--force", "--alpha", "4")
    assert_one_line_error(result, "would replace the checkpoint")
    assert tree_digest(tmp_path / "run") == before


def test_verify_refuses_a_folder_that_is_no_adapter(tmp_path, cli):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    result = cli("lora", "verify", str(checkpoint), "--base", "tiny")
    assert_one_line_error(result, "not an adapter folder")


def test_rslora_config_beside_is_a_problem(tmp_path, cli):
    """A config that says use_rslora: its scale is alpha/sqrt(r), which a plain LoRA config would silently change."""
    import json

    checkpoint = tmp_path / "peft"
    checkpoint.mkdir()
    a, b = lora_pair()
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": a, "transformer_blocks.0.attn1.to_q.lora_B.weight": b},
              str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    inspected = cli("lora", "inspect", str(checkpoint), "--json")
    assert any("use_rslora" in problem for problem in json.loads(inspected.stdout)["problems"])
    repaired = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "out"))
    assert_one_line_error(repaired, "use_rslora")
    assert not (tmp_path / "out").exists()


def test_force_never_replaces_a_folder_holding_other_files(tmp_path, cli):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.txt").write_text("years of work")
    before = tree_digest(project)
    result = cli("lora", "repair", str(checkpoint), "--out", str(project), "--force", "--alpha", "4")
    assert_one_line_error(result, "not an earlier repair")
    assert tree_digest(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "project"]


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, cli):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    result = cli("lora", "repair", str(checkpoint), "--out", "/proc/cogsurgeon-adapter", "--alpha", "4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("alpha", ["inf", "nan", "0", "-1"])
def test_alpha_must_be_positive_and_finite(tmp_path, cli, alpha):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    for args in (["inspect", str(checkpoint)], ["repair", str(checkpoint), "--out", str(tmp_path / "out")]):
        result = cli("lora", *args, "--alpha", alpha)
        assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "positive finite" in result.stderr
    assert not (tmp_path / "out").exists()
