"""PEFT's `lora_bias=True` (a bias on lora_B) and DoRA (`use_dora=True`, `lora_magnitude_vector`) are kept by repair
(issue 23, item 5): the adapter's config says so and the tensors are written under PEFT's own names, and PEFT
(`PeftModel.from_pretrained`) and diffusers (`load_lora_adapter`) both give the trained model. The kohya-style
ComfyUI file cannot hold either and is refused for them.

Writers: PEFT's adapter folder (`get_peft_model_state_dict` + `LoraConfig.save_pretrained`, tests/lora_trainers.py
peft_folder), diffusers' `save_lora_adapter` (diffusers 0.42.1 src/diffusers/loaders/peft.py:393-446) and CogVideo
finetune's accelerate save hook (tests/lora_trainers.py save_cogvideo_finetune, CogVideo finetune/trainer.py:736-757).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainers import (
    assert_reproduces,
    peft_folder,
    save_cogvideo_finetune,
    stores_lora_metadata,
    train,
    tree_digest,
)

pytestmark = pytest.mark.diffusers_versions

BASE = "tiny"


def save_diffusers_adapter(trained, folder: Path) -> Path:
    trained.model.save_lora_adapter(str(folder))
    return folder


CASES = {
    "dora-peft-folder": ({"use_dora": True}, lambda t, d: peft_folder(t, d / "peft"), {}),
    "dora-diffusers-save_lora_adapter": ({"use_dora": True}, lambda t, d: save_diffusers_adapter(t, d / "run"), {}),
    "lora_bias-peft-folder": ({"lora_bias": True}, lambda t, d: peft_folder(t, d / "peft"), {}),
    "lora_bias-cogvideo-finetune": ({"lora_bias": True}, lambda t, d: save_cogvideo_finetune(t, d / "out", 5),
                                    {"alpha": 6}),
    "lora_bias-baked": ({"lora_bias": True}, lambda t, d: peft_folder(t, d / "peft"), {"bake_scale": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dora_and_lora_bias_are_kept(tmp_path, name):
    from cogsurgeon.tools.lora import inspect_checkpoint, repair_checkpoint

    variant, save, options = CASES[name]
    trained = train(BASE, 4, 6, seed=61, **variant)
    checkpoint = save(trained, tmp_path)
    before = tree_digest(checkpoint)
    if name.endswith("save_lora_adapter") and not stores_lora_metadata(checkpoint):
        # diffusers 0.32's writer stores no config: DoRA's magnitudes are there, its alpha is not, and the tool
        # must say the strength is unknown rather than guess
        report = inspect_checkpoint(checkpoint)
        assert report.alpha is None and report.alpha_candidates and report.use_dora
        return
    report = inspect_checkpoint(checkpoint, alpha=options.get("alpha"))
    assert report.problems == () and report.alpha == 6
    assert (report.use_dora, report.lora_bias) == ("use_dora" in variant, "lora_bias" in variant)
    out = tmp_path / "adapter"
    repair_checkpoint(checkpoint, out, **options)
    assert tree_digest(checkpoint) == before
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["use_dora"], config["lora_bias"]) == ("use_dora" in variant, "lora_bias" in variant)
    assert_reproduces(BASE, out, trained.output)


def test_comfyui_file_is_refused_for_dora_and_verify_passes(tmp_path, cli):
    trained = train(BASE, 4, 6, seed=62, use_dora=True)
    checkpoint = peft_folder(trained, tmp_path / "peft")
    refused = cli("lora", "repair", str(checkpoint), "--out", str(tmp_path / "comfy"), "--to", "peft,comfyui")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "comfyui in --to" in refused.stderr and "DoRA" in refused.stderr and not (tmp_path / "comfy").exists()

    out = tmp_path / "adapter"
    assert cli("lora", "repair", str(checkpoint), "--out", str(out)).returncode == 0
    verified = cli("lora", "verify", str(out), "--base", BASE, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["outputs_match"] and report["source_check"]["compared"] and report["reference_diff"] == {}
