"""The torch distributed checkpoint (DCP) reader: CogKit's default LoRA checkpoint, `checkpoint-N/` holding `.metadata`
and `__0_0.distcp`, written by `dcp.save({"app": AppState(model, optimizer, lora=True)})` (CogKit
src/cogkit/finetune/base/base_trainer.py:439, AppState in src/cogkit/finetune/utils/ckpt.py:35-63), so the LoRA
tensors sit under `app.model.` and the optimizer under `app.optim.` (ignored). Read through
`torch.distributed.checkpoint`'s own FileSystemReader, in one process. Imports torch: imported only when a DCP
checkpoint is given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError
from cogsurgeon.tools.lora.keys import parse_lora_key
from cogsurgeon.tools.lora.sat import _SAFETENSORS_DTYPE, _payload

_MODEL_KEY = re.compile(r"^(?:app\.)?model\.(?P<key>.+)$")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _check_complete(folder: Path, metadata: Any) -> None:
    """Every byte range the metadata records lies inside its file: a truncated shard fails here, even where the LoRA
    tensors themselves come before the cut."""
    sizes: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        relative = str(getattr(info, "relative_path", ""))
        if relative not in sizes:
            shard = folder / relative
            sizes[relative] = shard.stat().st_size if shard.is_file() else -1
        if sizes[relative] < 0:
            raise LoraCheckpointError(f"{folder}: the torch distributed checkpoint lacks its shard {relative}")
        end = int(info.offset) + int(info.length)
        if end > sizes[relative]:
            raise LoraCheckpointError(
                f"{folder}: the torch distributed checkpoint is truncated: {relative} has {sizes[relative]} bytes, "
                f"its metadata records {getattr(index, 'fqn', index)} up to byte {end}"
            )


def read_dcp_lora(folder: Path) -> list[tuple[str, str, tuple[int, ...], int, None, Any]]:
    """The model tensors of a DCP checkpoint as (key without `app.model.`, dtype, shape, nbytes, None, payload).
    LoRA tensors are loaded here (they are small), so a truncated or damaged checkpoint fails now, not mid-write."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as exc:
        raise LoraCheckpointError(f"{folder} is not a readable torch distributed checkpoint ({_one_line(exc)})") from None
    _check_complete(folder, metadata)
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
                dcp.load(wanted, storage_reader=reader, no_dist=True)
        except Exception as exc:
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
        entries.append((key, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), None, _payload(tensor)))
    return entries
