"""The MODEL argument: published CogVideoX configs shipped with the package, tiny runnable configs, and how a
spec string is classified (published, tiny, local folder, hub id). Pure: no torch, no file writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cogsurgeon.inspector.errors import ModelSpecError
from cogsurgeon.inspector.user_files import describe_os_error, expand_user

DEFAULT_SPEC = "cogvideox-5b-i2v"

# The published transformers, and the dtype each one's weights are stored in: the meta model takes it so that
# sizes match.
PUBLISHED_DTYPES: dict[str, str] = {
    "cogvideox-2b": "float16",
    "cogvideox-5b": "bfloat16",
    "cogvideox-5b-i2v": "bfloat16",
    "cogvideox1.5-5b": "bfloat16",
    "cogvideox1.5-5b-i2v": "bfloat16",
}
PUBLISHED_SPECS: tuple[str, ...] = tuple(PUBLISHED_DTYPES)

# Small configs of the same classes: 2 layers, 2 heads, every code path of the published variants
# (rotary, learned positions, temporal patches). Head dim 16 splits evenly into the 3D rotary bands.
_TINY_COMMON: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 16,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "max_text_seq_length": 8,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 4,
    "patch_size": 2,
    "sample_frames": 9,
    "sample_height": 8,
    "sample_width": 8,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 16,
    "time_embed_dim": 16,
    "timestep_activation_fn": "silu",
    "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": True,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY_COMMON),
    # image-to-video: the image latents double the input channels; learned positions beside the rotary ones
    "tiny-i2v": {**_TINY_COMMON, "in_channels": 8, "use_learned_positional_embeddings": True},
    "tiny-1.5": {**_TINY_COMMON, "patch_size_t": 2, "patch_bias": False, "num_layers": 3},
}
TINY_SPECS: tuple[str, ...] = tuple(TINY_CONFIGS)
TINY_SEED = 0

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

SpecKind = Literal["published", "tiny", "folder", "hub"]


@dataclass(frozen=True)
class ResolvedSpec:
    """What a MODEL string names: its kind and the text it came from (a folder as an absolute path)."""

    kind: SpecKind
    spec: str


def published_config(name: str) -> dict[str, Any]:
    """The transformer config.json of a published CogVideoX model, as shipped in inspector/configs."""
    if name not in PUBLISHED_SPECS:
        raise ModelSpecError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED_SPECS)}")
    text = resources.files("cogsurgeon.inspector").joinpath("configs").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def tiny_config(name: str) -> dict[str, Any]:
    """A small runnable config of the same class (a copy: callers may change it)."""
    return dict(TINY_CONFIGS[name])


def builtin_config(name: str) -> dict[str, Any]:
    """The config of a spec shipped with the package, published or tiny."""
    return tiny_config(name) if name in TINY_CONFIGS else published_config(name)


def builtin_dtype(name: str) -> str:
    """The dtype a shipped spec loads in when none is asked for: as the published weights are stored; tiny in fp32."""
    return PUBLISHED_DTYPES.get(name, "float32")


def known_specs() -> tuple[str, ...]:
    return PUBLISHED_SPECS + TINY_SPECS


def resolve_spec(spec: str | None) -> ResolvedSpec:
    """Classify a MODEL argument without loading anything. A name wins over a folder only when no such folder
    exists; an existing path is always a folder spec."""
    if spec is None or spec == "":
        return ResolvedSpec("published", DEFAULT_SPEC)
    if spec in PUBLISHED_SPECS:
        return ResolvedSpec("published", spec)
    if spec in TINY_CONFIGS:
        return ResolvedSpec("tiny", spec)
    path = expand_user(spec)
    try:
        exists = path.exists()  # raises for a name too long, a loop, a folder we may not enter
    except OSError as exc:
        raise ModelSpecError(f"model folder {describe_os_error(spec, exc)}") from None
    if exists:
        return ResolvedSpec("folder", str(path.resolve()))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if _HUB_ID.match(spec) and not looks_like_path:
        return ResolvedSpec("hub", spec)
    if looks_like_path:
        raise ModelSpecError(f"model folder {spec!r} does not exist")
    raise ModelSpecError(
        f"unknown model {spec!r}: expected one of {', '.join(known_specs())}, "
        "a local model folder, or a hub id (org/name) already in the Hugging Face cache"
    )


__all__ = [
    "DEFAULT_SPEC", "PUBLISHED_DTYPES", "PUBLISHED_SPECS", "TINY_CONFIGS", "TINY_SEED", "TINY_SPECS", "builtin_config",
    "builtin_dtype", "known_specs", "published_config", "resolve_spec", "tiny_config",
]
