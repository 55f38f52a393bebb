"""Turn a MODEL spec into a live `CogVideoXTransformer3DModel`: published configs on the meta device, tiny
seeded CPU models, local diffusers folders (single-file or sharded safetensors), and hub ids resolved from the
local Hugging Face cache only. Nothing here touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import ModelLoadError, ModelSpecError
from cogsurgeon.inspector.geometry import TRANSFORMER_CLASS_NAME
from cogsurgeon.inspector.model_specs import (
    PUBLISHED_DTYPES,
    TINY_SEED,
    published_config,
    resolve_spec,
    tiny_config,
)
from cogsurgeon.inspector.offline import hub_download_command

if TYPE_CHECKING:
    import torch
    from diffusers import CogVideoXTransformer3DModel

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
# What diffusers raises for files it cannot load: unreadable or corrupt weights (OSError), weights of another shape
# (ValueError; RuntimeError from torch in older releases), config values of the wrong type (TypeError, KeyError),
# and an unknown activation_fn, for which its FeedForward leaves `act_fn` unbound (UnboundLocalError). Anything
# else is a bug and keeps its traceback.
_USER_FILE_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, UnboundLocalError)
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


_TRANSFORMERS_PACKAGE = "diffusers.models.transformers"
_COGVIDEOX_MODULE = "diffusers.models.transformers.cogvideox_transformer_3d"


def transformer_class() -> type[CogVideoXTransformer3DModel]:
    """diffusers' `CogVideoXTransformer3DModel`, imported without the ~80 sibling transformers.

    `diffusers.models.transformers/__init__.py` imports every transformer diffusers has (about 2 s). When that
    package is not loaded yet, a bare placeholder stands in for it while the CogVideoX module alone is imported,
    and is then removed: a later import of the package runs its real `__init__`, which finds this module in
    `sys.modules`, so there is still exactly one class object.
    """
    if _COGVIDEOX_MODULE not in sys.modules and _TRANSFORMERS_PACKAGE not in sys.modules:
        package_spec = importlib.util.find_spec(_TRANSFORMERS_PACKAGE)
        if package_spec is not None and package_spec.submodule_search_locations:
            placeholder = importlib.util.module_from_spec(package_spec)
            sys.modules[_TRANSFORMERS_PACKAGE] = placeholder
            try:
                importlib.import_module(_COGVIDEOX_MODULE)
            finally:
                if sys.modules.get(_TRANSFORMERS_PACKAGE) is placeholder:
                    del sys.modules[_TRANSFORMERS_PACKAGE]
    return importlib.import_module(_COGVIDEOX_MODULE).CogVideoXTransformer3DModel


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters in `dtype` (instead of casting afterwards), restoring the caller's default."""
    import torch

    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelSpecError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


def build_on_meta(config: dict[str, Any], dtype: str | torch.dtype | None = None) -> CogVideoXTransformer3DModel:
    """Build from a config on the meta device, buffers included: no memory, no weights, same shapes."""
    import torch

    cls = transformer_class()
    resolved = _torch_dtype(dtype)
    with torch.device("meta"), _default_dtype(resolved):
        model = cls.from_config(config)
    if resolved is not None:
        _cast_float_buffers(model, resolved)
    return model.eval()


def build_tiny(name: str, dtype: str | torch.dtype | None = None) -> CogVideoXTransformer3DModel:
    """A tiny model with weights drawn from a fixed seed, leaving the caller's RNG state as it was."""
    import torch

    cls = transformer_class()
    resolved = _torch_dtype(dtype)
    with torch.random.fork_rng(devices=[]), _default_dtype(resolved):
        torch.manual_seed(TINY_SEED)
        model = cls.from_config(tiny_config(name))
    if resolved is not None:
        _cast_float_buffers(model, resolved)
    return model.eval()


def _cast_float_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Bring floating buffers (the sincos position table is built in float64) to the model's dtype, as a load of
    saved weights in that dtype would; `ModelMixin.to` would also do it, but warns about fp32 modules."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)


def find_transformer_folder(root: Path) -> Path:
    """The folder holding the transformer's config: `root` itself, or `root/transformer` for a model root."""
    if not root.is_dir():
        raise ModelSpecError(f"{root} is not a folder: MODEL must be a diffusers model folder")
    for candidate in (root, root / "transformer"):
        config_path = candidate / "config.json"
        if config_path.is_file():
            config = read_config(config_path)
            class_name = config.get("_class_name")
            if class_name == TRANSFORMER_CLASS_NAME:
                return candidate
            if candidate == root and (root / "transformer" / "config.json").is_file():
                continue
            raise ModelLoadError(
                f"{config_path} describes a {class_name or 'model of unknown class'}, "
                f"not a {TRANSFORMER_CLASS_NAME}"
            )
    raise ModelSpecError(
        f"{root} holds no config.json (nor transformer/config.json): point MODEL at a diffusers model "
        "folder or its transformer/ folder"
    )


def read_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformer folder, shards in index order."""
    index_path = folder / WEIGHT_FILES[1]
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path} is not a valid shard index: {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ModelLoadError(f"{index_path} is not a valid shard index: weight_map must map tensors to file names")
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / WEIGHT_FILES[0]
    if single.is_file():
        return [single]
    raise ModelLoadError(
        f"{folder} has a config but no weights ({WEIGHT_FILES[0]} or its sharded index): "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets), read without torch."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file: header is not a JSON object")
    return header


def saved_dtype(files: list[Path]) -> str | None:
    """The floating dtype most tensors were saved in (by element count), read from the headers only."""
    counts: Counter[str] = Counter()
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("shape", []), list):
                raise ModelLoadError(f"{path} is not a valid safetensors file: tensor {name!r} has no dtype and shape")
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is not None:
                elements = 1
                for size in entry.get("shape", []):
                    elements *= size
                counts[dtype] += elements
    return counts.most_common(1)[0][0] if counts else None


def load_from_folder(root: Path, dtype: str | torch.dtype | None = None) -> CogVideoXTransformer3DModel:
    """Real weights from a local folder, memory-mapped, in the dtype they were saved in unless one is asked for."""
    folder = find_transformer_folder(root)
    files = weight_files(folder)
    resolved = _torch_dtype(dtype if dtype is not None else saved_dtype(files))
    cls = transformer_class()
    try:
        model = cls.from_pretrained(str(folder), torch_dtype=resolved, local_files_only=True)
    except _USER_FILE_ERRORS as exc:  # the user's files are the input here; report, don't crash
        message = " ".join(str(exc).split())[:400]
        raise ModelLoadError(f"could not load {folder}: {type(exc).__name__}: {message}") from None
    return model.eval()


def cached_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub id in the Hugging Face cache; never downloads."""
    from huggingface_hub import constants

    repo_folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = repo_folder / "refs" / "main"
    snapshots = repo_folder / "snapshots"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if candidates:
        return candidates[-1]
    raise ModelSpecError(
        f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); cogsurgeon never "
        f"downloads: fetch it elsewhere ({hub_download_command(repo_id)}) or pass a local folder"
    )


def load_transformer(
    spec: str | None = None, *, dtype: str | torch.dtype | None = None
) -> CogVideoXTransformer3DModel:
    """Load the transformer a MODEL spec names (see DESIGN, "Model specs"). Raises `ModelSpecError` for a spec that
    names nothing, `ModelLoadError` for files that are there but not a loadable CogVideoX transformer."""
    resolved = resolve_spec(spec)
    if resolved.kind == "published":
        return build_on_meta(published_config(resolved.spec), dtype or PUBLISHED_DTYPES[resolved.spec])
    if resolved.kind == "tiny":
        return build_tiny(resolved.spec, dtype)
    if resolved.kind == "folder":
        return load_from_folder(Path(resolved.spec), dtype)
    return load_from_folder(cached_snapshot(resolved.spec), dtype)
