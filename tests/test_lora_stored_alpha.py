"""`--alpha` sets only what the checkpoint does not store (issue 23, item 1). Two ways a LoRA came out at a silently
wrong strength before: `repair --alpha A` with A the stored lora_alpha dropped the stored alpha_pattern, and an A that
differs replaced the stored lora_alpha without a word; `verify` passed both, checking the adapter against its own
config. Now the stored patterns are always kept, a contradicting --alpha needs --override-stored-alpha (and says what
changes), and verify checks each module's α/r·B·A against the source checkpoint its repair manifest records.

Checkpoints come from the writers' own save calls: diffusers' `save_lora_adapter` (diffusers 0.42.1
src/diffusers/loaders/peft.py:393-446: `peft_config[adapter].to_dict()` as `lora_adapter_metadata`) and PEFT's
adapter folder (`get_peft_model_state_dict` + `LoraConfig.save_pretrained`, tests/lora_trainers.py:peft_folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainers import assert_reproduces, peft_folder, stores_lora_metadata, train, tree_digest

pytestmark = pytest.mark.diffusers_versions

BASE = "tiny-i2v"
# lora_alpha 6 at rank 4 (scale 1.5); to_out.0 trained at alpha 3 (0.75), to_v at rank 2 (scale 3)
ALPHA_PATTERN = {"to_out.0": 3}


@pytest.fixture(scope="module")
def trained():
    return train(BASE, 4, 6, rank_pattern={"to_v": 2}, alpha_pattern=ALPHA_PATTERN, seed=11)


def save_with_diffusers(trained, folder: Path) -> Path:
    """diffusers' own writer: ModelMixin.save_lora_adapter (peft.py:393-446), the LoraConfig as metadata."""
    trained.model.save_lora_adapter(str(folder))
    return folder


WRITERS = {"diffusers-save_lora_adapter": (save_with_diffusers, "metadata"), "peft-folder": (peft_folder, "config")}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_alpha_equal_to_the_stored_one_keeps_the_stored_alpha_pattern(trained, tmp_path, writer):
    """Silent-wrong case 1: `--alpha 6` on a checkpoint that stores 6 and {to_out.0: 3}. Before the fix the
    pattern was dropped and to_out.0 ran at scale 1.5 instead of 0.75 through every loader."""
    from cogsurgeon.tools.lora import repair_checkpoint

    from cogsurgeon.tools.lora import inspect_checkpoint

    save, source = WRITERS[writer]
    checkpoint = save(trained, tmp_path / "ckpt")
    if source == "metadata" and not stores_lora_metadata(checkpoint):
        # diffusers 0.32's writer stores neither lora_alpha nor the pattern: the tool must not claim one
        report = inspect_checkpoint(checkpoint)
        assert report.alpha is None and report.alpha_pattern in ({}, None) and report.alpha_candidates
        return
    out = tmp_path / "adapter"
    result = repair_checkpoint(checkpoint, out, alpha=6, to="peft,diffusers,comfyui")
    assert_reproduces(BASE, out, trained.output)
    assert (result.report.alpha, result.report.alpha_source) == (6, source)
    assert result.report.alpha_pattern == ALPHA_PATTERN
    assert any("is the stored lora_alpha" in w and "alpha_pattern of 1 module is kept" in w
               for w in result.report.warnings)
    assert json.loads((out / "adapter_config.json").read_text())["alpha_pattern"] == ALPHA_PATTERN


def test_alpha_that_contradicts_the_stored_one_is_refused(trained, tmp_path, cli):
    """Silent-wrong case 2: `--alpha 8` on a checkpoint that stores 6. Before the fix it wrote 8 without a word."""
    checkpoint = peft_folder(trained, tmp_path / "peft")
    before = tree_digest(checkpoint)
    out = tmp_path / "adapter"
    refused = cli("lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "8")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "--alpha 8 contradicts the lora_alpha 6 stored in" in line and "adapter_config.json" in line
    assert "--override-stored-alpha" in line and "alpha_pattern of 1 module is kept (to_out.0=3)" in line
    assert not out.exists() and tree_digest(checkpoint) == before

    from cogsurgeon.tools.lora import repair_checkpoint
    from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError

    with pytest.raises(LoraCheckpointError) as raised:  # from Python: the keyword arguments, not the flags
        repair_checkpoint(checkpoint, out, alpha=8)
    assert "alpha=8 contradicts the lora_alpha 6 stored in" in str(raised.value)
    assert "drop alpha=, or pass override_stored_alpha=True to write 8 instead" in str(raised.value)
    assert not out.exists() and tree_digest(checkpoint) == before
    inspected = cli("lora", "inspect", str(checkpoint), "--alpha", "8")
    assert inspected.returncode == 2 and "contradicts" in inspected.stderr

    overridden = cli("lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "8", "--override-stored-alpha")
    assert overridden.returncode == 0, overridden.stderr
    assert "STORED ALPHA OVERRIDDEN: lora_alpha 6 -> 8 (scale 1.5 -> 2 at rank 4)" in overridden.stderr
    assert "alpha_pattern of 1 module is kept (to_out.0=3)" in overridden.stderr
    assert "alpha_pattern kept: 1 module differs: to_out.0=3" in overridden.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["alpha_pattern"]) == (8, ALPHA_PATTERN)
    manifest = json.loads((out / "cogsurgeon-repair.json").read_text())
    assert manifest["source"]["request"] == {"alpha": 8.0, "trainer": None, "override_stored_alpha": True}
    assert (manifest["source"]["lora_alpha"], manifest["source"]["alpha_source"]) == (8, "flag")
    assert manifest["source"]["file"] == str((checkpoint / "adapter_model.safetensors").absolute())
    verified = cli("lora", "verify", str(out), "--base", BASE, "--json")  # what the person asked for, checked
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["source_check"]["compared"] is True


def drop_alpha_pattern(out: Path) -> None:
    """What the repair used to write: the same adapter with the stored per-module alpha gone."""
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {}
    config_path.write_text(json.dumps(config, indent=2))
    weights = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    packed = json.loads(metadata["lora_adapter_metadata"])
    packed["transformer.alpha_pattern"] = {}
    save_file(tensors, str(weights), metadata={**metadata, "lora_adapter_metadata": json.dumps(packed)})


def test_verify_checks_the_adapter_against_its_source_checkpoint(trained, tmp_path, cli):
    """An adapter whose alpha_pattern was dropped loads the same through PEFT and diffusers, each at its config's
    scale, so the checks against its own config pass; the source check fails it, naming the module and scales."""
    from cogsurgeon.tools.lora import repair_checkpoint

    checkpoint = peft_folder(trained, tmp_path / "ckpt")  # stores alpha and pattern with every diffusers release
    out = tmp_path / "adapter"
    repair_checkpoint(checkpoint, out)
    manifest = json.loads((out / "cogsurgeon-repair.json").read_text())["source"]
    assert manifest["lora_alpha"] == 6 and manifest["alpha_pattern"] == ALPHA_PATTERN
    assert manifest["alpha_source"] == "config" and len(manifest["lora_sha256"]) == 64
    good = cli("lora", "verify", str(out), "--base", BASE, "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["source_check"]["max_rel_diff"] < 1e-6

    drop_alpha_pattern(out)
    bad = cli("lora", "verify", str(out), "--base", BASE, "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    report = json.loads(bad.stdout)
    assert max(report["reference_diff"].values()) < 1e-5  # both loaders agree with the (wrong) config
    failures = [f for f in report["failures"] if "off the source checkpoint's" in f]
    assert {f.split(":")[0] for f in failures} == {f"transformer_blocks.{i}.attn1.to_out.0" for i in (0, 1)}
    assert all("scale 1.5 written, 0.75 in adapter_model.safetensors" in f for f in failures)
    assert report["failures"] == failures

    text = cli("lora", "verify", str(out), "--base", BASE)
    assert text.returncode == 1 and "off the source checkpoint's" in text.stdout


def test_verify_says_when_there_is_no_source_to_check(trained, tmp_path):
    from cogsurgeon.tools.lora import repair_checkpoint, verify_adapter

    checkpoint = peft_folder(trained, tmp_path / "peft")
    out = tmp_path / "adapter"
    repair_checkpoint(checkpoint, out)
    (checkpoint / "adapter_model.safetensors").unlink()
    report = verify_adapter(out, BASE)
    assert report.passed and report.source_check["compared"] is False
    assert "cannot be read now" in report.source_check["status"]
