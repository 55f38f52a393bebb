"""The built-in patches (DESIGN, "Patch definitions (exact)"): `causal-attention`, `frame-causal-attention`,
`attention-mask`. Each is a rule switched on in the shared attention surgery of `patches.processor`; how each rule
is computed fast is explained in `patches.attention`.
"""

from __future__ import annotations

from typing import Any

from cogsurgeon.patches.registry import Patch


class StructuralAttentionPatch(Patch):
    """A rule on which keys each query may see, fixed by positions only (no user input)."""

    structure: str = ""
    exclusive = "attention-pattern"

    def apply(self, transformer: Any, **options: Any) -> Any:
        from cogsurgeon.patches.processor import enable_attention_rule

        return enable_attention_rule(transformer, structure=self.structure)

    def revert(self, transformer: Any, record: Any) -> None:
        from cogsurgeon.patches.processor import disable_attention_rule

        disable_attention_rule(transformer, record, structure=self.structure)

    def reference_mask(self, layout: Any, **options: Any) -> Any:
        from cogsurgeon.patches.reference import RULE_MASKS

        return RULE_MASKS[self.name](layout)


class CausalAttention(StructuralAttentionPatch):
    """Token-causal over the joint sequence, `k <= q`: exactly the original fork's `is_causal=True`.

    Computed as one SDPA call with `is_causal=True` (the flash kernel skips the masked half: 0.454x of full
    attention at the 5B shape on an H100, `python bench/attention_gpu.py`, bench/RESULTS.md), so it allocates
    nothing beyond unpatched attention."""

    name = "causal-attention"
    summary = "token-causal attention over [text ; video] (k <= q), as the original fork's is_causal=True"
    structure = "causal"

    def extra_memory_bytes(
        self, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, *, head_dim=64, training=False
    ):
        return 0


class FrameCausalAttention(StructuralAttentionPatch):
    """Block-causal by frame, text as frame -1: `frame(k) <= frame(q)`.

    Computed as text queries over text keys plus one SDPA call per frame over its key prefix `[text ; frames <= f]`
    (about 0.54 of full attention's work at 13 frames, all in the flash kernel: 0.610x of full SDPA at the 5B shape
    on an H100, bench/RESULTS.md; DESIGN's anchor for flex_attention's block mask is 1.11x). Each segment's output
    is a temporary copied into the output, so the extra memory is the largest segment's output."""

    name = "frame-causal-attention"
    summary = "frame-causal attention: text sees text; frame f sees text and frames <= f"
    structure = "frame-causal"

    def extra_memory_bytes(
        self, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, *, head_dim=64, training=False
    ):
        largest_segment = max(text_tokens, video_tokens // max(frames, 1))
        return batch * heads * largest_segment * head_dim * dtype_bytes


class AttentionMask(Patch):
    """Makes `attention_kwargs={"attention_mask": M}` reach CogVideoX attention correctly, on every diffusers
    version (0.32 blocks drop `attention_kwargs`: the mask is read at the transformer's forward instead).

    Accepted M (bool: True = attend; float: additive): `(B, T)` over text keys (video keys always kept),
    `(B, T+N)` over all keys, `(B|1, 1|heads, T+N, T+N)` a full mask. Composes with either causal rule.

    Key masks (bool, or additive with only 0 and <= -1e4 values) drop the masked keys per group of batch items
    sharing a mask (text padding: the kept text keys move next to the video keys in place), so attention stays in
    the flash kernel (text padding 30/226: 1.014x of full SDPA at the 5B shape on an H100, bench/RESULTS.md),
    where a key mask given to SDPA would leave it. A full mask goes to SDPA as it is: broadcast over heads, never
    repeated per head (diffusers' head repeat makes a (B·heads, L, L) tensor: 56.5 GiB at B=2, bf16, L=17,776)."""

    name = "attention-mask"
    summary = "attention_kwargs={'attention_mask': M} reaches attention: (B,T), (B,T+N) or (B|1,1|heads,L,L)"

    def apply(self, transformer: Any, **options: Any) -> Any:
        from cogsurgeon.patches.processor import enable_attention_rule

        return enable_attention_rule(transformer, masks=True)

    def revert(self, transformer: Any, record: Any) -> None:
        from cogsurgeon.patches.processor import disable_attention_rule

        disable_attention_rule(transformer, record, masks=True)

    def extra_memory_bytes(
        self, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, *, head_dim=64, training=False
    ):
        """For a `(B, T)` text padding mask, worst case over how the batch's masks differ. Inference: the kept text
        keys move next to the video keys in place (2·B·H·T·D for the moved keys); items whose masks differ run as
        groups whose outputs are copied into the output (at most (B-1)·H·L·D). Training (autograd needs K and V
        unchanged): K and V are gathered per group, at most max(2B, 3(B-1))·H·L·D. Plus the (B, L) keep mask."""
        length = text_tokens + video_tokens
        row = heads * length * head_dim * dtype_bytes
        keep_mask = batch * length
        if training:
            return max(2 * batch, 3 * (batch - 1)) * row + keep_mask
        moved_text_keys = 2 * batch * heads * text_tokens * head_dim * dtype_bytes
        return (batch - 1) * row + moved_text_keys + keep_mask


BUILTIN_PATCHES: tuple[Patch, ...] = (CausalAttention(), FrameCausalAttention(), AttentionMask())
