"""Read a LoRA checkpoint as a trainer left it — a file, a checkpoint folder, or an output folder holding several
checkpoints — in every format of the LoRA-in-the-wild table (diffusers/CogVideo, finetrainers, CogKit file or DCP,
VideoX-Fun, kohya/ComfyUI, PEFT, SAT) into one view: tensors by module, format, ranks, lora_alpha and where it came
from (or the candidates when the file does not settle it), problems; and the `LoraReport` of `cogsurgeon lora inspect`.
Torch-free: the torch pickle, SAT and torch DCP readers (tools/lora/torch_pickle.py, tools/lora/sat.py,
tools/lora/dcp.py) import torch, and are imported only when such a checkpoint is given.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.errors import CogsurgeonError, counted, shown
from cogsurgeon.inspector.safetensors_header import DTYPE_NAMES, read_header
from cogsurgeon.inspector.user_files import (
    UserFileError,
    describe_os_error,
    expand_user,
    file_kind,
    is_folder,
    is_regular_file,
    list_folder,
    loads_json,
    read_json,
    read_yaml,
)
from cogsurgeon.tools.lora.keys import (
    FINETRAINERS_FORMATS,
    FORMAT_DESCRIPTIONS,
    TRAINERS,
    AlphaResolution,
    dcp_format,
    detect_format,
    is_dora_key,
    is_text_encoder_key,
    key_prefix,
    module_ranks,
    most_common_and_pattern,
    not_lora_algorithm,
    number,
    parse_lora_key,
    rank_and_pattern,
    resolve_alpha,
    short_target,
)

SAFETENSORS_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
# the same files pickled (diffusers' save_lora_weights / PEFT's save_pretrained with safe_serialization=False)
PICKLED_NAMES = ("pytorch_lora_weights.bin", "adapter_model.bin")
TORCH_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files, read with weights_only=True
DCP_METADATA = ".metadata"
STEP_FOLDER = re.compile(r"^(?:checkpoint-|finetrainers_step_)?(?P<step>\d+)$")
STEP_FILE = re.compile(r"^checkpoint-(?P<step>\d+)\.safetensors$")
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
    part: str  # "A", "B" or "alpha" (a kohya per-module alpha, a scalar)
    dtype: str  # safetensors name (BF16, F32, ...)
    shape: tuple[int, ...]
    nbytes: int
    source_start: int | None = None  # absolute offset in a safetensors file
    payload: Callable[[], Any] | None = field(default=None, compare=False, repr=False)  # SAT: the bytes


@dataclass(frozen=True)
class LoraReport:
    """What `cogsurgeon lora inspect` says about a checkpoint. Its warnings and `alpha_detail` name the keyword
    arguments of the Python calls (`pass alpha=A`), as errors do; each front end renames them
    (`errors.renamed_parameters`)."""

    format: str
    path: str
    file: str
    rank: int | None
    rank_pattern: dict[str, int]
    alpha: float | int | None  # None: not settled, see alpha_candidates
    alpha_source: str | None  # flag | metadata | config | trainer | default; None when not settled
    alpha_detail: str
    alpha_pattern: dict[str, float]
    alpha_candidates: tuple[dict[str, Any], ...]  # [{"alpha", "trainer", "source"}] when several trainers fit
    target_modules: tuple[str, ...]
    num_modules: int
    modules: tuple[str, ...]
    dtype: str | None
    size_bytes: int
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    steps: tuple[int, ...] = ()  # the checkpoints of the output folder given, when it holds several
    ignored: tuple[str, ...] = ()  # non-LoRA tensors read past (finetrainers' full state)
    lora_bias: bool = False  # lora_B has a bias (PEFT lora_bias=True)
    use_dora: bool = False  # DoRA magnitude vectors (PEFT use_dora=True)
    text_encoder: tuple[str, ...] = ()  # a text encoder's LoRA (lora_te_ keys), left out of the adapter
    fits: tuple[str, ...] = ()  # CogVideoX variants whose shapes the LoRA fits
    fit_detail: str = ""

    @property
    def format_description(self) -> str:
        return FORMAT_DESCRIPTIONS.get(self.format, self.format)

    @property
    def scale(self) -> float | None:
        """The LoRA scale of the common rank (lora_alpha / r)."""
        return self.alpha / self.rank if self.rank and self.alpha is not None else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("target_modules", "modules", "problems", "warnings", "steps", "ignored", "text_encoder", "fits"):
            data[key] = list(data[key])
        data["alpha_candidates"] = [dict(candidate) for candidate in self.alpha_candidates]
        data["format_description"] = self.format_description
        data["scale"] = self.scale
        return data

    def unsettled_alpha_message(self) -> str:
        """One line for a repair without `alpha` when the file does not settle lora_alpha."""
        options = "; ".join(f"{c['alpha']} ({c['trainer']}: {c['source']})" for c in self.alpha_candidates)
        trainers = ", ".join(c["trainer"] for c in self.alpha_candidates)
        return (f"{self.file} does not store lora_alpha and several trainers write this format "
                f"({self.format}), so the strength is unknown: candidates {options}. "
                f"Settle it with alpha=A or trainer=NAME ({trainers})")


@dataclass(frozen=True)
class LoraCheckpoint:
    """A checkpoint read for repair: its report, its LoRA tensors in file order, and the file to copy from."""

    report: LoraReport
    tensors: tuple[LoraTensor, ...]
    source_file: Path | None  # the safetensors file the bytes come from; None for SAT/DCP (payloads)
    metadata_config: dict[str, Any]  # LoRA config keys from the file's metadata (prefix removed), if any


@dataclass(frozen=True)
class Located:
    """Which checkpoint a CKPT argument names: the tensor file (or DCP folder), and the steps of the folder."""

    kind: str  # "safetensors" | "pickle" | "sat" | "dcp"
    path: Path
    steps: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


def checkpoint_steps(folder: Path) -> dict[int, Path]:
    """The checkpoints an output folder holds, by step: `checkpoint-N/` (CogVideo, diffusers, CogKit),
    `checkpoint-N.safetensors` (VideoX-Fun), `lora_weights/NNNNNN/` (finetrainers; its `finetrainers_step_N/` full
    states only for steps without one), `N/` with a SAT model file."""
    found: dict[int, Path] = {}
    fallbacks: dict[int, Path] = {}
    folders = [folder]
    if is_folder(folder / "lora_weights"):
        folders.append(folder / "lora_weights")
    for parent in folders:
        for child in list_folder(parent):
            file_match = STEP_FILE.match(child.name)
            if file_match and is_regular_file(child):
                found[int(file_match["step"])] = child
                continue
            folder_match = STEP_FOLDER.match(child.name)
            if not folder_match or not is_folder(child):
                continue
            step = int(folder_match["step"])
            if child.name.startswith("finetrainers_step_"):
                fallbacks[step] = child
            elif child.name.startswith("checkpoint-") or _holds_checkpoint(child):
                found[step] = child
    for step, path in fallbacks.items():
        found.setdefault(step, path)
    return dict(sorted(found.items()))


def _holds_checkpoint(folder: Path) -> bool:
    return any(is_regular_file(folder / name) for name in (*SAFETENSORS_NAMES, *PICKLED_NAMES, SAT_FILE_NAME,
                                                           DCP_METADATA))


def locate_checkpoint(path: Path, *, step: int | None = None, latest: bool = False) -> Located:
    """The checkpoint a CKPT argument names. A folder holding several checkpoints is never picked from silently:
    `step` or `latest` chooses, otherwise the steps are listed in the error."""
    try:
        kind = file_kind(path)  # None: a regular file; FIFOs and devices are never opened
    except FileNotFoundError:
        raise LoraCheckpointError(f"{path} does not exist") from None
    except OSError as exc:  # a symlink loop, a folder we may not enter, a name too long
        raise LoraCheckpointError(f"cannot read {describe_os_error(path, exc)}") from None
    if kind is None:
        if step is not None or latest:
            raise LoraCheckpointError(f"{path} is one file: step= and latest=True choose among the checkpoints of a "
                                      "folder")
        if path.suffix == ".distcp" or path.name == DCP_METADATA:
            return Located("dcp", path.parent)
        if ACCELERATE_STATE.match(path.name):
            raise LoraCheckpointError(
                f"{path} is accelerate's training state (optimizer, scheduler or random states), not LoRA weights: "
                "pass the checkpoint folder or its LoRA weights file"
            )
        if path.name != SAT_FILE_NAME and path.suffix.lower() in TORCH_PICKLE_SUFFIXES:
            return Located("pickle", path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraCheckpointError(
                f"{path} is a plain pickle, and cogsurgeon never unpickles those (they can run code): pass the "
                "checkpoint's .safetensors file, a torch .bin/.pt (read with weights_only=True) or its folder"
            )
        return Located("sat" if path.name == SAT_FILE_NAME else "safetensors", path)
    if kind != "a folder":
        raise LoraCheckpointError(f"{path} is {kind}, neither a regular file nor a folder")
    steps = checkpoint_steps(path)
    direct = _checkpoint_in(path)
    listed = ", ".join(str(s) for s in steps)
    if step is not None:
        if step not in steps:
            raise LoraCheckpointError(f"{path} holds no checkpoint of step {step} (steps: {listed or 'none'})")
        chosen = steps[step]
    elif latest:
        if not steps:
            raise LoraCheckpointError(f"{path} holds no numbered checkpoints for latest=True to choose from")
        chosen = steps[max(steps)]
    elif direct is not None:
        notes = (f"{path} also holds the checkpoints of steps {listed}: step=N reads one of them",) if steps else ()
        return Located(direct.kind, direct.path, tuple(steps), notes)
    elif len(steps) == 1:
        chosen = next(iter(steps.values()))
    elif steps:
        raise LoraCheckpointError(
            f"{path} holds {len(steps)} checkpoints (steps {listed}): pass step=N for one, or latest=True for step "
            f"{max(steps)}"
        )
    else:
        raise LoraCheckpointError(
            f"{path} holds no LoRA checkpoint: looked for {', '.join(SAFETENSORS_NAMES + PICKLED_NAMES)}, "
            f"{SAT_FILE_NAME}, a torch DCP (.metadata), a single .safetensors file, or checkpoint-N folders/files"
        )
    located = locate_checkpoint(chosen)
    return Located(located.kind, located.path, tuple(steps), located.notes)


def _checkpoint_in(folder: Path) -> Located | None:
    """The checkpoint a folder itself holds (not its numbered sub-checkpoints)."""
    for name in SAFETENSORS_NAMES:
        if is_regular_file(folder / name):
            return Located("safetensors", folder / name)
    for name in PICKLED_NAMES:
        if is_regular_file(folder / name):
            return Located("pickle", folder / name)
    if is_regular_file(folder / SAT_FILE_NAME):
        return Located("sat", folder / SAT_FILE_NAME)
    if is_regular_file(folder / DCP_METADATA):
        return Located("dcp", folder)
    candidates = [p for p in list_folder(folder) if p.suffix == ".safetensors" and is_regular_file(p)
                  and not STEP_FILE.match(p.name) and not p.name.endswith("-compatible_with_comfyui.safetensors")]
    if len(candidates) == 1:
        return Located("safetensors", candidates[0])
    if candidates:
        names = ", ".join(candidate.name for candidate in candidates[:4])
        raise LoraCheckpointError(f"{folder} holds several safetensors files ({names}): pass the LoRA file itself")
    return None


@dataclass
class RawCheckpoint:
    """A tensor file's LoRA entries before they are checked: what every reader hands to `_assemble`."""

    entries: list[tuple[str, LoraTensor]]
    non_lora: list[str]
    dora: list[str]
    adapters: set[str | None]
    prefixes: set[str]
    metadata: dict[str, str]
    format_name: str
    alpha_values: dict[str, float]  # kohya per-module `.alpha` values
    source_file: Path | None
    old_spelling: int = 0  # keys in diffusers' old `.lora.down/.lora.up` spelling
    not_lora: dict[str, str] = field(default_factory=dict)  # LyCORIS LoKr/LoHa: algorithm -> an example key
    text_encoder: list[str] = field(default_factory=list)  # a text encoder's LoRA (lora_te_), left out of the repair


def read_checkpoint(
    path: str | Path,
    *,
    alpha: float | None = None,
    trainer: str | None = None,
    step: int | None = None,
    latest: bool = False,
    override_stored_alpha: bool = False,
) -> LoraCheckpoint:
    """Read the checkpoint at `path` (folder or file). Raises `LoraCheckpointError` for what is not a LoRA
    checkpoint at all, and for an `alpha` that contradicts a stored lora_alpha without `override_stored_alpha`;
    fixable-or-not defects of one that is are listed in `report.problems`."""
    if trainer is not None and trainer not in TRAINERS:
        raise LoraCheckpointError(f"trainer={trainer!r}: unknown trainer; known: {', '.join(TRAINERS)}")
    given = expand_user(path)
    located = locate_checkpoint(given, step=step, latest=latest)
    if located.kind == "sat":
        from cogsurgeon.tools.lora.sat import read_sat_lora  # imports torch

        raw_tensors, non_lora = read_sat_lora(located.path)
        raw = RawCheckpoint(raw_tensors, non_lora, [], set(), set(), {}, "sat", {}, None)
    elif located.kind == "dcp":
        from cogsurgeon.tools.lora.dcp import read_dcp_lora  # imports torch

        entries = read_dcp_lora(located.path)
        raw = _classify(entries, {}, None, dcp_format(located.path.name, [entry[0] for entry in entries]))
    elif located.kind == "pickle":
        from cogsurgeon.tools.lora.torch_pickle import read_pickled_lora  # imports torch

        raw = _with_format(_classify(read_pickled_lora(located.path), {}, None, ""), located.path)
        located = Located(located.kind, located.path, located.steps, (*located.notes, (
            f"{located.path.name} is a torch pickle, read with torch.load(weights_only=True): tensors only, no code "
            "from the file runs; safetensors is the safer format to keep")))
    else:
        raw = _read_safetensors(located.path)
    return _assemble(given, located, raw, AlphaRequest(alpha, trainer, override_stored_alpha))


# key, dtype, shape, bytes, start, payload
RawEntry = tuple[str, str, tuple[int, ...], int, int | None, Callable[[], Any] | None]


def _classify(entries: list[RawEntry], metadata: dict[str, str], source_file: Path | None,
              format_name: str) -> RawCheckpoint:
    """Sort raw entries into LoRA weights (by the key grammar), DoRA and other tensors."""
    raw = RawCheckpoint([], [], [], set(), set(), metadata, format_name, {}, source_file)
    for key, dtype, shape, nbytes, start, payload in entries:
        parsed = parse_lora_key(key)
        if parsed is None:
            algorithm = not_lora_algorithm(key)
            if algorithm is not None:
                raw.not_lora.setdefault(algorithm, key)
            if is_text_encoder_key(key):
                raw.text_encoder.append(key)
                continue
            (raw.dora if is_dora_key(key) else raw.non_lora).append(key)
            continue
        raw.old_spelling += parsed.style == "diffusers-old"
        raw.adapters.add(parsed.adapter)
        raw.prefixes.add(key_prefix(key))
        raw.entries.append((key, LoraTensor(parsed.module, parsed.part, dtype, shape, nbytes, start, payload)))
    return raw


def _read_safetensors(tensor_file: Path) -> RawCheckpoint:
    header = read_header(tensor_file)
    entries = [(e.name, e.dtype, e.shape, e.nbytes, e.start, None) for e in header.tensors]
    return _with_format(_classify(entries, header.metadata, tensor_file, format_name=""), tensor_file)


def _with_format(raw: RawCheckpoint, tensor_file: Path) -> RawCheckpoint:
    """A tensor file's entries named by format (from its keys, header, file and folder names and neighbours), with
    the kohya per-module alphas read."""
    folder = tensor_file.parent
    raw.format_name = detect_format(
        file_name=tensor_file.name, folder_name=folder.name, prefixes=raw.prefixes, adapters=raw.adapters,
        metadata_keys=set(raw.metadata),
        accelerate_state=any(ACCELERATE_STATE.match(p.name) for p in list_folder(folder)),
        peft_config_beside=is_regular_file(folder / "adapter_config.json"),
    )
    for _, tensor in raw.entries:
        if tensor.part == "alpha":
            raw.alpha_values[tensor.module] = scalar_value(tensor, tensor_bytes(tensor, raw.source_file))
    return raw


def tensor_bytes(tensor: LoraTensor, source_file: Path | None) -> bytes | memoryview:
    """A tensor's bytes: its payload (SAT, DCP), or its byte range of the safetensors file it was read from."""
    if tensor.payload is not None:
        return tensor.payload()
    assert source_file is not None and tensor.source_start is not None
    with source_file.open("rb") as handle:
        handle.seek(tensor.source_start)
        return handle.read(tensor.nbytes)


def lora_digest(checkpoint: LoraCheckpoint) -> str:
    """sha256 over the LoRA tensors a repair reads (module, part, dtype, shape and bytes, in file order): what a repair
    manifest records of its source, so that `verify` knows the checkpoint it finds there is the one repaired. The
    tensors only, not the whole file: finetrainers' full state holds the base model beside them."""
    digest = hashlib.sha256()
    for tensor in checkpoint.tensors:
        digest.update(f"{tensor.module}\0{tensor.part}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor_bytes(tensor, checkpoint.source_file))
    return digest.hexdigest()


def scalar_value(tensor: LoraTensor, data: bytes) -> float:
    """The value of a one-element tensor from its bytes (F32/F16/BF16/F64), without torch."""
    if math.prod(tensor.shape) != 1:
        raise LoraCheckpointError(
            f"{tensor.module}.alpha has shape {list(tensor.shape)}: a kohya alpha is one number (shape [] or [1])"
        )
    if tensor.dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + bytes(data[:2]))[0]
    formats = {"F32": "<f", "F16": "<e", "F64": "<d", "I64": "<q", "I32": "<i"}
    if tensor.dtype not in formats:
        raise LoraCheckpointError(f"{tensor.module}.alpha has dtype {tensor.dtype}: expected a float")
    return float(struct.unpack(formats[tensor.dtype], bytes(data))[0])


def _metadata_config(metadata: dict[str, str], problems: list[str], tensor_file: Path) -> dict[str, Any]:
    """The transformer's LoRA config from diffusers' `lora_adapter_metadata` (keys `transformer.r`, ...); an
    unreadable one is added to `problems`."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        config = _json_object(metadata[METADATA_KEY])
    except ValueError as exc:
        problems.append(f"{tensor_file.name}: {METADATA_KEY} is unreadable ({exc}), so the LoRA config it holds is "
                        "unknown; fix or strip the metadata")
        return {}
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or {k: v for k, v in config.items() if "." not in k}


def _config_beside(
    tensor_file: Path, warnings: list[str], problems: list[str]
) -> tuple[float | None, dict[str, float] | None, str | None]:
    """lora_alpha from a trainer or PEFT config next to the checkpoint (for SAT also one folder up)."""
    folders = [tensor_file if tensor_file.is_dir() else tensor_file.parent]  # a DCP checkpoint is a folder
    if tensor_file.name == SAT_FILE_NAME:
        folders.append(tensor_file.parent.parent)
    for folder in folders:
        for name in CONFIG_FILES:
            config_path = folder / name
            if not is_regular_file(config_path):
                continue
            try:  # regular files only, size capped; JSON without NaN, YAML without aliases (no alias bombs)
                config = read_json(config_path) if name.endswith(".json") else read_yaml(config_path)
            except UserFileError as exc:  # a config the user's trainer wrote; unreadable means "no config"
                warnings.append(f"{' '.join(str(exc).split())[:300]}; ignored")
                continue
            if not isinstance(config, dict):  # it parsed, but as a list or a scalar: not the config it claims to be
                raise LoraCheckpointError(
                    f"{config_path} is not a mapping (it parses as {type(config).__name__}): a trainer config "
                    "is a mapping of settings; fix or move it"
                )
            _unsupported_variants(config, str(config_path), problems)
            found = _find_key(config, "lora_alpha")
            if positive_number(found):
                pattern = _find_key(config, "alpha_pattern")
                return float(found), pattern if isinstance(pattern, dict) else None, str(config_path)
    return None, None, None


def _unsupported_variants(config: Any, where: str, problems: list[str]) -> None:
    """LoRA variants whose scale the adapter written by repair would get wrong (DoRA and lora_bias are written)."""
    if _find_key(config, "use_rslora") is True:
        problems.append(f"{where} says use_rslora: rsLoRA (scale alpha/sqrt(r)) is not plain LoRA and repair does not "
                        "rebuild it")


def _find_key(tree: Any, wanted: str) -> Any:
    """The first value stored under `wanted` anywhere in a nested config."""
    if isinstance(tree, dict):
        if wanted in tree:
            return tree[wanted]
        tree = list(tree.values())
    if isinstance(tree, list):
        for value in tree:
            found = _find_key(value, wanted)
            if found is not None:
                return found
    return None


def _finetrainers_config(tensor_file: Path) -> tuple[float | None, str | None]:
    """finetrainers' full state (`finetrainers_step_N/model.safetensors`, or the PTD backend's torch DCP folder
    `finetrainers_step_N/`) stores no alpha; the LoRA file its save hook wrote at the same step,
    `lora_weights/{N:06d}/pytorch_lora_weights.safetensors`, holds it in `lora_config`."""
    step_folder = tensor_file if tensor_file.is_dir() else tensor_file.parent
    match = re.match(r"^finetrainers_step_(\d+)$", step_folder.name)
    if match is None:
        return None, None
    sibling = step_folder.parent / "lora_weights" / f"{int(match[1]):06d}" / "pytorch_lora_weights.safetensors"
    if not is_regular_file(sibling):
        return None, None
    config = _lora_config_metadata(read_header(sibling).metadata, sibling)
    value = config.get("lora_alpha")
    return (float(value), str(sibling)) if positive_number(value) else (None, None)


def _lora_config_metadata(metadata: dict[str, str], tensor_file: Path) -> dict[str, Any]:
    """finetrainers' header `lora_config`: JSON with r, lora_alpha, target_modules."""
    if "lora_config" not in metadata:
        return {}
    try:
        return _json_object(metadata["lora_config"])
    except ValueError as exc:
        raise LoraCheckpointError(f"{tensor_file}: header lora_config is unreadable ({exc})") from None


def _json_object(text: str) -> dict[str, Any]:
    """A LoRA config stored as JSON in the header; NaN is let through to the checks of _assemble, which refuse it."""
    config = loads_json(text, allow_nan=True)
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    return config


def _kohya_alpha(raw: RawCheckpoint, ranks: dict[str, int],
                 problems: list[str]) -> tuple[float | None, dict[str, float]]:
    """kohya stores alpha per module: the most common value is lora_alpha, the others go to alpha_pattern."""
    if not raw.alpha_values:
        return None, {}
    missing = sorted(set(ranks) - set(raw.alpha_values))
    if missing:
        problems.append(f"{counted(len(missing), 'module')} {'has' if len(missing) == 1 else 'have'} no .alpha while "
                        f"others do, e.g. {missing[0]}")
    common, pattern = most_common_and_pattern(raw.alpha_values)
    wrong = next((value for value in (common, *pattern.values()) if not positive_number(value)), None)
    if wrong is not None:
        problems.append(f".alpha {wrong:g} is not {ALPHA_RANGE}")
    return common, pattern


@dataclass(frozen=True)
class AlphaRequest:
    """What the person asked for: alpha=, trainer=, override_stored_alpha= (the CLI's --alpha, --trainer,
    --override-stored-alpha)."""

    alpha: float | None = None
    trainer: str | None = None
    override_stored: bool = False


def _alpha_notes(resolution: AlphaResolution, request: AlphaRequest, rank: int | None, tensor_file: Path) -> list[str]:
    """What a person must hear about the alpha they asked for: a refused contradiction (raised), an override (what
    changes), a flag that agreed with the stored value, and the stored per-module alphas that are kept."""
    stored, flag = resolution.stored_alpha, request.alpha
    kept = (f"; the stored alpha_pattern of {counted(len(resolution.alpha_pattern), 'module')} is kept "
            f"({_listed(resolution.alpha_pattern)})") if resolution.alpha_pattern else ""
    if resolution.refused_flag is not None:
        raise LoraCheckpointError(
            f"alpha={number(flag)} contradicts the lora_alpha {number(stored)} stored in {resolution.detail} "
            f"({tensor_file.name}): the stored value is what the LoRA was trained with; drop alpha=, or pass "
            f"override_stored_alpha=True to write {number(flag)} instead{kept}"
        )
    if flag is None or stored is None:
        return []
    if resolution.source == "flag":
        before, after = (f"{stored / rank:g}", f"{flag / rank:g}") if rank else ("?", "?")
        return [f"STORED ALPHA OVERRIDDEN: lora_alpha {number(stored)} -> {number(flag)} (scale {before} -> {after} at "
                f"rank {rank}), as override_stored_alpha=True asks{kept}"]
    return [f"alpha={number(flag)} is the stored lora_alpha ({resolution.detail}): nothing changes{kept}"]


def _listed(pattern: dict[str, Any], shown_count: int = 3) -> str:
    items = [f"{module}={number(value)}" for module, value in list(pattern.items())[:shown_count]]
    return ", ".join(items) + (", ..." if len(pattern) > shown_count else "")


EXTRA_PARTS = {"bias": "lora_B bias (PEFT lora_bias=True)", "magnitude": "DoRA magnitude (PEFT use_dora=True)"}


def _bias_and_magnitude(raw: RawCheckpoint, b_shapes: dict[str, tuple[int, ...]],
                        problems: list[str]) -> list[LoraTensor]:
    """PEFT's lora_B biases and DoRA magnitude vectors: one per module, of lora_B's output size, on every module of
    the LoRA (PEFT sets lora_bias and use_dora for the whole adapter)."""
    found: dict[str, dict[str, LoraTensor]] = {part: {} for part in EXTRA_PARTS}
    for key, tensor in raw.entries:
        if tensor.part not in EXTRA_PARTS:
            continue
        modules = found[tensor.part]
        expected = (b_shapes[tensor.module][0],) if tensor.module in b_shapes else None
        if tensor.module in modules:
            problems.append(f"{tensor.module}: the {EXTRA_PARTS[tensor.part]} appears twice (again as {key!r})")
        elif expected is None:
            problems.append(f"{tensor.module}: a {EXTRA_PARTS[tensor.part]} without lora_B ({key!r})")
        elif tensor.shape != expected:
            problems.append(f"{tensor.module}: the {EXTRA_PARTS[tensor.part]} has shape {list(tensor.shape)}, "
                            f"expected {list(expected)} (lora_B's output size)")
        else:
            modules[tensor.module] = tensor
    for part, modules in found.items():
        missing = sorted(set(b_shapes) - set(modules))
        if modules and missing:
            problems.append(f"{len(missing)} modules have no {EXTRA_PARTS[part]} while others do, e.g. {missing[0]}")
    return [tensor for modules in found.values() for tensor in modules.values()]


def _assemble(given: Path, located: Located, raw: RawCheckpoint, request: AlphaRequest) -> LoraCheckpoint:
    """The checked checkpoint of a tensor file's raw entries, in named steps: refuse what is not LoRA, note what the
    entries say, pair lora_A with lora_B, find the alpha the file stores, settle the alpha, and write the report."""
    tensor_file = located.path
    _refuse_not_lora(raw, tensor_file)
    warnings, problems, ignored = _entry_notes(raw, located.notes)
    a_shapes, b_shapes, tensors = _lora_pairs(raw, problems)
    ranks, rank_problems = module_ranks(a_shapes, b_shapes)
    problems.extend(rank_problems)
    rank, rank_pattern = rank_and_pattern(ranks)
    extras = _bias_and_magnitude(raw, b_shapes, problems)
    tensors.extend(extras)
    stored = _stored_alpha(raw, tensor_file, ranks, rank, extras, problems)
    resolution = _resolve_stored_alpha(raw, tensor_file, stored, rank, request, warnings, problems)
    front, back = _alpha_warnings(resolution, request, rank, tensor_file)
    warnings = [*front, *warnings, *back]
    modules = tuple(sorted(ranks) if ranks else sorted(set(a_shapes) | set(b_shapes)))
    report = _report(given, located, raw, tensors, extras, modules, rank, rank_pattern, resolution, ignored,
                     problems, warnings)
    return LoraCheckpoint(report, tuple(tensors), raw.source_file, stored.config)


def _refuse_not_lora(raw: RawCheckpoint, tensor_file: Path) -> None:
    """A LyCORIS LoKr/LoHa file, or one without a transformer LoRA, is no checkpoint to repair: one clear error."""
    if raw.not_lora:
        algorithm, example = next(iter(raw.not_lora.items()))
        raise LoraCheckpointError(
            f"{tensor_file} is a LyCORIS {algorithm} adapter, not LoRA (e.g. {example!r}): it has no lora_A/lora_B "
            "pair for PEFT's or diffusers' LoRA loaders, so repair cannot rebuild it; LyCORIS itself loads it "
            "(lycoris.create_lycoris_from_weights(1.0, FILE, transformer), then .apply_to())"
        )
    if not any(t.part in ("A", "B") for _, t in raw.entries) and not raw.dora:
        detail = f" (it holds {len(raw.non_lora)} other tensors, e.g. {raw.non_lora[0]})" if raw.non_lora else ""
        if raw.text_encoder:
            detail = f" for the transformer: only a text encoder's LoRA ({len(raw.text_encoder)} lora_te_ tensors)"
        raise LoraCheckpointError(f"{tensor_file} holds no LoRA weights (no lora_A/lora_B keys){detail}")


def _entry_notes(raw: RawCheckpoint, notes: tuple[str, ...]) -> tuple[list[str], list[str], tuple[str, ...]]:
    """(warnings, problems, ignored tensors) from the keys alone: a text encoder's LoRA left out, the old diffusers
    spelling, several adapters or prefixes in one file, tensors that are not LoRA, kohya-style DoRA."""
    warnings, problems = list(notes), []
    if raw.text_encoder:
        modules = {key.split(".")[0] for key in raw.text_encoder}
        warnings.append(
            f"TEXT ENCODER LEFT OUT: {len(raw.text_encoder)} tensors of a text-encoder LoRA ({len(modules)} lora_te_ "
            f"modules, e.g. {raw.text_encoder[0]!r}) are not written: the adapter holds the transformer's LoRA "
            "only; the text encoder runs as it was before training unless its LoRA is applied another way"
        )
    if raw.old_spelling:
        warnings.append(f"{raw.old_spelling} keys use diffusers' old .lora.down/.lora.up spelling "
                        "(convert_state_dict_to_diffusers), read as lora_A/lora_B")
    named_adapters = sorted(a for a in raw.adapters if a is not None)
    if len(named_adapters) > 1 or (named_adapters and None in raw.adapters):
        problems.append(f"keys name several adapters ({', '.join(named_adapters)}): keep one adapter per file")
    if len(raw.prefixes) > 1:
        problems.append(f"keys mix prefixes {sorted(raw.prefixes)}: one model prefix per file expected")
    ignored: tuple[str, ...] = ()
    if raw.non_lora and raw.format_name in FINETRAINERS_FORMATS:
        ignored = tuple(raw.non_lora)
        warnings.append(f"{len(ignored)} non-LoRA tensors of finetrainers' full state ignored, e.g. {ignored[0]!r}")
    elif raw.non_lora:
        problems.append(
            f"{len(raw.non_lora)} tensors are not LoRA weights, e.g. {raw.non_lora[0]!r}: repair writes "
            "LoRA weights only"
        )
    if raw.dora:
        problems.append(
            f"{len(raw.dora)} kohya-style DoRA scales (e.g. {raw.dora[0]!r}): not PEFT's lora_magnitude_vector; repair "
            "does not rebuild this DoRA"
        )
    return warnings, problems, ignored


Shapes = dict[str, tuple[int, ...]]  # module -> the shape of one of its tensors


def _lora_pairs(raw: RawCheckpoint, problems: list[str]) -> tuple[Shapes, Shapes, list[LoraTensor]]:
    """(lora_A shapes, lora_B shapes, the A and B tensors in file order), a module's second lora_A or lora_B a
    problem."""
    a_shapes: Shapes = {}
    b_shapes: Shapes = {}
    tensors: list[LoraTensor] = []
    for key, tensor in raw.entries:
        if tensor.part not in ("A", "B"):
            continue
        shapes = a_shapes if tensor.part == "A" else b_shapes
        if tensor.module in shapes:
            problems.append(f"{tensor.module}: lora_{tensor.part} appears twice (again as {key!r})")
            continue
        shapes[tensor.module] = tensor.shape
        tensors.append(tensor)
    return a_shapes, b_shapes, tensors


@dataclass(frozen=True)
class StoredAlpha:
    """What the tensor file itself says about its LoRA config: the config in its metadata (prefix removed), the
    lora_alpha and alpha_pattern it stores (None: none usable) and where they were found."""

    config: dict[str, Any]
    alpha: float | None
    pattern: dict[str, Any] | None
    where: str


def _stored_alpha(raw: RawCheckpoint, tensor_file: Path, ranks: dict[str, int], rank: int | None,
                  extras: list[LoraTensor], problems: list[str]) -> StoredAlpha:
    """The file's own LoRA config: `lora_adapter_metadata`, else finetrainers' `lora_config`, else kohya's `.alpha`
    tensors. Unreadable or impossible values are problems (repair refuses), never a silent default."""
    metadata_config = _metadata_config(raw.metadata, problems, tensor_file)
    stored_where = f"{METADATA_KEY} in the file"
    stored_pattern = metadata_config.get("alpha_pattern")
    if not metadata_config and "lora_config" in raw.metadata:
        metadata_config = _lora_config_metadata(raw.metadata, tensor_file)
        stored_where = "lora_config in the file (finetrainers)"
    metadata_alpha = metadata_config.get("lora_alpha")
    if metadata_alpha is not None and not positive_number(metadata_alpha):
        problems.append(f"the file's LoRA config says lora_alpha={shown(metadata_alpha)}: not {ALPHA_RANGE}")
        metadata_alpha = None
    for key, check, what in (("alpha_pattern", positive_number, "positive numbers"),
                             ("rank_pattern", positive_int, "positive integers")):
        pattern = metadata_config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(check(v) for v in pattern.values())):
            problems.append(f"the file's LoRA config says {key}={shown(pattern)}: expected module names mapped to "
                            f"{what}")
            if key == "alpha_pattern":
                stored_pattern = None
    kohya_alpha, kohya_pattern = _kohya_alpha(raw, ranks, problems)
    if kohya_alpha is not None and metadata_alpha is None:
        metadata_alpha, stored_pattern, stored_where = kohya_alpha, kohya_pattern, "kohya .alpha tensors in the file"
    if metadata_config and rank is not None:
        stored_r = metadata_config.get("r")
        if stored_r is not None and stored_r != rank and not metadata_config.get("rank_pattern"):
            problems.append(f"rank clash: the file's LoRA config says r={stored_r} but the tensors have rank {rank}")
    if metadata_config:
        _unsupported_variants(metadata_config, METADATA_KEY, problems)
    if metadata_config.get("use_dora") is True and not any(t.part == "magnitude" for t in extras):
        problems.append("the file's LoRA config says use_dora but it holds no lora_magnitude_vector: the DoRA "
                        "magnitudes are missing")
    alpha = float(metadata_alpha) if metadata_alpha is not None else None
    return StoredAlpha(metadata_config, alpha, stored_pattern, stored_where)


def _resolve_stored_alpha(raw: RawCheckpoint, tensor_file: Path, stored: StoredAlpha, rank: int | None,
                          request: AlphaRequest, warnings: list[str], problems: list[str]) -> AlphaResolution:
    """The lora_alpha to write: the file's, a config beside it, the request's, or the trainer's default
    (`resolve_alpha` decides; a config beside the file adds its own warnings and problems)."""
    config_alpha, config_pattern, config_file = _config_beside(tensor_file, warnings, problems)
    if config_alpha is None and raw.format_name in FINETRAINERS_FORMATS:
        config_alpha, config_file = _finetrainers_config(tensor_file)
    return resolve_alpha(
        flag=request.alpha,
        metadata_alpha=stored.alpha,
        metadata_alpha_pattern=stored.pattern,
        config_alpha=config_alpha,
        config_alpha_pattern=config_pattern,
        config_file=config_file,
        format_name=raw.format_name,
        rank=rank,
        trainer=request.trainer,
        stored_where=stored.where,
        override_stored=request.override_stored,
    )


def _alpha_warnings(resolution: AlphaResolution, request: AlphaRequest, rank: int | None,
                    tensor_file: Path) -> tuple[list[str], list[str]]:
    """(warnings that lead the report, warnings after the others) about the alpha settled: a lora_alpha the file
    does not store comes first, as what a person must read; then what the request changed or did not."""
    back = _alpha_notes(resolution, request, rank, tensor_file)
    if request.trainer is not None and resolution.stored_alpha is not None:
        back.append(f"trainer={request.trainer!r} ignored: lora_alpha is stored ({resolution.detail})")
    if resolution.source in ("default", "trainer") and resolution.lora_alpha is not None:
        scale = resolution.lora_alpha / rank if rank else float("nan")
        front = [
            f"LORA_ALPHA NOT STORED: {tensor_file.name} has no lora_alpha and no config beside it; using "
            f"lora_alpha={number(resolution.lora_alpha)} (scale {scale:g} at rank {rank}), {resolution.detail}. "
            "If your training used another value, pass alpha=A."
        ]
    elif resolution.lora_alpha is None:
        listed = ", ".join(f"{number(c.alpha)} ({c.trainer})" for c in resolution.candidates)
        front = [f"LORA_ALPHA NOT STORED and not settled: it could be {listed}; pass alpha=A or trainer=NAME"]
    else:
        front = []
    return front, back


def _report(given: Path, located: Located, raw: RawCheckpoint, tensors: list[LoraTensor], extras: list[LoraTensor],
            modules: tuple[str, ...], rank: int | None, rank_pattern: dict[str, int], resolution: AlphaResolution,
            ignored: tuple[str, ...], problems: list[str], warnings: list[str]) -> LoraReport:
    """The `LoraReport` of the checked checkpoint: dtypes, the variants it fits and its size on disk added."""
    from cogsurgeon.tools.lora.compat import lora_fits  # pure: shapes against the published configs

    tensor_file = located.path
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, t.dtype) for t in tensors})
    if len(dtypes) > 1:
        warnings = [*warnings, f"LoRA weights mix dtypes ({', '.join(dtypes)})"]
    fits, fit_detail = lora_fits([(t.module, t.part, t.shape) for t in tensors])
    files = [p for p in tensor_file.iterdir() if p.is_file()] if tensor_file.is_dir() else [tensor_file]
    size = sum(p.stat().st_size for p in files)
    return LoraReport(
        format=raw.format_name,
        path=str(given),
        file=str(tensor_file),
        rank=rank,
        rank_pattern=rank_pattern,
        alpha=number(resolution.lora_alpha),
        alpha_source=resolution.source,
        alpha_detail=resolution.detail,
        alpha_pattern=dict(resolution.alpha_pattern),
        alpha_candidates=tuple(
            {"alpha": number(c.alpha), "trainer": c.trainer, "source": c.source} for c in resolution.candidates
        ) if resolution.lora_alpha is None else (),
        target_modules=tuple(sorted({short_target(m) for m in modules})),
        num_modules=len(modules),
        modules=modules,
        dtype=dtypes[0] if len(dtypes) == 1 else ("mixed" if dtypes else None),
        size_bytes=size,
        problems=tuple(problems),
        warnings=tuple(warnings),
        steps=located.steps,
        ignored=ignored,
        text_encoder=tuple(raw.text_encoder),
        lora_bias=any(t.part == "bias" for t in extras),
        use_dora=any(t.part == "magnitude" for t in extras),
        fits=fits,
        fit_detail=fit_detail,
    )


# float32's largest value and smallest normal one: PEFT multiplies float32/bf16 outputs by alpha / r, kohya files
# store `.alpha` as F32, so an alpha beyond these becomes inf or loses its digits on the way.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
ALPHA_RANGE = "a positive finite number float32 can hold (1.2e-38 to 3.4e38)"


def positive_number(value: Any) -> bool:
    """A lora_alpha PEFT, diffusers and kohya files can use: an int or float (not a bool), above zero, within
    float32's normal range (`ALPHA_RANGE`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return FLOAT32_MIN_NORMAL <= float(value) <= FLOAT32_MAX
    except OverflowError:  # a 401-digit integer
        return False


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def inspect_checkpoint(
    path: str | Path,
    *,
    alpha: float | None = None,
    trainer: str | None = None,
    step: int | None = None,
    latest: bool = False,
    override_stored_alpha: bool = False,
) -> LoraReport:
    """Inspect a LoRA checkpoint (folder or file) without changing anything. `alpha` plays the role of `--alpha`,
    `trainer` of `--trainer`, `override_stored_alpha` of `--override-stored-alpha`, `step`/`latest` choose among
    the checkpoints of an output folder."""
    return read_checkpoint(path, alpha=alpha, trainer=trainer, step=step, latest=latest,
                           override_stored_alpha=override_stored_alpha).report


__all__ = [
    "ALPHA_RANGE", "DCP_METADATA", "FLOAT32_MAX", "FLOAT32_MIN_NORMAL", "LoraCheckpoint", "LoraCheckpointError",
    "LoraReport", "LoraTensor", "checkpoint_steps", "inspect_checkpoint", "lora_digest", "positive_int",
    "positive_number", "read_checkpoint", "scalar_value", "tensor_bytes",
]
