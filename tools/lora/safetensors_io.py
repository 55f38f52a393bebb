"""Writing safetensors without torch: a new file whose tensors are copied byte for byte out of other files (or
handed over as bytes), so a checkpoint is never held in memory. Reading and validating headers has one home,
`cogsurgeon.inspector.safetensors_header`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# read_header is re-exported
from cogsurgeon.inspector.safetensors_header import SafetensorsFormatError, read_header  # noqa: F401

COPY_CHUNK_BYTES = 64 * 1024 * 1024
WRITE_CHUNK_BYTES = 1024 * 1024

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: a name, dtype and shape, and where its bytes come from — a byte range of a source
    file (`source_start`, `nbytes`) or a function that returns them (`payload`, for sources that are not files)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source_start: int | None = None
    payload: Callable[[], bytes | memoryview] | None = None


def encode_header(tensors: Sequence[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for `tensors` laid out back to back in the given order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded


def byte_runs(tensors: Iterable[OutputTensor]) -> list[tuple[int, int]]:
    """(source_start, length) runs covering the tensors in order, adjacent ranges merged: a checkpoint whose layout
    is kept becomes one or a few large copies instead of hundreds of small ones."""
    runs: list[tuple[int, int]] = []
    for tensor in tensors:
        assert tensor.source_start is not None
        if runs and runs[-1][0] + runs[-1][1] == tensor.source_start:
            runs[-1] = (runs[-1][0], runs[-1][1] + tensor.nbytes)
        else:
            runs.append((tensor.source_start, tensor.nbytes))
    return runs


@dataclass
class Progress:
    """Bytes written so far out of `total`, told to `callback(done, total)` as they grow."""

    total: int
    callback: ProgressCallback | None = None
    done: int = 0

    def advance(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


def _copy_range(source: BinaryIO, target: BinaryIO, start: int, length: int, progress: Progress) -> None:
    """Copy `length` bytes from `start` of source to the current end of target, in the kernel where it can."""
    source_fd, target_fd = source.fileno(), target.fileno()
    target.flush()
    position = start
    remaining = length
    while remaining:
        count = min(remaining, COPY_CHUNK_BYTES)
        try:
            copied = os.copy_file_range(source_fd, target_fd, count, position)
        except (AttributeError, OSError):
            copied = 0
        if copied <= 0:  # not supported here (other file systems, old kernels): plain reads
            source.seek(position)
            chunk = source.read(count)
            if len(chunk) != count:
                raise SafetensorsFormatError(f"{source.name} ended early while copying tensor bytes")
            target.write(chunk)
            target.flush()
            copied = count
        position += copied
        remaining -= copied
        progress.advance(copied)


def write_safetensors(
    target_path: Path,
    tensors: Sequence[OutputTensor],
    metadata: dict[str, str],
    *,
    source: BinaryIO | None = None,
    progress: Progress | None = None,
) -> None:
    """Write a safetensors file: header, then each tensor's bytes copied from `source` (ranges) or its payload."""
    progress = progress or Progress(sum(t.nbytes for t in tensors))
    with target_path.open("wb") as target:
        target.write(encode_header(tensors, metadata))
        if all(t.source_start is not None for t in tensors):
            assert source is not None
            for start, length in byte_runs(tensors):
                _copy_range(source, target, start, length, progress)
            return
        for tensor in tensors:
            if tensor.payload is None:
                assert source is not None and tensor.source_start is not None
                _copy_range(source, target, tensor.source_start, tensor.nbytes, progress)
                continue
            data = tensor.payload()
            if len(data) != tensor.nbytes:
                raise SafetensorsFormatError(f"tensor {tensor.name!r} has {len(data)} bytes, expected {tensor.nbytes}")
            view = memoryview(data).cast("B")
            for offset in range(0, tensor.nbytes, WRITE_CHUNK_BYTES):  # large writes were slower here, not faster
                target.write(view[offset:offset + WRITE_CHUNK_BYTES])
            target.flush()
            progress.advance(tensor.nbytes)


__all__ = [
    "OutputTensor", "Progress", "ProgressCallback", "byte_runs", "encode_header", "write_safetensors",
]
