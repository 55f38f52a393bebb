"""Pure logic of LoRA checkpoints: what a tensor name means (module, A or B, adapter name), which trainer wrote a
file, per-module ranks and the rank_pattern, and where lora_alpha comes from. No I/O, no torch.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

LoraPart = Literal["A", "B"]

# `<module>.lora_A.weight`, `<module>.lora_A.<adapter>.weight` (a PEFT model's raw state_dict)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_DORA_KEY = re.compile(r"(\.lora_magnitude_vector(\.|$))|(\.dora_scale$)")
# key prefixes that name the model the module lives in, not the module: diffusers' component name, PEFT's wrapper
_MODEL_PREFIXES = ("base_model.model.", "transformer.")

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "cogvideo-finetune": "CogVideo finetune trainer checkpoint (checkpoint-N with accelerate state)",
    "diffusers-script": "diffusers training script output (pytorch_lora_weights.safetensors, no metadata)",
    "diffusers-metadata": "diffusers >= 0.34 LoRA with lora_adapter_metadata",
    "cogkit": "CogKit adapter (unprefixed adapter_model.safetensors)",
    "peft": "PEFT adapter (base_model.model. keys)",
    "peft-adapter-name": "PEFT model state_dict with an adapter name in the keys",
    "sat": "SAT checkpoint (mp_rank_00_model_states.pt)",
}


@dataclass(frozen=True)
class TrainerDefault:
    """A trainer's documented lora_alpha when it stored none, and where that default is written down."""

    lora_alpha: float | None  # None: alpha = rank
    reference: str


TRAINER_DEFAULTS: dict[str, TrainerDefault] = {
    "cogvideo-finetune": TrainerDefault(64, "the CogVideo finetune trainer's default (rank 128, lora_alpha 64)"),
    "diffusers-script": TrainerDefault(128, "diffusers' train_cogvideox_lora.py default (--rank 128 --lora_alpha 128)"),
    "cogkit": TrainerDefault(64, "CogKit's hard-coded LoRA config (rank 128, lora_alpha 64)"),
    "peft": TrainerDefault(8, "PEFT's LoraConfig default (lora_alpha 8)"),
    "peft-adapter-name": TrainerDefault(8, "PEFT's LoraConfig default (lora_alpha 8)"),
    "sat": TrainerDefault(1, "SAT's LoRA (lora_alpha 1, scale 1/rank)"),
    "diffusers-metadata": TrainerDefault(None, "diffusers' reload default (alpha = rank)"),
}


@dataclass(frozen=True)
class ParsedKey:
    module: str  # canonical module name inside the transformer: transformer_blocks.0.attn1.to_q
    part: LoraPart
    adapter: str | None


def parse_lora_key(key: str) -> ParsedKey | None:
    """The module, A/B and adapter name a LoRA weight key names, or None for anything else."""
    match = _PEFT_KEY.match(key)
    if match is None:
        return None
    return ParsedKey(canonical_module(match["module"]), match["part"], match["adapter"])  # type: ignore[arg-type]


def canonical_module(name: str) -> str:
    for prefix in _MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_dora_key(key: str) -> bool:
    return _DORA_KEY.search(key) is not None


def key_prefix(key: str) -> str:
    """The model prefix of a key as written ("transformer.", "base_model.model." or "")."""
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


def detect_format(
    *, file_name: str, prefixes: set[str], adapters: set[str | None], has_metadata: bool, accelerate_state: bool
) -> str:
    """Which trainer wrote a safetensors LoRA, from its file name, key prefixes and neighbours."""
    if has_metadata:
        return "diffusers-metadata"
    if adapters - {None}:
        return "peft-adapter-name"
    if "base_model.model." in prefixes:
        return "peft"
    if "transformer." in prefixes:
        return "cogvideo-finetune" if accelerate_state else "diffusers-script"
    if file_name == "adapter_model.safetensors" or "" in prefixes:
        return "cogkit"
    return "diffusers-script"


def module_ranks(a_shapes: dict[str, tuple[int, ...]], b_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], list[str]]:
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
    if not ranks:
        return None, {}
    counts = Counter(ranks.values())
    rank = max(counts, key=lambda value: (counts[value], value))
    return rank, {module: value for module, value in sorted(ranks.items()) if value != rank}


@dataclass(frozen=True)
class AlphaResolution:
    lora_alpha: float
    source: Literal["flag", "metadata", "config", "default"]
    detail: str  # where it came from, for people
    alpha_pattern: dict[str, float]


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
) -> AlphaResolution:
    """lora_alpha in DESIGN's order: --alpha, metadata in the file, a trainer config beside it, the default."""
    if flag is not None:
        return AlphaResolution(flag, "flag", "--alpha", {})
    if metadata_alpha is not None:
        return AlphaResolution(metadata_alpha, "metadata", "lora_adapter_metadata in the file", metadata_alpha_pattern or {})
    if config_alpha is not None:
        return AlphaResolution(config_alpha, "config", config_file or "a config beside the checkpoint", config_alpha_pattern or {})
    default = TRAINER_DEFAULTS[format_name]
    value = default.lora_alpha if default.lora_alpha is not None else float(rank or 1)
    return AlphaResolution(value, "default", default.reference, {})


def number(value: float) -> float | int:
    """JSON-friendly: 64.0 -> 64."""
    return int(value) if float(value).is_integer() else float(value)
