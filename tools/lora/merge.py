"""`cogsurgeon lora merge BASE LORA[:WEIGHT] … --out DIR`: fuse LoRAs into a local base transformer's weights and write
a diffusers transformer folder — same dtype, the base's shards and index, config copied. Streams shard by shard and
tensor by tensor: untouched tensors are byte ranges copied by the kernel, each LoRA target weight is read, fused
(W + Σ weight·α/r·B·A as one GEMM in the weight's dtype, accumulated in float32) on a worker thread a few weights
ahead of the writer, so memory stays at a few tensors; a second thread follows the writer and hashes what it wrote.

The folder is published as `lora repair` publishes (tools/lora/publish.py): staged beside `--out`, a manifest
(`cogsurgeon-merge.json`, sha256 of every file) written last, renamed into place only while `--out` is absent, under
a lock; --force replaces only an unchanged earlier merge; SIGTERM/SIGHUP remove the partial folder.

Imports torch (fusing is arithmetic on tensors); tools/lora inspect and repair do not import this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpoint, LoraCheckpointError, read_checkpoint
from cogsurgeon.tools.lora.compat import check_fits
from cogsurgeon.tools.lora.export import module_scales
from cogsurgeon.tools.lora.publish import MERGE, OutputError, output_path, publication, refuse_existing_output
from cogsurgeon.tools.lora.safetensors_io import (
    OutputTensor,
    ProgressCallback,
    encode_header,
    new_progress,
    read_header,
    write_safetensors,
)

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
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Fuse `loras` (each at its trained scale times its weight) into the base at `base` and write `out_dir`.
    Raises `LoraCheckpointError` (nothing written) for bad inputs, `OutputError` when `out_dir` exists (with
    `force`: as anything but an unchanged earlier merge), appears or changes meanwhile, or another merge holds it;
    SIGTERM/SIGHUP raise `RepairInterrupted` (SIGINT: KeyboardInterrupt) after the partial folder is removed."""
    if not loras:
        raise LoraCheckpointError("merge needs at least one LORA")
    folder = transformer_folder(base)
    config = json.loads((folder / CONFIG_NAME).read_text())
    out = output_path(out_dir, tuple(Path(spec.path).expanduser() for spec in loras))
    resolved_base = folder.resolve()
    if out == resolved_base or resolved_base in out.parents or out in resolved_base.parents:
        raise OutputError(f"--out {out} would be inside or around the base {folder}: choose another folder")
    refuse_existing_output(out, force, MERGE)
    return _merge(str(base), folder, config, loras, out, force, progress)


def _merge(base: str, folder: Path, config: dict[str, Any], loras: list[LoraSpec], out: Path, force: bool,
           progress: ProgressCallback | None) -> MergeResult:
    import torch
    from safetensors import safe_open


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
    with publication(out, force=force, kind=MERGE) as target:
        staging = target.staging
        hashes: dict[str, str] = {}
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
            path = staging / shard.name
            hasher = None
            try:
                with shard.open("rb") as source:
                    path.touch()
                    hasher = TrailingHash(path, len(encode_header(tensors, header.metadata)))
                    write_safetensors(path, tensors, header.metadata, source=source,
                                      progress=_Following(tracker, hasher))
                hashes[shard.name] = hasher.finish(path.stat().st_size)
            finally:
                ahead.close()
                if hasher is not None:
                    hasher.stop()
        shutil.copyfile(folder / CONFIG_NAME, staging / CONFIG_NAME)
        for index in folder.glob(f"*{INDEX_SUFFIX}"):
            shutil.copyfile(index, staging / index.name)
        published = target.publish(hashes)
    files = tuple(str(out / name) for name in sorted(published))
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

    DEPTH = 6  # a block's four attention weights lie together in a shard: fuse them while its FF bytes are copied

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


class TrailingHash:
    """sha256 of a file while it is written, on a thread that follows the writer: `reached(n)` says that the first
    n bytes are in the file; `finish(size)` waits for the hash of the whole file. Reads what the kernel holds for
    the file (the page cache, just written), so the manifest hashes the bytes written, not the bytes meant."""

    CHUNK = 8 * 1024 * 1024

    def __init__(self, path: Path, header_bytes: int) -> None:
        self.descriptor = os.open(path, os.O_RDONLY)
        self.digest = hashlib.sha256()
        self.condition = threading.Condition()
        self.header_bytes = header_bytes
        self.target = 0
        self.done = 0
        self.ending = False
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="merge-hash", daemon=True)
        self.thread.start()

    def reached(self, data_bytes: int) -> None:
        with self.condition:
            self.target = self.header_bytes + data_bytes
            self.condition.notify()

    def _run(self) -> None:
        try:
            while True:
                with self.condition:
                    while self.done >= self.target and not self.ending and not self.stopped:
                        self.condition.wait()
                    if self.stopped or (self.ending and self.done >= self.target):
                        return
                    target = self.target
                while self.done < target and not self.stopped:
                    chunk = os.pread(self.descriptor, min(self.CHUNK, target - self.done), self.done)
                    if not chunk:
                        raise OSError(f"the merged shard ended at {self.done} bytes while hashing")
                    self.digest.update(chunk)  # hashlib releases the GIL on large buffers
                    self.done += len(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread in finish()
            self.error = exc

    def finish(self, size: int) -> str:
        with self.condition:
            self.target = size
            self.ending = True
            self.condition.notify()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join()
        try:
            os.close(self.descriptor)
        except OSError:
            pass


class _Following:
    """The byte progress of one shard's writer, passed on to the overall progress and to the shard's hasher."""

    def __init__(self, tracker: Any, hasher: TrailingHash) -> None:
        self.tracker = tracker
        self.hasher = hasher
        self.written = 0

    def advance(self, count: int) -> None:
        self.written += count
        self.hasher.reached(self.written)
        self.tracker.advance(count)
