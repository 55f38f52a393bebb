"""`repair --to peft,diffusers,comfyui` and `--bake-scale`: every consumer's file gives the trained model — PEFT,
diffusers, and the kohya/ComfyUI file merged the way kijai's ComfyUI-CogVideoXWrapper merges it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainers import base_model, kijai_merge, peft_folder, run, train

pytestmark = pytest.mark.diffusers_versions

ATOL = 1e-5


@pytest.fixture(scope="module")
def trained():
    """Mixed ranks and a per-module alpha, saved as a PEFT folder (adapter_config.json holds both patterns)."""
    return train("tiny-i2v", 4, 6, rank_pattern={"to_v": 2}, alpha_pattern={"to_out.0": 3}, seed=7)


def test_every_consumer_reproduces_the_trained_model(trained, tmp_path):
    from peft import PeftModel

    from cogsurgeon.tools.lora import repair_checkpoint
    from cogsurgeon.tools.lora.verify import load_with_diffusers

    out = tmp_path / "adapter"
    result = repair_checkpoint(peft_folder(trained, tmp_path / "peft"), out, to="peft,diffusers,comfyui")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "cogsurgeon-repair.json", "comfyui_lora.safetensors",
                                                     "pytorch_lora_weights.safetensors"]
    assert len(result.files) == 5  # with the manifest that marks the folder as a repair
    torch.testing.assert_close(run(PeftModel.from_pretrained(base_model("tiny-i2v"), str(out))), trained.output, atol=ATOL, rtol=0)
    diffusers_model = base_model("tiny-i2v")
    load_with_diffusers(diffusers_model, out)
    torch.testing.assert_close(run(diffusers_model), trained.output, atol=ATOL, rtol=0)

    comfy = load_file(str(out / "comfyui_lora.safetensors"))
    assert comfy["lora_unet__transformer_blocks_1_attn1_to_v.alpha"].item() == 6  # alpha 6 at rank 2: scale 3
    assert comfy["lora_unet__transformer_blocks_0_attn1_to_out_0.alpha"].item() == 3
    assert comfy["lora_unet__transformer_blocks_1_attn1_to_v.lora_up.weight"].shape[1] == 2
    torch.testing.assert_close(run(kijai_merge(base_model("tiny-i2v"), out / "comfyui_lora.safetensors")),
                               trained.output, atol=ATOL, rtol=0)


def test_bake_scale_is_the_trained_strength_at_scale_one(trained, tmp_path):
    from peft import PeftModel

    from cogsurgeon.tools.lora import repair_checkpoint

    out = tmp_path / "baked"
    repair_checkpoint(peft_folder(trained, tmp_path / "peft"), out, to="peft,diffusers,comfyui", bake_scale=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and config["alpha_pattern"] == config["rank_pattern"]
    torch.testing.assert_close(run(PeftModel.from_pretrained(base_model("tiny-i2v"), str(out))), trained.output, atol=ATOL, rtol=0)

    # a consumer that ignores alpha: the diffusers file without its metadata loads at alpha = rank, scale 1.0
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(str(out / "pytorch_lora_weights.safetensors")), str(stripped / "pytorch_lora_weights.safetensors"))
    model = base_model("tiny-i2v")
    model.load_lora_adapter(str(stripped), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    torch.testing.assert_close(run(model), trained.output, atol=ATOL, rtol=0)

    # ComfyUI at strength 1.0 with the alpha left out entirely: still the trained strength
    comfy = {k: v for k, v in load_file(str(out / "comfyui_lora.safetensors")).items() if not k.endswith(".alpha")}
    save_file(comfy, str(tmp_path / "no_alpha.safetensors"))
    torch.testing.assert_close(run(kijai_merge(base_model("tiny-i2v"), tmp_path / "no_alpha.safetensors")),
                               trained.output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")])
def test_scaled_bytes_round_as_torch_does(dtype, name):
    from cogsurgeon.tools.lora.export import scaled_bytes

    values = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    expected = (values.float() * 0.37).to(dtype)
    got = torch.frombuffer(bytearray(scaled_bytes(values.view(torch.uint8).numpy().tobytes(), name, 0.37)), dtype=dtype)
    assert torch.equal(got, expected)


def test_unknown_consumer_is_one_line(tmp_path, cli):
    trained_small = train("tiny", 4, 2)
    folder = peft_folder(trained_small, tmp_path / "peft")
    result = cli("lora", "repair", str(folder), "--out", str(tmp_path / "out"), "--to", "peft,a1111")
    assert result.returncode == 2 and "--to 'peft,a1111'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
