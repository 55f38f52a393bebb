"""Torch pickles (`pytorch_lora_weights.bin`, `adapter_model.bin`, SAT's `.pt`) read with
`torch.load(weights_only=True)` only, plus an explicit allow-list where a format needs more (SAT's numpy rng state), and
only on a torch whose weights_only unpickler has no known hole: torch.load(weights_only=True) could run code from a
crafted file before torch 2.6.0 (CVE-2025-32434, GHSA-53q9-r3pm-6pq6) and could corrupt memory towards it before 2.10.0
(CVE-2026-24747), while the package allows torch>=2.4; on those releases a pickle is refused with that reason. Imports
torch: imported only when such a file is given.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError

WEIGHTS_ONLY_SAFE_FROM = (2, 10)
SAFETENSORS_DTYPE = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64"}


def weights_only_is_safe(version: str) -> bool:
    """Whether this torch release (`torch.__version__`) has the weights_only unpickler without the known holes."""
    found = re.match(r"^(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) >= WEIGHTS_ONLY_SAFE_FROM


def load_weights_only(path: Path, allowed_globals: list[Any] | None = None) -> Any:
    """`torch.load(path, weights_only=True)` (memory-mapped where the file is in the zip format), with
    `allowed_globals` added to torch's allow-list; a refusal of the unpickler or an unreadable file is a
    `LoraCheckpointError` naming the file."""
    import torch

    if not weights_only_is_safe(torch.__version__):
        raise LoraCheckpointError(
            f"{path} is a torch pickle, and torch {torch.__version__}'s torch.load(weights_only=True) can run code "
            "from a crafted file (CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10): cogsurgeon reads "
            "pickles on torch >= 2.10 only; upgrade torch, or convert the file to safetensors where you trust it"
        )
    try:
        with torch.serialization.safe_globals(allowed_globals or []):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraCheckpointError(
            f"{path} holds more than tensors, and cogsurgeon loads torch pickles only with weights_only=True "
            f"({first_line})"
        ) from None
    except Exception as exc:
        raise LoraCheckpointError(f"{path} is not a readable torch checkpoint: {type(exc).__name__}: {exc}") from None


def tensor_payload(tensor: Any):
    """A function returning the tensor's bytes (as safetensors stores them), for the writers of tools/lora."""
    import torch

    def tensor_bytes() -> memoryview:
        return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    return tensor_bytes


def read_pickled_lora(path: Path) -> list[tuple[str, str, tuple[int, ...], int, None, Any]]:
    """The tensors of a pickled LoRA state dict (what `save_lora_weights(..., safe_serialization=False)` writes:
    `torch.save(state_dict)`, diffusers src/diffusers/loaders/lora_base.py write_lora_layers) as raw entries for
    tools/lora/checkpoint.py; an entry that is not a float tensor comes back with no bytes, so it is reported."""
    import torch

    saved = load_weights_only(path)
    if not isinstance(saved, dict) or not all(isinstance(key, str) for key in saved):
        raise LoraCheckpointError(f"{path} holds a {type(saved).__name__}, not a state dict of named tensors")
    entries = []
    for key, value in saved.items():
        dtype = SAFETENSORS_DTYPE.get(str(value.dtype)) if isinstance(value, torch.Tensor) else None
        if dtype is None:
            entries.append((key, "F32", (), 0, None, None))
            continue
        tensor = value.detach()
        entries.append((key, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), None,
                        tensor_payload(tensor)))
    return entries


__all__ = [
    "SAFETENSORS_DTYPE", "load_weights_only", "read_pickled_lora", "tensor_payload", "weights_only_is_safe",
]
