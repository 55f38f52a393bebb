"""The attention patterns and options of the causal-video patches, as values: `BlockCausal(chunk, window, sink)`,
`WindowAttention(window, chunk, text_sees_video)` and the per-frame timesteps' `text_timestep`. Torch-free, so that
checking a patch's options (`patch list`, `cogsurgeon run --patch NAME:k=v` before it launches) loads no torch;
`patches.attention` plans the patterns and `patches.timesteps` applies the timesteps.
"""

from __future__ import annotations

import math
from contextlib import suppress
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

from cogsurgeon.inspector.errors import shown
from cogsurgeon.patches.errors import PatchParameterError


def _check_int(parameter: str, value: Any, minimum: int, pattern: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PatchParameterError(pattern, parameter, f"{pattern}: {parameter} must be a whole number, got {value!r}")
    if value < minimum:
        raise PatchParameterError(pattern, parameter, f"{pattern}: {parameter} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class BlockCausal:
    """`block-causal-attention(chunk, window, sink)`: with `chunk(f) = f // chunk` for video, a video query in chunk i
    attends all text keys and the video keys of chunks j with `j <= i` and (`window` is None or `j > i - window` or
    `j < sink`); text attends text only. `frame-causal-attention` is `BlockCausal(chunk=1)`."""

    chunk: int = 1
    window: int | None = None
    sink: int = 0

    def __post_init__(self) -> None:
        name = "block-causal-attention"
        _check_int("chunk", self.chunk, 1, name)
        if self.window is not None:
            _check_int("window", self.window, 1, name)
        _check_int("sink", self.sink, 0, name)
        if self.window is not None and self.sink > self.window:
            raise PatchParameterError(
                name,
                "sink",
                f"{name}: sink ({self.sink}) must not exceed window ({self.window}): sinks are the first chunks kept "
                "beside the window",
            )


@dataclass(frozen=True)
class WindowAttention:
    """`window-attention(window, chunk, text_sees_video)`: bidirectional local attention; a video query in chunk i
    attends all text keys and the chunks j with `|i - j| < window`; text attends text only, or every key when
    `text_sees_video`."""

    window: int = 1
    chunk: int = 1
    text_sees_video: bool = False

    def __post_init__(self) -> None:
        name = "window-attention"
        _check_int("window", self.window, 1, name)
        _check_int("chunk", self.chunk, 1, name)
        if not isinstance(self.text_sees_video, bool):
            raise PatchParameterError(
                name, "text_sees_video", f"{name}: text_sees_video must be true or false, got {self.text_sees_video!r}"
            )


Structure = Literal["causal", "frame-causal"] | BlockCausal | WindowAttention
FRAME_CAUSAL = BlockCausal(chunk=1)


def as_pattern(structure: Structure | None) -> Structure | None:
    """"frame-causal" is block-causal with chunks of one frame; everything else is itself."""
    return FRAME_CAUSAL if structure == "frame-causal" else structure


TEXT_TIMESTEP_CHOICES = ("max", "min", "first", "last")


TIMESTEP_LIMIT = 2**63  # a fixed text timestep fills a tensor of the frames' dtype: int64 (or float32) must hold it


def check_text_timestep(text_timestep: Any) -> str | float:
    """`max`, `min`, `first`, `last` or a finite number that an int64 timestep holds (a fixed timestep for text);
    anything else names the parameter. (1e39 would overflow the timestep tensor and fail every forward.)"""
    value = None
    if isinstance(text_timestep, str):
        if text_timestep in TEXT_TIMESTEP_CHOICES:
            return text_timestep
        with suppress(ValueError):
            value = float(text_timestep)  # from the command line: text_timestep=0 ("nan" and "inf" parse too)
    elif isinstance(text_timestep, Real) and not isinstance(text_timestep, bool):
        try:
            value = float(text_timestep)
        except OverflowError:  # an integer of hundreds of digits
            value = math.inf
    if value is None or not -TIMESTEP_LIMIT < value < TIMESTEP_LIMIT:
        if value is None:
            expected = f"one of {', '.join(TEXT_TIMESTEP_CHOICES)} or a number"
        elif not math.isfinite(value):
            expected = "finite"
        else:
            expected = "within the timestep's range (-2**63 to 2**63, what an int64 timestep holds; 0 to 1000 in use)"
        message = f"per-frame-timesteps: text_timestep must be {expected}, got {shown(text_timestep)}"
        raise PatchParameterError("per-frame-timesteps", "text_timestep", message)
    return value


__all__ = [
    "BlockCausal", "FRAME_CAUSAL", "Structure", "TIMESTEP_LIMIT", "WindowAttention", "as_pattern",
    "check_text_timestep",
]
