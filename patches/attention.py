"""Attention under the patches' rules, computed without an `(L, L)` tensor on the hot path.

Every rule the patches define gives each *block of queries* at most two contiguous key ranges: a prefix `[0, p)`
(text, and for block-causal also the sink chunks) and a range `[a, e)` (the chunks the block may see). Causal lets
query q see keys `[0, q]`; block-causal (frame-causal is chunk 1) lets the queries of chunk i see
`[text ; chunks <= i]`, with a window and sinks `[text ; sink chunks] + [chunks i-w+1 .. i]`; window attention lets
chunk i see `[text] + [chunks i-w+1 .. i+w-1]`; text sees text (or everything). So attention is planned once per
forward as a list of `QuerySegment`s (a run of queries and the keys it may see) and run as SDPA per segment:

- causal: a single segment, SDPA `is_causal=True` (flash kernel skips the upper triangle: 0.454x of full
  attention at the 5B shape on an H100, bench/RESULTS.md; no mask memory).
- block-causal / frame-causal / window: one SDPA call per segment (flash kernel, no mask). Frame-causal's work is
  `sum_f n_f * (T + (f+1) n)`, 0.538 of full attention at 13 frames; it runs at 0.590x of full SDPA at the 5B shape
  on an H200 (0.572x at the 1.5 shape; bench/RESULTS.md). flex_attention's block mask is 1.11x of full on an H100 by
  DESIGN's anchors, so it is not used. A packed alternative, one varlen flash call over every (item, head, segment)
  as a sequence of its own (`PACKED_FLASH`, off), measured slower on the H200 (0.789x for frame-causal) and is kept
  only for that comparison.
- segments with two key ranges (a window past the sinks): when the keys are ours to overwrite (the processor's own
  temporaries, no autograd), the prefix is moved in place to just before the window, into keys no later segment
  needs (windows only move forward), so each segment is still one SDPA call over one slice; otherwise the two
  ranges are concatenated for that segment.
- a key mask (`(B, T)` or `(B, T+N)`; bool, or additive with only 0 and -inf, or 0 and <= -1e4 while every query
  keeps a key): the masked keys are *dropped*, per group of batch items sharing a mask, instead of passed as a mask,
  because SDPA with any `attn_mask` leaves the flash kernel. With text padding the few kept text keys are moved in
  place next to the video keys, so the kept keys are one slice (1.014x of full SDPA at the 5B shape,
  bench/RESULTS.md; nothing allocated); otherwise, or while autograd needs K and V, they are gathered. Kept keys
  stay in order, so every key range above maps to a range of the kept keys and causal runs become lower-right
  causal segments.
- a full `(B|1, 1|heads, L, L)` mask: given to SDPA as it is (no head repeat, no copy); composed with a block rule
  by slicing it per segment, with causal by combining it chunk by chunk (chunks of at most `CHUNK_MASK_ELEMENTS`).

A query that may see no key at all gets a zero output (what SDPA returns for a fully masked row since torch 2.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cogsurgeon.inspector.geometry import FrameLayout
from cogsurgeon.patches.errors import AttentionMaskError
from cogsurgeon.patches.patterns import FRAME_CAUSAL, BlockCausal, Structure, WindowAttention, as_pattern  # noqa: F401

# Additive key-mask values at or below this count as padding: exp(-1e4) underflows to 0 in every float dtype, so
# dropping those keys gives the same softmax as adding the value, as long as the query keeps some other key.
DROP_THRESHOLD = -1.0e4
# Past this many query runs, a causal key-dropping plan falls back to chunked dense masks (call overhead).
MAX_SEGMENTS = 64
# Largest mask chunk the causal + dense-mask path materialises (elements): 64 Mi, not (L, L).
CHUNK_MASK_ELEMENTS = 1 << 26
# One packed varlen flash call (two, merged, for two-range plans) instead of one SDPA call per segment, on CUDA
# without autograd. Off: on an H200 it was slower (frame-causal 0.789x of full SDPA vs 0.590x per segment, 5B shape,
# bench/RESULTS.md) and the two-call merge needs a second output buffer. The bench turns it on to compare.
PACKED_FLASH = False


@dataclass(frozen=True)
class QuerySegment:
    """Queries `[query_start, query_end)` see keys `[0, prefix_end) + [key_start, key_end)` (with `key_start` 0: the
    prefix `[0, key_end)`); when `causal` (one prefix only), lower-right aligned: query i of the segment sees keys
    `< key_end - (length - 1 - i)`."""

    query_start: int
    query_end: int
    key_end: int
    causal: bool = False
    key_start: int = 0
    prefix_end: int = 0

    @property
    def length(self) -> int:
        return self.query_end - self.query_start

    @property
    def two_ranges(self) -> bool:
        return self.key_start > 0

    @property
    def key_count(self) -> int:
        return self.key_end - self.key_start + self.prefix_end

    @property
    def key_ranges(self) -> tuple[tuple[int, int], ...]:
        if not self.two_ranges:
            return ((0, self.key_end),)
        return ((0, self.prefix_end), (self.key_start, self.key_end))


def keys_segment(query_start: int, query_end: int, prefix_end: int, key_start: int, key_end: int) -> QuerySegment:
    """Queries that see `[0, prefix_end) + [key_start, key_end)`, written as one prefix when the ranges touch."""
    if key_end <= key_start:  # an empty range: the prefix only
        return QuerySegment(query_start, query_end, prefix_end)
    if key_start <= prefix_end:
        return QuerySegment(query_start, query_end, max(prefix_end, key_end))
    return QuerySegment(query_start, query_end, key_end, key_start=key_start, prefix_end=prefix_end)


def chunk_bounds(layout: FrameLayout, chunk: int) -> list[int]:
    """Token positions where each chunk of `chunk` frames starts, plus the end of the sequence: chunk i is
    `[bounds[i], bounds[i + 1])`. The last chunk may hold fewer frames."""
    return [layout.frame_start(min(f, layout.frames)) for f in range(0, layout.frames + chunk, chunk)]


def _merge_equal_neighbours(segments: list[QuerySegment]) -> tuple[QuerySegment, ...]:
    """Adjacent query runs that see the same keys become one segment (fewer, larger SDPA calls)."""
    merged: list[QuerySegment] = []
    for segment in segments:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and not previous.causal
            and not segment.causal
            and previous.query_end == segment.query_start
            and previous.key_ranges == segment.key_ranges
        ):
            merged[-1] = QuerySegment(
                previous.query_start, segment.query_end, segment.key_end, False, segment.key_start, segment.prefix_end
            )
        else:
            merged.append(segment)
    return tuple(merged)


def structure_segments(structure: Structure | None, layout: FrameLayout) -> tuple[QuerySegment, ...]:
    """The segments of a structural rule over the full (uncompacted) sequence."""
    length, text = layout.sequence_length, layout.text_tokens
    pattern = as_pattern(structure)
    if pattern is None:
        return (QuerySegment(0, length, length),)
    if pattern == "causal":
        return (QuerySegment(0, length, length, causal=True),)
    if isinstance(pattern, (BlockCausal, WindowAttention)):
        bounds = chunk_bounds(layout, pattern.chunk)
        chunks = len(bounds) - 1
        text_sees = length if isinstance(pattern, WindowAttention) and pattern.text_sees_video else text
        segments = [QuerySegment(0, text, text_sees)] if text else []
        for i in range(chunks):
            if isinstance(pattern, BlockCausal):
                first = 0 if pattern.window is None else max(0, i - pattern.window + 1)
                prefix_end = bounds[min(pattern.sink, i + 1)] if first else bounds[0]
                last = i + 1
            else:
                first, last = max(0, i - pattern.window + 1), min(chunks, i + pattern.window)
                prefix_end = text
            segments.append(keys_segment(bounds[i], bounds[i + 1], prefix_end, bounds[first], bounds[last]))
        return _merge_equal_neighbours(segments)
    raise ValueError(f"unknown attention structure {structure!r}")


def compact_segments(segments: tuple[QuerySegment, ...], keep: list[bool]) -> tuple[QuerySegment, ...]:
    """The same rule over the kept keys only (keys keep their order, so a key range is a range of kept keys).

    A causal segment splits into runs: queries at kept positions see a lower-right causal prefix, queries at dropped
    positions see every kept key before them (non-causal)."""
    kept_before = [0, *accumulate(keep)]  # kept_before[i] = kept keys among [0, i)
    compacted: list[QuerySegment] = []
    for segment in segments:
        if not segment.causal:
            compacted.append(
                keys_segment(
                    segment.query_start,
                    segment.query_end,
                    kept_before[segment.prefix_end],
                    kept_before[segment.key_start],
                    kept_before[segment.key_end],
                )
            )
            continue
        if segment.key_end != segment.query_end:
            raise ValueError("only causal segments aligned at the diagonal are compacted")
        start = segment.query_start
        while start < segment.query_end:
            end = start
            while end < segment.query_end and keep[end] == keep[start]:
                end += 1
            if keep[start]:
                compacted.append(QuerySegment(start, end, kept_before[start] + (end - start), causal=True))
            else:
                compacted.append(QuerySegment(start, end, kept_before[start]))
            start = end
    return tuple(compacted)


@dataclass(frozen=True)
class SegmentPlan:
    """Attention as SDPA per segment over all keys, optionally with a dense mask `(B|1, 1|H, L|1, L)`."""

    segments: tuple[QuerySegment, ...]
    dense_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class KeptKeyGroup:
    """Batch items sharing one key mask: their kept key indices (None: all kept) and the compacted segments."""

    items: tuple[int, ...] | None  # None: the whole batch
    kept_index: torch.Tensor | None
    segments: tuple[QuerySegment, ...]
    # When every key from `prefix_end` on is kept (text padding): the kept keys of the prefix, to be moved up against
    # position `prefix_end` so that the kept keys become the slice `[prefix_end - len(index), L)` (no big copy).
    prefix_end: int = 0
    prefix_kept_index: torch.Tensor | None = None


@dataclass(frozen=True)
class KeptKeyPlan:
    groups: tuple[KeptKeyGroup, ...]


AttentionPlan = SegmentPlan | KeptKeyPlan


def describe_mask_forms(layout: FrameLayout) -> str:
    t, length = layout.text_tokens, layout.sequence_length
    return f"(B, {t}) over text keys, (B, {length}) over all keys, or (B|1, 1|heads, {length}, {length})"


def normalize_attention_mask(
    mask: torch.Tensor, layout: FrameLayout, batch: int, heads: int, *, read_values: bool = True
) -> tuple[Literal["keys", "soft-keys", "dense"], torch.Tensor]:
    """Check a user mask against DESIGN's accepted forms and bring it to one of three shapes:

    ("keys", keep): keep a bool `(B|1, L)` (True = attend; text masks extended with True for video), from a bool
    mask or an additive one of only 0 and -inf;
    ("soft-keys", bias): an additive `(B|1, L)` of only 0 and finite values <= -1e4 (HF's classic -10000 padding);
    ("dense", m): m a bool or additive float `(B|1, 1|heads, L|1, L)`.
    `read_values=False` classifies by shape and dtype alone (no host read): additive key masks become "dense".
    """
    text, length = layout.text_tokens, layout.sequence_length
    if not isinstance(mask, torch.Tensor):
        raise AttentionMaskError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttentionMaskError(
            f"attention_mask has dtype {mask.dtype}: pass a bool mask (True = attend), e.g. tokenizer_mask.bool(), "
            "or an additive float mask"
        )
    shape = tuple(mask.shape)
    batch_ok = bool(shape) and shape[0] in (1, batch)
    if mask.dim() == 2 and batch_ok and shape[1] in (text, length):
        if shape[1] == text and text != length:
            video = torch.ones if mask.dtype == torch.bool else torch.zeros
            mask = torch.cat([mask, video(shape[0], length - text, dtype=mask.dtype, device=mask.device)], dim=1)
        if mask.dtype == torch.bool or mask.is_meta:  # a meta mask has no values: shapes as if every key is kept
            return "keys", mask if mask.dtype == torch.bool else mask == 0
        if not read_values:  # an additive key mask, its values unread (inside a compiled graph)
            return "dense", mask[:, None, None, :]
        if bool(((mask == 0) | (mask == float("-inf"))).all()):
            return "keys", mask == 0
        if bool(((mask == 0) | (mask <= DROP_THRESHOLD)).all()):
            return "soft-keys", mask
        return "dense", mask[:, None, None, :]
    if mask.dim() == 4 and batch_ok and shape[1] in (1, heads) and shape[2:] == (length, length):
        return "dense", mask
    raise AttentionMaskError(
        f"attention_mask of shape {shape} does not fit this call (batch {batch}, {heads} heads, {text} text + "
        f"{layout.video_tokens} video tokens): expected {describe_mask_forms(layout)}"
    )


def plan_attention(
    structure: Structure | None,
    layout: FrameLayout,
    mask: torch.Tensor | None,
    *,
    batch: int,
    heads: int,
    device: torch.device,
    dtype: torch.dtype,
) -> AttentionPlan:
    """Plan one forward's attention (the same for every layer): segments, and what to do with the mask."""
    segments = structure_segments(structure, layout)
    if mask is None:
        return SegmentPlan(segments)
    # Inside a compiled graph (torch.compile, fullgraph) the mask's values cannot be read on the host: it goes to
    # SDPA as a key mask instead of dropping keys (same result, without the flash kernel).
    read_values = not torch.compiler.is_compiling()
    form, normalized = normalize_attention_mask(mask, layout, batch, heads, read_values=read_values)
    if form == "keys" and normalized.is_meta:  # a shape-only (meta) forward: the mask's values are unknown
        return SegmentPlan(segments)
    if form in ("keys", "soft-keys"):
        if read_values:
            # Dropping a key whose additive value is finite is exact only while each query keeps another key.
            keep = normalized if form == "keys" else normalized == 0
            plan = _kept_key_plan(keep, segments, device, allow_keyless_queries=form == "keys")
            if plan is not None:
                return plan
        normalized = normalized[:, None, None, :]
    if normalized.dtype != torch.bool:
        normalized = normalized.to(dtype)
    return SegmentPlan(segments, normalized.to(device))


def _kept_key_plan(
    keep: torch.Tensor, segments: tuple[QuerySegment, ...], device: torch.device, allow_keyless_queries: bool
) -> KeptKeyPlan | None:
    """Group batch items by their key mask and compact the segments for each; None when the causal runs are too
    many for one SDPA call each (then the dense path is cheaper), or when some query would keep no key and that is
    not allowed."""
    keep_rows = keep.detach().to("cpu")
    unique_rows, inverse = torch.unique(keep_rows, dim=0, return_inverse=True)
    groups = []
    for group_number, row in enumerate(unique_rows):
        keep_list = row.tolist()
        compacted = compact_segments(segments, keep_list)
        if len(compacted) > MAX_SEGMENTS:
            return None
        if not allow_keyless_queries and any(segment.key_count == 0 for segment in compacted):
            return None
        if len(unique_rows) == 1:
            items = None
        else:
            items = tuple(i for i in range(keep_rows.shape[0]) if int(inverse[i]) == group_number)
        if all(keep_list):
            groups.append(KeptKeyGroup(items, None, compacted))
            continue
        kept = row.nonzero().flatten()
        prefix_end = len(keep_list) - keep_list[::-1].index(False)  # one past the last dropped key
        prefix_kept = kept[: int(row[:prefix_end].sum())]
        groups.append(KeptKeyGroup(items, kept.to(device), compacted, prefix_end, prefix_kept.to(device)))
    return KeptKeyPlan(tuple(groups))


def run_plan(
    plan: AttentionPlan,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    keys_writable: bool = False,
) -> torch.Tensor:
    """Attention output `(B, H, L, D)` for query/key/value `(B, H, L, D)` under a plan.

    `keys_writable=True` lets the plan reorder `key` and `value` in place (the processor's own temporaries): with
    text padding it then moves the few kept text keys next to the video keys instead of gathering every kept key into
    new tensors (a copy of K and V, about 3% of attention time at the 5B shape), and a window past the sinks moves the
    prefix next to the window instead of concatenating both per segment. Ignored while autograd needs the keys."""
    if keys_writable and torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
        keys_writable = False
    if isinstance(plan, SegmentPlan):
        return attend_segments(query, key, value, plan.segments, plan.dense_mask, keys_writable=keys_writable)
    if len(plan.groups) == 1 and plan.groups[0].items is None:
        return _attend_group(plan.groups[0], query, key, value, keys_writable)
    output = query.new_empty(*query.shape[:-1], value.shape[-1])
    for group in plan.groups:
        first, last = group.items[0], group.items[-1] + 1
        if group.items == tuple(range(first, last)):  # a run of items: views, no copies
            output[first:last] = _attend_group(
                group, query[first:last], key[first:last], value[first:last], keys_writable
            )
            continue
        index = torch.tensor(group.items, device=query.device)
        writable = not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad))
        group_output = _attend_group(
            group, query.index_select(0, index), key.index_select(0, index), value.index_select(0, index), writable
        )  # index_select made copies: ours to reorder (unless autograd keeps them)
        output.index_copy_(0, index, group_output)
    return output


def _attend_group(
    group: KeptKeyGroup, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys_writable: bool
) -> torch.Tensor:
    """The kept keys, in order, as one tensor: a slice after moving the prefix's kept keys up (when allowed and the
    prefix is at most half the sequence), else a gather."""
    if group.kept_index is None:
        return attend_segments(query, key, value, group.segments, keys_writable=keys_writable)
    if keys_writable and group.prefix_kept_index is not None and 2 * group.prefix_end <= key.shape[2]:
        start = group.prefix_end - group.prefix_kept_index.numel()
        key[:, :, start : group.prefix_end] = key[:, :, : group.prefix_end].index_select(2, group.prefix_kept_index)
        value[:, :, start : group.prefix_end] = value[:, :, : group.prefix_end].index_select(
            2, group.prefix_kept_index
        )
        return attend_segments(query, key[:, :, start:], value[:, :, start:], group.segments, keys_writable=True)
    key = key.index_select(2, group.kept_index)
    value = value.index_select(2, group.kept_index)
    writable = not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad))
    return attend_segments(query, key, value, group.segments, keys_writable=writable)


def prefix_can_roll(segments: tuple[QuerySegment, ...]) -> bool:
    """Whether the two-range segments may move the prefix in place, in order: they come after every one-range
    segment that needs keys past the prefix, share one prefix, and their windows only move forward (so the keys
    overwritten just before a window are never needed again)."""
    two = [index for index, segment in enumerate(segments) if segment.two_ranges]
    if not two:
        return False
    tail = segments[two[0] :]
    if any(segment.causal or not segment.two_ranges for segment in tail):
        return False
    prefix = tail[0].prefix_end
    starts = [segment.key_start for segment in tail]
    return all(segment.prefix_end == prefix for segment in tail) and starts == sorted(starts)


def attend_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: tuple[QuerySegment, ...],
    dense_mask: torch.Tensor | None = None,
    *,
    keys_writable: bool = False,
) -> torch.Tensor:
    """SDPA per segment, written into one output tensor (a single segment returns SDPA's own output; one-range
    segments on a CUDA device without autograd run as one packed flash call)."""
    if len(segments) == 1 and segments[0].query_start == 0 and segments[0].query_end == query.shape[2]:
        if not segments[0].two_ranges:
            return _attend_segment(query, key, value, segments[0], dense_mask)
    if dense_mask is None:
        packed = _packed_flash(query, key, value, segments)
        if packed is not None:
            return packed
    output = query.new_empty(*query.shape[:-1], value.shape[-1])
    roll = keys_writable and dense_mask is None and prefix_can_roll(segments)
    prefix_at = 0  # where the keys [0, prefix_end) of the two-range segments live now
    for segment in segments:
        rows = slice(segment.query_start, segment.query_end)
        if roll and segment.two_ranges:
            prefix = segment.prefix_end
            destination = segment.key_start - prefix
            if destination != prefix_at:
                _move_keys(key, prefix_at, destination, prefix)
                _move_keys(value, prefix_at, destination, prefix)
                prefix_at = destination
            sliced = QuerySegment(segment.query_start, segment.query_end, segment.key_end - destination)
            output[:, :, rows] = _attend_segment(
                query, key[:, :, destination:], value[:, :, destination:], sliced, None
            )
            continue
        output[:, :, rows] = _attend_segment(query, key, value, segment, dense_mask)
    return output


def _move_keys(keys: torch.Tensor, source: int, destination: int, count: int) -> None:
    """keys[:, :, destination : destination + count] = keys[:, :, source : source + count], overlap allowed."""
    if count == 0:
        return
    moved = keys[:, :, source : source + count]
    if abs(destination - source) < count:
        moved = moved.clone()
    keys[:, :, destination : destination + count] = moved


def _attend_segment(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment: QuerySegment,
    dense_mask: torch.Tensor | None,
) -> torch.Tensor:
    start, end, key_end = segment.query_start, segment.query_end, segment.key_end
    segment_query = query[:, :, start:end]
    if segment.key_count == 0:
        return segment_query.new_zeros(*segment_query.shape[:-1], value.shape[-1])
    rows = None
    if dense_mask is not None:
        rows = dense_mask if dense_mask.shape[-2] == 1 else dense_mask[:, :, start:end]
    if segment.two_ranges:  # keys not ours to move: the two ranges concatenated for this segment
        ranges = segment.key_ranges
        segment_key = torch.cat([key[:, :, a:b] for a, b in ranges], dim=2)
        segment_value = torch.cat([value[:, :, a:b] for a, b in ranges], dim=2)
        if rows is not None:
            rows = torch.cat([rows[..., a:b] for a, b in ranges], dim=-1)
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, attn_mask=rows)
    segment_key, segment_value = key[:, :, :key_end], value[:, :, :key_end]
    if rows is not None:
        rows = rows[..., :key_end]
        if segment.causal:
            return _causal_with_dense_mask(segment_query, segment_key, segment_value, rows)
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, attn_mask=rows)
    if not segment.causal:
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value)
    if segment.length == key_end:
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, is_causal=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(
        segment_query, segment_key, segment_value, attn_mask=causal_lower_right(segment.length, key_end)
    )


# -- one packed flash-attention call for many segments (CUDA, no autograd) -------------------------------------------


@dataclass(frozen=True)
class PackedSequences:
    """Varlen flash-attention descriptors over `(B*H*L, 1, D)` views of q/k/v: sequence s has queries
    `[query_offsets[s], query_offsets[s + 1])` and keys `[key_starts[s], key_starts[s] + key_lengths[s])`."""

    query_offsets: list[int]
    key_starts: list[int]
    key_lengths: list[int]
    max_query: int
    max_key: int


def packed_sequences(
    segments: tuple[QuerySegment, ...],
    batch_heads: int,
    query_length: int,
    key_length: int,
    part: Literal["all", "ranges", "prefixes"] = "all",
) -> PackedSequences | None:
    """The descriptors of a plan whose segments tile the queries in order (None otherwise). `all`: each segment with
    its one key range (None if one has two). With two-range segments the plan runs as two calls merged by their
    log-sum-exp: `ranges` gives each segment its last range (`[key_start, key_end)`, or its one prefix), `prefixes`
    gives the two-range segments their prefix `[0, prefix_end)` and the others zero keys. A sequence of zero keys is
    allowed (flash writes zeros and an infinite log-sum-exp for it)."""
    if any(segment.causal for segment in segments):
        return None
    if part == "all" and any(segment.two_ranges for segment in segments):
        return None
    if [segment.query_start for segment in segments[1:]] != [segment.query_end for segment in segments[:-1]]:
        return None
    if not segments or segments[0].query_start != 0 or segments[-1].query_end != query_length:
        return None
    ranges = []
    for segment in segments:
        if part == "prefixes":
            ranges.append((0, segment.prefix_end if segment.two_ranges else 0))
        else:
            ranges.append((segment.key_start, segment.key_end))
    query_offsets, key_starts, key_lengths = [], [], []
    for item in range(batch_heads):
        for segment, (start, end) in zip(segments, ranges):
            query_offsets.append(item * query_length + segment.query_start)
            key_starts.append(item * key_length + start)
            key_lengths.append(end - start)
    query_offsets.append(batch_heads * query_length)
    return PackedSequences(
        query_offsets,
        key_starts,
        key_lengths,
        max(segment.length for segment in segments),
        max(max(end - start for start, end in ranges), 1),
    )


def merge_by_log_sum_exp(
    output: torch.Tensor, log_sum_exp: torch.Tensor, other: torch.Tensor, other_log_sum_exp: torch.Tensor
) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each one's output `(..., D)` and log-sum-exp `(...)`,
    written into `output`. An empty key set has output 0 and log-sum-exp +inf (flash's convention) or -inf."""

    def weightless(lse: torch.Tensor) -> torch.Tensor:
        return lse.masked_fill(torch.isinf(lse), float("-inf"))

    dtype = torch.promote_types(log_sum_exp.dtype, torch.float32)
    first, second = weightless(log_sum_exp.to(dtype)), weightless(other_log_sum_exp.to(dtype))
    total = torch.logaddexp(first, second)
    first_weight = torch.nan_to_num(torch.exp(first - total))  # both empty: -inf - -inf = nan -> 0
    second_weight = torch.nan_to_num(torch.exp(second - total))
    output.mul_(first_weight[..., None].to(output.dtype))
    output.addcmul_(other, second_weight[..., None].to(output.dtype))
    return output


# The packed call is a private aten op: it is checked once per device and dtype against one SDPA call per segment
# (`_packed_flash_checked`); where this torch refuses it or disagrees, segments run one SDPA call each.
_packed_flash_checked: dict[tuple[str, torch.dtype], bool] = {}


def _packed_flash_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the packed calls once on small problems against one SDPA call per segment: keys of different lengths,
    item offsets, and two-range segments beside one-range ones (zero-key sequences, the log-sum-exp merge)."""
    check = (str(device), dtype)
    if check not in _packed_flash_checked:
        _packed_flash_checked[check] = True  # so that the check's own calls go through
        layout = FrameLayout(text_tokens=5, frames=4, tokens_per_frame=70)
        generator = torch.Generator().manual_seed(0)
        query, key, value = (
            torch.randn(2, 3, layout.sequence_length, 64, generator=generator).to(device, dtype) for _ in range(3)
        )
        works = True
        try:
            with torch.no_grad():
                for pattern in ("frame-causal", BlockCausal(chunk=1, window=1, sink=1)):
                    segments = structure_segments(pattern, layout)
                    packed = _packed_flash(query, key, value, segments)
                    expected = torch.cat(
                        [_attend_segment(query, key, value, segment, None) for segment in segments], dim=2
                    )
                    works = works and packed is not None and bool((packed.float() - expected.float()).abs().max() < 0.05)
        except (RuntimeError, TypeError):  # an older torch without seqused_k, or a build without flash
            works = False
        _packed_flash_checked[check] = works
        if not works:
            import warnings

            warnings.warn(f"cogsurgeon: packed flash attention unavailable on {device}; using one SDPA call per segment")
    return _packed_flash_checked[check]


def _packed_flash(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: tuple[QuerySegment, ...]
) -> torch.Tensor | None:
    """All segments of every item and head in one varlen flash-attention call (two, merged by log-sum-exp, when some
    segments see a prefix and a window), or None when that does not apply here (CPU, fp32, autograd, flash disabled,
    non-contiguous q/k/v, causal segments)."""
    if not (PACKED_FLASH and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if not torch.backends.cuda.flash_sdp_enabled() or torch.cuda.get_device_capability(query.device) < (8, 0):
        return None
    head_dim = query.shape[-1]
    if value.shape[-1] != head_dim or head_dim % 8 or head_dim > 256 or not all(
        tensor.is_contiguous() for tensor in (query, key, value)
    ):
        return None
    batch, heads, query_length, _ = query.shape
    two_calls = any(segment.two_ranges for segment in segments)
    parts = ("ranges", "prefixes") if two_calls else ("all",)
    calls = [_packed_tensors(segments, batch * heads, query_length, key.shape[2], query.device, part) for part in parts]
    if any(call is None for call in calls) or not _packed_flash_works(query.device, query.dtype):
        return None
    results = [_flash_call(query, key, value, call) for call in calls]
    output, log_sum_exp = results[0]
    if two_calls:
        merge_by_log_sum_exp(output, log_sum_exp.view(-1), results[1][0], results[1][1].view(-1))
    return output.view(batch, heads, query_length, head_dim)


def _flash_call(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """One varlen flash-attention forward over `(B*H*L, 1, D)` views: output `(B*H*L, D)` and log-sum-exp."""
    query_offsets, key_offsets, key_lengths, max_query, max_key = call
    head_dim = query.shape[-1]
    output, log_sum_exp = torch.ops.aten._flash_attention_forward(
        query.view(-1, 1, head_dim),
        key.view(-1, 1, head_dim),
        value.view(-1, 1, head_dim),
        query_offsets,
        key_offsets,
        max_query,
        max_key,
        0.0,
        False,
        False,
        seqused_k=key_lengths,
    )[:2]
    return output.view(-1, head_dim), log_sum_exp


@lru_cache(maxsize=16)
def _packed_tensors(
    segments: tuple[QuerySegment, ...],
    batch_heads: int,
    query_length: int,
    key_length: int,
    device: torch.device,
    part: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None:
    """The descriptors on the device, made once per plan and size (every layer of a forward reuses them)."""
    descriptors = packed_sequences(segments, batch_heads, query_length, key_length, part)
    if descriptors is None or len(descriptors.key_starts) >= 65535:  # sequences are a grid dimension
        return None

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return (
        int32(descriptors.query_offsets),
        int32([*descriptors.key_starts, batch_heads * key_length]),  # starts only: lengths come from seqused_k
        int32(descriptors.key_lengths),
        descriptors.max_query,
        descriptors.max_key,
    )


def _causal_with_dense_mask(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask_rows: torch.Tensor
) -> torch.Tensor:
    """Lower-right causal AND a dense mask, in query chunks whose combined mask stays under CHUNK_MASK_ELEMENTS
    (SDPA cannot take `is_causal` together with `attn_mask`). Chunk c sees only the keys before its last query."""
    queries, keys = query.shape[2], key.shape[2]
    offset = keys - queries
    broadcast = mask_rows.shape[0] * mask_rows.shape[1]
    chunk = max(1, CHUNK_MASK_ELEMENTS // max(1, broadcast * keys))
    output = query.new_empty(*query.shape[:-1], value.shape[-1])
    for first in range(0, queries, chunk):
        last = min(queries, first + chunk)
        key_end = offset + last
        positions = torch.arange(first, last, device=query.device)[:, None] + offset
        allowed = torch.arange(key_end, device=query.device)[None, :] <= positions
        rows = mask_rows if mask_rows.shape[-2] == 1 else mask_rows[:, :, first:last]
        rows = rows[..., :key_end]
        if rows.dtype == torch.bool:
            combined = rows & allowed
        else:
            combined = torch.where(allowed, rows, torch.tensor(float("-inf"), dtype=rows.dtype, device=rows.device))
        output[:, :, first:last] = F.scaled_dot_product_attention(
            query[:, :, first:last], key[:, :, :key_end], value[:, :, :key_end], attn_mask=combined
        )
    return output
