"""Turn a MODEL spec into a live `CogVideoXTransformer3DModel`: published configs on the meta device, tiny
seeded CPU models, local diffusers folders (single-file or sharded safetensors), and hub ids resolved from the
local Hugging Face cache only. Nothing here touches the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import CogsurgeonError, ModelLoadError, ModelSpecError
from cogsurgeon.inspector.geometry import TRANSFORMER_CLASS_NAME, latent_frame_count
from cogsurgeon.inspector.model_specs import (
    PUBLISHED_DTYPES,
    TINY_SEED,
    published_config,
    resolve_spec,
    tiny_config,
)
from cogsurgeon.inspector.offline import hub_download_command
from cogsurgeon.inspector.safetensors_header import SafetensorsHeader, read_header
from cogsurgeon.inspector.user_files import UserFileError, is_folder, is_regular_file, read_json, read_text

if TYPE_CHECKING:
    import torch
    from diffusers import CogVideoXTransformer3DModel

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
# What diffusers raises for files it cannot load, once the config's sizes and types are checked: unreadable or
# corrupt weights (OSError), weights of another shape (ValueError; RuntimeError from torch in older releases),
# config values it cannot use (TypeError, KeyError), and an unknown activation_fn, for which its FeedForward leaves
# `act_fn` unbound (UnboundLocalError). Anything else is a bug and keeps its traceback.
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


def import_diffusers(progress: Callable[[str], None] | None = None) -> None:
    """Import torch and diffusers' CogVideoX code (`transformer_class`), first saying so to `progress` when they are
    not loaded yet: the slowest step of a cold start, seconds on an idle machine and many more on a loaded one."""
    if _COGVIDEOX_MODULE not in sys.modules and progress is not None:
        progress("importing torch and diffusers…")
    transformer_class()


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

    check_config_size(config, "the config")
    return _build(config, dtype, torch.device("meta"))


def build_tiny(name: str, dtype: str | torch.dtype | None = None) -> CogVideoXTransformer3DModel:
    """A tiny model with weights drawn from a fixed seed, leaving the caller's RNG state as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return _build(tiny_config(name), dtype, nullcontext())


def _build(config: dict[str, Any], dtype: str | torch.dtype | None, device: Any) -> CogVideoXTransformer3DModel:
    """`from_config` within `device` (a context), parameters created in `dtype`; floating buffers (the sincos
    position table is built in float64) then brought to it, as a load of saved weights in that dtype would
    (`ModelMixin.to` would also do it, but warns about fp32 modules)."""
    cls = transformer_class()
    resolved = _torch_dtype(dtype)
    with device, _default_dtype(resolved):
        model = cls.from_config(config)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if resolved is not None and buffer is not None and buffer.is_floating_point() and buffer.dtype != resolved:
                module._buffers[name] = buffer.to(resolved)
    return model.eval()


def find_transformer_folder(root: Path) -> Path:
    """The folder holding the transformer's config: `root` itself, or `root/transformer` for a model root."""
    if not is_folder(root):
        raise ModelSpecError(f"{root} is not a folder: MODEL must be a diffusers model folder")
    for candidate in (root, root / "transformer"):
        config_path = candidate / "config.json"
        if os.path.lexists(config_path):
            config = read_config(config_path)
            class_name = config.get("_class_name")
            if class_name == TRANSFORMER_CLASS_NAME:
                config_sizes(config, str(config_path))  # a size of 0 fails deep inside diffusers or the planner
                return candidate
            if candidate == root and is_regular_file(root / "transformer" / "config.json"):
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
    """A model's config.json as a dict; anything else (not a regular file, not JSON, nested absurdly deep, too
    large) is a `ModelLoadError`."""
    try:
        config = read_json(config_path, CONFIG_BYTES_LIMIT, allow_nan=True)
    except UserFileError as exc:
        raise ModelLoadError(str(exc)) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    return config


CONFIG_BYTES_LIMIT = 16 * 1024 * 1024
MAX_PARAMETERS = 100_000_000_000  # CogVideoX-5B has 5.6e9; a config far beyond is a typo or hostile
MAX_LAYERS = 1_000  # CogVideoX has 30 or 42; building a million modules never returns
MAX_BUFFER_ELEMENTS = 10_000_000_000  # the sincos position table is (patches + text) x inner_dim
_SIZE_FIELDS = (
    "num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels", "text_embed_dim",
    "time_embed_dim", "sample_width", "sample_height", "sample_frames", "patch_size", "patch_size_t",
    "max_text_seq_length", "temporal_compression_ratio", "ofs_embed_dim",
)
_SIZE_DEFAULTS = {
    "num_attention_heads": 30, "attention_head_dim": 64, "num_layers": 30, "in_channels": 16, "text_embed_dim": 4096,
    "time_embed_dim": 512, "sample_width": 90, "sample_height": 60, "sample_frames": 49, "patch_size": 2,
    "max_text_seq_length": 226, "temporal_compression_ratio": 4,
}  # diffusers' CogVideoXTransformer3DModel defaults
# Sizes that divide or scale something (head_dim ** -0.5, latent // patch_size, ...): 0 is as wrong as negative. The
# others may be 0 (no blocks, no text tokens, no ofs embedding).
_POSITIVE_SIZE_FIELDS = frozenset(_SIZE_FIELDS) - {"num_layers", "max_text_seq_length", "out_channels", "ofs_embed_dim"}


def config_sizes(config: dict[str, Any], where: str) -> dict[str, int]:
    """The size fields of a CogVideoX config as integers (diffusers' defaults where absent); a float, bool, string
    or negative number where a size belongs, or 0 where a size divides (`_POSITIVE_SIZE_FIELDS`), is a
    `ModelLoadError`."""
    sizes: dict[str, int] = {}
    for field in _SIZE_FIELDS:
        value = config.get(field, _SIZE_DEFAULTS.get(field))
        if value is None:
            continue
        minimum = 1 if field in _POSITIVE_SIZE_FIELDS else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            expected = "a positive integer" if minimum else "a non-negative integer"
            raise ModelLoadError(f"{where}: {field} is {value!r}; it must be {expected}: fix it in that file")
        sizes[field] = value
    return sizes


def estimated_size(config: dict[str, Any], where: str = "the config") -> tuple[int, int]:
    """(parameters, position-table elements) a CogVideoX config would allocate, from its sizes alone: per block the
    attention (4 dim^2), the feed-forward (8 dim^2) and the two adaptive norms (12 dim x time_embed_dim), plus the
    embeddings and the output projection. An estimate within a few percent, good enough to refuse absurd ones."""
    sizes = config_sizes(config, where)
    dim = sizes["num_attention_heads"] * sizes["attention_head_dim"]
    time_dim = sizes["time_embed_dim"]
    patch = max(sizes["patch_size"], 1)
    patch_t = max(sizes.get("patch_size_t") or 1, 1)
    per_block = 12 * dim * dim + 12 * dim * time_dim + 20 * dim
    embeddings = (
        sizes["text_embed_dim"] * dim
        + sizes["in_channels"] * patch * patch * patch_t * dim
        + 2 * time_dim * time_dim
        + 2 * time_dim * dim
        + dim * (sizes.get("out_channels") or sizes["in_channels"]) * patch * patch * patch_t
    )
    parameters = sizes["num_layers"] * per_block + embeddings
    latent_frames = latent_frame_count(max(sizes["sample_frames"], 1), max(sizes["temporal_compression_ratio"], 1))
    patches = (sizes["sample_height"] // patch) * (sizes["sample_width"] // patch) * (latent_frames // patch_t + 1)
    position_table = (patches + sizes["max_text_seq_length"]) * dim
    return parameters, position_table


def check_config_size(config: dict[str, Any], where: str) -> None:
    """Refuse a config whose model would not fit any machine (or take hours to build) before anything is built,
    saying what it would allocate."""
    parameters, position_table = estimated_size(config, where)
    layers = config_sizes(config, where)["num_layers"]
    gib = 4 * parameters / 2**30
    if layers > MAX_LAYERS or parameters > MAX_PARAMETERS or position_table > MAX_BUFFER_ELEMENTS:
        raise ModelLoadError(
            f"{where} describes a model of {layers:,} blocks and about {_count(parameters)} parameters "
            f"({gib:,.0f} GiB in float32) with a {_count(position_table)}-element position table; cogsurgeon builds "
            f"at most {MAX_LAYERS:,} blocks and {_count(MAX_PARAMETERS)} parameters (CogVideoX-5B: 42 blocks, 5.6 "
            "billion): check num_layers, num_attention_heads, attention_head_dim and the sample sizes"
        )


def check_config_types(config: dict[str, Any], signature: inspect.Signature, where: str) -> None:
    """Refuse a config value of another type than the argument's default (a list where a name belongs, text where
    a number or a flag belongs): diffusers would fail on it deep inside, with any kind of exception."""
    for name, parameter in signature.parameters.items():
        default = parameter.default
        if name not in config or default is inspect.Parameter.empty or default is None:
            continue
        value = config[name]
        accepted = (int, float) if type(default) is float else (type(default),)
        if not isinstance(value, accepted) or (isinstance(value, bool) and type(default) is not bool):
            raise ModelLoadError(
                f"{where}: {name} is {value!r}; it must be a {type(default).__name__} (diffusers' default: {default!r})"
            )


def _count(value: int) -> str:
    if value < 1_000_000:
        return f"{value:,}"
    exponent = int(math.log10(value))
    return f"{value / 10**exponent:.1f}e{exponent}"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformer folder, shards in index order; each must be a regular file inside
    the folder."""
    index_path = folder / WEIGHT_FILES[1]
    if os.path.lexists(index_path):
        try:
            index = read_json(index_path, CONFIG_BYTES_LIMIT)
        except UserFileError as exc:
            raise ModelLoadError(f"{index_path} is not a valid shard index: {exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ModelLoadError(f"{index_path} is not a valid shard index: weight_map must map tensors to file names")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise ModelLoadError(f"{index_path} names the shard {name!r}, which is not a file inside {folder}")
        return [folder / name for name in names]
    single = folder / WEIGHT_FILES[0]
    if os.path.lexists(single):
        return [single]
    raise ModelLoadError(
        f"{folder} has a config but no weights ({WEIGHT_FILES[0]} or its sharded index): "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


def read_weight_headers(folder: Path, files: list[Path]) -> list[SafetensorsHeader]:
    """The validated header of every weight file (regular files only: a FIFO or a device is refused unread)."""
    headers = []
    for path in files:
        try:
            headers.append(read_header(path))
        except CogsurgeonError as exc:
            raise ModelLoadError(f"could not load {folder}: {exc}") from None
    return headers


def saved_dtype(headers: list[SafetensorsHeader]) -> str | None:
    """The floating dtype most tensors were saved in (by element count), read from the headers only."""
    counts: Counter[str] = Counter()
    for header in headers:
        for entry in header.tensors:
            dtype = _SAFETENSORS_DTYPES.get(entry.dtype)
            if dtype is not None:
                counts[dtype] += math.prod(entry.shape)
    return counts.most_common(1)[0][0] if counts else None


def load_from_folder(root: Path, dtype: str | torch.dtype | None = None) -> CogVideoXTransformer3DModel:
    """Real weights from a local folder, memory-mapped, in the dtype they were saved in unless one is asked for."""
    folder = find_transformer_folder(root)
    config = read_config(folder / "config.json")
    check_config_size(config, str(folder / "config.json"))
    headers = read_weight_headers(folder, weight_files(folder))
    resolved = _torch_dtype(dtype if dtype is not None else saved_dtype(headers))
    cls = transformer_class()
    check_config_types(config, inspect.signature(cls.__init__), str(folder / "config.json"))
    try:
        model = cls.from_pretrained(str(folder), torch_dtype=resolved, local_files_only=True)
    except _USER_FILE_ERRORS as exc:  # the user's files are the input here; report, don't crash
        message = " ".join(str(exc).split())[:400]
        raise ModelLoadError(f"could not load {folder}: {type(exc).__name__}: {message}") from None
    return model.eval()


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a hub id in the Hugging Face cache at `revision` (a branch, tag or commit hash;
    None: `main`), found by huggingface_hub's own offline lookup (`refs/<revision>` names the commit, whose
    `snapshots/<commit>` folder is the answer); never downloads. A revision the cache does not hold is a
    `ModelSpecError` that lists the ones it does."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = Path(constants.HF_HUB_CACHE)
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo_folder / "refs" / (revision or "main")
    if os.path.lexists(ref) and not is_regular_file(ref):  # huggingface_hub would block on a FIFO there
        raise ModelSpecError(f"{ref} is not a regular file: the Hugging Face cache of {repo_id} is damaged")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, UnicodeDecodeError, OSError):
        cached = _cached_revisions(repo_folder)
        if not cached:
            raise ModelSpecError(
                f"{repo_id} is not in the local Hugging Face cache ({cache}); cogsurgeon never downloads: fetch it "
                f"elsewhere ({hub_download_command(repo_id)}) or pass a local folder"
            ) from None
        raise ModelSpecError(
            f"{repo_id} at revision {revision or 'main'!r} is not in the local Hugging Face cache ({cache}), which "
            f"holds {', '.join(cached)}: ask for one of those, or fetch it elsewhere ({hub_download_command(repo_id)})"
        ) from None
    if Path(folder).parent != repo_folder / "snapshots":  # a ref holding a path ("../..") rather than a commit
        raise ModelSpecError(f"{ref} does not name a commit: the Hugging Face cache of {repo_id} is damaged")
    return Path(folder)


def _loading_step(kind: str, spec: str) -> str:
    return {
        "published": f"building {spec} on the meta device…",
        "tiny": f"building {spec} (seeded weights)…",
        "folder": f"loading the weights of {spec}…",
    }.get(kind, f"loading {spec} from the Hugging Face cache…")


def _cached_revisions(repo_folder: Path) -> list[str]:
    """What a repo's cache folder holds, for an error message: its refs (`main -> 0123abcd`) and the snapshots no
    ref names."""
    refs: dict[str, str] = {}
    with suppress(OSError):
        for entry in sorted((repo_folder / "refs").iterdir()):
            with suppress(UserFileError):
                refs[entry.name] = read_text(entry, 4096).strip()
    snapshots = []
    with suppress(OSError):
        snapshots = sorted(entry.name for entry in (repo_folder / "snapshots").iterdir() if is_folder(entry))
    named = [f"{name} -> {commit[:8]}" for name, commit in refs.items() if commit in snapshots]
    return named + [commit for commit in snapshots if commit not in refs.values()]


def load_transformer(
    spec: str | None = None, *, dtype: str | torch.dtype | None = None, revision: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CogVideoXTransformer3DModel:
    """Load the CogVideoX transformer that `spec` names: a published config (`cogvideox-5b`, ...: built on the meta
    device, no weights), a tiny model (`tiny`, `tiny-i2v`, `tiny-1.5`: seeded, runs on a CPU), a local diffusers
    folder (the model root or its `transformer/`), or a hub id already in the local Hugging Face cache (never
    downloaded; `revision` picks a branch, tag or commit of it, `main` by default); None is the default,
    cogvideox-5b-i2v. `dtype` (a torch dtype or its name) overrides the stored one.
    Raises `ModelSpecError` for a spec that names nothing, `ModelLoadError` for files that are there but not a
    loadable CogVideoX transformer. `progress(message)` is told each slow step: the import, the build or load."""
    resolved = resolve_spec(spec)
    if revision is not None and resolved.kind != "hub":
        raise ModelSpecError(f"revision {revision!r} is for a hub id (org/name); {spec!r} is a {resolved.kind} model")
    if progress is not None:
        import_diffusers(progress)
        progress(_loading_step(resolved.kind, resolved.spec))
    if resolved.kind == "published":
        return build_on_meta(published_config(resolved.spec), dtype or PUBLISHED_DTYPES[resolved.spec])
    if resolved.kind == "tiny":
        return build_tiny(resolved.spec, dtype)
    if resolved.kind == "folder":
        return load_from_folder(Path(resolved.spec), dtype)
    return load_from_folder(cached_snapshot(resolved.spec, revision), dtype)


__all__ = [
    "build_on_meta", "build_tiny", "cached_snapshot", "find_transformer_folder", "import_diffusers", "load_transformer",
    "read_config", "transformer_class",
]
