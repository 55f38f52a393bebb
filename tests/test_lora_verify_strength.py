"""`lora verify` checks strength, not just agreement: each loader's output against a reference built from the raw
tensors (x·Aᵀ·Bᵀ·α/r added by plain forward hooks), the effective scale each loader applied, and a base the LoRA does
not fit refused with the mismatch named (exit 2)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from lora_trainers import save_cogkit_low_vram, train

pytestmark = pytest.mark.diffusers_versions


def repaired(tmp_path, base="tiny", rank=4, alpha=6):
    from cogsurgeon.tools.lora import repair_checkpoint

    trained = train(base, rank, alpha)
    out = tmp_path / "adapter"
    repair_checkpoint(save_cogkit_low_vram(trained, tmp_path / "run", 1), out, alpha=alpha)
    return out


def test_verify_reports_the_scale_each_loader_applied(tmp_path, cli):
    out = repaired(tmp_path)
    result = cli("lora", "verify", str(out), "--base", "tiny", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["effective_scale"]["PEFT"] == pytest.approx(1.5, abs=1e-4)
    assert report["effective_scale"]["diffusers"] == pytest.approx(1.5, abs=1e-4)
    assert max(report["reference_diff"].values()) < 1e-5
    for check in report["modules"]:
        assert check["peft_effective_scale"] == pytest.approx(1.5, abs=1e-4)


@pytest.mark.skipif(not __import__("cogsurgeon.tools.lora.verify", fromlist=["x"]).diffusers_reads_metadata(),
                    reason="diffusers < 0.34 gets the alpha as network_alphas from verify itself")
def test_a_loader_at_another_scale_fails(tmp_path, cli):
    """Without its lora_adapter_metadata the diffusers file loads at alpha = rank (scale 1, not 1.5): verify must
    fail on diffusers, name the scale it applied, and pass PEFT."""
    out = repaired(tmp_path)
    weights_file = out / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(weights_file)), str(weights_file), metadata={"format": "pt"})
    result = cli("lora", "verify", str(out), "--base", "tiny", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["effective_scale"]["diffusers"] == pytest.approx(1.0, abs=1e-4)
    assert report["effective_scale"]["PEFT"] == pytest.approx(1.5, abs=1e-4)
    assert report["reference_diff"]["diffusers"] > 1e-3 and report["reference_diff"]["PEFT"] < 1e-5
    assert any("diffusers applied scale 1 " in failure for failure in report["failures"])
    assert any("diffusers's output differs from the reference" in failure for failure in report["failures"])
    assert not any("PEFT applied" in failure or "PEFT's output" in failure for failure in report["failures"])


def test_verify_on_a_base_the_lora_does_not_fit_names_the_mismatch(tmp_path, cli):
    out = repaired(tmp_path, base="tiny-1.5")  # 3 blocks; tiny has 2
    result = cli("lora", "verify", str(out), "--base", "tiny")
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("cogsurgeon: error:") and "does not fit tiny" in line
    assert "LoRA: 3 blocks of 32" in line and "base: 2 blocks of 32" in line


def test_inspect_says_which_variants_fit(tmp_path):
    from cogsurgeon.tools.lora import inspect_checkpoint

    report = inspect_checkpoint(repaired(tmp_path, base="tiny-1.5"))
    assert report.fits == ("tiny-1.5",)
    assert "3 blocks of 32" in report.fit_detail and "fits tiny-1.5 only" in report.fit_detail


def attention_lora(blocks: int, inner: int, rank: int = 8) -> list[tuple[str, str, tuple[int, ...]]]:
    shapes = []
    for block in range(blocks):
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            module = f"transformer_blocks.{block}.attn1.{target}"
            shapes += [(module, "A", (rank, inner)), (module, "B", (inner, rank))]
    return shapes


def test_fits_against_the_published_variants():
    from cogsurgeon.inspector.model_specs import published_config
    from cogsurgeon.tools.lora.compat import check_fits, lora_fits

    fits, detail = lora_fits(attention_lora(42, 3072))
    assert [name for name in fits if name.startswith("cogvideox")] == [
        "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"]
    assert lora_fits(attention_lora(30, 1920))[1] == "LoRA over 30 blocks of 1920: fits cogvideox-2b only"
    message = check_fits(published_config("cogvideox-5b"), attention_lora(30, 1920), "cogvideox-5b")
    assert message.startswith("the LoRA does not fit cogvideox-5b: LoRA: 30 blocks of 1920 (cogvideox-2b); "
                              "base: 42 blocks of 3072")
    # in-channels matter where the patch embedding is targeted (1.5: a Linear over p*p*pt*C inputs)
    patch = [("patch_embed.proj", "A", (8, 16 * 2 * 2 * 2)), ("patch_embed.proj", "B", (3072, 8))]
    assert [name for name in lora_fits(patch)[0] if name.startswith("cogvideox")] == ["cogvideox1.5-5b"]


def test_linear_shapes_match_the_real_modules():
    """The shape table of compat.py against the modules diffusers builds, for every published and tiny config."""
    import torch

    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.tools.lora.compat import known_configs, linear_shapes

    for name, config in known_configs().items():
        model = load_transformer(name)
        layers, shapes = linear_shapes(config)
        assert layers == len(model.transformer_blocks)
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                key = module_name.split(".", 2)[2] if module_name.startswith("transformer_blocks.") else module_name
                assert shapes[key] == (module.in_features, module.out_features), (name, module_name)


def test_judging_modules_is_a_pure_step_a_failed_loader_is_reported_by_its_load_only():
    from cogsurgeon.tools.lora.verify import ModuleCheck, judge_modules

    def check(module, expected, peft_scale, diffusers_scale, diffusers_loaded=True):
        return ModuleCheck(module, expected, peft_scale, diffusers_scale, peft_weights_loaded=True,
                           diffusers_weights_loaded=diffusers_loaded)

    checks = [check("a", 1.5, 1.5, 1.5), check("b", 1.5, 1.5, 2.0), check("c", None, 1.0, None),
              check("d", 1.5, 1.5, None, diffusers_loaded=False)]
    found = judge_modules(checks, peft_loaded=True, diffusers_loaded=True)
    assert (found.matched, found.missing, found.unexpected, found.scales_match) == (("a", "b"), ("d",), ("c",), False)
    assert found.failures == (
        "b: diffusers scale 2, expected 1.5 (lora_alpha / r)",
        "c: a LoRA layer was created but the adapter holds no weights for it",
        "d: diffusers did not load its weights (no matching key; left at init)",
    )
    assert judge_modules(checks[3:], peft_loaded=True, diffusers_loaded=False).failures == ()
