"""`per-frame-timesteps`: a noise level per latent frame (diffusion forcing), which CogVideoX cannot express because
one timestep embedding modulates every token.

With the patch on, the transformer's `timestep` may be `(B, F)`, F the latent frames of `hidden_states` (for
CogVideoX1.5 the `patch_size_t` frames of one temporal patch must share a timestep). Each video token is then
modulated by its own frame's timestep embedding in every block's `CogVideoXLayerNormZero` and in the final
`AdaLayerNorm`; text tokens by the embedding of `text_timestep` (`max`, `min`, `first` or `last` of the sample's frame
timesteps, or a fixed number: the same at every step, so text never changes, what a KV cache needs). `ofs`
(CogVideoX1.5-I2V) is added to every embedding as unpatched. A `(B,)` timestep runs exactly as unpatched.

How, without editing diffusers: a forward pre-hook on the transformer turns a `(B, F)` timestep into one 1-D
timestep of `columns x B` values, column-major (`[text ; frame 0 ; frame 1 ...]`, one column per temporal patch), so
the transformer's own code embeds it. The time and ofs embeddings, the blocks' `CogVideoXLayerNormZero` and the
final `AdaLayerNorm` get a replaced `forward` (an instance attribute, deleted again on revert) that runs the module's
own layers one column (B rows) at a time, exactly as unpatched runs its one column, and modulates each frame's tokens
with their column: so equal frames give bit-identical outputs, and a frame's output never depends on another frame's
timestep except through attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from cogsurgeon.patches.errors import PatchError, PatchTargetError
from cogsurgeon.patches.ulysses import PARALLEL_ATTRIBUTE


class PerFrameTimestepError(PatchError):
    """A `(B, F)` timestep that does not fit the call: wrong frame count, or frames of one temporal patch (CogVideoX1.5)
    with different timesteps."""


def patch_timesteps(timestep: torch.Tensor, latent_frames: int, patch_frames: int) -> torch.Tensor:
    """`(B, F)` per latent frame → `(B, F // patch_frames)` per temporal patch, checking the shape and that the frames
    of one patch share a timestep."""
    if timestep.dim() != 2 or timestep.shape[1] != latent_frames:
        raise PerFrameTimestepError(
            f"timestep of shape {tuple(timestep.shape)} does not fit latents of {latent_frames} frames: pass (B,) or "
            f"(B, {latent_frames}), one timestep per latent frame"
        )
    if latent_frames % patch_frames:
        raise PerFrameTimestepError(
            f"{latent_frames} latent frames do not split into temporal patches of {patch_frames} frames"
        )
    grouped = timestep.reshape(timestep.shape[0], latent_frames // patch_frames, patch_frames)
    if patch_frames > 1 and not bool((grouped == grouped[..., :1]).all()):
        raise PerFrameTimestepError(
            f"CogVideoX1.5 embeds {patch_frames} latent frames as one temporal patch, so they need one timestep: "
            f"frames {patch_frames}k .. {patch_frames}k+{patch_frames - 1} must share a timestep (got "
            f"{timestep.tolist()})"
        )
    return grouped[..., 0]


def text_timesteps(frame_timesteps: torch.Tensor, text_timestep: str | float) -> torch.Tensor:
    """The text tokens' timestep of each sample `(B,)` from its frames' `(B, F)`."""
    if text_timestep == "max":
        return frame_timesteps.max(dim=1).values
    if text_timestep == "min":
        return frame_timesteps.min(dim=1).values
    if text_timestep == "first":
        return frame_timesteps[:, 0]
    if text_timestep == "last":
        return frame_timesteps[:, -1]
    keeps_dtype = frame_timesteps.is_floating_point() or float(text_timestep).is_integer()
    dtype = frame_timesteps.dtype if keeps_dtype else torch.float32
    return torch.full(frame_timesteps.shape[:1], text_timestep, dtype=dtype, device=frame_timesteps.device)


def column_timesteps(frame_timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`[text ; frame 0 ; frame 1 ...]`, column-major, as one 1-D timestep of `(1 + F) x B` values. (Integer
    timesteps meet a fractional text timestep as float32: what the sinusoidal projection turns them into anyway.)"""
    dtype = torch.promote_types(frame_timesteps.dtype, text.dtype)
    return torch.cat([text[:, None].to(dtype), frame_timesteps.to(dtype)], dim=1).T.reshape(-1)


def per_column(function, packed: torch.Tensor, columns: int) -> list[torch.Tensor]:
    """`function` applied to each column (B consecutive rows) of a column-major packed tensor."""
    return [function(column) for column in packed.view(columns, -1, *packed.shape[1:]).unbind(0)]


def modulate_frames(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`normed * (1 + scale) + shift` with `(B, F, D)` scale and shift, frame f's for frame f's tokens of
    `normed` `(B, F·n, D)`; element for element what the unpatched `(B, 1, D)` broadcast computes."""
    batch, tokens, dim = normed.shape
    frames = scale.shape[1]
    framed = normed.view(batch, frames, tokens // frames, dim)
    return (framed * (1 + scale)[:, :, None, :] + shift[:, :, None, :]).view(batch, tokens, dim)


def per_token(values: torch.Tensor, tokens: int) -> torch.Tensor:
    """`(B, F, D)` per frame → `(B, tokens, D)` per token (a gate)."""
    batch, frames, dim = values.shape
    return values[:, :, None, :].expand(batch, frames, tokens // frames, dim).reshape(batch, tokens, dim)


def frame_runs(first_token: int, tokens: int, frame_tokens: int) -> list[tuple[int, int, int]]:
    """`(frame, start, end)` for the runs of `tokens` consecutive video tokens from `first_token` on (a context-parallel
    shard) that fall in one frame of `frame_tokens` tokens; start and end count from the shard's first token."""
    runs, position, end = [], first_token, first_token + tokens
    while position < end:
        frame = position // frame_tokens
        run_end = min(end, (frame + 1) * frame_tokens)
        runs.append((frame, position - first_token, run_end - first_token))
        position = run_end
    return runs


def modulate_shard(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """`modulate_frames` for a shard of the video tokens: each run by its frame's scale and shift (the same
    element-wise arithmetic)."""
    return torch.cat([normed[:, start:end] * (1 + scale[:, frame, None, :]) + shift[:, frame, None, :]
                      for frame, start, end in runs], dim=1)


def per_token_shard(values: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """`per_token` for a shard of the video tokens."""
    return torch.cat([values[:, frame, None, :].expand(-1, end - start, -1) for frame, start, end in runs], dim=1)


def _columns_of(temb: torch.Tensor, batch: int) -> int | None:
    """How many columns a packed embedding holds (None: an ordinary `(B, D)` embedding)."""
    if temb.dim() != 2 or temb.shape[0] == batch or temb.shape[0] % batch:
        return None
    return temb.shape[0] // batch


class ReplacedForward:
    """A module's `forward` while the patch is on: an object (not a closure), so a deep copy of the model gets one that
    calls the copy's own layers."""

    def __init__(self, module: nn.Module, original: Any, state: PerFrameTimestepState):
        self.module, self.original, self.state = module, original, state


class LayerNormZeroForward(ReplacedForward):
    """`CogVideoXLayerNormZero.forward` for packed embeddings: text by column 0, frame f's tokens by column 1 + f."""

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor):
        columns = _columns_of(temb, hidden_states.shape[0])
        if columns is None:
            return self.original(hidden_states, encoder_hidden_states, temb)
        module = self.module
        chunks = per_column(lambda column: module.linear(module.silu(column)).chunk(6, dim=1), temb, columns)
        _, _, _, enc_shift, enc_scale, enc_gate = chunks[0]
        shift, scale, gate = (torch.stack([chunk[i] for chunk in chunks[1:]], dim=1) for i in range(3))
        encoder_hidden_states = (
            module.norm(encoder_hidden_states) * (1 + enc_scale)[:, None, :] + enc_shift[:, None, :]
        )
        runs = self.state.shard_runs(hidden_states.shape[1], frames=scale.shape[1])
        if runs is not None:  # this rank's shard of the video tokens under context parallelism
            hidden_states = modulate_shard(module.norm(hidden_states), scale, shift, runs)
            return hidden_states, encoder_hidden_states, per_token_shard(gate, runs), enc_gate[:, None, :]
        hidden_states = modulate_frames(module.norm(hidden_states), scale, shift)
        return hidden_states, encoder_hidden_states, per_token(gate, hidden_states.shape[1]), enc_gate[:, None, :]


class AdaLayerNormForward(ReplacedForward):
    """The final `AdaLayerNorm(chunk_dim=1).forward` for packed embeddings: frame f's tokens by column 1 + f."""

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor | None = None, temb: torch.Tensor | None = None):
        module = self.module
        columns = None if temb is None or module.emb is not None else _columns_of(temb, x.shape[0])
        if columns is None:
            return self.original(x, timestep=timestep, temb=temb)
        chunks = per_column(lambda column: module.linear(module.silu(column)).chunk(2, dim=1), temb, columns)
        shift, scale = (torch.stack([chunk[i] for chunk in chunks[1:]], dim=1) for i in range(2))
        return modulate_frames(module.norm(x), scale, shift)


class EmbeddingForward(ReplacedForward):
    """`TimestepEmbedding.forward` that embeds a packed timestep one column at a time (each exactly as unpatched)."""

    def __call__(self, sample: torch.Tensor, condition: torch.Tensor | None = None):
        columns = self.state.columns
        if columns is None or condition is not None or sample.shape[0] != columns * self.state.batch:
            return self.original(sample, condition)
        return torch.cat(per_column(self.original, sample, columns), dim=0)


class PerFrameTimestepState:
    """The replaced forwards and the pre-hook of one transformer, and what this forward's timestep was packed as."""

    def __init__(self, transformer: nn.Module, text_timestep: str | float):
        self.text_timestep = text_timestep
        self.config = transformer.config
        self.forward_parameters = list(inspect.signature(transformer.forward).parameters)
        self.replaced: list[tuple[nn.Module, Any]] = []  # (module, its own instance `forward` before us, or None)
        self.hook_handle: Any = None
        self.columns: int | None = None
        self.batch: int | None = None
        self.parallel: Any = None  # the transformer's `SequenceParallel` during a context-parallel forward

    @classmethod
    def install(cls, transformer: nn.Module, text_timestep: str | float) -> PerFrameTimestepState:
        """Replace the forwards and hook the transformer; checks everything before changing anything."""
        targets = cls._targets(transformer)
        state = cls(transformer, text_timestep)
        for module, replacement in targets:
            state.replaced.append((module, module.__dict__.get("forward")))
            module.forward = replacement(module, module.forward, state)
        state.hook_handle = transformer.register_forward_pre_hook(state._pack_timestep, with_kwargs=True)
        return state

    @staticmethod
    def _targets(transformer: nn.Module) -> list[tuple[nn.Module, Any]]:
        """Every module whose forward is replaced, checked before anything changes."""
        blocks = getattr(transformer, "transformer_blocks", None)
        norm_out = getattr(transformer, "norm_out", None)
        if blocks is None or norm_out is None or not hasattr(transformer, "time_embedding"):
            raise PatchTargetError(
                f"{type(transformer).__name__} has no transformer_blocks / time_embedding / norm_out: not the "
                "CogVideoX transformer per-frame-timesteps knows"
            )
        targets: list[tuple[nn.Module, Any]] = []
        for index, block in enumerate(blocks):
            for norm_name in ("norm1", "norm2"):
                norm = getattr(block, norm_name, None)
                if type(norm).__name__ != "CogVideoXLayerNormZero":
                    raise PatchTargetError(
                        f"transformer_blocks.{index}.{norm_name} is {type(norm).__name__}, not CogVideoXLayerNormZero"
                    )
                targets.append((norm, LayerNormZeroForward))
        if type(norm_out).__name__ != "AdaLayerNorm" or getattr(norm_out, "chunk_dim", None) != 1:
            raise PatchTargetError(f"norm_out is {type(norm_out).__name__}, not CogVideoX's AdaLayerNorm(chunk_dim=1)")
        targets.append((norm_out, AdaLayerNormForward))
        embeddings = (getattr(transformer, name, None) for name in ("time_embedding", "ofs_embedding"))
        return targets + [(embedding, EmbeddingForward) for embedding in embeddings if embedding is not None]

    def uninstall(self) -> None:
        """Put back exactly the forwards we replaced and remove the hook."""
        for module, own in reversed(self.replaced):
            module.__dict__.pop("forward", None)
            if own is not None:
                module.forward = own
        self.replaced.clear()
        if self.hook_handle is not None:
            self.hook_handle.remove()
            self.hook_handle = None

    def shard_runs(self, tokens: int, frames: int) -> list[tuple[int, int, int]] | None:
        """Under context parallelism, the frame runs of this rank's `tokens` video tokens (of the forward's `frames`
        frames; padding as the last frame's); None when the block sees the whole video."""
        parallel = self.parallel
        if parallel is None or parallel.video_tokens is None or tokens == parallel.video_tokens:
            return None
        start, end = parallel.video_shard()
        real = max(0, min(end, parallel.video_tokens) - start)
        runs = frame_runs(start, real, parallel.video_tokens // frames)
        if real < tokens:  # padding (dropped by attention and after the blocks): modulated as the last frame
            runs.append((frames - 1, real, tokens))
        return runs

    def _pack_timestep(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook: a `(B, F)` timestep becomes `[text ; frames]` columns; `(B,)` passes unchanged."""
        self.columns = self.batch = None
        self.parallel = getattr(transformer, PARALLEL_ATTRIBUTE, None)
        arguments = {**dict(zip(self.forward_parameters, args)), **kwargs}
        timestep, latents = arguments.get("timestep"), arguments.get("hidden_states")
        if not isinstance(timestep, torch.Tensor) or timestep.dim() < 2 or not isinstance(latents, torch.Tensor):
            return None
        if arguments.get("timestep_cond") is not None:
            raise PerFrameTimestepError("per-frame timesteps do not combine with timestep_cond: pass (B,) timesteps")
        batch = latents.shape[0]
        if timestep.shape[0] != batch:
            raise PerFrameTimestepError(
                f"timestep of shape {tuple(timestep.shape)} does not fit a batch of {batch}: pass (B,) or (B, F)"
            )
        frames = patch_timesteps(timestep, latents.shape[1], self.config.patch_size_t or 1)
        packed = column_timesteps(frames, text_timesteps(frames, self.text_timestep))
        columns = frames.shape[1] + 1
        replacements = {"timestep": packed}
        ofs = arguments.get("ofs")
        if isinstance(ofs, torch.Tensor) and ofs.dim() == 1 and ofs.shape[0] == batch and batch > 1:
            replacements["ofs"] = ofs.repeat(columns)  # column-major, like the timesteps
        self.columns, self.batch = columns, batch
        args = list(args)
        for name, value in replacements.items():
            position = self.forward_parameters.index(name)
            if position < len(args):
                args[position] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs


__all__ = [
    "PerFrameTimestepError", "PerFrameTimestepState",
]
