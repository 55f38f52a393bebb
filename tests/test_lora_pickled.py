"""A folder holding only `pytorch_lora_weights.bin` (issue 23, item 7): what diffusers' `save_lora_weights(...,
safe_serialization=False)` writes (diffusers 0.42.1 src/diffusers/loaders/lora_base.py:1032-1079, write_lora_layers:
`save_function = torch.save`, `weight_name = LORA_WEIGHT_NAME`). It is read with `torch.load(weights_only=True)` on
torch >= 2.10 only (tools/lora/torch_pickle.py says why), named in what inspect and repair say, and repaired at the
trained strength; a pickle that needs more than tensors is refused without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainers import assert_reproduces, pipeline_class, train, tree_digest

pytestmark = pytest.mark.diffusers_versions


def save_pickled(trained, folder: Path) -> Path:
    from peft import get_peft_model_state_dict

    pipeline_class(trained.base).save_lora_weights(
        str(folder), transformer_lora_layers=get_peft_model_state_dict(trained.model), safe_serialization=False)
    return folder


def test_a_folder_with_only_the_bin_file_is_repaired(tmp_path, cli):
    trained = train("tiny-i2v", 4, 6, seed=41)
    folder = save_pickled(trained, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_lora_weights.bin"]
    before = tree_digest(folder)

    inspected = cli("lora", "inspect", str(folder))
    assert inspected.returncode == 0, inspected.stderr
    assert f"file          {folder / 'pytorch_lora_weights.bin'}" in inspected.stdout
    assert "pytorch_lora_weights.bin is a torch pickle, read with torch.load(weights_only=True)" in inspected.stderr
    assert "format        diffusers-lora" in inspected.stdout and "UNKNOWN" in inspected.stdout

    out = tmp_path / "adapter"
    repaired = cli("lora", "repair", str(folder), "--out", str(out), "--alpha", "6", "--to", "peft,diffusers,comfyui")
    assert repaired.returncode == 0, repaired.stderr
    assert tree_digest(folder) == before
    assert_reproduces("tiny-i2v", out, trained.output)
    verified = cli("lora", "verify", str(out), "--base", "tiny-i2v", "--json")  # the source is read back too
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["source_check"]["compared"] is True


class WritesAFile:
    """A pickle that runs `open(marker, "w")` when unpickled: weights_only must refuse it before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, cli):
    folder = tmp_path / "run"
    folder.mkdir()
    marker = tmp_path / "ran"
    torch.save({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
                "payload": WritesAFile(marker)}, folder / "pytorch_lora_weights.bin")
    result = cli("lora", "repair", str(folder), "--out", str(tmp_path / "adapter"), "--alpha", "6")
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "pytorch_lora_weights.bin holds more than tensors" in line and "weights_only=True" in line
    assert not marker.exists() and not (tmp_path / "adapter").exists()


def test_plain_pickles_and_training_state_are_still_refused(tmp_path, cli):
    (tmp_path / "lora.pkl").write_bytes(b"\x80\x04N.")
    (tmp_path / "optimizer.bin").write_bytes(b"not read")
    plain = cli("lora", "inspect", str(tmp_path / "lora.pkl"))
    assert plain.returncode == 2 and "plain pickle" in plain.stderr and "never unpickles" in plain.stderr
    state = cli("lora", "inspect", str(tmp_path / "optimizer.bin"))
    assert state.returncode == 2 and "accelerate's training state" in state.stderr


def test_weights_only_is_trusted_from_torch_2_10():
    from cogsurgeon.tools.lora.torch_pickle import weights_only_is_safe

    assert [weights_only_is_safe(v) for v in ("2.4.1", "2.5.1", "2.6.0", "2.9.1+cu128")] == [False] * 4
    assert [weights_only_is_safe(v) for v in ("2.10.0", "2.13.0+cpu", "3.0.0")] == [True] * 3
    assert weights_only_is_safe(torch.__version__)  # the release these tests run on reads pickles
