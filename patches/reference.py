"""Plain explicit-mask attention: each patch's rule (see `patches.builtin`) written out as `(L, L)` masks and a softmax,
for `verify` and the tests. Deliberately naive (it builds every mask); never use it on a real model size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cogsurgeon.inspector.geometry import FrameLayout
from cogsurgeon.patches.processor import (
    attention_modules,
    is_fused_processor,
    joint_query_key_value,
    project_attention_output,
)


def frame_of_token(layout: FrameLayout) -> torch.Tensor:
    """The frame of every token of the joint sequence `(L,)`: -1 for text, then 0, 1, ... frame by frame."""
    text = torch.full((layout.text_tokens,), -1, dtype=torch.long)
    video = torch.arange(layout.frames, dtype=torch.long).repeat_interleave(layout.tokens_per_frame)
    return torch.cat([text, video])


def causal_mask(layout: FrameLayout) -> torch.Tensor:
    """`causal-attention`: query q may attend key k iff `k <= q`. `(L, L)` bool."""
    positions = torch.arange(layout.sequence_length)
    return positions[None, :] <= positions[:, None]


def frame_causal_mask(layout: FrameLayout) -> torch.Tensor:
    """`frame-causal-attention`: query q may attend key k iff `frame(k) <= frame(q)`, text being frame -1."""
    frames = frame_of_token(layout)
    return frames[None, :] <= frames[:, None]


def chunk_of_token(layout: FrameLayout, chunk: int) -> torch.Tensor:
    """`chunk(f) = f // chunk` for every video token; -1 for text (text has no chunk)."""
    frames = frame_of_token(layout)
    return torch.where(frames >= 0, frames // chunk, -1)


def block_causal_mask(layout: FrameLayout, chunk: int = 1, window: int | None = None, sink: int = 0) -> torch.Tensor:
    """`block-causal-attention(chunk, window, sink)`: a video query in chunk i may attend all text keys and the video
    keys of chunks j with `j <= i` and (`window` is None or `j > i - window` or `j < sink`); text attends text only."""
    chunks = chunk_of_token(layout, chunk)
    i, j = chunks[:, None], chunks[None, :]
    text_query, text_key = i < 0, j < 0
    in_reach = (j <= i) if window is None else (j <= i) & ((j > i - window) | (j < sink))
    return torch.where(text_query, text_key, text_key | in_reach)


def window_attention_mask(
    layout: FrameLayout, window: int = 1, chunk: int = 1, text_sees_video: bool = False
) -> torch.Tensor:
    """`window-attention(window, chunk, text_sees_video)`: a video query in chunk i may attend all text keys and the
    chunks j with `|i - j| < window`; text attends text only, or every key with `text_sees_video`."""
    chunks = chunk_of_token(layout, chunk)
    i, j = chunks[:, None], chunks[None, :]
    text_query, text_key = i < 0, j < 0
    text_row = torch.ones_like(text_key) if text_sees_video else text_key.expand(i.shape[0], -1)
    return torch.where(text_query, text_row, text_key | ((i - j).abs() < window))


RULE_MASKS = {
    "causal-attention": causal_mask,
    "frame-causal-attention": frame_causal_mask,
    "block-causal-attention": block_causal_mask,
    "window-attention": window_attention_mask,
}


def rule_mask(name: str, layout: FrameLayout, **parameters: Any) -> torch.Tensor:
    """The `(L, L)` bool mask of the attention rule of patch `name` with these parameters."""
    return RULE_MASKS[name](layout, **parameters)


def full_attention_mask(user_mask: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """An accepted `attention-mask` form written out as `(B|1, 1|heads, L, L)` (bool: True = attend; float:
    additive): `(B, T)` covers text keys (video keys kept), `(B, T+N)` all keys, 4-D masks are already full."""
    length = layout.sequence_length
    if user_mask.dim() == 4:
        return user_mask
    if user_mask.shape[-1] == layout.text_tokens and layout.text_tokens != length:
        fill = torch.ones if user_mask.dtype == torch.bool else torch.zeros
        video = fill(user_mask.shape[0], layout.video_tokens, dtype=user_mask.dtype, device=user_mask.device)
        user_mask = torch.cat([user_mask, video], dim=1)
    return user_mask[:, None, None, :].expand(-1, 1, length, length)


def combine_masks(rule: torch.Tensor | None, user: torch.Tensor | None) -> torch.Tensor | None:
    """A rule mask `(L, L)` bool AND a user mask (bool: both must allow; float: the rule adds -inf)."""
    if rule is None or user is None:
        return rule if user is None else user
    if user.dtype == torch.bool:
        return user & rule.to(user.device)
    rule = rule.to(user.device)
    return user + torch.zeros(rule.shape, dtype=user.dtype, device=user.device).masked_fill(~rule, float("-inf"))


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v with the mask applied explicitly; a query that may attend no key gets 0."""
    scores = (query @ key.transpose(-2, -1)) * query.shape[-1] ** -0.5
    if mask is not None:
        mask = mask.to(scores.device)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return weights @ value


class ExplicitMaskAttnProcessor:
    """CogVideoX attention with a fixed explicit mask, standing in for diffusers' processor in reference runs."""

    def __init__(self, mask: torch.Tensor | None, fused: bool):
        self.mask, self.fused = mask, fused

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,  # the explicit mask is already in self.mask
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = joint_query_key_value(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.fused
        )
        output = reference_attention(query, key, value, self.mask)
        return project_attention_output(attn, output, encoder_hidden_states.size(1))


@contextmanager
def reference_processors(transformer: nn.Module, mask: torch.Tensor | None) -> Iterator[nn.Module]:
    """Run `transformer` with explicit-mask attention inside the block, then put its processors back."""
    originals = {module: module.processor for _, module in attention_modules(transformer)}
    try:
        for module, original in originals.items():
            module.set_processor(ExplicitMaskAttnProcessor(mask, is_fused_processor(original)))
        yield transformer
    finally:
        for module, original in originals.items():
            module.set_processor(original)


# -- per-frame timesteps, from the definition ----------------------------------------------------------------------


def reference_text_timesteps(frame_timesteps: torch.Tensor, text_timestep: str | float) -> torch.Tensor:
    """The text tokens' timestep per sample: `max`, `min`, `first`, `last` of its frame timesteps, or a number."""
    choices = {
        "max": lambda t: t.max(dim=1).values,
        "min": lambda t: t.min(dim=1).values,
        "first": lambda t: t[:, 0],
        "last": lambda t: t[:, -1],
    }
    if isinstance(text_timestep, str):
        return choices[text_timestep](frame_timesteps).double()
    return torch.full(frame_timesteps.shape[:1], float(text_timestep), dtype=torch.float64)


def timestep_embedding(transformer: nn.Module, timestep: float, ofs: float | None = None) -> torch.Tensor:
    """The conditioning vector `(D,)` of one timestep (plus `ofs` where the model has an ofs embedding), computed with
    the model's own layers one value at a time: sinusoid, then linear, activation, linear."""

    def embed(projection: nn.Module, embedding: nn.Module, value: float) -> torch.Tensor:
        sinusoid = projection(torch.tensor([value], dtype=torch.float64)).to(embedding.linear_1.weight.dtype)
        hidden = embedding.linear_1(sinusoid)
        if embedding.act is not None:
            hidden = embedding.act(hidden)
        return embedding.linear_2(hidden)[0]

    vector = embed(transformer.time_proj, transformer.time_embedding, timestep)
    if getattr(transformer, "ofs_embedding", None) is not None:
        vector = vector + embed(transformer.ofs_proj, transformer.ofs_embedding, ofs)
    return vector


def layer_norm_zero_reference(
    norm: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    frame_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`CogVideoXLayerNormZero` token by token: video token of frame f in sample b modulated by
    `frame_embeddings[b, f]` `(B, F, D)`, text of sample b by `text_embeddings[b]` `(B, D)`; gates per token."""
    batch, tokens, _ = hidden_states.shape
    frames = frame_embeddings.shape[1]
    per_frame = tokens // frames
    video, gates = torch.empty_like(hidden_states), torch.empty_like(hidden_states)
    text = torch.empty_like(encoder_hidden_states)
    text_gates = torch.empty(batch, 1, hidden_states.shape[-1], dtype=hidden_states.dtype)
    for b in range(batch):
        for f in range(frames):
            shift, scale, gate, _, _, _ = norm.linear(norm.silu(frame_embeddings[b, f])).chunk(6)
            for token in range(f * per_frame, (f + 1) * per_frame):
                video[b, token] = norm.norm(hidden_states[b, token]) * (1 + scale) + shift
                gates[b, token] = gate
        _, _, _, enc_shift, enc_scale, enc_gate = norm.linear(norm.silu(text_embeddings[b])).chunk(6)
        text[b] = norm.norm(encoder_hidden_states[b]) * (1 + enc_scale) + enc_shift
        text_gates[b, 0] = enc_gate
    return video, text, gates, text_gates


def ada_layer_norm_reference(norm: nn.Module, hidden_states: torch.Tensor,
                             frame_embeddings: torch.Tensor) -> torch.Tensor:
    """The final `AdaLayerNorm(chunk_dim=1)` token by token, frame f's tokens by `frame_embeddings[:, f]`."""
    batch, tokens, _ = hidden_states.shape
    frames = frame_embeddings.shape[1]
    per_frame = tokens // frames
    output = torch.empty_like(hidden_states)
    for b in range(batch):
        for f in range(frames):
            shift, scale = norm.linear(norm.silu(frame_embeddings[b, f])).chunk(2)
            rows = slice(f * per_frame, (f + 1) * per_frame)
            output[b, rows] = norm.norm(hidden_states[b, rows]) * (1 + scale) + shift
    return output


def per_frame_modulation_error(
    transformer: nn.Module, inputs: dict[str, Any], text_timestep: str | float = "max"
) -> float:
    """Run `transformer` (with per-frame-timesteps applied) on `inputs` (a `(B, F)` timestep), capturing what every
    `CogVideoXLayerNormZero` and the final `AdaLayerNorm` got and returned; the largest difference from the token by
    token reference above, with embeddings computed one timestep at a time."""
    captured: list[tuple[nn.Module, tuple, dict, Any]] = []
    norms = [norm for block in transformer.transformer_blocks for norm in (block.norm1, block.norm2)]
    norms.append(transformer.norm_out)
    handles = [
        norm.register_forward_hook(
            lambda module, args, kwargs, output: captured.append((module, args, kwargs, output)), with_kwargs=True
        )
        for norm in norms
    ]
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    patch_frames = transformer.config.patch_size_t or 1
    frame_timesteps = inputs["timestep"][:, ::patch_frames].double()
    ofs = inputs.get("ofs")
    batch = frame_timesteps.shape[0]

    def ofs_of(b: int) -> float | None:
        return None if ofs is None else float(ofs.reshape(-1)[b if ofs.numel() > 1 else 0])

    with torch.no_grad():
        frame_embeddings = torch.stack(
            [
                torch.stack([timestep_embedding(transformer, float(t), ofs_of(b)) for t in frame_timesteps[b]])
                for b in range(batch)
            ]
        )
        text = reference_text_timesteps(frame_timesteps, text_timestep)
        text_embeddings = torch.stack([timestep_embedding(transformer, float(text[b]), ofs_of(b))
                                       for b in range(batch)])
        error = 0.0
        for module, args, kwargs, output in captured:
            if module is transformer.norm_out:
                expected = (ada_layer_norm_reference(module, args[0], frame_embeddings),)
                output = (output,)
            else:
                expected = layer_norm_zero_reference(module, args[0], args[1], frame_embeddings, text_embeddings)
            for got, want in zip(output, expected):
                error = max(error, float((got - want.expand_as(got)).abs().max()))
    if len(captured) != len(norms):
        raise AssertionError(f"captured {len(captured)} of {len(norms)} modulations")
    return error


__all__ = [
    "RULE_MASKS", "block_causal_mask", "causal_mask", "chunk_of_token", "combine_masks", "frame_causal_mask",
    "frame_of_token", "full_attention_mask", "per_frame_modulation_error", "reference_attention",
    "reference_processors", "rule_mask", "window_attention_mask",
]
