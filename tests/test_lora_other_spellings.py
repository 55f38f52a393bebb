"""LoRA under other names (issue 23, items 3 and 4): diffusers' old `.lora.down/.lora.up` spelling (alone and mixed
with `lora_A/lora_B` in one file) and LyCORIS LoCon (`lycoris_` keys, `lora_down/lora_up/.alpha`) are plain LoRA and
are repaired; LyCORIS LoKr and LoHa are not LoRA and are refused, naming what loads them.

Writers, called for real:
- diffusers `convert_state_dict_to_diffusers` (diffusers 0.42.1 src/diffusers/utils/state_dict_utils.py:237-281, the
  PEFT_TO_DIFFUSERS map at :118-135 renames to_q/to_k/to_v/to_out.0 only) on `get_peft_model_state_dict`, then the
  pipeline's `save_lora_weights`, as diffusers' older LoRA training scripts save;
- LyCORIS 4.1.3 `create_lycoris(...)` (lycoris/wrapper.py:53) and `LycorisNetwork.save_weights` (wrapper.py:701-721).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainers import ATTENTION, assert_reproduces, base_model, pipeline_class, run, train, tree_digest

pytestmark = pytest.mark.diffusers_versions

ATOL = 1e-5


@pytest.mark.parametrize("targets, old_keys", [(ATTENTION, 16), (ATTENTION + ["ff.net.0.proj"], 16)],
                         ids=["old-spelling", "old-spelling-mixed-with-lora_A"])
def test_diffusers_old_key_spelling_is_repaired(tmp_path, targets, old_keys):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    from cogsurgeon.tools.lora import inspect_checkpoint, repair_checkpoint

    trained = train("tiny", 4, 6, targets, seed=21)
    folder = tmp_path / "run"
    pipeline = pipeline_class("tiny")
    pipeline.save_lora_weights(str(folder), transformer_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(trained.model)))
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert sum(".lora.down.weight" in k or ".lora.up.weight" in k for k in keys) == old_keys
    assert any(".lora_A.weight" in k for k in keys) == ("ff.net.0.proj" in targets)

    # diffusers itself loads the raw file (at alpha = rank: scale 1; the adapter weight 1.5 makes it 6/4)
    raw = base_model("tiny")
    # the file named: diffusers 0.32 refuses to guess it under HF_HUB_OFFLINE=1
    state_dict = pipeline.lora_state_dict(str(folder), weight_name="pytorch_lora_weights.safetensors")
    pipeline.load_lora_into_transformer(state_dict, transformer=raw, adapter_name="raw")
    raw.set_adapters(["raw"], weights=[1.5])
    torch.testing.assert_close(run(raw), trained.output, atol=ATOL, rtol=0)

    before = tree_digest(folder)
    report = inspect_checkpoint(folder, alpha=6)
    assert (report.format, report.rank, report.problems) == ("diffusers-lora", 4, ())
    assert report.num_modules == 2 * len(targets)
    assert any(f"{old_keys} keys use diffusers' old .lora.down/.lora.up spelling" in w for w in report.warnings)
    out = tmp_path / "adapter"
    repair_checkpoint(folder, out, alpha=6, to="peft,diffusers,comfyui")
    assert tree_digest(folder) == before
    assert_reproduces("tiny", out, trained.output)


LYCORIS_PRESET = 'enable_conv = false\ntarget_module = ["CogVideoXBlock"]\ntarget_name = []\n'


def lycoris_trained(tmp_path: Path, algo: str, base: str = "tiny-1.5"):
    """A LyCORIS network of `algo` over every Linear of the CogVideoX blocks (dim 4, alpha 2), weights seeded away
    from their init, applied to the model; saved with its own save_weights. Returns (file, trained output)."""
    from lycoris import create_lycoris

    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    model = base_model(base)
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset=str(preset))
    network.apply_to()
    generator = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return path, run(model)


def test_lycoris_locon_is_repaired(tmp_path):
    from cogsurgeon.tools.lora import inspect_checkpoint, repair_checkpoint

    path, trained_output = lycoris_trained(tmp_path, "lora")
    report = inspect_checkpoint(path)
    assert (report.format, report.rank, report.alpha, report.alpha_source) == ("lycoris", 4, 2, "metadata")
    assert report.num_modules == 3 * 8 and report.problems == ()  # every Linear of the 3 blocks
    assert {"transformer_blocks.2.ff.net.0.proj", "transformer_blocks.0.norm1.linear"} <= set(report.modules)
    out = tmp_path / "adapter"
    repair_checkpoint(path, out, to="peft,diffusers,comfyui")
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 2
    assert_reproduces("tiny-1.5", out, trained_output)


@pytest.mark.parametrize("algo, name", [("lokr", "LoKr"), ("loha", "LoHa")])
def test_lycoris_lokr_and_loha_are_refused_naming_what_loads_them(tmp_path, cli, algo, name):
    from lycoris import create_lycoris_from_weights

    path, trained_output = lycoris_trained(tmp_path, algo, base="tiny")
    before = tree_digest(path)
    out = tmp_path / "adapter"
    for arguments in (("inspect", str(path)), ("repair", str(path), "--out", str(out), "--alpha", "2")):
        result = cli("lora", *arguments)
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line
        assert f"is a LyCORIS {name}" in line and "not LoRA" in line
        assert "lycoris.create_lycoris_from_weights(1.0, FILE, transformer)" in line
    assert not out.exists() and tree_digest(path) == before

    model = base_model("tiny")  # what the message says loads it does load it, at the trained strength
    network, _ = create_lycoris_from_weights(1.0, str(path), model)
    network.apply_to()
    torch.testing.assert_close(run(model), trained_output, atol=ATOL, rtol=0)
