"""Pure logic of LoRA checkpoints, the one LoRA key grammar: what a tensor name means (module, A or B or a kohya alpha,
adapter name) in PEFT, diffusers and kohya/ComfyUI spelling; which trainer wrote a file; per-module ranks and the
rank_pattern; and where lora_alpha comes from, or which trainers' values it could be. No I/O, no torch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

LoraPart = Literal["A", "B"]
# the suffix of each part of a module's LoRA in PEFT's spelling (what get_peft_model_state_dict writes)
PEFT_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias",
                 "magnitude": "lora_magnitude_vector"}

# `<module>.lora_A.weight`, `<module>.lora_A.<adapter>.weight` (a PEFT model's raw state_dict)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# diffusers' old spelling, `<module>.lora.down.weight` / `.lora.up.weight`: what `convert_state_dict_to_diffusers`
# writes for the attention projections (PEFT_TO_DIFFUSERS, diffusers src/diffusers/utils/state_dict_utils.py), and
# what diffusers' loader still reads (convert_unet_state_dict_to_peft, UNET_TO_DIFFUSERS there)
_OLD_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<part>down|up)\.weight$")
# LyCORIS algorithms whose weights are not a B·A pair: LoKr (Kronecker factors) and LoHa (Hadamard product)
_LYCORIS_NOT_LORA = {"lokr": "LoKr (ΔW = w1 ⊗ w2, a Kronecker product)",
                     "hada": "LoHa (ΔW = (w1a·w1b) ⊙ (w2a·w2b), a Hadamard product)"}
_LYCORIS_NOT_LORA_KEY = re.compile(r"\.(?P<algo>lokr|hada)_(?:w|t)\d")
# PEFT's lora_bias=True (`<module>.lora_B.bias`) and DoRA magnitude (`<module>.lora_magnitude_vector`, in a model's
# raw state_dict `.lora_magnitude_vector.<adapter>.weight`): written as they are, with lora_bias / use_dora set
_PEFT_EXTRA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_B(?:\.(?P<bias_adapter>[^.]+))?\.bias"
                             r"|lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight)?)$")
_DORA_KEY = re.compile(r"\.dora_scale$")  # kohya/ComfyUI-style DoRA: another parametrisation, not rebuilt
# key prefixes that name the model the module lives in, not the module: diffusers' component name, PEFT's wrapper
_MODEL_PREFIXES = ("base_model.model.", "transformer.")

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "diffusers-checkpoint": "diffusers-style checkpoint-N/ (transformer. keys, accelerate state beside): "
                            "CogVideo finetune, the diffusers CogVideoX scripts or cogvideox-factory",
    "diffusers-lora": "diffusers save_lora_weights file (transformer. keys, no alpha): the diffusers CogVideoX "
                      "scripts, cogvideox-factory, CogVideo finetune or CogVideo's SAT export",
    "diffusers-metadata": "diffusers >= 0.34 LoRA with lora_adapter_metadata",
    "finetrainers": "finetrainers lora_weights/{step}/ (lora_config in the header)",
    "finetrainers-state": "finetrainers full state finetrainers_step_N/model.safetensors (LoRA + base tensors)",
    "finetrainers-ptd": "finetrainers PTD state finetrainers_step_N/ (torch DCP: LoRA + base tensors + optimizer)",
    "cogkit": "CogKit low_vram checkpoint (unprefixed adapter_model.safetensors, no adapter_config.json)",
    "cogkit-dcp": "CogKit torch distributed checkpoint (.metadata + __0_0.distcp)",
    "videox-fun": "VideoX-Fun PEFT checkpoint-N.safetensors (unprefixed keys)",
    "kohya": "kohya / ComfyUI LoRA (lora_unet_ keys, lora_down/lora_up, .alpha)",
    "lycoris": "LyCORIS LoCon (lycoris_ keys, lora_down/lora_up, .alpha): plain LoRA under LyCORIS's prefix",
    "peft": "PEFT adapter (base_model.model. keys)",
    "peft-unprefixed": "unprefixed PEFT state dict (get_peft_model_state_dict saved as is)",
    "peft-adapter-name": "PEFT model state_dict with an adapter name in the keys",
    "sat": "SAT checkpoint (mp_rank_00_model_states.pt)",
}


@dataclass(frozen=True)
class Trainer:
    """A trainer's lora_alpha when it stored none, and where in its code that value is written down."""

    name: str  # what --trainer takes
    lora_alpha: float | None  # None: alpha = rank
    reference: str


TRAINERS: dict[str, Trainer] = {trainer.name: trainer for trainer in (
    Trainer("cogvideo-finetune", 64, "CogVideo finetune/: --lora_alpha default 64 (finetune/schemas/args.py:229, rank "
                                     "128)"),
    Trainer("diffusers-scripts", 128, "diffusers examples/cogvideo/train_cogvideox*_lora.py: --lora_alpha default 128 "
            "(rank 128)"),
    Trainer("cogvideox-factory", 64, "cogvideox-factory: --rank 64 --lora_alpha 64 defaults (finetrainers "
            "examples/_legacy/training/cogvideox/args.py:166-171)"),
    Trainer("finetrainers", 64, "finetrainers: --rank 64 --lora_alpha 64 defaults (docs/args.md:328)"),
    Trainer("cogkit", 64, "CogKit src/cogkit/utils/lora.py:33-38: LoraConfig(r=128, lora_alpha=64) hard-coded"),
    Trainer("sat", 1, "SAT LoRA: lora_alpha 1 (scale 1/r) unless training_config.yaml sets lora_alpha"),
    Trainer("sat-export", 1, "CogVideo tools/export_sat_lora_weight.py: a SAT LoRA (lora_alpha 1) written without "
                             "alpha"),
    Trainer("videox-fun", 32, "VideoX-Fun scripts/cogvideox_fun/train_lora.sh: --rank=64 --network_alpha=32"),
    Trainer("videox-fun-cli", 64, "VideoX-Fun scripts/cogvideox_fun/train_lora.py:551: --network_alpha default 64 "
            "(run without train_lora.sh)"),
    Trainer("peft", 8, "PEFT LoraConfig default lora_alpha 8"),
    Trainer("lycoris", 1, "LyCORIS create_lycoris: linear_alpha default 1 (lycoris/wrapper.py:53-58); it saves a "
            "per-module .alpha"),
    Trainer("alpha-equals-rank", None, "alpha = rank: what diffusers and ComfyUI apply to a file without alpha"),
)}

# Which trainers write each format (in the order listed to people). One trainer: its default settles alpha.
FORMAT_TRAINERS: dict[str, tuple[str, ...]] = {
    "diffusers-checkpoint": ("cogvideo-finetune", "diffusers-scripts", "cogvideox-factory"),
    "diffusers-lora": ("diffusers-scripts", "cogvideox-factory", "cogvideo-finetune", "sat-export"),
    "diffusers-metadata": ("alpha-equals-rank",),
    "finetrainers": ("finetrainers",),
    "finetrainers-state": ("finetrainers",),
    "finetrainers-ptd": ("finetrainers",),
    "cogkit": ("cogkit",),
    "cogkit-dcp": ("cogkit",),
    "videox-fun": ("videox-fun", "videox-fun-cli"),
    "kohya": ("videox-fun", "videox-fun-cli", "alpha-equals-rank"),
    "lycoris": ("lycoris",),
    "peft": ("peft", "alpha-equals-rank"),
    "peft-unprefixed": ("cogkit", "videox-fun", "videox-fun-cli", "peft"),
    "peft-adapter-name": ("peft", "alpha-equals-rank"),
    "sat": ("sat",),
}

# CogVideoX's Linear layers (all variants), for kohya names, where every "." became "_".
COGVIDEOX_LINEARS = (
    "transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k", "transformer_blocks.{i}.attn1.to_v",
    "transformer_blocks.{i}.attn1.to_out.0", "transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks.{i}.ff.net.2",
    "transformer_blocks.{i}.norm1.linear", "transformer_blocks.{i}.norm2.linear", "norm_out.linear", "patch_embed.proj",
    "patch_embed.text_proj", "proj_out", "time_embedding.linear_1", "time_embedding.linear_2",
    "ofs_embedding.linear_1", "ofs_embedding.linear_2",
)
_KOHYA_MODULES = tuple(
    (re.compile("^" + re.escape(name.replace(".", "_")).replace(re.escape("{i}"), r"(\d+)") + "$"), name)
    for name in COGVIDEOX_LINEARS
)
# kohya (`lora_unet_`) and LyCORIS LoCon (`lycoris_`, lycoris/wrapper.py:166) name a module the same way
_KOHYA_KEY = re.compile(r"^(?:lora_unet|lycoris)_+(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_PREFIX = "lora_unet__"


@dataclass(frozen=True)
class ParsedKey:
    module: str  # canonical module name inside the transformer: transformer_blocks.0.attn1.to_q
    part: LoraPart | Literal["alpha", "bias", "magnitude"]
    adapter: str | None
    style: Literal["peft", "kohya", "diffusers-old"] = "peft"


def parse_lora_key(key: str) -> ParsedKey | None:
    """The module, part (A, B, a kohya `.alpha`, PEFT's lora_B bias or DoRA magnitude) and adapter name a LoRA key
    names, or None for anything else."""
    match = _PEFT_KEY.match(key)
    if match is not None:
        return ParsedKey(canonical_module(match["module"]), match["part"], match["adapter"])  # type: ignore[arg-type]
    extra = _PEFT_EXTRA_KEY.match(key)
    if extra is not None:
        part = "magnitude" if "lora_magnitude_vector" in key[len(extra["module"]):] else "bias"
        return ParsedKey(canonical_module(extra["module"]), part, extra["adapter"] or extra["bias_adapter"])
    old = _OLD_DIFFUSERS_KEY.match(key)
    if old is not None:
        return ParsedKey(canonical_module(old["module"]), "A" if old["part"] == "down" else "B", None, "diffusers-old")
    kohya = _KOHYA_KEY.match(key)
    module = kohya_module(kohya["name"]) if kohya else None
    if module is None:
        return None
    part = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[kohya["part"]]
    return ParsedKey(module, part, None, "kohya")  # type: ignore[arg-type]


def kohya_module(name: str) -> str | None:
    """`transformer_blocks_0_attn1_to_out_0` -> `transformer_blocks.0.attn1.to_out.0` (CogVideoX's Linear names only:
    the underscores of a kohya name are ambiguous without knowing the model)."""
    name = name.lstrip("_")
    for pattern, module in _KOHYA_MODULES:
        found = pattern.match(name)
        if found:
            return module.replace("{i}", found.group(1)) if found.groups() else module
    return None


def peft_key(prefix: str, module: str, part: str) -> str:
    """The key of a module's LoRA part in PEFT's spelling under `prefix` ("base_model.model.", "transformer.")."""
    return f"{prefix}{module}.{PEFT_SUFFIXES[part]}"


def kohya_key(module: str, part: str) -> str:
    """The kohya/ComfyUI key of a module's weight: part "A" -> lora_down, "B" -> lora_up, "alpha"."""
    suffix = {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}[part]
    return f"{KOHYA_PREFIX}{module.replace('.', '_')}.{suffix}"


def canonical_module(name: str) -> str:
    for prefix in _MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_dora_key(key: str) -> bool:
    return _DORA_KEY.search(key) is not None


def is_text_encoder_key(key: str) -> bool:
    """A kohya-style key of a text encoder's LoRA (`lora_te_`, `lora_te1_`, ...: VideoX-Fun's LoRANetwork over T5)."""
    return re.match(r"^lora_te\d*_", key) is not None


def not_lora_algorithm(key: str) -> str | None:
    """The LyCORIS algorithm a key belongs to when it is not LoRA (LoKr, LoHa), else None."""
    found = _LYCORIS_NOT_LORA_KEY.search(key)
    return _LYCORIS_NOT_LORA[found["algo"]] if found else None


def key_prefix(key: str) -> str:
    """The model prefix of a key as written ("transformer.", "base_model.model.", "lora_unet_" or "")."""
    if key.startswith(("lora_unet_", "lora_te_")):
        return "lora_unet_"
    if key.startswith("lycoris_"):
        return "lycoris_"
    for prefix in _MODEL_PREFIXES:
        if key.startswith(prefix):
            return prefix
    return ""


def short_target(module: str) -> str:
    """A trainer-style target name: `transformer_blocks.3.attn1.to_out.0` -> `to_out.0`."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-\d+$")
_VIDEOX_FUN_FILE = re.compile(r"^checkpoint-\d+\.safetensors$")
_FINETRAINERS_STATE_FOLDER = re.compile(r"^finetrainers_step_\d+$")


def detect_format(
    *,
    file_name: str,
    folder_name: str = "",
    prefixes: set[str],
    adapters: set[str | None],
    metadata_keys: frozenset[str] | set[str] = frozenset(),
    accelerate_state: bool,
    peft_config_beside: bool = False,
) -> str:
    """Which trainer's format a safetensors LoRA is, from its header, file and folder names and neighbours (the
    table of the LoRA-in-the-wild issue)."""
    if "lora_adapter_metadata" in metadata_keys:
        return "diffusers-metadata"
    if "lora_config" in metadata_keys:
        return "finetrainers"
    if "lora_unet_" in prefixes:
        return "kohya"
    if "lycoris_" in prefixes:
        return "lycoris"
    if adapters - {None}:
        if _FINETRAINERS_STATE_FOLDER.match(folder_name) and file_name == "model.safetensors":
            return "finetrainers-state"
        return "peft-adapter-name"
    if "base_model.model." in prefixes:
        return "peft"
    if "transformer." in prefixes:
        return "diffusers-checkpoint" if accelerate_state else "diffusers-lora"
    if file_name == "adapter_model.safetensors" and not peft_config_beside and _CHECKPOINT_FOLDER.match(folder_name):
        return "cogkit"  # CogKit's low_vram save: checkpoint-N/adapter_model.safetensors, nothing else beside
    if _VIDEOX_FUN_FILE.match(file_name):
        return "videox-fun"
    return "peft-unprefixed"


FINETRAINERS_FORMATS = ("finetrainers-state", "finetrainers-ptd")  # a whole-model state: LoRA beside base weights


def dcp_format(folder_name: str, keys: list[str]) -> str:
    """Whose torch distributed checkpoint a folder is: finetrainers' PTD state (`finetrainers_step_N/`, its own
    checkpoint prefix, parallel/ptd.py:311; or a whole PEFT-injected model: `.base_layer.` weights beside adapter-named
    LoRA keys) or CogKit's (`checkpoint-N/`, LoRA tensors only)."""
    if _FINETRAINERS_STATE_FOLDER.match(folder_name):
        return "finetrainers-ptd"
    whole_model = any(".base_layer." in key for key in keys)
    adapter_named = any((parsed := parse_lora_key(key)) is not None and parsed.adapter for key in keys)
    return "finetrainers-ptd" if whole_model and adapter_named else "cogkit-dcp"


def module_ranks(a_shapes: dict[str, tuple[int, ...]],
                 b_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], list[str]]:
    """Rank of each module (rows of A), and the problems: A without B, B without A, non-2-D weights, and rank
    clashes (A's rows differ from B's columns)."""
    ranks: dict[str, int] = {}
    problems: list[str] = []
    for module in sorted(set(a_shapes) | set(b_shapes)):
        a_shape, b_shape = a_shapes.get(module), b_shapes.get(module)
        if a_shape is None:
            problems.append(f"{module}: lora_B without lora_A")
            continue
        if b_shape is None:
            problems.append(f"{module}: lora_A without lora_B")
            continue
        if len(a_shape) != 2 or len(b_shape) != 2:
            problems.append(f"{module}: LoRA weights must be 2-D, found A {list(a_shape)} and B {list(b_shape)}")
            continue
        if a_shape[0] != b_shape[1]:
            problems.append(
                f"{module}: rank clash, lora_A has {a_shape[0]} rows but lora_B has {b_shape[1]} columns"
            )
            continue
        ranks[module] = a_shape[0]
    return ranks, problems


def rank_and_pattern(ranks: dict[str, int]) -> tuple[int | None, dict[str, int]]:
    """The most common rank (ties: the larger) and the modules whose rank differs from it, as PEFT's rank_pattern."""
    return most_common_and_pattern(ranks) if ranks else (None, {})


def most_common_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common of per-module `values` (ties: the larger), and the modules whose value differs, sorted: how
    a per-module rank or kohya alpha becomes PEFT's r and rank_pattern (lora_alpha and alpha_pattern)."""
    counts = Counter(values.values())
    common = max(counts, key=lambda value: (counts[value], value))
    return common, {module: value for module, value in sorted(values.items()) if value != common}


@dataclass(frozen=True)
class AlphaCandidate:
    """A lora_alpha the checkpoint could have been trained with, and which trainer and why."""

    alpha: float | None  # None: alpha = rank (filled in by the caller that knows the rank)
    trainer: str
    source: str


AlphaSource = Literal["flag", "metadata", "config", "trainer", "default"]


@dataclass(frozen=True)
class AlphaResolution:
    lora_alpha: float | None  # None: not settled; see candidates
    source: AlphaSource | None
    detail: str  # where it came from, for people
    alpha_pattern: dict[str, float]
    candidates: tuple[AlphaCandidate, ...] = ()
    stored_alpha: float | None = None  # what the file or a config beside it stores, when it stores lora_alpha
    refused_flag: float | None = None  # an --alpha that contradicts the stored value without --override-stored-alpha


def trainer_candidates(trainers: tuple[str, ...], rank: int | None) -> tuple[AlphaCandidate, ...]:
    """Each trainer's default lora_alpha (alpha = rank resolved at `rank`)."""
    found = []
    for name in trainers:
        trainer = TRAINERS[name]
        value = trainer.lora_alpha if trainer.lora_alpha is not None else (float(rank) if rank else None)
        found.append(AlphaCandidate(value, name, trainer.reference))
    return tuple(found)


def same_alpha(first: float, second: float) -> bool:
    """Two lora_alpha values that give the same scale (a flag typed as 64 against a stored 64.0)."""
    return math.isclose(first, second, rel_tol=1e-9, abs_tol=0.0)


def resolve_alpha(
    *,
    flag: float | None,
    metadata_alpha: float | None,
    metadata_alpha_pattern: dict[str, float] | None,
    config_alpha: float | None,
    config_alpha_pattern: dict[str, float] | None,
    config_file: str | None,
    format_name: str,
    rank: int | None,
    trainer: str | None = None,
    stored_where: str = "lora_adapter_metadata in the file",
    override_stored: bool = False,
) -> AlphaResolution:
    """lora_alpha in the issue's order: stored in the file; a trainer config beside it; `flag` (the alpha= of the calls,
    --alpha of the CLI); a trainer's default (`trainer`, or the one trainer the format identifies). When several
    trainers fit and disagree, nothing is guessed: lora_alpha is None and `candidates` lists them. `detail` names the
    calls' keyword arguments (`alpha=`, `trainer='videox-fun'`), as their messages do.

    `flag` sets only what is not stored: equal to the stored value it changes nothing (the stored alpha_pattern
    stays), different from it the resolution carries `refused_flag` (the caller refuses) unless `override_stored`,
    which replaces lora_alpha and still keeps the stored per-module alpha_pattern."""
    stored: tuple[float, AlphaSource, str, dict[str, float]] | None = None
    if metadata_alpha is not None:
        stored = (metadata_alpha, "metadata", stored_where, metadata_alpha_pattern or {})
    elif config_alpha is not None:
        stored = (config_alpha, "config", config_file or "a config beside the checkpoint", config_alpha_pattern or {})
    if stored is not None:
        value, source, where, pattern = stored
        if flag is None or same_alpha(flag, value):
            return AlphaResolution(value, source, where, pattern, stored_alpha=value)
        if override_stored:
            return AlphaResolution(flag, "flag", f"alpha= with override_stored_alpha=True, replacing lora_alpha "
                                   f"{number(value)} stored in {where}", pattern, stored_alpha=value)
        return AlphaResolution(value, source, where, pattern, stored_alpha=value, refused_flag=flag)
    if flag is not None:
        return AlphaResolution(flag, "flag", "alpha=", {})
    if trainer is not None:
        (chosen,) = trainer_candidates((trainer,), rank)
        return AlphaResolution(chosen.alpha, "trainer", f"trainer={trainer!r}: {chosen.source}", {})
    candidates = trainer_candidates(FORMAT_TRAINERS[format_name], rank)
    values = {candidate.alpha for candidate in candidates}
    if len(values) == 1 and None not in values:
        detail = "; ".join(candidate.source for candidate in candidates)
        return AlphaResolution(values.pop(), "default", detail, {}, candidates)  # type: ignore[arg-type]
    return AlphaResolution(None, None, "not stored, and several trainers write this format", {}, candidates)


def module_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A rank_pattern / alpha_pattern lookup as PEFT does it: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def number(value: float | None) -> float | int | None:
    """JSON-friendly: 64.0 -> 64."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else float(value)


__all__ = [
    "AlphaResolution", "FINETRAINERS_FORMATS", "FORMAT_DESCRIPTIONS", "TRAINERS", "dcp_format", "detect_format",
    "is_dora_key", "is_text_encoder_key", "key_prefix", "kohya_key", "kohya_module", "module_ranks", "module_value",
    "most_common_and_pattern", "not_lora_algorithm", "number", "parse_lora_key", "peft_key", "rank_and_pattern",
    "resolve_alpha", "short_target",
]
