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
  Frame-causal's work is `sum_f n_f * (T + (f+1) n)`, 0.538 of full attention at 13 frames; it runs at 0.583-0.590x
  of full SDPA at the 5B shape on an H200 (0.555x at the 1.5 shape; bench/RESULTS.md). flex_attention's block mask
  is 1.11x of full on an H100 by DESIGN's anchors, and one packed varlen flash call over every (item, head, segment)
  measured 0.789x on the H200 (FlashAttention-2 is slower than cuDNN there), so neither is used.
- segments with two key ranges (a window past the sinks or the text): outside autograd, SDPA over the window slice
  merged by log-sum-exp with one SDPA call over the prefix shared by the run of such segments (no key moved or
  copied); under autograd or autocast, the two ranges concatenated for that segment. In bf16 the merge rounds the
  two partial outputs before combining them, so its error can exceed one SDPA call's (a review's H200 check: max
  0.9-1.8e-2 against 7.4e-3; bench/attention_gpu.py's accuracy level at 6 frames: equal, 0.00332).
- on CUDA outside autograd, the segments share two streams, so that output copies and kernel tails overlap.
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
            kept_bounds = (kept_before[segment.prefix_end], kept_before[segment.key_start], kept_before[segment.key_end])
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

    `keys_writable=True` lets the plan reorder `key` and `value` in place (the processor's own temporaries): with
    text padding it then moves the few kept text keys next to the video keys instead of gathering every kept key into
    new tensors (a copy of K and V, about 3% of attention time at the 5B shape). Ignored while autograd needs the
    keys."""
    keys_writable = keys_writable and not _autograd_records(key, value)
    if isinstance(plan, SegmentPlan):
        return attend_segments(query, key, value, plan.segments, plan.dense_mask)
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
        return attend_segments(query, key, value, group.segments)
    if keys_writable and group.prefix_kept_index is not None and 2 * group.prefix_end <= key.shape[2]:
        start = group.prefix_end - group.prefix_kept_index.numel()
        for keys in (key, value):
            keys[:, :, start : group.prefix_end] = keys.index_select(2, group.prefix_kept_index)
        return attend_segments(query, key[:, :, start:], value[:, :, start:], group.segments)
    return attend_segments(
        query, key.index_select(2, group.kept_index), value.index_select(2, group.kept_index), group.segments
    )


def attend_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: tuple[QuerySegment, ...],
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA per segment, written into one output tensor (a single segment returns SDPA's own output).

    A segment that sees a prefix and a window runs, outside autograd and compilation, as SDPA over its window slice
    merged by log-sum-exp with one SDPA call over the prefix shared by the run of such segments (no key is copied
    or moved); otherwise its two ranges are concatenated (autograd would not carry the log-sum-exp's gradient). On
    CUDA without autograd the segments run largest first on `SEGMENT_STREAMS` streams, so that one segment's output
    copy and its kernel's last, partly empty wave overlap the next segment's kernel."""
    if len(segments) == 1 and segments[0].query_start == 0 and segments[0].query_end == query.shape[2]:
        if not segments[0].two_ranges:
            return _attend_segment(query, key, value, segments[0], dense_mask)
    output = query.new_empty(*query.shape[:-1], value.shape[-1])
    mergeable = (
        dense_mask is None
        and not _autograd_records(query, key, value)
        and not torch.compiler.is_compiling()
        and not _autocast_enabled(query.device)  # the private ops are not autocast: SDPA casts
        and query.dtype == key.dtype == value.dtype
        and query.dtype in (MERGE_DTYPES_CUDA if query.is_cuda else MERGE_DTYPES_CPU)
    )
    merged = [segment for segment in segments if mergeable and segment.two_ranges and segment.prefix_end > 0]
    prefix_of = {}  # merged segment -> (first query of its run, the run's prefix output and log-sum-exp)
    for run in _prefix_runs(merged):
        first, prefix = run[0].query_start, run[0].prefix_end
        result = _attention_and_log_sum_exp(
            query[:, :, first : run[-1].query_end], key[:, :, :prefix], value[:, :, :prefix]
        )
        prefix_of.update({segment: (first, *result) for segment in run})
    largest_first = sorted(segments, key=lambda segment: -segment.length * segment.key_count)
    with _segment_streams(query, key, value, len(segments)) as on_stream:
        for index, segment in enumerate(largest_first):
            rows = slice(segment.query_start, segment.query_end)
            with on_stream(index):
                if segment not in prefix_of:
                    output[:, :, rows] = _attend_segment(query, key, value, segment, dense_mask)
                    continue
                first, prefix_output, prefix_log_sum_exp = prefix_of[segment]
                window = slice(segment.key_start, segment.key_end)
                own = slice(rows.start - first, rows.stop - first)
                merge_by_log_sum_exp(
                    output[:, :, rows],
                    *_attention_and_log_sum_exp(query[:, :, rows], key[:, :, window], value[:, :, window]),
                    prefix_output[:, :, own],
                    prefix_log_sum_exp[:, :, own],
                )
    return output


def _autocast_enabled(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _prefix_runs(segments: list[QuerySegment]) -> list[list[QuerySegment]]:
    """Segments in runs that follow one another in the queries and share a prefix (one SDPA call over it each)."""
    runs: list[list[QuerySegment]] = []
    for segment in segments:
        previous = runs[-1][-1] if runs else None
        if previous and previous.query_end == segment.query_start and previous.prefix_end == segment.prefix_end:
            runs[-1].append(segment)
        else:
            runs.append([segment])
    return runs


def _attention_and_log_sum_exp(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output `(B, H, Lq, D)` and each query's log-sum-exp `(B, H, Lq)` (float32, or float64 for float64
    inputs), outside autograd and autocast, over at least one key: cuDNN's attention on CUDA in fp16/bf16 while SDPA
    may use it (memory-efficient attention for fp32, or where this build or card has no cuDNN attention), the flash
    kernel on the CPU."""
    batch, heads, length = query.shape[:3]
    if not query.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[:2]
    cudnn = query.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.cudnn_sdp_enabled()
    if cudnn and _cudnn_attention_works.get(query.device, True):  # (cuDNN's op returns NaN for fp32 rather than fail)
        try:
            output, log_sum_exp = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True)[:2]
            return output, log_sum_exp.view(batch, heads, length)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):
            _cudnn_attention_works[query.device] = False
    output, log_sum_exp = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)[:2]
    return output, log_sum_exp[:, :, :length]  # its rows are padded to a multiple of 32


_cudnn_attention_works: dict[torch.device, bool] = {}
# The dtypes whose fused kernels return a log-sum-exp (cuDNN or memory-efficient attention on CUDA, flash on the CPU);
# others concatenate a segment's two key ranges instead.
MERGE_DTYPES_CUDA = (torch.float16, torch.bfloat16, torch.float32)
MERGE_DTYPES_CPU = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def merge_by_log_sum_exp(
    output: torch.Tensor,
    first: torch.Tensor,
    first_log_sum_exp: torch.Tensor,
    second: torch.Tensor,
    second_log_sum_exp: torch.Tensor,
) -> torch.Tensor:
    """Attention over the union of two disjoint key sets, each holding at least one key, from each one's output
    `(..., D)` and log-sum-exp `(...)`, written into `output` in one pass: `second + w * (first - second)` with `w`
    the first set's share of the softmax's denominator, `sigmoid(first_lse - second_lse)`."""
    weight = torch.sigmoid(first_log_sum_exp - second_log_sum_exp)[..., None].to(output.dtype)
    return torch.lerp(second, first, weight, out=output)


# CUDA streams that independent segments share out (2 measured best on an H200, bench/RESULTS.md); 1 runs every
# segment on the current stream.
SEGMENT_STREAMS = 2
_side_streams: dict[torch.device, list[torch.cuda.Stream]] = {}


@contextmanager
def _segment_streams(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, count: int
) -> Iterator[Callable[[int], AbstractContextManager]]:
    """`on_stream(index)`: the context to run the index-th of `count` independent segments in. On CUDA, outside
    autograd, compilation and graph capture, the segments share `SEGMENT_STREAMS` side streams, forked from the
    current stream on entry and joined back into it on exit (so every later use of the inputs and the output, and
    every reuse of their memory, comes after); elsewhere every segment runs on the current stream."""
    serial = (
        count < 2
        or SEGMENT_STREAMS < 2
        or not query.is_cuda
        or _autograd_records(query, key, value)
        or torch.compiler.is_compiling()
        or torch.cuda.is_current_stream_capturing()
    )
    if serial:
        yield lambda index: nullcontext()
        return
    streams = _side_streams.get(query.device)
    if streams is None or len(streams) != SEGMENT_STREAMS:
        streams = _side_streams[query.device] = [torch.cuda.Stream(query.device) for _ in range(SEGMENT_STREAMS)]
    current = torch.cuda.current_stream(query.device)
    for stream in streams:
        stream.wait_stream(current)
    try:
        yield lambda index: torch.cuda.stream(streams[index % len(streams)])
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
