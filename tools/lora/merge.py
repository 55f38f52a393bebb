"""`cogsurgeon lora merge BASE LORA[:WEIGHT] … --out DIR`: fuse LoRAs into a local base transformer's weights and write
a diffusers transformer folder — same dtype, the base's shards and index, config copied. Streams shard by shard and
tensor by tensor: untouched tensors are byte ranges copied by the kernel, each LoRA target weight is read, fused
(W + Σ weight·α/r·B·A as one GEMM in the weight's dtype, accumulated in float32) and written before the next is
read, so memory stays at about one tensor.

Imports torch (fusing is arithmetic on tensors); tools/lora inspect and repair do not import this module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpoint, LoraCheckpointError, read_checkpoint
from cogsurgeon.tools.lora.compat import check_fits
from cogsurgeon.tools.lora.export import module_scales
from cogsurgeon.tools.lora.safetensors_io import OutputTensor, ProgressCallback, new_progress, read_header, write_safetensors

CONFIG_NAME = "config.json"
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class LoraSpec:
    path: str
    weight: float


@dataclass(frozen=True)
class MergeResult:
    out_dir: str
    files: tuple[str, ...]
    fused_modules: int
    loras: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "files": list(self.files), "fused_modules": self.fused_modules,
                "loras": list(self.loras)}


def parse_lora_spec(text: str) -> LoraSpec:
    """`path` or `path:WEIGHT` (a path may itself hold ':'; only a trailing number is a weight)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return LoraSpec(text, 1.0)
        if not math.isfinite(weight):
            raise LoraCheckpointError(f"{text}: the weight after ':' must be a finite number")
        return LoraSpec(head, weight)
    return LoraSpec(text, 1.0)


def transformer_folder(base: str | Path) -> Path:
    """The folder holding the transformer's config.json and safetensors: BASE itself or BASE/transformer."""
    folder = Path(base).expanduser()
    for candidate in (folder, folder / "transformer"):
        if (candidate / CONFIG_NAME).is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    raise LoraCheckpointError(
        f"{base} is not a local diffusers transformer folder (config.json and *.safetensors, or a model root with "
        "transformer/ inside): merge writes weights, so the base must be on disk"
    )


def _lora_tensors(checkpoint: LoraCheckpoint) -> dict[str, dict[str, Any]]:
    """{module: {"A": tensor, "B": tensor}} as torch tensors in their stored dtype (widened to float32 only while one
    weight is fused), read from the file or the reader's payloads."""
    import torch

    by_module: dict[str, dict[str, Any]] = {}
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    source = checkpoint.source_file.open("rb") if checkpoint.source_file is not None else None
    try:
        for tensor in checkpoint.tensors:
            if tensor.payload is not None:
                data = bytes(tensor.payload())
            else:
                assert source is not None and tensor.source_start is not None
                source.seek(tensor.source_start)
                data = source.read(tensor.nbytes)
            value = torch.frombuffer(bytearray(data), dtype=dtypes[tensor.dtype]).reshape(tensor.shape)
            by_module.setdefault(tensor.module, {})[tensor.part] = value
    finally:
        if source is not None:
            source.close()
    return by_module


def merge_loras(
    base: str | Path,
    loras: list[LoraSpec],
    out_dir: str | Path,
    *,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Fuse `loras` (each at its trained scale times its weight) into the base at `base` and write `out_dir`."""
    import torch
    from safetensors import safe_open

    if not loras:
        raise LoraCheckpointError("merge needs at least one LORA")
    folder = transformer_folder(base)
    config = json.loads((folder / CONFIG_NAME).read_text())
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        raise LoraCheckpointError(f"{out} already exists: choose another --out")
    if out == folder.resolve() or folder.resolve() in out.parents:
        raise LoraCheckpointError(f"--out {out} is inside the base {folder}: choose another folder")

    deltas: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    summaries = []
    for spec in loras:
        checkpoint = read_checkpoint(spec.path)
        report = checkpoint.report
        if report.problems:
            raise LoraCheckpointError(f"cannot merge {report.file}: {report.problems[0]}")
        if report.alpha is None:
            raise LoraCheckpointError(report.unsettled_alpha_message().replace(
                "Settle it with", "Repair it first (`cogsurgeon lora repair` with") + ") and merge the repaired folder")
        misfit = check_fits(config, [(t.module, t.part, t.shape) for t in checkpoint.tensors], str(base))
        if misfit is not None:
            raise LoraCheckpointError(f"{spec.path}: {misfit}")
        scales = module_scales(report)
        for module, pair in _lora_tensors(checkpoint).items():
            rank, alpha = scales[module]
            deltas.setdefault(f"{module}.weight", []).append((spec.weight * alpha / rank, pair))
        summaries.append({"path": spec.path, "weight": spec.weight, "alpha": report.alpha, "rank": report.rank,
                          "modules": report.num_modules})

    shards = sorted(folder.glob("*.safetensors"))
    headers = [read_header(shard) for shard in shards]
    present = {entry.name for header in headers for entry in header.tensors}
    absent = sorted(set(deltas) - present)
    if absent:
        raise LoraCheckpointError(f"the base {folder} has no weight {absent[0]} that the LoRA targets")

    total = sum(header.file_size for header in headers)
    tracker = new_progress(total, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for shard, header in zip(shards, headers):
            handle = safe_open(str(shard), framework="pt")

            def fuse(name: str, handle=handle) -> memoryview:
                weight = handle.get_tensor(name)
                down, up = stacked(deltas[name], weight.dtype)
                merged = torch.addmm(weight, up, down)  # one GEMM, accumulated in float32, rounded once
                return memoryview(merged.contiguous().reshape(-1).view(torch.uint8).numpy())

            ahead = Prefetcher([entry.name for entry in header.tensors if entry.name in deltas], fuse)
            tensors = [
                OutputTensor(entry.name, entry.dtype, entry.shape, entry.nbytes,
                             None if entry.name in deltas else entry.start,
                             ahead.payload(entry.name) if entry.name in deltas else None)
                for entry in header.tensors
            ]
            try:
                with shard.open("rb") as source:
                    write_safetensors(staging / shard.name, tensors, header.metadata, source=source, progress=tracker)
            finally:
                ahead.close()
        shutil.copyfile(folder / CONFIG_NAME, staging / CONFIG_NAME)
        for index in folder.glob(f"*{INDEX_SUFFIX}"):
            shutil.copyfile(index, staging / index.name)
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LoraCheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(str(out / p.name) for p in sorted(out.iterdir()))
    return MergeResult(str(out), files, len(deltas), tuple(summaries))


def stacked(pairs: list[tuple[float, dict[str, Any]]], dtype: Any) -> tuple[Any, Any]:
    """All LoRAs of one weight as one low-rank product: A stacked by rows, B (times each LoRA's weight * alpha / r,
    in float32) by columns, so that W + B_all @ A_all = W + Σ factor_i B_i A_i is one GEMM in the weight's dtype."""
    import torch

    down = torch.cat([pair["A"].float() for _, pair in pairs], dim=0)
    up = torch.cat([pair["B"].float() * factor for factor, pair in pairs], dim=1)
    return down.to(dtype), up.to(dtype)


class Prefetcher:
    """Fuses the next weights on a worker thread while the writer copies the bytes before them (torch releases the
    GIL in its kernels): at most DEPTH fused weights wait in memory, so memory stays bounded."""

    DEPTH = 2

    def __init__(self, names: list[str], compute: Callable[[str], memoryview]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.names = names
        self.compute = compute
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[str, Any] = {}
        self.submitted = 0

    def _fill(self) -> None:
        while self.submitted < len(self.names) and len(self.futures) < self.DEPTH:
            name = self.names[self.submitted]
            self.futures[name] = self.pool.submit(self.compute, name)
            self.submitted += 1

    def payload(self, name: str) -> Callable[[], memoryview]:
        def get() -> memoryview:
            self._fill()
            future = self.futures.pop(name, None)
            data = future.result() if future is not None else self.compute(name)
            self._fill()  # start the next one before this one is written
            return data
        return get

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
