"""Read a LoRA checkpoint as it was left by a trainer — a folder or a file, safetensors or SAT — into one view
(tensors by module, format, ranks, lora_alpha and where it came from, problems) and the `LoraReport` of
`cogsurgeon lora inspect`. Torch-free except for the SAT reader, which is imported only for SAT files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.user_files import (
    UserFileError,
    describe_os_error,
    file_kind,
    is_regular_file,
    list_folder,
    loads_json,
    read_json,
    read_text,
    read_yaml,
)
from cogsurgeon.tools.lora.keys import (
    FORMAT_DESCRIPTIONS,
    AlphaResolution,
    detect_format,
    is_dora_key,
    key_prefix,
    module_ranks,
    number,
    parse_lora_key,
    rank_and_pattern,
    resolve_alpha,
    short_target,
)
from cogsurgeon.tools.lora.safetensors_io import DTYPE_NAMES, read_header

SAFETENSORS_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
SAT_FILE_NAME = "mp_rank_00_model_states.pt"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ACCELERATE_STATE = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt)$")
METADATA_KEY = "lora_adapter_metadata"
CONFIG_FILES = ("adapter_config.json", "training_config.yaml")


class LoraCheckpointError(CogsurgeonError):
    """A path that is not a readable LoRA checkpoint, or one that cannot be repaired."""


@dataclass(frozen=True)
class LoraTensor:
    """One LoRA weight of a checkpoint and where its bytes are."""

    module: str
    part: str  # "A" or "B"
    dtype: str  # safetensors name (BF16, F32, ...)
    shape: tuple[int, ...]
    nbytes: int
    source_start: int | None = None  # absolute offset in a safetensors file
    payload: Callable[[], Any] | None = field(default=None, compare=False, repr=False)  # SAT: the bytes


@dataclass(frozen=True)
class LoraReport:
    """What `cogsurgeon lora inspect` says about a checkpoint."""

    format: str
    path: str
    file: str
    rank: int | None
    rank_pattern: dict[str, int]
    alpha: float | int
    alpha_source: str  # flag | metadata | config | default
    alpha_detail: str
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...]
    num_modules: int
    modules: tuple[str, ...]
    dtype: str | None
    size_bytes: int
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def format_description(self) -> str:
        return FORMAT_DESCRIPTIONS.get(self.format, self.format)

    @property
    def scale(self) -> float | None:
        """The LoRA scale of the common rank (lora_alpha / r)."""
        return self.alpha / self.rank if self.rank else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["modules"] = list(self.modules)
        data["problems"] = list(self.problems)
        data["warnings"] = list(self.warnings)
        data["format_description"] = self.format_description
        data["scale"] = self.scale
        return data


@dataclass(frozen=True)
class LoraCheckpoint:
    """A checkpoint read for repair: its report, its LoRA tensors in file order, and the file to copy from."""

    report: LoraReport
    tensors: tuple[LoraTensor, ...]
    source_file: Path | None  # the safetensors file the bytes come from; None for SAT (payloads)
    metadata_config: dict[str, Any]  # LoRA config keys from the file's metadata (prefix removed), if any


def locate_checkpoint(path: Path) -> Path:
    """The tensor file a CKPT argument names: the file itself, or the known file inside a checkpoint folder."""
    try:
        kind = file_kind(path)
    except FileNotFoundError:
        raise LoraCheckpointError(f"{path} does not exist") from None
    except OSError as exc:
        raise LoraCheckpointError(f"cannot read {describe_os_error(path, exc)}") from None
    if kind is None:
        if path.name != SAT_FILE_NAME and path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraCheckpointError(
                f"{path} is a pickle, and cogsurgeon never unpickles files (they can run code): pass the "
                "checkpoint's .safetensors file or its folder (SAT: mp_rank_00_model_states.pt)"
            )
        return path
    if kind != "a folder":
        raise LoraCheckpointError(f"{path} is {kind}, neither a regular file nor a folder")
    for name in SAFETENSORS_NAMES:
        if is_regular_file(path / name):
            return path / name
    sat = _sat_file_in(path)
    if sat is not None:
        return sat
    candidates = [entry for entry in list_folder(path) if entry.suffix == ".safetensors" and is_regular_file(entry)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(candidate.name for candidate in candidates[:4])
        raise LoraCheckpointError(f"{path} holds several safetensors files ({names}): pass the LoRA file itself")
    raise LoraCheckpointError(
        f"{path} holds no LoRA checkpoint: looked for {', '.join(SAFETENSORS_NAMES)}, "
        f"{SAT_FILE_NAME} or a single .safetensors file"
    )


def _sat_file_in(folder: Path) -> Path | None:
    """SAT saves `{save_dir}/{iteration}/mp_rank_00_model_states.pt` and names the newest in `latest`."""
    if is_regular_file(folder / SAT_FILE_NAME):
        return folder / SAT_FILE_NAME
    latest = folder / "latest"
    if is_regular_file(latest):
        try:
            iteration = read_text(latest, 4096).strip()
        except UserFileError as exc:
            raise LoraCheckpointError(f"{latest} does not name an iteration folder: {exc}") from None
        candidate = folder / iteration / SAT_FILE_NAME
        if iteration and "/" not in iteration and is_regular_file(candidate):
            return candidate
    iterations = [entry for entry in list_folder(folder) if is_regular_file(entry / SAT_FILE_NAME)]
    if iterations:
        newest = max(iterations, key=lambda p: (_iteration_number(p.name), p.name))
        return newest / SAT_FILE_NAME
    return None


def _iteration_number(name: str) -> int:
    """SAT's iteration folders are ASCII digits ("1000"); anything else ("²", "1000-ema") sorts first."""
    return int(name) if name.isascii() and name.isdigit() else -1


def read_checkpoint(path: str | Path, *, alpha: float | None = None) -> LoraCheckpoint:
    """Read the checkpoint at `path` (folder or file). Raises `LoraCheckpointError` for what is not a LoRA
    checkpoint at all; fixable-or-not defects of one that is are listed in `report.problems`."""
    given = Path(path).expanduser()
    tensor_file = locate_checkpoint(given)
    if tensor_file.name == SAT_FILE_NAME:
        from cogsurgeon.tools.lora.sat import read_sat_lora  # the one reader that needs torch

        raw_tensors, non_lora = read_sat_lora(tensor_file)
        return _assemble(given, tensor_file, raw_tensors, non_lora, dora=[], adapters=set(), prefixes=set(),
                         metadata={}, format_name="sat", source_file=None, alpha=alpha)
    header = read_header(tensor_file)
    raw: list[tuple[str, LoraTensor]] = []
    non_lora: list[str] = []
    dora: list[str] = []
    adapters: set[str | None] = set()
    prefixes: set[str] = set()
    for entry in header.tensors:
        parsed = parse_lora_key(entry.name)
        if parsed is None:
            (dora if is_dora_key(entry.name) else non_lora).append(entry.name)
            continue
        adapters.add(parsed.adapter)
        prefixes.add(key_prefix(entry.name))
        raw.append((entry.name, LoraTensor(parsed.module, parsed.part, entry.dtype, entry.shape, entry.nbytes, entry.start)))
    folder = tensor_file.parent
    accelerate_state = any(ACCELERATE_STATE.match(p.name) for p in list_folder(folder))
    format_name = detect_format(
        file_name=tensor_file.name,
        prefixes=prefixes,
        adapters=adapters,
        has_metadata=METADATA_KEY in header.metadata,
        accelerate_state=accelerate_state,
    )
    return _assemble(given, tensor_file, raw, non_lora, dora, adapters, prefixes, header.metadata, format_name,
                     tensor_file, alpha)


def _metadata_config(metadata: dict[str, str], warnings: list[str], tensor_file: Path) -> dict[str, Any]:
    """The transformer's LoRA config from diffusers' `lora_adapter_metadata` (keys `transformer.r`, ...)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        config = loads_json(raw, allow_nan=True)  # NaN reaches the checks below and is refused there
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        warnings.append(f"{tensor_file.name}: {METADATA_KEY} is unreadable ({exc}); ignored")
        return {}
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or {k: v for k, v in config.items() if "." not in k}


def _config_beside(
    tensor_file: Path, warnings: list[str], problems: list[str]
) -> tuple[float | None, dict[str, float] | None, str | None]:
    """lora_alpha from a trainer or PEFT config next to the checkpoint (for SAT also one folder up)."""
    folders = [tensor_file.parent]
    if tensor_file.name == SAT_FILE_NAME:
        folders.append(tensor_file.parent.parent)
    for folder in folders:
        for name in CONFIG_FILES:
            config_path = folder / name
            if not is_regular_file(config_path):
                continue
            try:  # YAML without aliases (no alias bombs), JSON without NaN; only regular files, size capped
                config = read_json(config_path) if name.endswith(".json") else read_yaml(config_path)
            except UserFileError as exc:  # a config the user's trainer wrote; unreadable means "no config"
                warnings.append(f"{' '.join(str(exc).split())[:300]}; ignored")
                continue
            _unsupported_variants(config, str(config_path), problems)
            found = _find_key(config, "lora_alpha")
            if _positive_number(found):
                pattern = _find_key(config, "alpha_pattern")
                return float(found), pattern if isinstance(pattern, dict) else None, str(config_path)
    return None, None, None


def _unsupported_variants(config: Any, where: str, problems: list[str]) -> None:
    """LoRA variants whose scale or weights the plain adapter written by repair would get wrong."""
    for flag, what in (("use_rslora", "rsLoRA (scale alpha/sqrt(r))"), ("use_dora", "DoRA")):
        if _find_key(config, flag) is True:
            problems.append(f"{where} says {flag}: {what} is not plain LoRA and repair does not rebuild it")


def _find_key(tree: Any, wanted: str) -> Any:
    """The first value stored under `wanted` anywhere in a nested config."""
    if isinstance(tree, dict):
        if wanted in tree:
            return tree[wanted]
        for value in tree.values():
            found = _find_key(value, wanted)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for value in tree:
            found = _find_key(value, wanted)
            if found is not None:
                return found
    return None


def _assemble(
    given: Path,
    tensor_file: Path,
    raw: list[tuple[str, LoraTensor]],
    non_lora: list[str],
    dora: list[str],
    adapters: set[str | None],
    prefixes: set[str],
    metadata: dict[str, str],
    format_name: str,
    source_file: Path | None,
    alpha: float | None,
) -> LoraCheckpoint:
    problems: list[str] = []
    warnings: list[str] = []
    if not raw and not dora:
        detail = f" (it holds {len(non_lora)} other tensors, e.g. {non_lora[0]})" if non_lora else ""
        raise LoraCheckpointError(f"{tensor_file} holds no LoRA weights (no lora_A/lora_B keys){detail}")
    named_adapters = sorted(a for a in adapters if a is not None)
    if len(named_adapters) > 1 or (named_adapters and None in adapters):
        problems.append(f"keys name several adapters ({', '.join(named_adapters)}): keep one adapter per file")
    if len(prefixes) > 1:
        problems.append(f"keys mix prefixes {sorted(prefixes)}: one model prefix per file expected")
    if non_lora:
        problems.append(
            f"{len(non_lora)} tensors are not LoRA weights, e.g. {non_lora[0]!r}: repair writes LoRA weights only"
        )
    if dora:
        problems.append(
            f"{len(dora)} DoRA magnitude vectors (e.g. {dora[0]!r}): a DoRA adapter, not plain LoRA; repair does not "
            "rebuild DoRA"
        )
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    tensors: list[LoraTensor] = []
    for key, tensor in raw:
        shapes = a_shapes if tensor.part == "A" else b_shapes
        if tensor.module in shapes:
            problems.append(f"{tensor.module}: lora_{tensor.part} appears twice (again as {key!r})")
            continue
        shapes[tensor.module] = tensor.shape
        tensors.append(tensor)
    ranks, rank_problems = module_ranks(a_shapes, b_shapes)
    problems.extend(rank_problems)
    rank, rank_pattern = rank_and_pattern(ranks)

    metadata_config = _metadata_config(metadata, warnings, tensor_file)
    metadata_alpha = metadata_config.get("lora_alpha")
    if metadata_alpha is not None and not _positive_number(metadata_alpha):
        problems.append(f"{METADATA_KEY} says lora_alpha={_shown(metadata_alpha)}: not a positive finite number")
        metadata_alpha = None
    for key, check, what in (("alpha_pattern", _positive_number, "positive numbers"),
                             ("rank_pattern", _positive_int, "positive integers")):
        pattern = metadata_config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(check(v) for v in pattern.values())):
            problems.append(f"{METADATA_KEY} says {key}={_shown(pattern)}: expected module names mapped to {what}")
            metadata_config = {k: v for k, v in metadata_config.items() if k != key}
    if metadata_config and rank is not None:
        stored_r = metadata_config.get("r")
        stored_pattern = metadata_config.get("rank_pattern") or {}
        if stored_r is not None and stored_r != rank and not stored_pattern:
            problems.append(
                f"rank clash: {METADATA_KEY} says r={stored_r} but the tensors have rank {rank}"
            )
    if metadata_config:
        _unsupported_variants(metadata_config, METADATA_KEY, problems)
    config_alpha, config_pattern, config_file = _config_beside(tensor_file, warnings, problems)
    resolution: AlphaResolution = resolve_alpha(
        flag=alpha,
        metadata_alpha=float(metadata_alpha) if isinstance(metadata_alpha, (int, float)) else None,
        metadata_alpha_pattern=metadata_config.get("alpha_pattern"),
        config_alpha=config_alpha,
        config_alpha_pattern=config_pattern,
        config_file=config_file,
        format_name=format_name,
        rank=rank,
    )
    if resolution.source == "default":
        scale = resolution.lora_alpha / rank if rank else float("nan")
        warnings.insert(
            0,
            f"LORA_ALPHA NOT STORED: {tensor_file.name} has no lora_alpha and no config beside it; assuming "
            f"lora_alpha={number(resolution.lora_alpha)} (scale {scale:g} at rank {rank}), {resolution.detail}. "
            "If your training used another value, pass --alpha A.",
        )
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in tensors})
    if len(dtypes) > 1:
        warnings.append(f"LoRA weights mix dtypes ({', '.join(dtypes)})")
    modules = tuple(sorted(ranks) if ranks else sorted(set(a_shapes) | set(b_shapes)))
    report = LoraReport(
        format=format_name,
        path=str(given),
        file=str(tensor_file),
        rank=rank,
        rank_pattern=rank_pattern,
        alpha=number(resolution.lora_alpha),
        alpha_source=resolution.source,
        alpha_detail=resolution.detail,
        alpha_pattern=dict(resolution.alpha_pattern),
        target_modules=tuple(sorted({short_target(m) for m in modules})),
        num_modules=len(modules),
        modules=modules,
        dtype=dtypes[0] if len(dtypes) == 1 else ("mixed" if dtypes else None),
        size_bytes=tensor_file.stat().st_size,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )
    return LoraCheckpoint(report, tuple(tensors), source_file, metadata_config)


def _positive_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # a 401-digit integer
        return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def inspect_checkpoint(path: str | Path, *, alpha: float | None = None) -> LoraReport:
    """Inspect a LoRA checkpoint (folder or file) without changing anything. `alpha` plays the role of `--alpha`."""
    return read_checkpoint(path, alpha=alpha).report
