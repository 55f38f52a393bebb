"""`cogsurgeon lora merge BASE LORA[:WEIGHT] … --out DIR`: fuse LoRAs into a local base transformer's weights and write
a diffusers transformer folder — same dtype, the base's shards and index, config copied. Streams shard by shard and
tensor by tensor: untouched tensors are byte ranges copied by the kernel, each LoRA target weight is read, fused
(W + Σ weight·α/r·B·A as one GEMM in the weight's dtype, accumulated in float32) on a worker thread a few weights
ahead of the writer, so memory stays at a few tensors; a second thread follows the writer and hashes what it wrote.

The folder is published as `lora repair` publishes (tools/lora/publish.py): staged beside `--out`, a manifest
(`cogsurgeon-merge.json`, the xxh3-128 of every file, sha256 without xxhash) written last, renamed into place only
while `--out` is absent, under a lock; --force replaces only an unchanged earlier merge; SIGTERM/SIGHUP remove the
partial folder.

Imports torch (fusing is arithmetic on tensors); tools/lora inspect and repair do not import this module.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.loading import read_config
from cogsurgeon.inspector.safetensors_header import DTYPE_NAMES, read_header
from cogsurgeon.tools.lora.checkpoint import (
    FLOAT32_MAX,
    FLOAT32_MIN_NORMAL,
    LoraCheckpoint,
    LoraCheckpointError,
    read_checkpoint,
    tensor_bytes,
)
from cogsurgeon.tools.lora.compat import check_fits
from cogsurgeon.tools.lora.export import module_scales
from cogsurgeon.tools.lora.publish import (
    MERGE,
    OutputError,
    new_hash,
    output_path,
    publication,
    refuse_existing_output,
)
from cogsurgeon.tools.lora.safetensors_io import (
    OutputTensor,
    Progress,
    ProgressCallback,
    encode_header,
    write_safetensors,
)

CONFIG_NAME = "config.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
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
            if head and not Path(text).expanduser().exists():  # `my-adapter:abc`: a weight that is not a number
                raise LoraCheckpointError(
                    f"{text}: the weight after ':' must be a number (LORA:WEIGHT, e.g. {head}:0.5), got {tail!r}"
                ) from None
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


def torch_dtype(name: str) -> Any:
    """The torch dtype of a safetensors dtype name; merge fuses float weights only."""
    import torch

    if name not in FLOAT_DTYPES:
        raise LoraCheckpointError(f"merge fuses float weights only; one is stored as {name}")
    return getattr(torch, DTYPE_NAMES[name])


def _lora_tensors(checkpoint: LoraCheckpoint) -> dict[str, dict[str, Any]]:
    """{module: {"A": tensor, "B": tensor}} as torch tensors in their stored dtype (widened to float32 only while one
    weight is fused), read from the file or the reader's payloads."""
    import torch

    by_module: dict[str, dict[str, Any]] = {}
    for tensor in checkpoint.tensors:
        data = bytearray(tensor_bytes(tensor, checkpoint.source_file))
        value = torch.frombuffer(data, dtype=torch_dtype(tensor.dtype)).reshape(tensor.shape)
        by_module.setdefault(tensor.module, {})[tensor.part] = value
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
    SIGTERM/SIGHUP raise `PublicationInterrupted` (SIGINT: KeyboardInterrupt) after the partial folder is removed."""
    if not loras:
        raise LoraCheckpointError("merge needs at least one LORA")
    folder = transformer_folder(base)
    config = read_config(folder / CONFIG_NAME)
    out = output_path(out_dir, tuple(Path(spec.path).expanduser() for spec in loras))
    resolved_base = folder.resolve()
    if out == resolved_base or resolved_base in out.parents or out in resolved_base.parents:
        raise OutputError(f"out_dir={out} would be inside or around the base {folder}: choose another folder")
    refuse_existing_output(out, force, MERGE)
    return _merge(str(base), folder, config, loras, out, force, progress)


def _merge(base: str, folder: Path, config: dict[str, Any], loras: list[LoraSpec], out: Path, force: bool,
           progress: ProgressCallback | None) -> MergeResult:
    deltas: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    summaries = []
    for spec in loras:
        checkpoint = read_checkpoint(spec.path)
        report = checkpoint.report
        if report.problems:
            raise LoraCheckpointError(f"cannot merge {report.file}: {report.problems[0]}")
        if report.use_dora or report.lora_bias:
            raise LoraCheckpointError(f"cannot merge {report.file}: a {'DoRA' if report.use_dora else 'lora_bias'} "
                                      "LoRA is not W + α/r·B·A, which is what merge fuses")
        if report.alpha is None:
            raise LoraCheckpointError(report.unsettled_alpha_message().replace(
                "Settle it with", "Repair it first (repair_checkpoint or `cogsurgeon lora repair`, with")
                + ") and merge the repaired folder")
        misfit = check_fits(config, [(t.module, t.part, t.shape) for t in checkpoint.tensors], str(base))
        if misfit is not None:
            raise LoraCheckpointError(f"{spec.path}: {misfit}")
        scales = module_scales(report)
        for module, pair in _lora_tensors(checkpoint).items():
            rank, alpha = scales[module]
            factor = fused_factor(spec, alpha, rank)
            deltas.setdefault(f"{module}.weight", []).append((factor, pair))
        summaries.append({"path": spec.path, "weight": spec.weight, "alpha": report.alpha, "rank": report.rank,
                          "modules": report.num_modules})

    shards = sorted(folder.glob("*.safetensors"))
    headers = [read_header(shard) for shard in shards]
    present = {entry.name for header in headers for entry in header.tensors}
    absent = sorted(set(deltas) - present)
    if absent:
        raise LoraCheckpointError(f"the base {folder} has no weight {absent[0]} that the LoRA targets")

    tracker = Progress(sum(header.file_size for header in headers), progress)
    with publication(out, force=force, kind=MERGE) as target, _gemm_threads(GEMM_THREADS):
        staging = target.staging
        hashes: dict[str, str] = {}
        for shard, header in zip(shards, headers):
            fused = {entry.name: entry for entry in header.tensors if entry.name in deltas}
            source_descriptor = os.open(shard, os.O_RDONLY)

            def fuse(name: str, buffer: Any, descriptor: int = source_descriptor, fused: dict = fused) -> memoryview:
                """Read W into a reused buffer (no fresh pages to fault in); add the LoRAs in place; its bytes."""
                entry = fused[name]
                raw = buffer[:entry.nbytes]
                view = raw.numpy()
                done = 0
                while done < entry.nbytes:
                    count = os.preadv(descriptor, [view[done:]], entry.start + done)
                    if count <= 0:
                        raise LoraCheckpointError(f"{shard} ended inside the weight {name}")
                    done += count
                weight = raw.view(torch_dtype(entry.dtype)).reshape(entry.shape)
                down, up = stacked(deltas[name], weight.dtype)
                weight.addmm_(up, down)  # one GEMM, accumulated in float32, rounded once (as torch.addmm)
                if not bool(weight.isfinite().all()):  # a fused weight of inf loads and silently ruins every output
                    raise LoraCheckpointError(
                        f"fusing into {name} gives values that are not finite in {weight.dtype}: lower the "
                        "LoRA weights (or check the LoRAs' lora_alpha and the base's weights)"
                    )
                return memoryview(view)

            ahead = Prefetcher(list(fused), fuse, max((e.nbytes for e in fused.values()), default=0))
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
                    # not created here first: ext4 flushes a file truncated and rewritten (auto_da_alloc) on close
                    hasher = TrailingHash(path, len(encode_header(tensors, header.metadata)), tracker)
                    write_safetensors(path, tensors, header.metadata, source=source, progress=hasher)
                hashes[shard.name] = hasher.finish(path.stat().st_size)
            finally:
                ahead.close()
                os.close(source_descriptor)
                if hasher is not None:
                    hasher.stop()
        shutil.copyfile(folder / CONFIG_NAME, staging / CONFIG_NAME)
        for index in folder.glob(f"*{INDEX_SUFFIX}"):
            shutil.copyfile(index, staging / index.name)
        published = target.publish(hashes)
    files = tuple(str(out / name) for name in sorted(published))
    return MergeResult(str(out), files, len(deltas), tuple(summaries))


def fused_factor(spec: LoraSpec, alpha: float, rank: int) -> float:
    """weight * alpha / r of one module of one LoRA, refused when float32 (where B is scaled) cannot hold it: inf, or
    a weight that is not 0 rounding to nothing."""
    factor = spec.weight * alpha / rank
    if abs(factor) > FLOAT32_MAX or (factor != 0 and abs(factor) < FLOAT32_MIN_NORMAL) or (spec.weight and not factor):
        raise LoraCheckpointError(
            f"{spec.path} at weight {spec.weight:g}: weight x alpha / r = {factor:g} is outside float32's range "
            "(1.2e-38 to 3.4e38), so the fused weights would be inf or unchanged: choose a weight within it"
        )
    return factor


def stacked(pairs: list[tuple[float, dict[str, Any]]], dtype: Any) -> tuple[Any, Any]:
    """All LoRAs of one weight as one low-rank product: A stacked by rows, B (times each LoRA's weight * alpha / r,
    in float32) by columns, so that W + B_all @ A_all = W + Σ factor_i B_i A_i is one GEMM in the weight's dtype."""
    import torch

    down = torch.cat([pair["A"].float() for _, pair in pairs], dim=0)
    up = torch.cat([pair["B"].float() * factor for factor, pair in pairs], dim=1)
    return down.to(dtype), up.to(dtype)


GEMM_THREADS = 1  # the fusing thread's GEMMs on one core: the writer's kernel copies need the other one


@contextmanager
def _gemm_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads for the merge (a process-wide setting, restored afterwards). One thread of rank-r
    GEMMs keeps ahead of the writer; more made them contend with the copy for the same cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(count, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Prefetcher:
    """Fuses the next weights on a worker thread while the writer copies the bytes before them (torch and preadv
    release the GIL). DEPTH + 1 buffers of the largest fused weight are reused in turn (DEPTH being fused, one being
    written), so memory stays bounded and no fresh pages are faulted in per weight."""

    DEPTH = 6  # a block's four attention weights lie together in a shard: fuse them while its FF bytes are copied

    def __init__(self, names: list[str], compute: Callable[[str, Any], memoryview], buffer_bytes: int) -> None:
        import torch
        from concurrent.futures import ThreadPoolExecutor

        self.names = names
        self.compute = compute
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[str, tuple[Any, Any]] = {}
        self.submitted = 0
        count = min(self.DEPTH + 1, len(names))
        self.free = [torch.empty(buffer_bytes, dtype=torch.uint8) for _ in range(count)]
        self.writing: Any = None  # the buffer whose bytes the writer holds

    def _fill(self) -> None:
        while self.submitted < len(self.names) and len(self.futures) < self.DEPTH and self.free:
            name = self.names[self.submitted]
            buffer = self.free.pop()
            self.futures[name] = (self.pool.submit(self.compute, name, buffer), buffer)
            self.submitted += 1

    def payload(self, name: str) -> Callable[[], memoryview]:
        def get() -> memoryview:
            if self.writing is not None:  # the writer asks for the next weight only once the last one is written
                self.free.append(self.writing)
                self.writing = None
            self._fill()
            future, buffer = self.futures.pop(name)  # asked in the order the names were given
            data = future.result()
            self.writing = buffer
            self._fill()  # start the next one before this one is written
            return data
        return get

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class TrailingHash:
    """The manifest hash (`MERGE.hash_name`: xxh3-128) of a file while it is written, on a thread that follows the
    writer: it is the writer's progress, `advance(n)` saying that n more data bytes are in the file (passed on to the
    overall `tracker`); `finish(size)` waits for the hash of the whole file. Hashes what the kernel holds for the file
    (the page cache, just written), so the manifest hashes the bytes written, not the bytes meant."""

    CHUNK = 64 * 1024 * 1024

    def __init__(self, path: Path, header_bytes: int, tracker: Progress) -> None:
        self.path = path
        self.tracker = tracker
        self.written = 0  # data bytes the writer has put in the file
        self.descriptor = -1  # opened once the writer has written something (the file exists then)
        self.digest = new_hash(MERGE.hash_name)
        self.condition = threading.Condition()
        self.header_bytes = header_bytes
        self.target = 0
        self.done = 0
        self.ending = False
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="merge-hash", daemon=True)
        self.thread.start()

    def advance(self, count: int) -> None:
        self.written += count
        with self.condition:
            self.target = self.header_bytes + self.written
            self.condition.notify()
        self.tracker.advance(count)

    def _run(self) -> None:
        try:
            while True:
                with self.condition:
                    while self.done >= self.target and not self.ending and not self.stopped:
                        self.condition.wait()
                    if self.stopped or (self.ending and self.done >= self.target):
                        return
                    target = self.target
                if self.descriptor < 0:
                    self.descriptor = os.open(self.path, os.O_RDONLY)
                while self.done < target and not self.stopped:
                    self.done += self._hash_mapped(min(self.CHUNK, target - self.done))
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread in finish()
            self.error = exc

    def _hash_mapped(self, length: int) -> int:
        """Hash `length` bytes from `done` through a read-only mapping of the file: the page cache's pages are
        hashed where they lie, with no copy into a buffer (a copy of every byte written cost a core here)."""
        start = self.done - self.done % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(self.descriptor, self.done + length - start, prot=mmap.PROT_READ, offset=start) as mapped:
            view = memoryview(mapped)
            try:
                self.digest.update(view[self.done - start:])
            finally:
                view.release()
        return length

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
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


__all__ = [
    "LoraSpec", "MergeResult", "merge_loras", "parse_lora_spec",
]
