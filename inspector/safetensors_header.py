"""The one safetensors header reader: parse and validate the header of a `.safetensors` file without torch, as
strictly as the `safetensors` library itself (and, as a last word, ask the library on the same file), so that every
file cogsurgeon accepts is one that safetensors, PEFT and diffusers load.

Layout: 8 bytes little-endian header length N (at most 100 MB), N bytes of UTF-8 JSON (`{name: {dtype, shape,
data_offsets}, ..., "__metadata__": {str: str}}`), then the data; offsets are relative to the start of the data,
tensors lie back to back from 0 to the end of the file. Foundation layer: used by model loading and the LoRA tools.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.user_files import UserFileError, describe_os_error, loads_json, open_regular

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
MAX_USIZE = 2**64 - 1  # safetensors reads sizes and offsets as 64-bit unsigned integers
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


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


def read_header(path: Path, *, ask_library: bool = True) -> SafetensorsHeader:
    """Parse and validate the header of `path`: a regular file, a header safetensors accepts, every tensor's bytes
    in the file, back to back, matching its shape and dtype. With `ask_library`, the `safetensors` library must
    accept the same file too. Raises `SafetensorsFormatError` naming the file and what is wrong."""
    try:
        with open_regular(path) as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsFormatError(f"{path} is not a safetensors file: it is only {file_size} bytes long")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES:
                raise SafetensorsFormatError(
                    f"{path} is not a safetensors file: its first 8 bytes announce a {header_length:,}-byte header, "
                    f"over safetensors' limit of {MAX_HEADER_BYTES:,}"
                )
            if header_length > file_size - 8:
                raise SafetensorsFormatError(
                    f"{path} is not a safetensors file (or is truncated): its first 8 bytes announce a "
                    f"{header_length}-byte header in a {file_size}-byte file"
                )
            raw_header = handle.read(header_length)
    except UserFileError as exc:
        raise SafetensorsFormatError(str(exc)) from None
    except OSError as exc:
        raise SafetensorsFormatError(f"cannot read {describe_os_error(path, exc)}") from None
    header = parse_header_json(path, raw_header)
    parsed = validate_header(path, header, 8 + header_length, file_size)
    if ask_library:
        rejection = library_rejection(path)
        if rejection is not None:
            raise SafetensorsFormatError(f"{path} is refused by the safetensors library: {rejection}")
    return parsed


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice")
        _check_text(key)
        seen[key] = value
    return seen


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode") from None


def parse_header_json(path: Path, raw_header: bytes) -> dict[str, Any]:
    """The header bytes as a JSON object, refused as safetensors refuses them: not strict UTF-8 (a BOM included),
    not JSON, NaN/Infinity, lone surrogates, duplicate keys, or nested deeper than any header is."""
    broken = f"{path} has a broken safetensors header"
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsFormatError(f"{broken}: not UTF-8 ({exc.reason} at byte {8 + exc.start})") from None
    if text.startswith("\ufeff"):
        raise SafetensorsFormatError(f"{broken}: it starts with a byte-order mark, which safetensors refuses")
    try:
        header = loads_json(text, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise SafetensorsFormatError(f"{broken}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{broken}: not a JSON object")
    return header


def _size_value(value: Any) -> int | None:
    """A JSON value as safetensors' usize: a non-negative integer below 2**64 (not a bool, float or string)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USIZE:
        return value
    return None


def validate_header(path: Path, header: dict[str, Any], data_start: int, file_size: int) -> SafetensorsHeader:
    """Check a parsed header against the file: entry types, dtypes, sizes without overflow, offsets back to back."""
    broken = f"{path} has a broken safetensors header"
    header = dict(header)
    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise SafetensorsFormatError(f"{broken}: __metadata__ must map strings to strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise SafetensorsFormatError(f"{broken}: __metadata__[{key!r}] is not a string")
        try:
            _check_text(value)
        except ValueError as exc:
            raise SafetensorsFormatError(f"{broken}: __metadata__[{key!r}]: {exc}") from None
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise SafetensorsFormatError(
                f"{broken}: entry {name!r} must hold exactly dtype, shape and data_offsets"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            shown = dtype if isinstance(dtype, str) else type(dtype).__name__
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unknown dtype {shown!r}")
        if not isinstance(shape, list) or any(_size_value(size) is None for size in shape):
            raise SafetensorsFormatError(
                f"{broken}: tensor {name!r} has shape {_short(shape)}; a shape is a list of non-negative integers"
            )
        if not isinstance(offsets, list) or len(offsets) != 2 or any(_size_value(o) is None for o in offsets):
            raise SafetensorsFormatError(
                f"{broken}: tensor {name!r} has data_offsets {_short(offsets)}; expected two non-negative integers"
            )
        elements = 1
        for size in shape:
            elements *= size
            if elements > MAX_USIZE:
                raise SafetensorsFormatError(f"{broken}: tensor {name!r} has a shape whose size overflows 64 bits")
        nbytes = elements * DTYPE_SIZES[dtype]
        begin, end = offsets
        if nbytes > MAX_USIZE:
            raise SafetensorsFormatError(f"{broken}: tensor {name!r} has a byte size that overflows 64 bits")
        if end < begin or end - begin != nbytes:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has {end - begin} bytes of data, "
                f"expected {nbytes}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda item: (item.start, item.end))
    position = data_start
    for entry in entries:
        if entry.start != position:
            raise SafetensorsFormatError(
                f"{broken}: tensor {entry.name!r} starts at data byte "
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def library_rejection(path: Path) -> str | None:
    """What the `safetensors` library says against the file at `path`, or None when it opens it (header and
    layout; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
            handle.metadata()
    except Exception as exc:  # its Rust errors surface as several Python types
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    return None


__all__ = [
    "DTYPE_NAMES", "SafetensorsFormatError", "SafetensorsHeader", "library_rejection", "read_header",
]
