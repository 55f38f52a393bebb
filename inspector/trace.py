"""Shape trace: one forward of a CogVideoX transformer on the meta device at a real video size, with inputs derived
the way diffusers' CogVideoX pipelines derive them, recording every module's input and output shapes, every
attention call's query/key/value shapes, how the joint sequence splits into text and video tokens, and what an
explicit attention mask would cost at that size.

The size arithmetic lives in small pure functions (`latent_geometry`, `sequence_split`, `mask_memory_table`);
the torch edge (`trace_shapes`) only builds meta inputs, runs, and reads shapes. Nothing is computed for real and
the model is left as it was: hooks are removed, a model that is not on meta is traced through a meta twin.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Union

from cogsurgeon.inspector.errors import CogsurgeonError

if TYPE_CHECKING:
    import torch
    from torch import nn

# The CogVideoX VAE: 8× spatial, 4× temporal compression (`vae_scale_factor_spatial`, `..._temporal` in the
# pipelines; the transformer's config repeats the temporal one as `temporal_compression_ratio`).
VAE_SPATIAL_FACTOR = 8

# A traced shape: a tensor's shape, None for a non-tensor, or a nest of those (tuples of tensors, dicts).
Shape = Union[tuple[int, ...], None, tuple["Shape", ...], dict[str, "Shape"]]


class TraceSizeError(CogsurgeonError):
    """A video size the model cannot take (learned positions, patch divisibility, rotary table, ...)."""


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


@dataclass(frozen=True)
class SequenceSplit:
    """The joint attention sequence `[text ; video]`: video in frame-major raster order, `frames` token frames."""

    text_tokens: int
    video_tokens: int
    frames: int  # latent frames, or temporal patches for CogVideoX1.5
    tokens_per_frame: int
    total: int

    def to_json(self) -> dict[str, int]:
        return {
            "text_tokens": self.text_tokens,
            "video_tokens": self.video_tokens,
            "frames": self.frames,
            "tokens_per_frame": self.tokens_per_frame,
            "total": self.total,
        }


@dataclass(frozen=True)
class AttentionCall:
    """One scaled-dot-product attention call, attributed to the module running it (`transformer_blocks.0.attn1`)."""

    module: str
    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]
    output: tuple[int, ...]
    attn_mask: tuple[int, ...] | None
    is_causal: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "query": list(self.query),
            "key": list(self.key),
            "value": list(self.value),
            "output": list(self.output),
            "attn_mask": None if self.attn_mask is None else list(self.attn_mask),
            "is_causal": self.is_causal,
        }


@dataclass(frozen=True)
class ModuleShapes:
    """A module's inputs (by parameter name; only those holding tensors) and outputs, from its first call."""

    inputs: dict[str, Shape]
    outputs: Shape
    calls: int = 1

    def to_json(self, name: str) -> dict[str, Any]:
        return {"name": name, "inputs": shape_to_json(self.inputs), "outputs": shape_to_json(self.outputs),
                "calls": self.calls}


@dataclass(frozen=True)
class MaskMemory:
    """Per attention call at the traced size: what doing a patch's rule as an explicit mask costs, against what the
    patch itself allocates.

    `explicit_mask_bytes`: the mask diffusers' explicit-mask path materialises, `prepare_attention_mask` repeating
    it per head into `(batch·heads, L, L)` in the model dtype. `broadcast_mask_bytes`: the smallest dense mask
    SDPA accepts, `(1, 1, L, L)` bool. `patch_bytes`: the patch's own estimate from the patches package; None where
    it gives none (cogsurgeon does not guess).
    """

    patch: str
    explicit_mask_shape: tuple[int, ...]
    explicit_mask_dtype: str
    explicit_mask_bytes: int
    broadcast_mask_bytes: int
    patch_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "explicit_mask_shape": list(self.explicit_mask_shape),
            "explicit_mask_dtype": self.explicit_mask_dtype,
            "explicit_mask_bytes": self.explicit_mask_bytes,
            "broadcast_mask_bytes": self.broadcast_mask_bytes,
            "patch_bytes": self.patch_bytes,
        }


@dataclass(frozen=True)
class TraceResult:
    """Everything one traced forward showed."""

    model_class: str
    frames: int
    height: int
    width: int
    batch: int
    dtype: str
    geometry: LatentGeometry
    sequence: SequenceSplit
    attention: tuple[AttentionCall, ...]
    modules: dict[str, ModuleShapes]
    mask_memory: tuple[MaskMemory, ...]
    output: tuple[int, ...]
    inputs: dict[str, Shape] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_class,
            "video": {"frames": self.frames, "height": self.height, "width": self.width, "batch": self.batch},
            "dtype": self.dtype,
            "latent": {
                "frames": self.geometry.latent_frames,
                "padding_frames": self.geometry.padding_frames,
                "height": self.geometry.latent_height,
                "width": self.geometry.latent_width,
                "grid_height": self.geometry.grid_height,
                "grid_width": self.geometry.grid_width,
            },
            "inputs": shape_to_json(self.inputs),
            "output": list(self.output),
            "sequence": self.sequence.to_json(),
            "attention": [call.to_json() for call in self.attention],
            "modules": [shapes.to_json(name) for name, shapes in self.modules.items()],
            "mask_memory": [entry.to_json() for entry in self.mask_memory],
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------------
# Size arithmetic (pure)


def latent_frame_count(frames: int, temporal_compression_ratio: int = 4, patch_size_t: int | None = None) -> int:
    """Latent frames for `frames` video frames: `(F-1)//4+1`, then padded up to whole temporal patches for
    CogVideoX1.5 (the pipelines add the padding frames and drop them after decoding)."""
    latent_frames = (frames - 1) // temporal_compression_ratio + 1
    if patch_size_t is not None and latent_frames % patch_size_t:
        latent_frames += patch_size_t - latent_frames % patch_size_t
    return latent_frames


def latent_geometry(config: Mapping[str, Any], frames: int, height: int, width: int) -> LatentGeometry:
    """The latent video for a video size, or a `TraceSizeError` saying why the model cannot take that size."""
    for label, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise TraceSizeError(f"{label} must be a positive whole number, got {value!r}")
    patch_size = int(config.get("patch_size", 2))
    patch_size_t = config.get("patch_size_t")
    temporal_ratio = int(config.get("temporal_compression_ratio", 4))
    pixel_step = VAE_SPATIAL_FACTOR * patch_size
    for label, value in (("height", height), ("width", width)):
        if value % pixel_step:
            lower = max(pixel_step, value - value % pixel_step)
            raise TraceSizeError(
                f"{label} {value} is not a multiple of {pixel_step} (the VAE's {VAE_SPATIAL_FACTOR}× times patch "
                f"size {patch_size}): try {lower} or {lower + pixel_step}"
            )
    latent_height, latent_width = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
    if config.get("use_learned_positional_embeddings"):
        sample_height, sample_width = int(config["sample_height"]), int(config["sample_width"])
        if (latent_height, latent_width) != (sample_height, sample_width):
            raise TraceSizeError(
                f"this model's learned positional embeddings fix the video size to "
                f"{sample_height * VAE_SPATIAL_FACTOR}×{sample_width * VAE_SPATIAL_FACTOR} (height×width); "
                f"{height}×{width} cannot run (diffusers raises ValueError in CogVideoXPatchEmbed)"
            )
    unpadded = latent_frame_count(frames, temporal_ratio)
    latent_frames = latent_frame_count(frames, temporal_ratio, patch_size_t)
    grid_height, grid_width = latent_height // patch_size, latent_width // patch_size
    if patch_size_t is not None and config.get("use_rotary_positional_embeddings"):
        # The pipelines slice 1.5's rotary table out of a grid of the config's sample size; beyond it diffusers
        # fails with a reshape error deep inside get_3d_rotary_pos_embed.
        max_height, max_width = int(config["sample_height"]) // patch_size, int(config["sample_width"]) // patch_size
        if grid_height > max_height or grid_width > max_width:
            raise TraceSizeError(
                f"{height}×{width} is larger than this model's rotary grid allows: at most "
                f"{max_height * pixel_step}×{max_width * pixel_step} (height×width)"
            )
    token_frames = latent_frames // patch_size_t if patch_size_t else latent_frames
    return LatentGeometry(
        frames=frames,
        latent_frames=latent_frames,
        padding_frames=latent_frames - unpadded,
        latent_height=latent_height,
        latent_width=latent_width,
        token_frames=token_frames,
        grid_height=grid_height,
        grid_width=grid_width,
    )


VAE_SCALE_FACTOR = 8
LARGEST_DEFAULT_SIZE = (768, 1360)  # CogVideoX1.5's pipelines' size; its config's 300x300 latent is a maximum


def default_video_size(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """The video (frames, height, width) the pipelines default to for this config: the sample size times the VAE's
    factor (49x480x720 for CogVideoX, 9x64x64 for the tiny models), capped at CogVideoX1.5's 81x768x1360."""
    height = int(config["sample_height"]) * VAE_SCALE_FACTOR
    width = int(config["sample_width"]) * VAE_SCALE_FACTOR
    if height > LARGEST_DEFAULT_SIZE[0] or width > LARGEST_DEFAULT_SIZE[1]:
        height, width = LARGEST_DEFAULT_SIZE
    return int(config["sample_frames"]), height, width


def sequence_split(geometry: LatentGeometry, text_tokens: int) -> SequenceSplit:
    video_tokens = geometry.token_frames * geometry.tokens_per_frame
    return SequenceSplit(
        text_tokens=text_tokens,
        video_tokens=video_tokens,
        frames=geometry.token_frames,
        tokens_per_frame=geometry.tokens_per_frame,
        total=text_tokens + video_tokens,
    )


def size_notes(config: Mapping[str, Any], geometry: LatentGeometry) -> tuple[str, ...]:
    """Things true at this size that a person would want to know, though the forward runs."""
    notes = []
    ratio = int(config.get("temporal_compression_ratio", 4))
    if (geometry.frames - 1) % ratio:
        usable = (geometry.frames - 1) // ratio * ratio + 1
        notes.append(f"{geometry.frames} frames is not {ratio}k+1: the VAE keeps {usable}")
    if geometry.padding_frames:
        notes.append(
            f"{geometry.padding_frames} latent frame(s) of padding make whole temporal patches "
            f"(the pipeline drops them after denoising)"
        )
    sample_frames = int(config.get("sample_frames", 49))
    if config.get("use_learned_positional_embeddings") and geometry.frames != sample_frames:
        latent_sample = (sample_frames - 1) // ratio + 1
        if geometry.latent_frames != latent_sample:
            notes.append(
                f"learned positional embeddings cover {sample_frames} frames; at {geometry.frames} diffusers "
                "swaps them for sin-cos positions the model was not trained with"
            )
    return tuple(notes)


def resize_crop_region_for_grid(
    grid: tuple[int, int], base_width: int, base_height: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rotary crop region CogVideoX 1.0's pipelines use (`get_resize_crop_region_for_grid` in
    pipeline_cogvideox.py, same arithmetic; importing it would import the pipelines and transformers)."""
    grid_height, grid_width = grid
    if grid_height / grid_width > base_height / base_width:
        resize_height = base_height
        resize_width = int(round(base_height / grid_height * grid_width))
    else:
        resize_width = base_width
        resize_height = int(round(base_width / grid_width * grid_height))
    crop_top = int(round((base_height - resize_height) / 2.0))
    crop_left = int(round((base_width - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


DTYPE_BYTES = {"bool": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dense_mask_bytes(shape: tuple[int, ...], dtype: str = "bool") -> int:
    """Bytes of a dense mask tensor of `shape` in `dtype` (bool: one byte per element, as torch stores it)."""
    elements = 1
    for size in shape:
        elements *= size
    return elements * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class PatchMemoryModel:
    """Where per-patch memory figures come from (`patch_memory_model()`: the patches package); without the
    callables, the explicit mask is computed here and patches get no estimate."""

    names: tuple[str, ...]
    explicit_mask_bytes: Callable[..., int] | None = None  # patches.explicit_mask_bytes(batch, heads, T, N, bytes)
    patch_bytes: Callable[..., int | None] | None = None  # patches.memory_estimate(name, batch, heads, T, N, F, ...)


def mask_memory_table(
    sequence: SequenceSplit, batch: int, heads: int, head_dim: int, dtype: str, source: PatchMemoryModel
) -> tuple[MaskMemory, ...]:
    """One row per patch: the explicit mask against the patch's own extra memory, per attention call."""
    length = sequence.total
    dtype_bytes = DTYPE_BYTES[dtype]
    explicit_shape = (batch * heads, length, length)
    if source.explicit_mask_bytes is not None:
        explicit = source.explicit_mask_bytes(batch, heads, sequence.text_tokens, sequence.video_tokens, dtype_bytes)
    else:
        explicit = dense_mask_bytes(explicit_shape, dtype)
    rows = []
    for name in source.names:
        patch_bytes = None
        if source.patch_bytes is not None:
            patch_bytes = source.patch_bytes(name, batch, heads, sequence.text_tokens, sequence.video_tokens,
                                             sequence.frames, dtype_bytes, head_dim=head_dim)
        rows.append(MaskMemory(
            patch=name,
            explicit_mask_shape=explicit_shape,
            explicit_mask_dtype=dtype,
            explicit_mask_bytes=explicit,
            broadcast_mask_bytes=dense_mask_bytes((1, 1, length, length), "bool"),
            patch_bytes=patch_bytes,
        ))
    return tuple(rows)


def patch_memory_model() -> PatchMemoryModel:
    """The registered patches (third-party ones included) and the patches package's memory estimates."""
    from cogsurgeon import patches

    return PatchMemoryModel(
        tuple(info.name for info in patches.available()),
        explicit_mask_bytes=patches.explicit_mask_bytes,
        patch_bytes=patches.memory_estimate,
    )


# ---------------------------------------------------------------------------------------------------------------
# Shapes of nested values (pure over torch tensors)


def shape_of(value: Any) -> Shape:
    """A tensor's shape as a tuple; tuples/lists and dicts (diffusers' output dataclasses too) reduced element by
    element; anything else None."""
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, Mapping):
        reduced = {str(key): shape_of(item) for key, item in value.items()}
        return {key: item for key, item in reduced.items() if item is not None} or None
    if isinstance(value, (tuple, list)):
        reduced = tuple(shape_of(item) for item in value)
        return reduced if any(item is not None for item in reduced) else None
    return None


def shape_to_json(shape: Any) -> Any:
    if isinstance(shape, dict):
        return {key: shape_to_json(item) for key, item in shape.items()}
    if isinstance(shape, tuple):
        return [shape_to_json(item) for item in shape]
    return shape


def format_shape(shape: Shape) -> str:
    """A traced shape for people: `(2, 17776, 3072)`, `[(a), (b)]` for tuples of tensors, `name=(...)` for dicts."""
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        return ", ".join(f"{key}={format_shape(value)}" for key, value in shape.items())
    if all(isinstance(size, int) for size in shape):
        return "(" + ", ".join(str(size) for size in shape) + (",)" if len(shape) == 1 else ")")
    return "[" + ", ".join(format_shape(item) for item in shape) + "]"


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} B"


@lru_cache(maxsize=None)
def _parameter_names(cls: type) -> tuple[str, ...]:
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name, p in parameters.items()
                 if name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def named_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Shape]:
    """A call's tensor inputs by parameter name (positional ones named from `forward`'s signature)."""
    names = _parameter_names(type(module))
    inputs: dict[str, Shape] = {}
    for index, value in enumerate(args):
        shape = shape_of(value)
        if shape is not None:
            inputs[names[index] if index < len(names) else f"arg{index}"] = shape
    for name, value in kwargs.items():
        shape = shape_of(value)
        if shape is not None:
            inputs[name] = shape
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# The meta forward


def trace_inputs(model: nn.Module, geometry: LatentGeometry, batch: int) -> dict[str, Any]:
    """The transformer's keyword inputs on the meta device, shaped as the CogVideoX pipelines shape them."""
    import torch
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    config = model.config
    dtype = _model_dtype(model)
    meta = torch.device("meta")
    # In the i2v pipelines in_channels is the noise latents and the image latents concatenated on channels;
    # either way the transformer takes `in_channels`.
    hidden_states = torch.empty(
        batch, geometry.latent_frames, config.in_channels, geometry.latent_height, geometry.latent_width,
        dtype=dtype, device=meta,
    )
    encoder_hidden_states = torch.empty(
        batch, config.max_text_seq_length, config.text_embed_dim, dtype=dtype, device=meta
    )
    inputs: dict[str, Any] = {
        "hidden_states": hidden_states,
        "encoder_hidden_states": encoder_hidden_states,
        "timestep": torch.empty(batch, dtype=torch.int64, device=meta),  # `t.expand(batch)` of int64 timesteps
    }
    if config.get("ofs_embed_dim"):
        inputs["ofs"] = torch.empty(1, dtype=dtype, device=meta)  # `latents.new_full((1,), fill_value=2.0)`
    if config.use_rotary_positional_embeddings:
        patch_size, patch_size_t = config.patch_size, config.get("patch_size_t")
        grid = (geometry.grid_height, geometry.grid_width)
        base_width, base_height = config.sample_width // patch_size, config.sample_height // patch_size
        if patch_size_t is None:
            inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim,
                crops_coords=resize_crop_region_for_grid(grid, base_width, base_height),
                grid_size=grid,
                temporal_size=geometry.latent_frames,
                device=meta,
            )
        else:
            inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim,
                crops_coords=None,
                grid_size=grid,
                temporal_size=(geometry.latent_frames + patch_size_t - 1) // patch_size_t,
                grid_type="slice",
                max_size=(base_height, base_width),
                device=meta,
            )
    return inputs


def _model_dtype(model: nn.Module) -> torch.dtype:
    import torch

    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _on_meta(model: nn.Module) -> bool:
    return all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def meta_twin(model: nn.Module) -> nn.Module:
    """A meta-device copy of a model built from its config, for models whose weights are real: their shapes, with
    no compute. A patched model traces as patched: cogsurgeon patches are applied again by name (they keep state
    on the transformer, not only in processors); otherwise the model's attention processors are shared."""
    from cogsurgeon import patches

    from cogsurgeon.inspector.loading import build_on_meta

    twin = build_on_meta(dict(model.config), _model_dtype(model))
    applied = patches.applied_options(model)
    if applied:
        for name, options in applied.items():
            patches.apply(twin, name, **options)
        return twin
    processors = getattr(model, "attn_processors", None)
    if processors:
        twin.set_attn_processor(dict(processors))
    return twin


@contextmanager
def _recording_hooks(model: nn.Module, modules: dict[str, ModuleShapes], stack: list[str]) -> Iterator[None]:
    """Hooks that record each module's shapes and keep `stack` as the chain of modules now running; removed on
    exit, whatever happened (only the handles added here are removed)."""
    handles = []

    def make_hooks(name: str):
        def before(module, args, kwargs):
            stack.append(name)

        def after(module, args, kwargs, output):
            if stack and stack[-1] == name:
                stack.pop()
            previous = modules.get(name)
            if previous is None:
                modules[name] = ModuleShapes(named_inputs(module, args, kwargs), shape_of(output))
            else:
                modules[name] = ModuleShapes(previous.inputs, previous.outputs, previous.calls + 1)

        return before, after

    try:
        for name, module in model.named_modules():
            before, after = make_hooks(name)
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attention_recorder(calls: list[AttentionCall], stack: list[str]):
    """A TorchFunctionMode that records each `scaled_dot_product_attention` call (however the processor reaches
    it) without replacing anything in torch or diffusers."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class AttentionRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            output = func(*args, **kwargs)
            if func is F.scaled_dot_product_attention:
                query, key, value = (kwargs.get(n, args[i] if len(args) > i else None)
                                     for i, n in enumerate(("query", "key", "value")))
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                calls.append(AttentionCall(
                    module=stack[-1] if stack else "",
                    query=tuple(query.shape),
                    key=tuple(key.shape),
                    value=tuple(value.shape),
                    output=tuple(output.shape),
                    attn_mask=None if mask is None else tuple(mask.shape),
                    is_causal=bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False)),
                ))
            return output

    return AttentionRecorder()


def trace_shapes(model: nn.Module, *, frames: int, height: int, width: int, batch: int = 2) -> TraceResult:
    """Run `model` once on the meta device at this video size and report the shapes it saw.

    `batch` is the transformer's batch: 2 is one video with classifier-free guidance. A model with real weights is
    traced through a meta twin built from its config (same processors), so nothing is computed or changed.
    """
    import torch

    if not isinstance(batch, int) or batch < 1:
        raise TraceSizeError(f"batch must be a positive whole number, got {batch!r}")
    config = model.config
    geometry = latent_geometry(config, frames, height, width)
    text_tokens = int(config.max_text_seq_length)
    traced = model if _on_meta(model) else meta_twin(model)
    inputs = trace_inputs(traced, geometry, batch)
    modules: dict[str, ModuleShapes] = {}
    attention: list[AttentionCall] = []
    stack: list[str] = []
    with torch.no_grad(), _recording_hooks(traced, modules, stack), _attention_recorder(attention, stack):
        output = traced(**inputs, return_dict=False)[0]
    dtype = _model_dtype(traced)
    dtype_name = str(dtype).removeprefix("torch.")
    sequence = sequence_split(geometry, text_tokens)
    heads = int(config.num_attention_heads)
    return TraceResult(
        model_class=type(model).__name__,
        frames=frames,
        height=height,
        width=width,
        batch=batch,
        dtype=dtype_name,
        geometry=geometry,
        sequence=sequence,
        attention=tuple(attention),
        modules=modules,
        mask_memory=mask_memory_table(sequence, batch, heads, int(config.attention_head_dim), dtype_name,
                                      patch_memory_model()),
        output=tuple(output.shape),
        inputs={name: shape_of(value) for name, value in inputs.items()},
        notes=size_notes(config, geometry),
    )
