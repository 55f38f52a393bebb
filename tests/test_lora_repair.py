"""LoRA repair end to end on real checkpoints: every trainer format is inspected, repaired, and loaded back through
PEFT and through diffusers, which must both reproduce the trained model's output; plus the CLI and verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_helpers import (
    BASE,
    peft_state_dict,
    run,
    save_cogkit,
    save_cogvideo_checkpoint,
    save_peft_folder,
    save_sat,
    save_with_adapter_name,
    train,
    tree_digest,
)

pytestmark = pytest.mark.diffusers_versions

ATOL = 1e-5
DESIGN_KEYS = {"format", "rank", "rank_pattern", "alpha", "alpha_source", "target_modules", "num_modules", "problems"}


def diffusers_has_metadata() -> bool:
    from cogsurgeon.tools.lora.verify import diffusers_reads_metadata

    return diffusers_reads_metadata()


@pytest.fixture(scope="module")
def uniform():
    return train(rank=4, lora_alpha=6)


@pytest.fixture(scope="module")
def mixed():
    return train(rank=4, lora_alpha=6, rank_pattern={"to_v": 2}, seed=2)


@pytest.fixture(scope="module")
def sat_alpha_2():
    return train(rank=4, lora_alpha=2, seed=3)


@pytest.fixture(scope="module")
def sat_alpha_1():
    return train(rank=4, lora_alpha=1, seed=4)


def load_peft(adapter_dir: Path):
    from peft import PeftModel

    from cogsurgeon.inspector import load_transformer

    return PeftModel.from_pretrained(load_transformer(BASE), str(adapter_dir))


def load_diffusers(adapter_dir: Path):
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.tools.lora.verify import load_with_diffusers

    model = load_transformer(BASE)
    load_with_diffusers(model, adapter_dir)
    return model


MIXED_PATTERN = {"transformer_blocks.0.attn1.to_v": 2, "transformer_blocks.1.attn1.to_v": 2}

# id, trained fixture, how the trainer saved it, --alpha, expected format, alpha_source, rank_pattern
CASES = [
    ("cogvideo-finetune", "uniform", lambda t, d: save_cogvideo_checkpoint(t, d / "run" / "checkpoint-10"), 6,
     "diffusers-checkpoint", "flag", {}),
    ("diffusers-script-mixed-ranks", "mixed", lambda t, d: save_cogvideo_checkpoint(t, d / "run", accelerate_state=False),
     6, "diffusers-lora", "flag", MIXED_PATTERN),
    ("cogkit-file", "uniform", lambda t, d: save_cogkit(t, d / "checkpoint-4") / "adapter_model.safetensors", 6,
     "cogkit", "flag", {}),
    ("adapter-name-with-config", "mixed", lambda t, d: save_with_adapter_name(t, d / "raw", with_config=True), None,
     "peft-adapter-name", "config", MIXED_PATTERN),
    ("adapter-name-flag", "uniform", lambda t, d: save_with_adapter_name(t, d / "raw", with_config=False), 6,
     "peft-adapter-name", "flag", {}),
    ("peft-folder", "mixed", lambda t, d: save_peft_folder(t, d / "peft"), None, "peft", "config", MIXED_PATTERN),
    ("diffusers-metadata", "mixed", lambda t, d: save_cogvideo_checkpoint(t, d / "run" / "checkpoint-5", metadata=True),
     None, "diffusers-metadata", "metadata", MIXED_PATTERN),
    ("sat-training-config", "sat_alpha_2", lambda t, d: save_sat(t, d / "sat", config_alpha=2), None, "sat", "config", {}),
    ("sat-default-alpha", "sat_alpha_1", lambda t, d: save_sat(t, d / "sat") / "1000", None, "sat", "default", {}),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_repaired_adapter_reproduces_the_trained_model(case, request, tmp_path):
    from cogsurgeon.tools.lora import inspect_checkpoint, repair_checkpoint

    name, fixture, save, alpha, expected_format, expected_source, expected_pattern = case
    if name == "diffusers-metadata" and not diffusers_has_metadata():
        pytest.skip("diffusers < 0.34 has no lora_adapter_metadata to save with")
    trained = request.getfixturevalue(fixture)
    checkpoint = save(trained, tmp_path)
    before = tree_digest(checkpoint)

    report = inspect_checkpoint(checkpoint, alpha=alpha)
    assert (report.format, report.alpha_source) == (expected_format, expected_source)
    assert (report.rank, report.alpha, report.rank_pattern) == (4, trained.lora_alpha, expected_pattern)
    assert report.num_modules == 8 and report.target_modules == ("to_k", "to_out.0", "to_q", "to_v")
    assert report.problems == ()
    assert report.dtype == "float32"
    assert any("NOT STORED" in w for w in report.warnings) == (expected_source == "default")

    out = tmp_path / "adapter"
    result = repair_checkpoint(checkpoint, out, alpha=alpha)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "cogsurgeon-repair.json", "pytorch_lora_weights.safetensors"]
    assert result.report.alpha == trained.lora_alpha
    assert tree_digest(checkpoint) == before

    base_output = run(load_transformer_base())
    assert (trained.output - base_output).abs().max() > 1e-3  # the LoRA matters, so a wrong scale would show
    torch.testing.assert_close(run(load_peft(out)), trained.output, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(load_diffusers(out)), trained.output, atol=ATOL, rtol=0)


def load_transformer_base():
    from cogsurgeon.inspector import load_transformer

    return load_transformer(BASE)


def test_default_alpha_is_the_trainers_and_is_loud(uniform, tmp_path, cli):
    """A layout only CogKit writes gets CogKit's hard-coded lora_alpha 64 — not what this one was trained with — so
    the repaired adapter must differ from the trained model: the scale really is taken from alpha, and said loudly."""
    checkpoint = save_cogkit(uniform, tmp_path / "checkpoint-3")
    result = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "adapter"))
    assert result.returncode == 0, result.stderr
    assert "LORA_ALPHA NOT STORED" in result.stderr and "lora_alpha=64" in result.stderr and "--alpha" in result.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 64)
    assert (run(load_peft(tmp_path / "adapter")) - uniform.output).abs().max() > 1e-2


def test_cli_inspect_repair_verify(mixed, tmp_path, cli):
    checkpoint = save_cogvideo_checkpoint(mixed, tmp_path / "checkpoint-7")
    inspected = cli("lora", "inspect", str(checkpoint), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert DESIGN_KEYS <= set(report)
    assert (report["format"], report["rank"], report["alpha"], report["alpha_source"]) == ("diffusers-checkpoint", 4, None, None)
    assert {c["alpha"] for c in report["alpha_candidates"]} == {64, 128}
    assert report["rank_pattern"] == MIXED_PATTERN

    out = tmp_path / "adapter"
    repaired = cli("lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "6", "--json")
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["report"]["alpha_source"] == "flag"

    again = cli("lora", "inspect", str(out), "--json")  # the repaired folder is itself a complete checkpoint
    assert json.loads(again.stdout)["format"] == "diffusers-metadata"
    assert json.loads(again.stdout)["alpha_source"] == "metadata"
    assert json.loads(again.stdout)["alpha"] == 6

    verified = cli("lora", "verify", str(out), "--base", BASE, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    verdict = json.loads(verified.stdout)
    assert verdict["passed"] and verdict["outputs_match"]
    assert len(verdict["matched"]) == 8 and verdict["missing"] == [] and verdict["unexpected"] == []
    scales = {check["module"]: (check["peft_scale"], check["diffusers_scale"]) for check in verdict["modules"]}
    assert scales["transformer_blocks.0.attn1.to_q"] == (1.5, 1.5)
    assert scales["transformer_blocks.1.attn1.to_v"] == (3.0, 3.0)
    assert verdict["lora_effect"] > 1e-3


def test_verify_catches_the_silent_no_op_load(uniform, tmp_path, cli):
    """Keys that match no module (here one prefix too many, a common hand-made mistake): PEFT creates the layers from
    the config, loads nothing, and lora_B stays zero. verify must fail, exit 1."""
    from safetensors.torch import load_file, save_file

    from cogsurgeon.tools.lora import repair_checkpoint

    out = tmp_path / "adapter"
    repair_checkpoint(save_cogkit(uniform, tmp_path / "cogkit"), out, alpha=6)
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.", "base_model.model.transformer."): v for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))
    verified = cli("lora", "verify", str(out), "--base", BASE)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "PEFT did not load its weights" in verified.stdout
    assert "Traceback" not in verified.stderr


def test_force_replaces_an_existing_adapter_atomically(uniform, tmp_path):
    from cogsurgeon.tools.lora import repair_checkpoint

    checkpoint = save_cogkit(uniform, tmp_path / "cogkit")
    out = tmp_path / "adapter"
    repair_checkpoint(checkpoint, out, alpha=4)  # an earlier repair's folder (its manifest marks it)
    calls = []
    repair_checkpoint(checkpoint, out, alpha=6, force=True, progress=lambda done, total: calls.append((done, total)))
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "cogsurgeon-repair.json", "pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "cogkit"]  # no staging or retired folders
    lora_bytes = sum(v.numel() * v.element_size() for v in peft_state_dict(uniform).values())
    assert calls[-1] == (2 * lora_bytes, 2 * lora_bytes)  # both weight files, every byte counted once
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_inspect_and_repair_never_import_torch(uniform, tmp_path):
    import subprocess
    import sys

    from conftest import cli_environment

    checkpoint = save_cogvideo_checkpoint(uniform, tmp_path / "checkpoint-1")
    script = (
        "import sys\n"
        "from tools.lora import inspect_checkpoint, repair_checkpoint\n"
        f"inspect_checkpoint({str(checkpoint)!r})\n"
        f"repair_checkpoint({str(checkpoint)!r}, {str(tmp_path / 'adapter')!r}, alpha=6)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'textual') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_environment())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not diffusers_has_metadata(), reason="diffusers < 0.34 pipelines ignore lora_adapter_metadata")
def test_pipeline_lora_loader_reads_the_trained_scale(mixed, tmp_path):
    """The route users take, `pipe.load_lora_weights(DIR)`, is the pipeline class's `lora_state_dict` (with the
    file's metadata) then `load_lora_into_transformer`; run exactly that on the repaired folder."""
    from diffusers import CogVideoXImageToVideoPipeline

    from cogsurgeon.tools.lora import repair_checkpoint

    out = tmp_path / "adapter"
    repair_checkpoint(save_cogvideo_checkpoint(mixed, tmp_path / "checkpoint-9"), out, alpha=6)
    state_dict, metadata = CogVideoXImageToVideoPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == 6
    model = load_transformer_base()
    CogVideoXImageToVideoPipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    torch.testing.assert_close(run(model), mixed.output, atol=ATOL, rtol=0)
