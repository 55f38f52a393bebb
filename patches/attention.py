"""Attention under the patches' rules, computed without an `(L, L)` tensor on the hot path.

Every rule the patches define gives each *block of queries* at most two contiguous key ranges: a prefix `[0, p)`
(text, and for block-causal also the sink chunks) and a range `[a, e)` (the chunks the block may see). Causal lets
query q see keys `[0, q]`; block-causal (frame-causal is chunk 1) lets the queries of chunk i see
`[text ; chunks <= i]`, with a window and sinks `[text ; sink chunks] + [chunks i-w+1 .. i]`; window attention lets
chunk i see `[text] + [chunks i-w+1 .. i+w-1]`; text sees text (or everything). So attention is planned once per
forward as a list of `QuerySegment`s (a run of queries and the keys it may see) and run as SDPA per segment:

- causal: a single segment, SDPA `is_causal=True` (flash kernel skips the upper triangle: 0.454x of full
  attention at the 5B shape on an H100, bench/RESULTS.md; no mask memory).
- block-causal / frame-causal / window: one SDPA call per segment (cuDNN's fused kernel on Hopper, no mask).
  Frame-causal's work is `sum_f n_f * (T + (f+1) n)`, 0.538 of full attention at 13 frames; it runs at 0.564x of
  full SDPA at the 5B shape on an H200 (0.545x at the 1.5 shape), its launches queued as in a forward; from an idle
  GPU 0.596x (bench/RESULTS.md). flex_attention's block mask
  is 1.11x of full on an H100, and one packed varlen flash call over every (item, head, segment)
  measured 0.789x on the H200 (FlashAttention-2 is slower than cuDNN there), so neither is used.
- segments with two key ranges (a window past the sinks or the text): when the keys are the plan's to overwrite
  (`keys_writable`: the processor's own temporaries) and autograd does not record them, the prefix is saved once
  and copied in place just before each window, so that the segment's keys are one slice and it runs as one SDPA
  call; the segments run in order of their window's start, so each copy lands only on keys that no later window
  needs. Otherwise the two ranges are concatenated for that segment. (At the 5B shape on an H200 this is 0.375x of
  full SDPA for chunk 1 window 4 sink 1, work fraction 0.330, queued; 0.388x from an idle GPU; bench/RESULTS.md.)
- on CUDA outside autograd, the heads are split across two streams, each running every segment, so that one
  stream's copies and the last, partly empty wave of each kernel overlap the other stream's kernels.
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

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Callable, Iterator, Literal

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
            merged[-1] = replace(previous, query_end=segment.query_end)
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
            kept_bounds = (kept_before[bound] for bound in (segment.prefix_end, segment.key_start, segment.key_end))
            compacted.append(keys_segment(segment.query_start, segment.query_end, *kept_bounds))
            continue
        if segment.key_end != segment.query_end:
            raise ValueError("only causal segments aligned at the diagonal are compacted")
        start = segment.query_start
        while start < segment.query_end:
            end = start
            while end < segment.query_end and keep[end] == keep[start]:
                end += 1
            # a run of kept queries sees a lower-right causal prefix, a run of dropped ones every kept key before it
            compacted.append(QuerySegment(start, end, kept_before[end], causal=bool(keep[start])))
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


def normalize_attention_mask(
    mask: torch.Tensor, layout: FrameLayout, batch: int, heads: int, *, read_values: bool = True
) -> tuple[Literal["keys", "soft-keys", "dense"], torch.Tensor]:
    """Check a user mask against the accepted forms (`patches.builtin.AttentionMask`) and bring it to one of three
    shapes:

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
        f"{layout.video_tokens} video tokens): expected (B, {text}) over text keys, (B, {length}) over all keys, or "
        f"(B|1, 1|heads, {length}, {length})"
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
    return SegmentPlan(segments, normalized.to(device, None if normalized.dtype == torch.bool else dtype))


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
        items = None if len(unique_rows) == 1 else tuple((inverse == group_number).nonzero().flatten().tolist())
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

    `keys_writable=True` lets the plan overwrite `key` and `value` (the processor's own temporaries; afterwards they
    hold no meaning): with text padding it then moves the few kept text keys next to the video keys instead of
    gathering every kept key into new tensors (a copy of K and V, about 3% of attention time at the 5B shape), and a
    window past a prefix gets the prefix copied just before it instead of concatenated with it. Ignored while
    autograd needs the keys."""
    keys_writable = keys_writable and not _autograd_records(key, value)
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
        picked = [tensor.index_select(0, index) for tensor in (query, key, value)]  # copies: ours to reorder
        output.index_copy_(0, index, _attend_group(group, *picked, not _autograd_records(key, value)))
    return output


def _autograd_records(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _attend_group(
    group: KeptKeyGroup, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys_writable: bool
) -> torch.Tensor:
    """The kept keys, in order, as one tensor: a slice after moving the prefix's kept keys up (when allowed and the
    prefix is at most half the sequence), else a gather."""
    if group.kept_index is None:
        return attend_segments(query, key, value, group.segments, keys_writable=keys_writable)
    if keys_writable and group.prefix_kept_index is not None and 2 * group.prefix_end <= key.shape[2]:
        start = group.prefix_end - group.prefix_kept_index.numel()
        for keys in (key, value):
            keys[:, :, start : group.prefix_end] = keys.index_select(2, group.prefix_kept_index)
        return attend_segments(query, key[:, :, start:], value[:, :, start:], group.segments, keys_writable=True)
    kept_key, kept_value = (keys.index_select(2, group.kept_index) for keys in (key, value))  # copies: ours to write
    return attend_segments(
        query, kept_key, kept_value, group.segments, keys_writable=not _autograd_records(key, value)
    )


def attend_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: tuple[QuerySegment, ...],
    dense_mask: torch.Tensor | None = None,
    *,
    keys_writable: bool = False,
) -> torch.Tensor:
    """SDPA per segment, written into one output tensor (a single segment returns SDPA's own output).

    A segment that sees a prefix and a window, when `keys_writable` and autograd does not record q/k/v, has the
    prefix copied in place just before its window, so that its keys are one slice (`_slid_segment`); otherwise its two
    ranges are concatenated. On CUDA outside autograd the heads are split across `HEAD_STREAMS` streams, each running
    every segment, so that one stream's copies and kernel tails overlap the other's kernels."""
    if len(segments) == 1 and segments[0].query_start == 0 and segments[0].query_end == query.shape[2]:
        if not segments[0].two_ranges:
            return _attend_segment(query, key, value, segments[0], dense_mask)
    output = torch.empty_like(query) if value.shape[-1] == query.shape[-1] else query.new_empty(
        *query.shape[:-1], value.shape[-1]
    )
    slide = (
        keys_writable
        and dense_mask is None
        and not _autograd_records(query, key, value)
        and not torch.compiler.is_compiling()
    )
    # In order of window start, a prefix copied before one window only overwrites keys that no later window needs.
    slid = sorted([segment for segment in segments if slide and segment.two_ranges], key=lambda s: s.key_start)
    # The largest first, so that the GPU starts on long kernels while the rest are issued.
    direct = sorted(
        [segment for segment in segments if not (slide and segment.two_ranges)], key=lambda s: -s.length * s.key_count
    )
    prefix_end = max([0] + [segment.prefix_end for segment in slid])
    with _head_streams(query, key, value, dense_mask) as groups:
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for segment, slides in [(segment, False) for segment in direct] + [(segment, True) for segment in slid]:
            rows = slice(segment.query_start, segment.query_end)
            for group, (heads, on_stream) in enumerate(groups):
                with on_stream():
                    group_query, group_key, group_value = query[:, heads], key[:, heads], value[:, heads]
                    if slides and group not in saved:  # the prefix as it was, before any window's copy lands on it
                        saved[group] = group_key[:, :, :prefix_end].clone(), group_value[:, :, :prefix_end].clone()
                    # The segment's output goes straight into the copy, so it is freed before the next one is made.
                    _copy_rows(
                        output[:, heads, rows],
                        _slid_segment(segment, group_query, group_key, group_value, *saved[group])
                        if slides
                        else _attend_segment(group_query, group_key, group_value, segment, dense_mask),
                    )
    return output


def _slid_segment(
    segment: QuerySegment,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    saved_key: torch.Tensor,
    saved_value: torch.Tensor,
) -> torch.Tensor:
    """SDPA for a segment that sees a prefix and a window, after copying the saved prefix `[0, prefix_end)` into the
    keys just before its window, so that its keys are the one slice `[key_start - prefix_end, key_end)`."""
    start = segment.key_start - segment.prefix_end
    for keys, saved in ((key, saved_key), (value, saved_value)):
        _copy_rows(keys[:, :, start : segment.key_start], saved[:, :, : segment.prefix_end])
    rows, keys = slice(segment.query_start, segment.query_end), slice(start, segment.key_end)
    return F.scaled_dot_product_attention(query[:, :, rows], key[:, :, keys], value[:, :, keys])


def _copy_rows(destination: torch.Tensor, source: torch.Tensor) -> None:
    """`destination.copy_(source)`, moved as 8-byte words where the dtypes and shapes match and the last dimension
    allows (outside autograd): the element-wise copy of a strided bf16 slice runs at about half the speed otherwise
    (an H200 profile, bench/RESULTS.md)."""
    same = source.dtype == destination.dtype and source.shape == destination.shape
    if same and not source.requires_grad and not destination.requires_grad and not torch.compiler.is_compiling():
        try:
            destination, source = destination.view(torch.int64), source.view(torch.int64)
        except RuntimeError:  # rows not a whole number of aligned words: copied element by element
            pass
    destination.copy_(source)


def head_slices(heads: int, count: int) -> list[slice]:
    """`heads` split into `count` runs as even as they go (each one at least one head when `count <= heads`)."""
    bounds = [heads * group // count for group in range(count + 1)]
    return [slice(bounds[group], bounds[group + 1]) for group in range(count)]


# CUDA streams the heads are split across (2 measured best on an H200, bench/RESULTS.md); 1 runs on the current stream.
HEAD_STREAMS = 2
_side_streams: dict[torch.device, list[torch.cuda.Stream]] = {}


@contextmanager
def _head_streams(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dense_mask: torch.Tensor | None
) -> Iterator[list[tuple[slice, Callable[[], AbstractContextManager]]]]:
    """`(heads, on_stream)` per group of heads: on CUDA, outside autograd, compilation and graph capture, and without a
    dense mask, `HEAD_STREAMS` groups on side streams forked from the current stream on entry and joined back into
    it on exit (so every later use of the inputs and the output, and every reuse of their memory, comes after);
    elsewhere all heads on the current stream."""
    heads = query.shape[1]
    serial = (
        min(HEAD_STREAMS, heads) < 2
        or not query.is_cuda
        or dense_mask is not None
        or _autograd_records(query, key, value)
        or torch.compiler.is_compiling()
        or torch.cuda.is_current_stream_capturing()
    )
    if serial:
        yield [(slice(None), nullcontext)]
        return
    count = min(HEAD_STREAMS, heads)
    streams = _side_streams.get(query.device)
    if streams is None or len(streams) != count:
        streams = _side_streams[query.device] = [torch.cuda.Stream(query.device) for _ in range(count)]
    current = torch.cuda.current_stream(query.device)
    for stream in streams:
        stream.wait_stream(current)
    try:
        yield [
            (heads, lambda stream=stream: torch.cuda.stream(stream))
            for heads, stream in zip(head_slices(query.shape[1], count), streams)
        ]
    finally:
        for stream in streams:
            current.wait_stream(stream)


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
        segment_key, segment_value = (torch.cat([keys[:, :, a:b] for a, b in ranges], dim=2) for keys in (key, value))
        if rows is not None:
            rows = torch.cat([rows[..., a:b] for a, b in ranges], dim=-1)
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, attn_mask=rows)
    segment_key, segment_value = key[:, :, :key_end], value[:, :, :key_end]
    rows = None if rows is None else rows[..., :key_end]
    if not segment.causal:
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, attn_mask=rows)
    if rows is not None:
        return _causal_with_dense_mask(segment_query, segment_key, segment_value, rows)
    if segment.length == key_end:
        return F.scaled_dot_product_attention(segment_query, segment_key, segment_value, is_causal=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(
        segment_query, segment_key, segment_value, attn_mask=causal_lower_right(segment.length, key_end)
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
        rows = (mask_rows if mask_rows.shape[-2] == 1 else mask_rows[:, :, first:last])[..., :key_end]
        combined = rows & allowed if rows.dtype == torch.bool else torch.where(allowed, rows, float("-inf"))
        output[:, :, first:last] = F.scaled_dot_product_attention(
            query[:, :, first:last], key[:, :, :key_end], value[:, :, :key_end], attn_mask=combined
        )
    return output


__all__ = [
    "AttentionPlan", "HEAD_STREAMS", "KeptKeyPlan", "QuerySegment", "SegmentPlan", "attend_segments", "chunk_bounds",
    "compact_segments", "head_slices", "normalize_attention_mask", "plan_attention", "run_plan", "structure_segments",
]
