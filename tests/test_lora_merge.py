"""`lora merge BASE LORA[:WEIGHT] … --out DIR`: two LoRAs at weights 1.0 and 0.5 fused into a tiny base on disk equal
the base with both adapters loaded through PEFT (fp32 within 1e-5, bf16 within bf16's rounding); shards, dtype and
config as the base's; a LoRA that does not fit is exit 2 naming the mismatch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lora_helpers import staging_of_a_dead_run
from lora_trainers import peft_folder, run, train

pytestmark = pytest.mark.diffusers_versions
MERGE_MANIFEST = "cogsurgeon-merge.json"


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
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in base_dir.iterdir()), MERGE_MANIFEST])
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


# ---------------------------------------------------------------- publication (issue 16 items 1-4, issue 11 item 7)


def _padded_base(folder: Path) -> Path:
    """A tiny base plus a shard holding one 512 MiB tensor stored as a hole (nothing to write here), sorted first:
    merging it takes long enough to act while the merge writes."""
    from cogsurgeon.tools.lora.safetensors_io import OutputTensor, encode_header

    saved_base(folder, torch.float32)
    size = 512 * 2**20
    header = encode_header([OutputTensor("padding", "U8", (size,), size)], {"format": "pt"})
    with (folder / "aa-padding.safetensors").open("wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + size)
    return folder


def _start_merge(base: Path, lora: Path, out: Path, *extra: str, umask: int | None = None):
    import subprocess
    import sys

    from conftest import REPO_ROOT, cli_environment

    return subprocess.Popen(
        [sys.executable, "-m", "cogsurgeon.inspector", "lora", "merge", str(base), str(lora), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_environment(), cwd=REPO_ROOT,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def _wait_for_staging(out: Path, process, name: str = "aa-padding.safetensors") -> Path:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for entry in out.parent.glob(f".{out.name}.partial-*"):
            if (entry / name).exists():
                return entry
        assert process.poll() is None, process.communicate()
        time.sleep(0.002)
    raise AssertionError("the merge never started writing")


def _hidden_leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}"))


@pytest.mark.slow
def test_a_folder_appearing_at_out_during_a_merge_is_kept(adapters, tmp_path):
    base = _padded_base(tmp_path / "base")
    out = tmp_path / "merged"
    process = _start_merge(base, adapters[0], out)
    _wait_for_staging(out, process)
    out.mkdir()  # an empty folder: a plain rename would replace it
    (tmp_path / "marker").write_text("x")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert "appeared while the merge ran" in stderr.strip().splitlines()[-1]
    assert out.is_dir() and list(out.iterdir()) == []
    assert _hidden_leftovers(tmp_path, out) == []


@pytest.mark.slow
def test_sigterm_mid_merge_leaves_no_partial(adapters, tmp_path):
    import signal

    base = _padded_base(tmp_path / "base")
    out = tmp_path / "new" / "merged"
    process = _start_merge(base, adapters[0], out)
    _wait_for_staging(out, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "new").exists()  # the parent it created is gone too, with the partial folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_force_replaces_only_an_unchanged_earlier_merge(adapters, tmp_path, cli):
    first, second = adapters
    base = saved_base(tmp_path / "base", torch.float32)
    out = tmp_path / "merged"
    assert cli("lora", "merge", str(base), str(first), "--out", str(out)).returncode == 0
    manifest = (out / MERGE_MANIFEST).read_text()
    assert '"written_by": "cogsurgeon lora merge"' in manifest

    result = cli("lora", "merge", str(base), str(first), "--out", str(out))  # no --force: refused
    assert result.returncode == 2 and "already exists" in result.stderr
    result = cli("lora", "merge", str(base), f"{second}:0.5", "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert (out / MERGE_MANIFEST).read_text() != manifest  # replaced by the new merge

    shard = sorted(out.glob("*.safetensors"))[0]  # one byte changed, same size: no longer the merge it wrote
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = cli("lora", "merge", str(base), str(first), "--out", str(out), "--force")
    assert result.returncode == 2
    assert "is not an earlier merge that --force may replace" in result.stderr and "differs" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden_leftovers(tmp_path, out) == []


def test_merge_manifests_hash_with_xxh3_and_an_earlier_sha256_one_stays_replaceable(adapters, tmp_path, cli):
    """xxhash is required, so a merge's manifest is always xxh3-128; merges published before 2026-11-30 hashed with
    sha256, and --force still recognises one of those as an unchanged earlier merge."""
    import hashlib
    import json

    first, second = adapters
    base = saved_base(tmp_path / "base", torch.float32)
    out = tmp_path / "merged"
    assert cli("lora", "merge", str(base), str(first), "--out", str(out)).returncode == 0
    manifest = json.loads((out / MERGE_MANIFEST).read_text())
    assert {tuple(sorted(entry)) for entry in manifest["files"].values()} == {("bytes", "xxh3_128")}
    manifest["files"] = {
        name: {"sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(), "bytes": entry["bytes"]}
        for name, entry in manifest["files"].items()
    }
    (out / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    result = cli("lora", "merge", str(base), f"{second}:0.5", "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert "xxh3_128" in (out / MERGE_MANIFEST).read_text()


@pytest.mark.parametrize("kind", ["empty", "repair", "base-copy"])
def test_force_refuses_a_folder_that_is_not_a_merge(kind, adapters, tmp_path, cli):
    import shutil

    first, _ = adapters
    base = saved_base(tmp_path / "base", torch.float32)
    out = tmp_path / "target"
    if kind == "empty":
        out.mkdir()
    elif kind == "repair":
        assert cli("lora", "repair", str(first), "--out", str(out)).returncode == 0
        assert (out / "cogsurgeon-repair.json").is_file()
    else:
        shutil.copytree(base, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = cli("lora", "merge", str(base), str(first), "--out", str(out), "--force")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "is not an earlier merge that --force may replace" in line and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden_leftovers(tmp_path, out) == []


@pytest.mark.slow
def test_merge_output_gets_umask_permissions_and_stale_partials_are_removed(adapters, tmp_path):
    import stat

    base = saved_base(tmp_path / "base", torch.float32)
    out = tmp_path / "merged"
    stale = staging_of_a_dead_run(out)  # a dead process's leftover
    (stale / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 1000)
    process = _start_merge(base, adapters[0], out, umask=0o027)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}
    assert not stale.exists()
    assert _hidden_leftovers(tmp_path, out) == []
