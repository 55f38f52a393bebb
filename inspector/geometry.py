"""The CogVideoX pipelines' arithmetic, written once: the latent a video size becomes (1.5's temporal-patch padding
included), the joint attention sequence `[text ; video]` and its frame layout, the rotary crop region and
embeddings, and `pipeline_inputs`, the transformer's forward inputs as diffusers' pipelines build them.

Foundation layer: the arithmetic is pure Python over a config mapping (a published config dict or a model's
`config`); torch and diffusers are imported only by the two functions that build tensors. Tested against diffusers'
own pipeline methods in tests/test_geometry.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import CogsurgeonError

if TYPE_CHECKING:
    import torch

TRANSFORMER_CLASS_NAME = "CogVideoXTransformer3DModel"
# The CogVideoX VAE: 8x spatial, 4x temporal compression (the pipelines' `vae_scale_factor_spatial` and
# `..._temporal`; the transformer's config repeats the temporal one as `temporal_compression_ratio`).
VAE_SPATIAL_FACTOR = 8
VAE_TEMPORAL_FACTOR = 4
LARGEST_DEFAULT_SIZE = (768, 1360)  # CogVideoX1.5's pipelines' size; its config's 300x300 latent is a maximum
OFS_VALUE = 2.0  # the I2V 1.5 pipeline's `ofs`: `latents.new_full((1,), fill_value=2.0)`
TORCH_MAX_BYTES = 2**63 - 1  # torch sizes a tensor's storage in int64 bytes, on the meta device too

Config = Mapping[str, Any]
VideoSize = tuple[int, int, int]  # frames, height, width: what a pipeline call is asked for, in video pixels


class VideoSizeError(CogsurgeonError):
    """A video size the model cannot take (learned positions, patch divisibility, rotary table, frame split)."""


@dataclass(frozen=True)
class FrameLayout:
    """The joint attention sequence: text tokens first, then the video tokens frame by frame in raster order. For
    CogVideoX1.5 a "frame" is one temporal patch (`patch_size_t` latent frames)."""

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

    def to_json(self) -> dict[str, int]:
        return {"text_tokens": self.text_tokens, "video_tokens": self.video_tokens, "frames": self.frames,
                "tokens_per_frame": self.tokens_per_frame, "total": self.sequence_length}


@dataclass(frozen=True)
class LatentGeometry:
    """The latent video the transformer sees for a requested video size, as the pipelines compute it."""

    frames: int  # video frames asked for
    latent_frames: int  # after the VAE's temporal compression, padded to whole temporal patches (1.5)
    padding_frames: int  # latent frames added for CogVideoX1.5's temporal patches (the pipeline drops them after)
    latent_height: int
    latent_width: int
    token_frames: int  # latent frames, or temporal patches of `patch_size_t` latent frames (1.5)
    grid_height: int  # tokens per column after spatial patching
    grid_width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_height * self.grid_width

    def layout(self, text_tokens: int) -> FrameLayout:
        return FrameLayout(text_tokens, self.token_frames, self.tokens_per_frame)


def latent_frame_count(frames: int, temporal_compression_ratio: int = VAE_TEMPORAL_FACTOR,
                       patch_size_t: int | None = None) -> int:
    """Latent frames for `frames` video frames: `(F-1)//4+1`, then padded up to whole temporal patches for
    CogVideoX1.5 (the pipelines add the padding frames and drop them after decoding)."""
    latent_frames = (frames - 1) // temporal_compression_ratio + 1
    if patch_size_t and latent_frames % patch_size_t:
        latent_frames += patch_size_t - latent_frames % patch_size_t
    return latent_frames


def video_frame_count(latent_frames: int, temporal_compression_ratio: int = VAE_TEMPORAL_FACTOR) -> int:
    """The video frames (4k+1) that give `latent_frames` latent frames: the inverse of `latent_frame_count`."""
    return (latent_frames - 1) * temporal_compression_ratio + 1


def tokens_per_frame(config: Config, latent_height: int, latent_width: int) -> int:
    """Video tokens per latent frame (per temporal patch for CogVideoX1.5) for a latent of this size."""
    patch = config["patch_size"]
    return (latent_height // patch) * (latent_width // patch)


def latent_geometry(config: Config, frames: int, height: int, width: int, batch: int = 1) -> LatentGeometry:
    """The latent video for a video size, or a `VideoSizeError` saying why the model cannot take that size (or
    `batch`, checked here too, is not a positive whole number)."""
    for label, value in (("batch", batch), ("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise VideoSizeError(f"{label} must be a positive whole number, got {value!r}")
    patch_size = int(config.get("patch_size", 2))
    patch_size_t = config.get("patch_size_t")
    temporal_ratio = int(config.get("temporal_compression_ratio", VAE_TEMPORAL_FACTOR))
    pixel_step = VAE_SPATIAL_FACTOR * patch_size
    for label, value in (("height", height), ("width", width)):
        if value % pixel_step:
            lower = max(pixel_step, value - value % pixel_step)
            raise VideoSizeError(
                f"{label} {value} is not a multiple of {pixel_step} (the VAE's {VAE_SPATIAL_FACTOR}× times patch "
                f"size {patch_size}): try {lower} or {lower + pixel_step}"
            )
    latent_height, latent_width = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
    if config.get("use_learned_positional_embeddings"):
        sample_height, sample_width = int(config["sample_height"]), int(config["sample_width"])
        if (latent_height, latent_width) != (sample_height, sample_width):
            raise VideoSizeError(
                f"this model's learned positional embeddings fix the video size to "
                f"{sample_height * VAE_SPATIAL_FACTOR}×{sample_width * VAE_SPATIAL_FACTOR} (height×width); "
                f"{height}×{width} cannot run (diffusers raises ValueError in CogVideoXPatchEmbed)"
            )
    latent_frames = latent_frame_count(frames, temporal_ratio, patch_size_t)
    grid_height, grid_width = latent_height // patch_size, latent_width // patch_size
    if patch_size_t is not None and config.get("use_rotary_positional_embeddings"):
        # The pipelines slice 1.5's rotary table out of a grid of the config's sample size; beyond it diffusers
        # fails with a reshape error deep inside get_3d_rotary_pos_embed.
        max_height, max_width = int(config["sample_height"]) // patch_size, int(config["sample_width"]) // patch_size
        if grid_height > max_height or grid_width > max_width:
            raise VideoSizeError(
                f"{height}×{width} is larger than this model's rotary grid allows: at most "
                f"{max_height * pixel_step}×{max_width * pixel_step} (height×width)"
            )
    return LatentGeometry(
        frames=frames,
        latent_frames=latent_frames,
        padding_frames=latent_frames - latent_frame_count(frames, temporal_ratio),
        latent_height=latent_height,
        latent_width=latent_width,
        token_frames=latent_frames // patch_size_t if patch_size_t else latent_frames,
        grid_height=grid_height,
        grid_width=grid_width,
    )


def default_video_size(config: Config) -> VideoSize:
    """The video (frames, height, width) the pipelines default to for this config: the sample size times the VAE's
    factor (49x480x720 for CogVideoX, 9x64x64 for the tiny models), capped at CogVideoX1.5's 81x768x1360."""
    height = int(config["sample_height"]) * VAE_SPATIAL_FACTOR
    width = int(config["sample_width"]) * VAE_SPATIAL_FACTOR
    if height > LARGEST_DEFAULT_SIZE[0] or width > LARGEST_DEFAULT_SIZE[1]:
        height, width = LARGEST_DEFAULT_SIZE
    return int(config["sample_frames"]), height, width


def layout_of_call(text_tokens: int, video_tokens: int, frame_tokens: int) -> FrameLayout:
    """The layout of an attention call from what the processor sees (text and video lengths) and the tokens per
    frame read at the transformer's forward."""
    if frame_tokens <= 0 or video_tokens % frame_tokens:
        raise VideoSizeError(
            f"{video_tokens} video tokens do not split into frames of {frame_tokens} tokens: the attention call "
            "does not match the latent shape the transformer was called with"
        )
    return FrameLayout(text_tokens, video_tokens // frame_tokens, frame_tokens)


def layout_of_inputs(config: Config, inputs: Mapping[str, Any]) -> FrameLayout:
    """The frame layout of a forward call's `hidden_states` (B, F, C, H, W) and `encoder_hidden_states`."""
    batch, latent_frames, channels, latent_height, latent_width = inputs["hidden_states"].shape
    return FrameLayout(
        inputs["encoder_hidden_states"].shape[1],
        latent_frames // (config.get("patch_size_t") or 1),
        tokens_per_frame(config, latent_height, latent_width),
    )


def resize_crop_region_for_grid(
    grid: tuple[int, int], base_width: int, base_height: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rotary crop region CogVideoX 1.0's pipelines use (`get_resize_crop_region_for_grid` in
    pipeline_cogvideox.py, same arithmetic; importing it would import the pipelines and transformers)."""
    grid_height, grid_width = grid
    if grid_height / grid_width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / grid_height * grid_width))
    else:
        resize_width, resize_height = base_width, int(round(base_width / grid_width * grid_height))
    crop_top = int(round((base_height - resize_height) / 2.0))
    crop_left = int(round((base_width - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


# ---------------------------------------------------------------------------------------------------------------
# Tensors (torch imported here only)


def rotary_embedding(
    config: Config, latent_frames: int, latent_height: int, latent_width: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`image_rotary_emb` for a latent of this size, as the pipelines' `_prepare_rotary_positional_embeddings`
    computes it (None for a model without rotary positions)."""
    if not config.get("use_rotary_positional_embeddings"):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    patch, patch_t = config["patch_size"], config.get("patch_size_t")
    grid = (latent_height // patch, latent_width // patch)
    base_width, base_height = config["sample_width"] // patch, config["sample_height"] // patch
    shared = {"embed_dim": config["attention_head_dim"], "grid_size": grid, "device": device}
    if patch_t is None:  # CogVideoX 1.0
        crop = resize_crop_region_for_grid(grid, base_width, base_height)
        return get_3d_rotary_pos_embed(crops_coords=crop, temporal_size=latent_frames, **shared)
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        crops_coords=None, temporal_size=(latent_frames + patch_t - 1) // patch_t, grid_type="slice",
        max_size=(base_height, base_width), **shared,
    )


def pipeline_inputs(
    config: Config,
    size: VideoSize,
    batch: int = 2,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    seed: int | None = None,
    timestep: int = 500,
) -> dict[str, Any]:
    """The transformer's forward keyword inputs at video `size`, shaped as the CogVideoX pipelines build them:
    latents (for I2V, noise and image latents concatenated on channels: the encoded first frame, zeros after),
    `max_text_seq_length` text embeddings, one int64 timestep per batch item, `ofs` for CogVideoX1.5-I2V and the
    rotary embedding. `seed=None` leaves the values unset (`torch.empty`, for shape-only forwards, e.g. on meta);
    a seed draws them at random on the CPU and moves them to `device`. `batch` 2 is one video with guidance."""
    import torch

    geometry = latent_geometry(config, *size)
    dtype = dtype or torch.float32
    generator = None if seed is None else torch.Generator().manual_seed(seed)

    def values(*shape: int) -> torch.Tensor:
        if generator is None:
            return torch.empty(*shape, dtype=dtype, device=device)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    latent = (batch, geometry.latent_frames)
    spatial = (geometry.latent_height, geometry.latent_width)
    image_channels = max(0, config["in_channels"] - config["out_channels"])
    hidden_states = values(*latent, config["in_channels"] - image_channels, *spatial)
    if image_channels:
        image_latents = torch.zeros(*latent, image_channels, *spatial, dtype=dtype, device=device)
        image_latents[:, :1] = values(batch, 1, image_channels, *spatial)
        hidden_states = torch.cat([hidden_states, image_latents], dim=2)
    inputs: dict[str, Any] = {
        "hidden_states": hidden_states,
        "encoder_hidden_states": values(batch, config["max_text_seq_length"], config["text_embed_dim"]),
        "timestep": torch.full((batch,), timestep, dtype=torch.int64, device=device),  # `t.expand(batch)`
    }
    rotary = rotary_embedding(config, geometry.latent_frames, *spatial, device=device)
    if rotary is not None:
        inputs["image_rotary_emb"] = rotary
    if config.get("ofs_embed_dim"):
        inputs["ofs"] = torch.full((1,), OFS_VALUE, dtype=dtype, device=device)
    return inputs


__all__ = [
    "FrameLayout", "LatentGeometry", "TORCH_MAX_BYTES", "TRANSFORMER_CLASS_NAME", "VAE_SPATIAL_FACTOR",
    "VideoSizeError", "default_video_size", "latent_frame_count", "latent_geometry", "layout_of_call",
    "layout_of_inputs", "pipeline_inputs", "resize_crop_region_for_grid", "rotary_embedding", "tokens_per_frame",
    "video_frame_count",
]
