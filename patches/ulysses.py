"""Attention under Ulysses context parallelism, on diffusers' own engine (`cogsurgeon.parallel` sets it up).

Each of the N ranks holds a shard of the text tokens and a shard of the video tokens (diffusers' context-parallel
plan splits `encoder_hidden_states` and `hidden_states` at the first block with `torch.chunk`), so its joint
sequence is `[text shard r ; video shard r]`. A length that does not divide by N is padded with zero tokens at its
end first (`cogsurgeon.parallel` does it in front of diffusers' hooks; 226 text tokens over 4 ranks, say), and the
padding is dropped from the keys: never attended, its outputs discarded. diffusers' Ulysses all-to-all
(`TemplatedUlyssesAttention`) gives every rank the whole sequence for H/N heads, in rank-major order
`[text 0 ; video 0 ; text 1 ; video 1 ; ...]`. `SequenceParallel.attend` runs an attention function inside that
all-to-all with the shards put back in the original order `[text ; video]`, without padding, and with the *global*
text and video lengths, so the patches' plans (causal, block-causal, masks, the streaming KV cache) apply unchanged.

The global lengths come from the transformer's forward call, read by a forward pre-hook before diffusers' hooks
split anything. Unpatched attention needs neither when nothing is padded (full attention does not depend on the key
order): it goes through diffusers' dispatcher (`dispatch_attention_fn` with the parallel config); with padding, it
runs as plain SDPA inside the same all-to-all, without the padded keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from cogsurgeon.patches.errors import PatchError

# Where a transformer keeps its `SequenceParallel` while context parallelism is on (on the object it describes).
PARALLEL_ATTRIBUTE = "_cogsurgeon_parallel"


class ContextParallelError(PatchError):
    """Context parallelism that cannot run as asked: a degree that does not divide the heads or the world, no
    process group, a diffusers without the engine, lengths its sharder cannot split."""


def padded_length(length: int, degree: int) -> int:
    """`length` rounded up to a multiple of `degree`: what each of text and video is padded to (zero tokens at the end)
    so that diffusers' sharder splits it evenly."""
    return -(-length // degree) * degree


def shard_bounds(length: int, degree: int) -> list[tuple[int, int]]:
    """`[start, end)` of each rank's shard of `length` tokens after padding to a multiple of `degree`, as
    `torch.chunk` splits the padded tensor (positions past `length` are padding)."""
    shard = padded_length(length, degree) // degree
    return [(rank * shard, (rank + 1) * shard) for rank in range(degree)]


# A run of the gathered sequence: `(start, end, padding)` = the original positions `[start, end)`, then `padding`
# padding tokens.
Run = tuple[int, int, int]


def gathered_runs(text_tokens: int, video_tokens: int, degree: int) -> list[Run]:
    """The runs of the gathered (rank-major) sequence, in gathered order: text shard 0, video shard 0, text shard 1,
    ... (video positions counted after the text); each shard is its real tokens, then its padding."""
    runs = []
    for rank in range(degree):
        for offset, length in ((0, text_tokens), (text_tokens, video_tokens)):
            start, end = shard_bounds(length, degree)[rank]
            real_start, real_end = min(start, length), min(end, length)
            runs.append((offset + real_start, offset + real_end, (end - start) - (real_end - real_start)))
    return runs


def to_original_order(gathered: torch.Tensor, runs: list[Run], dim: int) -> torch.Tensor:
    """The gathered sequence (runs in rank-major order along `dim`) in the original `[text ; video]` order, without
    the padding."""
    pieces, offset = [], 0
    for start, end, padding in runs:
        pieces.append((start, gathered.narrow(dim, offset, end - start)))
        offset += end - start + padding
    return torch.cat([piece for _, piece in sorted(pieces, key=lambda item: item[0])], dim=dim)


def to_gathered_order(original: torch.Tensor, runs: list[Run], dim: int) -> torch.Tensor:
    """The inverse of `to_original_order`, with zeros for the padding."""
    pieces = []
    for start, end, padding in runs:
        pieces.append(original.narrow(dim, start, end - start))
        if padding:
            shape = list(original.shape)
            shape[dim] = padding
            pieces.append(original.new_zeros(shape))
    return torch.cat(pieces, dim=dim)


def valid_degrees(heads: int) -> list[int]:
    """Ulysses degrees a model with `heads` attention heads can run: the divisors of `heads` above 1."""
    return [degree for degree in range(2, heads + 1) if heads % degree == 0]


# An attention function over the whole sequence (original order) for this rank's heads:
# (query, key, value `(B, H/N, L, D)`, global text tokens, global video tokens) -> output `(B, H/N, L, D)`.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class SequenceParallel:
    """Ulysses context parallelism on one transformer: diffusers' parallel config, this rank's place in the Ulysses
    group, and the global lengths of the forward under way."""

    parallel_config: Any  # diffusers' ParallelConfig, set up (mesh, groups)
    degree: int
    rank: int
    route: str  # how diffusers' engine was entered (see `cogsurgeon.parallel`)
    plan: dict[str, Any]  # the context-parallel plan handed to diffusers
    plain_forward_modules: tuple[str, ...] = ()  # the plan's modules that had no instance `forward` before
    text_tokens: int | None = None
    video_tokens: int | None = None

    @property
    def context_config(self) -> Any:
        return self.parallel_config.context_parallel_config

    def read_lengths(self, text_tokens: int, video_tokens: int) -> None:
        """The forward's global lengths (before padding)."""
        self.text_tokens, self.video_tokens = text_tokens, video_tokens

    @property
    def padded(self) -> bool:
        """This forward pads text or video (a length that does not divide by the degree)."""
        return bool(self.text_tokens % self.degree or self.video_tokens % self.degree)

    def video_shard(self) -> tuple[int, int]:
        """This rank's `[start, end)` of the forward's padded video tokens (positions past `video_tokens` are
        padding)."""
        return shard_bounds(self.video_tokens, self.degree)[self.rank]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Attention of this rank's shard: `query`/`key`/`value` `(B, H, S_local, D)` (all heads, the local joint
        sequence) -> output `(B, H, S_local, D)`, with `attend` run on the whole sequence for H/N heads between
        diffusers' two all-to-alls."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        text, video = self.text_tokens, self.video_tokens
        runs = gathered_runs(text, video, self.degree)
        operation = _ShardedAttention(attend, runs, text, video)
        output = _templated_context_parallel_attention(
            *(tensor.transpose(1, 2) for tensor in (query, key, value)),  # diffusers' layout: (B, S, H, D)
            forward_op=operation.forward, backward_op=operation.backward, _parallel_config=self.parallel_config,
        )
        return output.transpose(1, 2)


class _ShardedAttention:
    """The forward and backward operations diffusers' templated Ulysses attention calls between its all-to-alls,
    on `(B, S_global, H/N, D)` tensors in gathered order."""

    def __init__(self, attend: Attend, runs: list[Run], text_tokens: int, video_tokens: int):
        self.attend, self.runs = attend, runs
        self.text_tokens, self.video_tokens = text_tokens, video_tokens

    def _run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ordered = (to_original_order(tensor, self.runs, dim=1).transpose(1, 2) for tensor in (query, key, value))
        output = self.attend(*ordered, self.text_tokens, self.video_tokens)
        return to_gathered_order(output.transpose(1, 2), self.runs, dim=1).contiguous()

    def forward(self, ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any,
                dropout_p: float, is_causal: bool, scale: Any, enable_gqa: bool, return_lse: bool,
                _save_ctx: bool = True, _parallel_config: Any = None) -> torch.Tensor:
        if return_lse or attn_mask is not None or is_causal:  # nothing of ours asks for these
            raise ContextParallelError("cogsurgeon's context-parallel attention takes no lse, mask or is_causal")
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
            ctx.sharded_attention = self
        return self._run(query, key, value)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
        """Recompute the attention under autograd and differentiate it (as diffusers' native backward does)."""
        query, key, value = (tensor.detach().requires_grad_(True) for tensor in ctx.saved_tensors)
        with torch.enable_grad():
            output = ctx.sharded_attention._run(query, key, value)
        return torch.autograd.grad(output, (query, key, value), grad_output)


__all__ = [
    "ContextParallelError", "PARALLEL_ATTRIBUTE", "SequenceParallel", "gathered_runs", "padded_length", "shard_bounds",
    "to_gathered_order", "to_original_order", "valid_degrees",
]
