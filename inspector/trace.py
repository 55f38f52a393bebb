"""Shape trace: one forward of a CogVideoX transformer on the meta device at a real video size, with inputs derived
the way diffusers' CogVideoX pipelines derive them, recording every module's input and output shapes, every
attention call's query/key/value shapes, how the joint sequence splits into text and video tokens, and what an
explicit attention mask would cost at that size.

The size arithmetic and the inputs come from `inspector.geometry` (the pipelines' arithmetic, written once); the
memory table is a small pure function (`mask_memory_table`); the torch edge (`trace_shapes`) runs and reads shapes.
Nothing is computed for real and the model is left as it was: hooks are removed, a model that is not on meta is traced
through a meta twin.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Union

from cogsurgeon.inspector.geometry import (
    FrameLayout,
    LatentGeometry,
    latent_frame_count,
    latent_geometry,
    pipeline_inputs,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

# A traced shape: a tensor's shape, None for a non-tensor, or a nest of those (tuples of tensors, dicts).
Shape = Union[tuple[int, ...], None, tuple["Shape", ...], dict[str, "Shape"]]


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
        return shape_to_json(asdict(self))


@dataclass(frozen=True)
class ModuleShapes:
    """A module's inputs (by parameter name; only those holding tensors) and outputs, from its first call."""

    inputs: dict[str, Shape]
    outputs: Shape
    calls: int = 1

    def to_json(self, name: str) -> dict[str, Any]:
        return {"name": name, **shape_to_json(asdict(self))}


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
        return shape_to_json(asdict(self))


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
    sequence: FrameLayout
    attention: tuple[AttentionCall, ...]
    modules: dict[str, ModuleShapes]
    mask_memory: tuple[MaskMemory, ...]
    output: tuple[int, ...]
    kv_cache: tuple[dict[str, Any], ...] = ()
    inputs: dict[str, Shape] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        geometry = self.geometry
        return {
            "model": self.model_class,
            "video": {"frames": self.frames, "height": self.height, "width": self.width, "batch": self.batch},
            "dtype": self.dtype,
            "latent": {"frames": geometry.latent_frames, "padding_frames": geometry.padding_frames,
                       "height": geometry.latent_height, "width": geometry.latent_width,
                       "grid_height": geometry.grid_height, "grid_width": geometry.grid_width},
            "inputs": shape_to_json(self.inputs),
            "output": list(self.output),
            "sequence": self.sequence.to_json(),
            "attention": [call.to_json() for call in self.attention],
            "modules": [shapes.to_json(name) for name, shapes in self.modules.items()],
            "mask_memory": [entry.to_json() for entry in self.mask_memory],
            "kv_cache": list(self.kv_cache),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------------
# Notes and mask memory (pure)


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
        if geometry.latent_frames != latent_frame_count(sample_frames, ratio):
            notes.append(
                f"learned positional embeddings cover {sample_frames} frames; at {geometry.frames} diffusers "
                "swaps them for sin-cos positions the model was not trained with"
            )
    return tuple(notes)


DTYPE_BYTES = {"bool": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dense_mask_bytes(shape: tuple[int, ...], dtype: str = "bool") -> int:
    """Bytes of a dense mask tensor of `shape` in `dtype` (bool: one byte per element, as torch stores it)."""
    return math.prod(shape) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class PatchMemoryModel:
    """Where per-patch memory figures come from (`patch_memory_model()`: the patches package); without the
    callables, the explicit mask is computed here and patches get no estimate."""

    names: tuple[str, ...]
    explicit_mask_bytes: Callable[..., int] | None = None  # patches.explicit_mask_bytes(batch, heads, T, N, bytes)
    patch_bytes: Callable[..., int | None] | None = None  # patches.memory_estimate(name, batch, heads, T, N, F, ...)


def mask_memory_table(
    sequence: FrameLayout, batch: int, heads: int, head_dim: int, dtype: str, source: PatchMemoryModel
) -> tuple[MaskMemory, ...]:
    """One row per patch: the explicit mask against the patch's own extra memory, per attention call."""
    length = sequence.sequence_length
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
    """A shape (or a dict of them, e.g. a dataclass as `asdict` gives it) with every tuple as a JSON list."""
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
    values = {(names[index] if index < len(names) else f"arg{index}"): value for index, value in enumerate(args)}
    shapes = {name: shape_of(value) for name, value in {**values, **kwargs}.items()}
    return {name: shape for name, shape in shapes.items() if shape is not None}


# ---------------------------------------------------------------------------------------------------------------
# The meta forward


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
def module_stack(roots: Sequence[nn.Module], stack: list[str],
                 after: Callable[[str, nn.Module, tuple, dict, Any], None] | None = None) -> Iterator[None]:
    """Forward hooks on every module of `roots` keeping `stack` as the chain of modules now running, and calling
    `after(name, module, args, kwargs, output)` as each call returns; removed on exit, whatever happened (only the
    handles added here are removed)."""
    handles = []

    def make_hooks(name: str):
        def before(module, args, kwargs):
            stack.append(name)

        def on_return(module, args, kwargs, output):
            if stack and stack[-1] == name:
                stack.pop()
            if after is not None:
                after(name, module, args, kwargs, output)

        return before, on_return

    try:
        for root in roots:
            for name, module in root.named_modules():
                before, on_return = make_hooks(name)
                handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(module.register_forward_hook(on_return, with_kwargs=True))
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


def trace_shapes(model: nn.Module, *, frames: int, height: int, width: int, batch: int = 2,
                 ulysses: int = 1) -> TraceResult:
    """Run `model` once on the meta device at this video size and report the shapes it saw.

    `batch` is the transformer's batch: 2 is one video with classifier-free guidance. A model with real weights is
    traced through a meta twin built from its config (same processors), so nothing is computed or changed. With
    `ulysses` N > 1 the shapes are one rank's under Ulysses context parallelism (`cogsurgeon.parallel`): the modules
    see its shard of the tokens, attention the whole sequence for H/N heads.
    """
    import torch

    from cogsurgeon.parallel.rank_view import one_rank_of

    config = model.config
    geometry = latent_geometry(config, frames, height, width, batch)
    traced = model if _on_meta(model) else meta_twin(model)
    dtype = _model_dtype(traced)
    inputs = pipeline_inputs(config, (frames, height, width), batch, dtype=dtype, device=torch.device("meta"))
    modules: dict[str, ModuleShapes] = {}
    attention: list[AttentionCall] = []
    stack: list[str] = []

    def record(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        previous = modules.get(name)
        modules[name] = (ModuleShapes(named_inputs(module, args, kwargs), shape_of(output)) if previous is None
                         else replace(previous, calls=previous.calls + 1))

    with torch.no_grad(), one_rank_of(traced, ulysses), module_stack((traced,), stack, record), \
            _attention_recorder(attention, stack):
        output = traced(**inputs, return_dict=False)[0]
    dtype_name = str(dtype).removeprefix("torch.")
    sequence = geometry.layout(int(config.max_text_seq_length))
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
        kv_cache=kv_cache_table(config, sequence.frames, height, width, batch, dtype.itemsize),
    )


STREAMING_CASES = ((1, None, 0), (3, None, 0), (1, 4, 1))  # (chunk, window, sink) shown by trace


def kv_cache_table(config: Mapping[str, Any], frames: int, height: int, width: int, batch: int,
                   dtype_bytes: int) -> tuple[dict[str, Any], ...]:
    """What a `patches.streaming` KV cache holds for this video (`frames` frames after temporal patching), for a few
    chunk / window / sink settings."""
    from cogsurgeon.patches.stream import kv_cache_bytes

    return tuple(
        {"chunk": chunk, "window": window, "sink": sink,
         "bytes": kv_cache_bytes(config, frames=frames, height=height, width=width, batch=batch, chunk=chunk,
                                 window=window, sink=sink, dtype_bytes=dtype_bytes)}
        for chunk, window, sink in STREAMING_CASES
    )


__all__ = [
    "AttentionCall", "PatchMemoryModel", "dense_mask_bytes", "format_bytes", "format_shape", "mask_memory_table",
    "meta_twin", "module_stack", "patch_memory_model", "shape_of", "shape_to_json", "size_notes", "trace_shapes",
]
