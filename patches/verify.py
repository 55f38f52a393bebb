"""`verify_patch(name)`: run a patch on the tiny models (plain and fused attention processors) against explicit-mask
reference attention, and check that reverting it gives outputs bit-identical to never patching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cogsurgeon.inspector.geometry import (
    FrameLayout,
    default_video_size,
    layout_of_inputs,
    pipeline_inputs,
    video_frame_count,
)
from cogsurgeon.inspector.model_specs import TINY_SPECS
from cogsurgeon.patches.errors import PatchError
from cogsurgeon.patches.parameters import format_patch_spec
from cogsurgeon.patches.reference import (
    RULE_MASKS,
    combine_masks,
    full_attention_mask,
    per_frame_modulation_error,
    reference_processors,
)
from cogsurgeon.patches.registry import apply, get_patch, resolve_options, revert

TOLERANCE = 1e-4
PROCESSORS = ("plain", "fused")


@dataclass(frozen=True)
class CaseResult:
    """One forward compared: a tiny variant, a processor kind, an input case."""

    variant: str
    processor: str
    case: str
    max_error: float
    revert_bit_exact: bool


@dataclass(frozen=True)
class VerifyResult:
    name: str
    max_error: float
    revert_bit_exact: bool
    passed: bool
    tolerance: float
    details: tuple[CaseResult, ...]
    settings: tuple[dict[str, Any], ...] = ()  # the options of each run verified, defaults filled in ({}: none)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- inputs --------------------------------------------------------------------------------------------------------


def tiny_video_size(config: Any) -> tuple[int, int, int]:
    """The video size verify runs a tiny model at: its sample size, with three temporal patches for CogVideoX1.5
    (so that frame rules have frames to tell apart)."""
    frames, height, width = default_video_size(config)
    if config.get("patch_size_t"):
        frames = video_frame_count(3 * config["patch_size_t"], config["temporal_compression_ratio"])
    return frames, height, width


def tiny_inputs(
    model: nn.Module, *, batch: int = 2, size: tuple[int, int, int] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Seeded random forward inputs for a (tiny) model, built as the pipelines build them, at `size` (frames,
    height, width of the video) or `tiny_video_size`."""
    return pipeline_inputs(model.config, size or tiny_video_size(model.config), batch, seed=seed)


def forward(model: nn.Module, inputs: dict[str, Any], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if attention_mask is None:
            return model(**inputs)[0]
        return model(**inputs, attention_kwargs={"attention_mask": attention_mask})[0]


# -- attention-mask cases ------------------------------------------------------------------------------------------


def sample_masks(layout: FrameLayout, batch: int, heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One mask of every accepted form, with different text padding per batch item (one left-padded)."""
    generator = torch.Generator().manual_seed(seed)
    text, length = layout.text_tokens, layout.sequence_length
    text_keep = torch.ones(batch, text, dtype=torch.bool)
    text_keep[0, text // 2 :] = False  # right padding
    if batch > 1:
        text_keep[1, :2] = False  # left padding: the first queries may see no key under causal rules
    all_keep = torch.rand(batch, length, generator=generator) > 0.3
    full_keep = torch.rand(batch, 1, length, length, generator=generator) > 0.4
    full_keep |= torch.eye(length, dtype=torch.bool)
    additive = torch.zeros(batch, text).masked_fill(~text_keep, float("-inf"))
    return {
        "text bool (B,T)": text_keep,
        "text additive (B,T)": additive,
        "text additive -1e4 (B,T)": torch.zeros(batch, text).masked_fill(~text_keep, -1.0e4),
        "keys bool (B,T+N)": all_keep,
        "keys additive bias (B,T+N)": torch.randn(batch, length, generator=generator),
        "full bool (B,1,L,L)": full_keep,
        "full additive (1,heads,L,L)": torch.randn(1, heads, length, length, generator=generator),
    }


@dataclass(frozen=True)
class Case:
    label: str
    attention_mask: torch.Tensor | None
    reference_mask: torch.Tensor | None


def verify_cases(
    name: str, layout: FrameLayout, batch: int, heads: int, options: dict[str, Any] | None = None
) -> list[Case]:
    """What to run for each patch: for `attention-mask`, every accepted form; otherwise its reference mask."""
    if name == "attention-mask":
        return [
            Case(label, mask, full_attention_mask(mask, layout))
            for label, mask in sample_masks(layout, batch, heads).items()
        ]
    reference = get_patch(name).reference_mask(layout, **(options or {}))
    if reference is None:
        raise PatchError(f"{name} gives no reference mask (Patch.reference_mask), so it cannot be verified")
    return [Case(name, None, reference)]


def fresh_tiny(variant: str, processor: str) -> nn.Module:
    from cogsurgeon.inspector.loading import build_tiny

    model = build_tiny(variant)
    if processor == "fused":
        model.fuse_qkv_projections()
    return model


# What `verify NAME` runs for a patch with parameters when none are given: its defaults and settings that exercise
# chunks, windows past the sinks, and text seeing video (the tiny models have 3 frames or temporal patches).
PARAMETER_SETTINGS: dict[str, tuple[dict[str, Any], ...]] = {
    "block-causal-attention": (
        {},
        {"chunk": 2},
        {"chunk": 1, "window": 1, "sink": 1},
        {"chunk": 1, "window": 2, "sink": 0},
    ),
    "window-attention": ({}, {"window": 2}, {"window": 1, "chunk": 2}, {"window": 2, "text_sees_video": True}),
    "per-frame-timesteps": ({}, {"text_timestep": "first"}, {"text_timestep": 0}),
}


def verify_patch(
    name: str,
    *,
    options: dict[str, Any] | None = None,
    variants: tuple[str, ...] = TINY_SPECS,
    tolerance: float = TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Run patch `name` (with `options`, defaults filled in) on each tiny variant with the plain and the fused
    processor: max |patched - reference| over every case, and whether the model after `revert` reproduces the
    unpatched output bit for bit."""
    settings = PARAMETER_SETTINGS.get(name, ({},)) if options is None else (options,)
    settings = [resolve_options(name, setting) for setting in settings]
    verify_on = _verify_per_frame_on if name == "per-frame-timesteps" else _verify_on
    details = []
    for variant in variants:
        for processor in PROCESSORS:
            if progress is not None:
                progress(f"{name}: {variant}, {processor} processor")
            model = fresh_tiny(variant, processor)
            for setting in settings:
                details.extend(verify_on(name, setting, model, variant, processor))
    max_error = max(case.max_error for case in details)
    revert_bit_exact = all(case.revert_bit_exact for case in details)
    passed = revert_bit_exact and max_error <= tolerance
    return VerifyResult(name, max_error, revert_bit_exact, passed, tolerance, tuple(details), tuple(settings))


def _verify_on(
    name: str, options: dict[str, Any], model: nn.Module, variant: str, processor: str
) -> Iterator[CaseResult]:
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    unpatched = forward(model, inputs)
    for case in verify_cases(name, layout, batch=2, heads=model.config.num_attention_heads, options=options):
        with reference_processors(model, case.reference_mask):
            expected = forward(model, inputs)
        apply(model, name, **options)
        try:
            actual = forward(model, inputs, case.attention_mask)
        finally:
            revert(model, name)
        reverted = forward(model, inputs)
        error = float((actual - expected).abs().max()) if torch.isfinite(actual).all() else float("inf")
        label = case.label if case.label != name else format_patch_spec(name, _non_default(name, options))
        yield CaseResult(variant, processor, label, error, bool(torch.equal(reverted, unpatched)))


def _non_default(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {p.name: options[p.name] for p in get_patch(name).parameters if options.get(p.name, p.default) != p.default}


def _verify_per_frame_on(
    name: str, options: dict[str, Any], model: nn.Module, variant: str, processor: str
) -> Iterator[CaseResult]:
    """per-frame-timesteps: a `(B,)` timestep and equal frames give the unpatched output bit for bit (error 0 when
    they do, else the difference); random per-frame timesteps give every modulation as the token-by-token
    reference (`patches.reference.per_frame_modulation_error`); revert is bit-exact."""
    inputs = tiny_inputs(model)
    unpatched = forward(model, inputs)
    frames = inputs["hidden_states"].shape[1]
    patch_frames = model.config.patch_size_t or 1
    generator = torch.Generator().manual_seed(1)
    random_frames = torch.randint(0, 1000, (2, frames // patch_frames), generator=generator)
    per_frame = {**inputs, "timestep": random_frames.repeat_interleave(patch_frames, dim=1)}
    equal_frames = {**inputs, "timestep": inputs["timestep"][:, None].expand(-1, frames).contiguous()}
    spec = format_patch_spec(name, _non_default(name, options))
    apply(model, name, **options)
    try:
        batch_error = float((forward(model, inputs) - unpatched).abs().max())
        equal_output = forward(model, equal_frames)
        # equal frames with a fixed text timestep other than theirs are not the unpatched model: not compared
        fixed_text = not isinstance(options["text_timestep"], str)
        equal_error = 0.0 if fixed_text else float((equal_output - unpatched).abs().max())
        modulation_error = per_frame_modulation_error(model, per_frame, options["text_timestep"])
    finally:
        revert(model, name)
    bit_exact = bool(torch.equal(forward(model, inputs), unpatched))
    yield CaseResult(variant, processor, f"{spec}: timestep (B,) as unpatched", batch_error, bit_exact)
    if not fixed_text:
        yield CaseResult(variant, processor, f"{spec}: equal frames as unpatched", equal_error, bit_exact)
    yield CaseResult(variant, processor, f"{spec}: per-token modulation vs reference", modulation_error, bit_exact)


def combined_reference_mask(names: tuple[str, ...], layout: FrameLayout, attention_mask: torch.Tensor | None):
    """The explicit mask of several composed patches (rules AND a user mask), for tests of composition."""
    rule = None
    for name in names:
        if name in RULE_MASKS:
            rule = RULE_MASKS[name](layout)
    user = full_attention_mask(attention_mask, layout) if attention_mask is not None else None
    return combine_masks(rule, user)


__all__ = [
    "PROCESSORS", "combined_reference_mask", "forward", "fresh_tiny", "sample_masks", "tiny_inputs", "tiny_video_size",
    "verify_patch",
]
