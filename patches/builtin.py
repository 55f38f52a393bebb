"""The built-in patches: `causal-attention`, `frame-causal-attention`,
`attention-mask`, `block-causal-attention(chunk, window, sink)`, `window-attention(window, chunk, text_sees_video)`
(each a rule switched on in the shared attention surgery of `patches.processor`; how each rule is computed fast is
explained in `patches.attention`), and `per-frame-timesteps(text_timestep)` (`patches.timesteps`).
"""

from __future__ import annotations

from typing import Any

from cogsurgeon.patches.parameters import PatchParameter
from cogsurgeon.patches.registry import Patch


class StructuralAttentionPatch(Patch):
    """A rule on which keys each query may see, fixed by positions and the patch's parameters (no user input).
    The rules contradict each other (one "attention-pattern" at a time); each composes with `attention-mask`."""

    structure: str = ""
    exclusive = "attention-pattern"

    def pattern(self, **options: Any) -> Any:
        """The rule as `patches.attention` plans it: a name, or a `BlockCausal` / `WindowAttention` (whose
        construction checks the parameters' ranges)."""
        return self.structure

    def check_options(self, options: dict[str, Any]) -> None:
        self.pattern(**options)

    def apply(self, transformer: Any, **options: Any) -> Any:
        from cogsurgeon.patches.processor import attention_state

        pattern = self.pattern(**options)  # before installing anything: apply leaves the model as it was on error
        return attention_state(transformer, install=True).set_rules(transformer, structure=pattern)

    def revert(self, transformer: Any, record: Any) -> None:
        record.set_rules(transformer, structure=None)

    def extra_memory_bytes(
        self, batch, heads, text_tokens, video_tokens, frames, dtype_bytes, *, head_dim=64, training=False, **options
    ):
        """One SDPA call per segment (a chunk of frames, or text), each output a temporary copied into the output: the
        largest segment's output. A window past a prefix (`window_prefix_tokens`) adds, in inference, a saved copy of
        the prefix's keys and values (it is copied just before each window); under autograd, the prefix's keys and
        values concatenated to one chunk's window. (5B shape, chunk 1, window 4, sink 1: 55 MB estimated; 46 MB measured
        on an H200 with the heads on 2 streams, 56 MB on 1; bench/RESULTS.md.)"""
        chunk = options.get("chunk", 1)
        chunk_tokens = chunk * (video_tokens // max(frames, 1))
        token_bytes = batch * heads * head_dim * dtype_bytes
        largest_output = max(text_tokens, chunk_tokens) * token_bytes
        prefix = self.window_prefix_tokens(text_tokens, chunk_tokens, **options)
        if training and prefix:
            return largest_output + 2 * (prefix + options["window"] * chunk_tokens) * token_bytes
        return largest_output + 2 * prefix * token_bytes

    def window_prefix_tokens(self, text_tokens: int, chunk_tokens: int, **options: Any) -> int:
        return 0

    def reference_mask(self, layout: Any, **options: Any) -> Any:
        from cogsurgeon.patches.reference import rule_mask

        return rule_mask(self.name, layout, **options)


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
    (0.538 of full attention's work at 13 frames, all in the fused kernel: 0.564x of full SDPA at the 5B shape on an
    H200, queued as in a forward, 0.596x from an idle GPU, bench/RESULTS.md; flex_attention's block mask measured
    1.11x on an H100). Each segment's output is a temporary copied into the output, so the extra memory is the
    largest segment's output."""

    name = "frame-causal-attention"
    summary = "frame-causal attention: text sees text; frame f sees text and frames <= f"
    structure = "frame-causal"


class BlockCausalAttention(StructuralAttentionPatch):
    """Block-causal by chunks of `chunk` frames, optionally a sliding `window` of chunks with the first `sink` chunks
    always kept (CausVid's chunks, Self-Forcing's `local_attn_size` / `sink_size`): a video query in chunk
    `i = frame // chunk` sees all text and the chunks j with `j <= i` and (`window` is None or `j > i - window` or
    `j < sink`); text sees text. `frame-causal-attention` is chunk 1.

    Planned as one key range per chunk of queries (`[text ; chunks <= i]`), or a prefix `[text ; sinks]` and a window
    of chunks; run as one SDPA call per chunk (chunk 3 at the 5B shape on an H200: 0.612x of full SDPA for 0.607 of
    its work, queued as in a forward; bench/RESULTS.md). A window past the sinks gets the prefix's keys copied just
    before it in inference (the processor's own key and value temporaries), or concatenated with it per chunk under
    autograd (then saved for backward: up to `T + (sink + window)·chunk·n` keys per chunk)."""

    name = "block-causal-attention"
    summary = "block-causal by chunks of frames, optional sliding window with sink chunks (CausVid, Self-Forcing)"
    parameters = (
        PatchParameter("chunk", int, 1, "frames per chunk (latent frames; temporal patches for CogVideoX1.5)"),
        PatchParameter("window", int, None, "chunks a query sees back to, its own included (none: all earlier)"),
        PatchParameter("sink", int, 0, "first chunks every query keeps seeing beside the window (at most window)"),
    )

    def pattern(self, **options: Any) -> Any:
        from cogsurgeon.patches.patterns import BlockCausal

        return BlockCausal(**options)

    def window_prefix_tokens(self, text_tokens: int, chunk_tokens: int, **options: Any) -> int:
        """With a window: the text and the sink chunks."""
        return text_tokens + options.get("sink", 0) * chunk_tokens if options.get("window") else 0


class WindowAttentionPatch(StructuralAttentionPatch):
    """Bidirectional local attention by chunks of frames (TTT-Video's segments): a video query in chunk i sees all
    text and the chunks j with `|i - j| < window`; text sees text, or everything with `text_sees_video`. Planned as
    the text prefix plus one range of chunks per chunk of queries, run as `block-causal-attention` is."""

    name = "window-attention"
    summary = "bidirectional local attention: chunk i sees text and chunks j with |i - j| < window"
    parameters = (
        PatchParameter("window", int, 1, "a query in chunk i sees chunks j with |i - j| < window"),
        PatchParameter("chunk", int, 1, "frames per chunk (latent frames; temporal patches for CogVideoX1.5)"),
        PatchParameter("text_sees_video", bool, False, "text queries attend every key (else text only)"),
    )

    def pattern(self, **options: Any) -> Any:
        from cogsurgeon.patches.patterns import WindowAttention

        return WindowAttention(**options)

    def window_prefix_tokens(self, text_tokens: int, chunk_tokens: int, **options: Any) -> int:
        return text_tokens


class PerFrameTimesteps(Patch):
    """A timestep per latent frame (diffusion forcing): the transformer's `timestep` may be `(B, F)`; each video
    token is modulated by its own frame's timestep embedding in every `CogVideoXLayerNormZero` and the final
    `AdaLayerNorm`, text by `text_timestep` (`max`, `min`, `first`, `last` of the sample's frame timesteps, or a
    fixed number). A `(B,)` timestep runs exactly as unpatched. See `patches.timesteps`."""

    name = "per-frame-timesteps"
    summary = "timestep (B, F): each frame's tokens modulated by their own frame's timestep (diffusion forcing)"
    parameters = (
        PatchParameter(
            "text_timestep", (str, float), "max", "text's timestep: max, min, first, last of the frames', or a number"
        ),
    )

    def check_options(self, options: dict[str, Any]) -> None:
        from cogsurgeon.patches.patterns import check_text_timestep

        check_text_timestep(options["text_timestep"])

    def apply(self, transformer: Any, **options: Any) -> Any:
        from cogsurgeon.patches.patterns import check_text_timestep
        from cogsurgeon.patches.timesteps import PerFrameTimestepState

        return PerFrameTimestepState.install(transformer, check_text_timestep(options["text_timestep"]))

    def revert(self, transformer: Any, record: Any) -> None:
        record.uninstall()


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
        from cogsurgeon.patches.processor import attention_state

        return attention_state(transformer, install=True).set_rules(transformer, masks_enabled=True)

    def revert(self, transformer: Any, record: Any) -> None:
        record.set_rules(transformer, masks_enabled=False)

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


BUILTIN_PATCHES: tuple[Patch, ...] = (
    CausalAttention(),
    FrameCausalAttention(),
    AttentionMask(),
    BlockCausalAttention(),
    WindowAttentionPatch(),
    PerFrameTimesteps(),
)


__all__ = [
    "BUILTIN_PATCHES",
]
