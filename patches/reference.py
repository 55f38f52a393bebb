"""Plain explicit-mask attention: DESIGN's patch definitions written out as `(L, L)` masks and a softmax, for
`verify` and the tests. Deliberately naive (it builds every mask); never use it on a real model size.
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


RULE_MASKS = {"causal-attention": causal_mask, "frame-causal-attention": frame_causal_mask}


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
        self.mask = mask
        self.fused = fused

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
