"""The frame layout of one forward call: CogVideoX attends over `[text (T) ; video (frames x tokens_per_frame)]`.

Pure arithmetic, no torch. For CogVideoX1.5 a "frame" is one temporal patch (`patch_size_t` latent frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cogsurgeon.patches.errors import PatchError


@dataclass(frozen=True)
class FrameLayout:
    """Text tokens first, then the video tokens frame by frame in raster order."""

    text_tokens: int
    frames: int
    tokens_per_frame: int

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def sequence_length(self) -> int:
        return self.text_tokens + self.video_tokens

    def frame_start(self, frame: int) -> int:
        """Index of the first token of `frame` in the joint sequence."""
        return self.text_tokens + frame * self.tokens_per_frame

    def frame_end(self, frame: int) -> int:
        """One past the last token of `frame`: the key prefix a frame-causal query of this frame may see."""
        return self.frame_start(frame + 1)


def tokens_per_frame(config: Any, latent_height: int, latent_width: int) -> int:
    """Video tokens per latent frame (per temporal patch for CogVideoX1.5) for a latent of this size."""
    patch = config.patch_size
    return (latent_height // patch) * (latent_width // patch)


def layout_of_call(text_tokens: int, video_tokens: int, frame_tokens: int) -> FrameLayout:
    """The layout of an attention call from what the processor sees (text and video lengths) and the tokens per
    frame read at the transformer's forward."""
    if frame_tokens <= 0 or video_tokens % frame_tokens:
        raise PatchError(
            f"{video_tokens} video tokens do not split into frames of {frame_tokens} tokens: the attention call "
            "does not match the latent shape the transformer was called with"
        )
    return FrameLayout(text_tokens, video_tokens // frame_tokens, frame_tokens)
