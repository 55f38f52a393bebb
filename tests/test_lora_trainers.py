"""Every row of the LoRA-in-the-wild table: a checkpoint written by the trainer's own save code (tests/lora_trainers.py
cites the lines) on a tiny T2V, I2V or 1.5 base, with lora_alpha != rank. `inspect` must give the true alpha, or
alpha null with a candidate list that holds it; `repair` must refuse to guess (exit 2 naming the candidates and the
flags) and, settled by the flag, reproduce the trained model within 1e-5 (fp32) through PEFT, diffusers and the
kohya/ComfyUI file merged as kijai's CogVideoXWrapper merges it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainers import (
    COGKIT_ALPHA,
    all_linear_names,
    base_model,
    kijai_merge,
    run,
    save_cogkit_dcp,
    save_cogkit_low_vram,
    save_cogvideo_finetune,
    save_diffusers_final,
    save_finetrainers,
    save_finetrainers_ptd,
    save_sat,
    save_sat_export,
    save_videox_fun_network,
    save_videox_fun_peft,
    train,
    train_cogkit,
    tree_digest,
)

pytestmark = pytest.mark.diffusers_versions

ATOL = 1e-5


def linear(base):
    return all_linear_names(base)


# id: (base, train(rank, alpha, targets|None, inject), save(trained, tmp) -> CKPT, inspect/repair kwargs that choose
#      the checkpoint, expected format, expected (alpha, source) or None when candidates must be listed,
#      the kwargs that settle alpha for repair)
ROWS = {
    "cogvideo-finetune-i2v": ("tiny-i2v", (16, 64), lambda t, d: save_cogvideo_finetune(t, d / "out", 10), {},
                              "diffusers-checkpoint", None, {"trainer": "cogvideo-finetune"}),
    "cogvideo-finetune-t2v": ("tiny", (16, 64), lambda t, d: save_cogvideo_finetune(t, d / "out", 10), {},
                              "diffusers-checkpoint", None, {"alpha": 64}),
    "cogvideo-finetune-1.5-latest": ("tiny-1.5", (16, 64), lambda t, d: (save_cogvideo_finetune(t, d / "out", 10),
                                     save_cogvideo_finetune(t, d / "out", 20))[1].parent, {"latest": True},
                                     "diffusers-checkpoint", None, {"alpha": 64}),
    "diffusers-scripts-final": ("tiny", (8, 128), lambda t, d: save_diffusers_final(t, d / "out"), {},
                                "diffusers-lora", None, {"trainer": "diffusers-scripts"}),
    "cogvideox-factory-final": ("tiny-i2v", (16, 64), lambda t, d: save_diffusers_final(t, d / "out"), {},
                                "diffusers-lora", None, {"trainer": "cogvideox-factory"}),
    "finetrainers-lora-weights": ("tiny-1.5", (16, 32), lambda t, d: (save_finetrainers(t, d / "out", 10),
                                  save_finetrainers(t, d / "out", 20))[1], {"step": 20},
                                  "finetrainers", (32, "metadata"), {}),
    "finetrainers-full-state": ("tiny", (16, 32), lambda t, d: save_finetrainers(t, d / "out", 30) / "finetrainers_step_30",
                                {}, "finetrainers-state", (32, "config"), {}),
    # finetrainers' PTD backend: a torch DCP of the whole state (issue 23, item 2: it was read as CogKit, alpha 64)
    "finetrainers-ptd-state": ("tiny", (16, 4), lambda t, d: save_finetrainers_ptd(t, d / "out", 30)
                               / "finetrainers_step_30", {}, "finetrainers-ptd", (4, "config"), {}),
    "finetrainers-ptd-state-alone": ("tiny-i2v", (16, 64), lambda t, d: save_finetrainers_ptd(
                                     t, d / "out", 40, lora_weights=False) / "finetrainers_step_40", {},
                                     "finetrainers-ptd", (64, "default"), {}),
    "cogkit-low-vram": ("tiny-i2v", "cogkit", lambda t, d: save_cogkit_low_vram(t, d / "out", 5), {},
                        "cogkit", (COGKIT_ALPHA, "default"), {}),
    "cogkit-dcp": ("tiny-1.5", "cogkit", lambda t, d: save_cogkit_dcp(t, d / "out", 5), {},
                   "cogkit-dcp", (COGKIT_ALPHA, "default"), {}),
    "sat-yaml-alpha": ("tiny", (4, 2), lambda t, d: save_sat(t, d / "sat", 100, config_alpha=2), {},
                       "sat", (2, "config"), {}),
    "sat-default-alpha": ("tiny-i2v", (4, 1), lambda t, d: save_sat(t, d / "sat", 100) / "100", {},
                          "sat", (1, "default"), {}),
    "sat-export": ("tiny", (4, 1), lambda t, d: save_sat_export(t, d / "export"), {},
                   "diffusers-lora", None, {"trainer": "sat-export"}),
    "videox-fun-peft": ("tiny-i2v", (64, 32, None, True), lambda t, d: save_videox_fun_peft(t, d / "out", 50), {},
                        "videox-fun", None, {"trainer": "videox-fun"}),
    "videox-fun-comfyui-file": ("tiny", (64, 32, None, True), lambda t, d: save_videox_fun_peft(t, d / "out", 50)
                                / "checkpoint-50-compatible_with_comfyui.safetensors", {}, "kohya", None, {"alpha": 32}),
    "videox-fun-kohya-network": ("tiny-1.5", (4, 2, linear, False), lambda t, d: save_videox_fun_network(t, d / "out", 7),
                                 {}, "kohya", (2, "metadata"), {}),
}


def trained_for(row):
    base, spec = row[0], row[1]
    if spec == "cogkit":
        return train_cogkit(base)
    rank, alpha, *rest = spec
    targets = rest[0](base) if rest and rest[0] else None
    return train(base, rank, alpha, targets, inject=bool(rest[1:] and rest[1]))


def load_peft(base, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(base), str(adapter_dir))


def load_diffusers(base, adapter_dir: Path):
    from cogsurgeon.tools.lora.verify import load_with_diffusers

    model = base_model(base)
    load_with_diffusers(model, adapter_dir)
    return model


@pytest.mark.parametrize("name", list(ROWS))
def test_trainer_checkpoint_inspects_and_repairs_at_the_trained_strength(name, tmp_path):
    from cogsurgeon.tools.lora import inspect_checkpoint, repair_checkpoint
    from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError

    row = ROWS[name]
    base, _, save, choose, expected_format, expected_alpha, settle = row
    trained = trained_for(row)
    checkpoint = save(trained, tmp_path)
    before = tree_digest(checkpoint)

    report = inspect_checkpoint(checkpoint, **choose)
    assert report.format == expected_format
    assert report.rank == trained.rank and report.problems == ()
    assert base in report.fits
    if expected_alpha is None:
        assert (report.alpha, report.alpha_source) == (None, None)
        assert trained.lora_alpha in [candidate["alpha"] for candidate in report.alpha_candidates]
        assert len({candidate["alpha"] for candidate in report.alpha_candidates}) > 1
        with pytest.raises(LoraCheckpointError, match="alpha=A or trainer=NAME"):
            repair_checkpoint(checkpoint, tmp_path / "refused", **choose)
        assert not (tmp_path / "refused").exists()
    else:
        assert (report.alpha, report.alpha_source) == expected_alpha
        assert report.alpha_candidates == ()

    out = tmp_path / "adapter"
    result = repair_checkpoint(checkpoint, out, **choose, **settle, to="peft,diffusers,comfyui")
    assert result.report.alpha == trained.lora_alpha
    assert tree_digest(checkpoint) == before

    base_output = run(base_model(base))
    assert (trained.output - base_output).abs().max() > 1e-3  # the LoRA matters, so a wrong scale would show
    torch.testing.assert_close(run(load_peft(base, out)), trained.output, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(load_diffusers(base, out)), trained.output, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(kijai_merge(base_model(base), out / "comfyui_lora.safetensors")), trained.output,
                               atol=ATOL, rtol=0)


def test_cli_lists_candidates_and_refuses_to_guess(tmp_path, cli):
    trained = train("tiny", 16, 64)
    checkpoint = save_cogvideo_finetune(trained, tmp_path / "out", 10)
    inspected = cli("lora", "inspect", str(checkpoint), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["alpha"] is None and report["alpha_source"] is None
    assert {(c["alpha"], c["trainer"]) for c in report["alpha_candidates"]} == {
        (64, "cogvideo-finetune"), (128, "diffusers-scripts"), (64, "cogvideox-factory")}
    assert all(set(c) == {"alpha", "trainer", "source"} and c["source"] for c in report["alpha_candidates"])

    refused = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "adapter"))
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("cogsurgeon: error:") and "--alpha A" in line and "--trainer NAME" in line
    assert "64 (cogvideo-finetune" in line and "128 (diffusers-scripts" in line
    assert not (tmp_path / "adapter").exists()

    settled = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "adapter"), "--trainer", "diffusers-scripts",
                  "--json")
    assert settled.returncode == 0, settled.stderr
    assert json.loads(settled.stdout)["report"]["alpha"] == 128
    assert json.loads(settled.stdout)["report"]["alpha_source"] == "trainer"


def test_a_folder_of_several_checkpoints_is_listed_never_picked(tmp_path, cli):
    trained = train("tiny", 4, 2, inject=True)
    out = save_videox_fun_peft(trained, tmp_path / "out", 50)
    save_videox_fun_peft(trained, out, 100)
    listed = cli("lora", "inspect", str(out))
    assert listed.returncode == 2
    assert "steps 50, 100" in listed.stderr and "--step N" in listed.stderr and "--latest" in listed.stderr
    latest = cli("lora", "inspect", str(out), "--latest", "--alpha", "2", "--json")
    assert latest.returncode == 0, latest.stderr
    assert json.loads(latest.stdout)["file"].endswith("checkpoint-100.safetensors")
    assert json.loads(latest.stdout)["steps"] == [50, 100]
    step = cli("lora", "inspect", str(out), "--step", "50", "--alpha", "2", "--json")
    assert json.loads(step.stdout)["file"].endswith("checkpoint-50.safetensors")
    missing = cli("lora", "inspect", str(out), "--step", "75")
    assert missing.returncode == 2 and "no checkpoint of step 75" in missing.stderr


def test_unprefixed_peft_file_is_named_as_such_not_as_cogkit(tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from cogsurgeon.tools.lora import inspect_checkpoint

    trained = train("tiny", 4, 8)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(get_peft_model_state_dict(trained.model), str(folder / "my_lora.safetensors"))
    report = inspect_checkpoint(folder)
    assert report.format == "peft-unprefixed"
    assert report.alpha is None and "cogkit" in [c["trainer"] for c in report.alpha_candidates]
