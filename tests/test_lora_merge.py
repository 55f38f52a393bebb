"""`lora merge BASE LORA[:WEIGHT] … --out DIR`: two LoRAs at weights 1.0 and 0.5 fused into a tiny base on disk equal
the base with both adapters loaded through PEFT (fp32 within 1e-5, bf16 within bf16's rounding); shards, dtype and
config as the base's; a LoRA that does not fit is exit 2 naming the mismatch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_trainers import run, train

pytestmark = pytest.mark.diffusers_versions


def peft_folder(trained, folder: Path) -> Path:
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained.model).items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    trained.model.peft_config["default"].save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = peft_folder(train("tiny-i2v", 4, 6, seed=11), root / "first")
    second = peft_folder(train("tiny-i2v", 2, 1, targets=["to_q", "to_v", "ff.net.0.proj"], seed=12), root / "second")
    return first, second


def saved_base(folder: Path, dtype: torch.dtype) -> Path:
    from cogsurgeon.inspector import load_transformer

    load_transformer("tiny-i2v").to(dtype).save_pretrained(str(folder), max_shard_size="40KB")
    return folder


def peft_pair(base_dir: Path, first: Path, second: Path):
    from diffusers import CogVideoXTransformer3DModel
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    dtype = torch.bfloat16 if "bf16" in base_dir.name else torch.float32
    base = CogVideoXTransformer3DModel.from_pretrained(str(base_dir), torch_dtype=dtype)
    model = PeftModel.from_pretrained(base, str(first), adapter_name="first")
    model.load_adapter(str(second), adapter_name="second")
    model.base_model.set_adapter(["first", "second"])
    for module in model.modules():
        if isinstance(module, LoraLayer) and "second" in module.scaling:
            module.set_scale("second", 0.5)
    return model


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -6)])
def test_merge_equals_the_peft_loaded_pair(dtype, atol, adapters, tmp_path, cli):
    from diffusers import CogVideoXTransformer3DModel

    first, second = adapters
    base_dir = saved_base(tmp_path / ("base-bf16" if dtype == torch.bfloat16 else "base"), dtype)
    out = tmp_path / "new" / "parents" / "merged"
    result = cli("lora", "merge", str(base_dir), str(first), f"{second}:0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded as the base is
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())

    from cogsurgeon.tools.lora.safetensors_io import read_header

    stored = {entry.dtype for shard in out.glob("*.safetensors") for entry in read_header(shard).tensors}
    assert stored == {"F32" if dtype == torch.float32 else "BF16"}
    merged = CogVideoXTransformer3DModel.from_pretrained(str(out), torch_dtype=dtype)
    expected = run(peft_pair(base_dir, first, second))
    got = run(merged)
    base_output = run(CogVideoXTransformer3DModel.from_pretrained(str(base_dir), torch_dtype=dtype))
    # bf16: two units in the last place at the output's magnitude (~1); the adapters move it by more than 3x that
    assert (expected - base_output).float().abs().max() > 3 * atol
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)


def test_merge_refuses_a_lora_that_does_not_fit(tmp_path, cli):
    other = peft_folder(train("tiny-1.5", 4, 2), tmp_path / "lora-1.5")  # 3 blocks; tiny-i2v has 2
    base_dir = saved_base(tmp_path / "base", torch.float32)
    result = cli("lora", "merge", str(base_dir), str(other), "--out", str(tmp_path / "merged"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "does not fit" in line and "LoRA: 3 blocks of 32" in line and "base: 2 blocks of 32" in line
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora-1.5"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
