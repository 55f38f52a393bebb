"""Safetensors as a file format, without torch: read and validate a header, and write a new file whose tensors are
copied byte for byte out of other files (or handed over as bytes), so a checkpoint is never held in memory.

Layout: 8 bytes little-endian header length N, N bytes of JSON (`{name: {dtype, shape, data_offsets}, ...,
"__metadata__": {str: str}}`, padded with spaces), then the data; offsets are relative to the start of the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cogsurgeon.inspector.errors import CogsurgeonError

# bytes per element; the names are safetensors' own
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
COPY_CHUNK_BYTES = 64 * 1024 * 1024

ProgressCallback = Callable[[int, int], None]


class SafetensorsFormatError(CogsurgeonError):
    """A file that claims to be safetensors but is not a complete, consistent one."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, as absolute offsets into the file."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: tuple[TensorEntry, ...]  # in file order (by offset)
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of `path`: every tensor's bytes lie in the file, back to back, and match its
    shape and dtype. Raises `SafetensorsFormatError` naming the file and what is wrong."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsFormatError(f"{path} is not a safetensors file: it is only {file_size} bytes long")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES or header_length > file_size - 8:
                raise SafetensorsFormatError(
                    f"{path} is not a safetensors file (or is truncated): its first 8 bytes announce a "
                    f"{header_length}-byte header in a {file_size}-byte file"
                )
            raw_header = handle.read(header_length)
    except OSError as exc:
        raise SafetensorsFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"{path} has a broken safetensors header: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path} has a broken safetensors header: not a JSON object")
    data_start = 8 + header_length
    return _validated(path, header, data_start, file_size)


def _validated(path: Path, header: dict, data_start: int, file_size: int) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError(f"{path} has a broken safetensors header: __metadata__ must map strings to strings")
    entries = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise SafetensorsFormatError(
                f"{path} has a broken safetensors header: entry {name!r} lacks dtype, shape or data_offsets"
            ) from None
        if dtype not in DTYPE_SIZES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        elements = 1
        for size in shape:
            elements *= size
        if end - begin != elements * DTYPE_SIZES[dtype] or begin < 0:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has {end - begin} bytes of data, "
                f"expected {elements * DTYPE_SIZES[dtype]}"
            )
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda entry: (entry.start, entry.end))
    position = data_start
    for entry in entries:
        if entry.start != position:
            raise SafetensorsFormatError(
                f"{path} has a broken safetensors header: tensor {entry.name!r} starts at data byte "
                f"{entry.start - data_start}, expected {position - data_start} (overlap or gap)"
            )
        position = entry.end
    if position != file_size:
        if position > file_size:
            raise SafetensorsFormatError(
                f"{path} is truncated: its header describes {position} bytes, the file has {file_size}"
            )
        raise SafetensorsFormatError(
            f"{path} has {file_size - position} bytes after the last tensor the header describes"
        )
    return SafetensorsHeader(path, tuple(entries), dict(metadata), data_start, file_size)


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
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
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


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.done = 0
        self.total = total
        self.callback = callback

    def advance(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


def _copy_range(source: BinaryIO, target: BinaryIO, start: int, length: int, progress: _Progress) -> None:
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
    progress: _Progress | None = None,
) -> None:
    """Write a safetensors file: header, then each tensor's bytes copied from `source` (ranges) or its payload."""
    progress = progress or _Progress(sum(t.nbytes for t in tensors), None)
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
            target.write(data)
            target.flush()
            progress.advance(tensor.nbytes)


def new_progress(total: int, callback: ProgressCallback | None) -> _Progress:
    return _Progress(total, callback)
