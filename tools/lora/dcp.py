"""The torch distributed checkpoint (DCP) reader: CogKit's default LoRA checkpoint, `checkpoint-N/` holding `.metadata`
and `__0_0.distcp`, written by `dcp.save({"app": AppState(model, optimizer, lora=True)})` (CogKit
src/cogkit/finetune/base/base_trainer.py:439, AppState in src/cogkit/finetune/utils/ckpt.py:35-63), so the LoRA
tensors sit under `app.model.` and the optimizer under `app.optim.` (ignored).

`.metadata` is a pickle, and torch's own `FileSystemReader.read_metadata` hands it to an unrestricted `pickle.load`:
a crafted file would run code. Here it is read only by `MetadataUnpickler`, which rebuilds the classes torch's DCP
metadata is made of (an explicit allow-list) and refuses any other global; the result is then checked field by field
before anything is allocated or read. The tensors themselves are read by torch (`torch.load(weights_only=True)` per
tensor), through a reader whose `read_metadata` is the restricted one. Imports torch: imported only when a DCP
checkpoint is given.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import DCP_METADATA, LoraCheckpointError
from cogsurgeon.tools.lora.keys import parse_lora_key
from cogsurgeon.tools.lora.sat import _SAFETENSORS_DTYPE, _payload

_MODEL_KEY = re.compile(r"^(?:app\.)?model\.(?P<key>.+)$")
_MAX_METADATA_BYTES = 256 * 1024 * 1024

# (module, name) of every global a DCP `.metadata` pickle refers to, in the torch releases cogsurgeon supports
# (2.4 onwards): the metadata dataclasses, torch.Size, the layout/memory-format decoders, the checkpoint id's path.
# Plain data classes and enums only: building one runs no code but their own constructors.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata: the allow-listed classes above and torch's dtype/layout/memory-format
    constants; any other global (os.system, builtins.eval, a user's class) raises `UnpicklingError`."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        torch_value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(torch_value, (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass  # a name of another torch release: not here, so not allowed
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP metadata never holds")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP metadata never holds")


def read_metadata_safely(folder: Path) -> Any:
    """The checked `Metadata` of the DCP checkpoint in `folder`, unpickled with `MetadataUnpickler` only."""
    path = folder / DCP_METADATA
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise LoraCheckpointError(f"{path} cannot be read ({_one_line(exc)})") from None
    if len(data) > _MAX_METADATA_BYTES:
        raise LoraCheckpointError(f"{path} is over {_MAX_METADATA_BYTES >> 20} MiB: not the metadata of a "
                                  "LoRA checkpoint")
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise LoraCheckpointError(
            f"{path} is not torch distributed checkpoint metadata and was not loaded ({exc}); cogsurgeon unpickles "
            "only the classes that metadata is made of"
        ) from None
    except (Exception, RecursionError) as exc:
        raise LoraCheckpointError(f"{path} is not readable torch distributed checkpoint metadata "
                                  f"({_one_line(exc)})") from None
    check_metadata(metadata, folder)
    return metadata


def _one_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # a CheckpointException: its text holds tracebacks, its causes do not
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return _one_line(first[0])
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is not a count, nor a float


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_count(n) for n in value)


def check_metadata(metadata: Any, folder: Path) -> None:
    """Every field cogsurgeon or torch's reader relies on has the type and range torch writes: tensor sizes and
    chunks are tuples of non-negative ints inside the tensor, every byte range lies inside a shard of `folder` (a
    plain file name, no path), and no tensor holds more bytes than the shards together. Raises
    `LoraCheckpointError` naming the first field that is not."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, TensorStorageMetadata,
    )

    where = folder / DCP_METADATA

    def refuse(what: str) -> LoraCheckpointError:
        return LoraCheckpointError(f"{where} is damaged or forged: {what}")

    if not isinstance(metadata, Metadata):
        raise refuse(f"it holds a {type(metadata).__name__}, not torch's Metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise refuse("state_dict_metadata and storage_data are not mappings")
    shard_bytes = _check_storage(storage, folder, refuse)
    total_bytes = sum(shard_bytes.values())
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise refuse(f"a state key is a {type(fqn).__name__}, not a name")
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise refuse(f"{fqn} is described by a {type(entry).__name__}")
        size, dtype = entry.size, getattr(entry.properties, "dtype", None)
        if not _is_shape(size) or not isinstance(dtype, torch.dtype):
            raise refuse(f"{fqn} has size {size!r} and dtype {dtype!r}")
        numel = 1
        for extent in size:
            numel *= extent
        if numel * dtype.itemsize > total_bytes:
            raise refuse(f"{fqn} claims {numel * dtype.itemsize} bytes, more than its shards hold ({total_bytes})")
        if not (isinstance(entry.chunks, list)
                and all(isinstance(chunk, ChunkStorageMetadata) for chunk in entry.chunks)):
            raise refuse(f"{fqn}'s chunks are not a list of chunk descriptions")
        for chunk in entry.chunks:
            if not (_is_shape(chunk.offsets) and _is_shape(chunk.sizes) and len(chunk.offsets) == len(size)
                    == len(chunk.sizes) and all(o + s <= n for o, s, n in zip(chunk.offsets, chunk.sizes, size))):
                raise refuse(f"{fqn} has a chunk at {chunk.offsets!r} of {chunk.sizes!r}, outside its size "
                             f"{tuple(size)}")


def _check_storage(storage: dict[Any, Any], folder: Path, refuse: Any) -> dict[str, int]:
    """The shard sizes by file name, after checking that every stored range lies inside its shard."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            raise refuse(f"a storage key is a {type(index).__name__}")
        relative = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(relative, str) or relative in ("", ".", "..") or "/" in relative or "\\" in relative \
                or "\0" in relative:
            raise refuse(f"{index.fqn} is stored in {relative!r}, not a file of the checkpoint folder")
        if not _is_count(offset) or not _is_count(length):
            raise refuse(f"{index.fqn} is stored at offset {offset!r}, length {length!r}")
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors is not None and not (isinstance(descriptors, list)
                                            and all(isinstance(d, str) for d in descriptors)):
            raise refuse(f"{index.fqn}'s transform descriptors are {descriptors!r}")
        if relative not in sizes:
            shard = folder / relative
            sizes[relative] = shard.stat().st_size if shard.is_file() and not shard.is_symlink() else -1
        if sizes[relative] < 0:
            raise LoraCheckpointError(f"{folder}: the torch distributed checkpoint lacks its shard {relative}")
        if offset + length > sizes[relative]:
            raise LoraCheckpointError(
                f"{folder}: the torch distributed checkpoint is truncated: {relative} has {sizes[relative]} bytes, "
                f"its metadata records {index.fqn} up to byte {offset + length}"
            )
    return sizes


def _safe_reader(folder: Path) -> Any:
    """torch's FileSystemReader for `folder`, whose metadata comes from `read_metadata_safely` (dcp.load asks for
    it again itself, and must never reach torch's unrestricted `pickle.load`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata_safely(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(str(folder))


def read_dcp_lora(folder: Path) -> list[tuple[str, str, tuple[int, ...], int, None, Any]]:
    """The model tensors of a DCP checkpoint as (key without `app.model.`, dtype, shape, nbytes, None, payload).
    LoRA tensors are loaded here (they are small), so a truncated or damaged checkpoint fails now, not mid-write."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata_safely(folder)
    wanted: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        match = _MODEL_KEY.match(fqn)
        if match is None or not isinstance(entry, TensorStorageMetadata):
            continue
        if parse_lora_key(match["key"]) is None:
            names[fqn] = match["key"]  # a model tensor that is not LoRA: reported, never loaded
            continue
        wanted[fqn] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        names[fqn] = match["key"]
    if wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no process group": one process reads, as intended
                dcp.load(wanted, storage_reader=_safe_reader(folder), no_dist=True)
        except LoraCheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise LoraCheckpointError(
                f"{folder}: the torch distributed checkpoint cannot be read, truncated or damaged ({_one_line(exc)})"
            ) from None
    entries = []
    for fqn, key in names.items():
        tensor = wanted.get(fqn)
        if tensor is None:
            entries.append((key, "F32", (), 0, None, None))
            continue
        dtype = _SAFETENSORS_DTYPE.get(str(tensor.dtype))
        if dtype is None:
            raise LoraCheckpointError(f"{folder}: {fqn} has dtype {tensor.dtype}, not a float LoRA weight")
        nbytes = tensor.numel() * tensor.element_size()
        entries.append((key, dtype, tuple(tensor.shape), nbytes, None, _payload(tensor)))
    return entries


__all__ = [
    "MetadataUnpickler", "read_dcp_lora", "read_metadata_safely",
]
