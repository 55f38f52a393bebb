"""Block-causal (with windows and sinks) and window attention in `patches.attention`, against masks written from the
definitions in `patches.reference`: fixed cases, then property-based over random layouts, parameters and key masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cogsurgeon.patches.attention import (
    BlockCausal,
    QuerySegment,
    WindowAttention,
    attend_segments,
    chunk_bounds,
    plan_attention,
    run_plan,
    structure_segments,
)
from cogsurgeon.patches.errors import PatchParameterError
from cogsurgeon.inspector.geometry import FrameLayout
from cogsurgeon.patches.reference import (
    block_causal_mask,
    chunk_of_token,
    combine_masks,
    frame_causal_mask,
    full_attention_mask,
    reference_attention,
    window_attention_mask,
)

HEADS, HEAD_DIM = 2, 4


def reference_mask_of(pattern, layout: FrameLayout) -> torch.Tensor:
    if isinstance(pattern, BlockCausal):
        return block_causal_mask(layout, pattern.chunk, pattern.window, pattern.sink)
    return window_attention_mask(layout, pattern.window, pattern.chunk, pattern.text_sees_video)


def random_qkv(batch: int, length: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator, dtype=dtype) for _ in range(3)]


def check_against_reference(
    pattern, layout, user_mask=None, batch=2, keys_writable=False, seed=0, atol=1e-10, autograd=False
):
    """`autograd=True`: q/k/v require grad, so windows past a prefix concatenate both ranges (no prefix copied)."""
    query, key, value = random_qkv(batch, layout.sequence_length, seed)
    user = full_attention_mask(user_mask, layout) if user_mask is not None else None
    expected = reference_attention(query, key, value, combine_masks(reference_mask_of(pattern, layout), user))
    plan = plan_attention(pattern, layout, user_mask, batch=batch, heads=HEADS, device=query.device, dtype=query.dtype)
    given = [tensor.clone().requires_grad_(autograd) for tensor in (query, key, value)]
    actual = run_plan(plan, *given, keys_writable=keys_writable)
    torch.testing.assert_close(actual.detach(), expected, rtol=0, atol=atol)


# -- the definitions ---------------------------------------------------------------------------------------------


def test_chunks_follow_the_definition():
    layout = FrameLayout(text_tokens=2, frames=5, tokens_per_frame=2)
    assert chunk_of_token(layout, 2).tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert chunk_bounds(layout, 2) == [2, 6, 10, 12]  # the last chunk holds one frame
    assert chunk_bounds(layout, 5) == [2, 12]


def test_frame_causal_is_block_causal_with_chunks_of_one_frame():
    layout = FrameLayout(text_tokens=3, frames=4, tokens_per_frame=2)
    assert torch.equal(block_causal_mask(layout, chunk=1), frame_causal_mask(layout))
    assert structure_segments("frame-causal", layout) == structure_segments(BlockCausal(chunk=1), layout)


def test_window_and_sink_by_hand():
    layout = FrameLayout(text_tokens=1, frames=6, tokens_per_frame=1)  # token 1 + f is frame f
    mask = block_causal_mask(layout, chunk=1, window=2, sink=1)
    assert mask[1 + 5].tolist() == [True, True, False, False, False, True, True]  # text, sink 0, frames 4 and 5
    assert mask[0].tolist() == [True] + [False] * 6  # text sees text only
    local = window_attention_mask(layout, window=2)
    assert local[1 + 3].tolist() == [True, False, False, True, True, True, False]  # text, frames 2..4
    assert window_attention_mask(layout, window=2, text_sees_video=True)[0].all()


def test_segments_are_a_prefix_and_a_window():
    layout = FrameLayout(text_tokens=2, frames=6, tokens_per_frame=3)  # frame f starts at 2 + 3f
    segments = structure_segments(BlockCausal(chunk=2, window=1, sink=1), layout)
    assert segments == (
        QuerySegment(0, 2, 2),
        QuerySegment(2, 8, 8),  # chunk 0 sees text and itself
        QuerySegment(8, 14, 14),  # chunk 1: sink 0 and window [1] touch: one prefix
        QuerySegment(14, 20, 20, key_start=14, prefix_end=8),  # chunk 2: [text ; sink 0] + [chunk 2]
    )
    local = structure_segments(WindowAttention(window=2), FrameLayout(text_tokens=2, frames=3, tokens_per_frame=1))
    assert local == (
        QuerySegment(0, 2, 2),
        QuerySegment(2, 3, 4),
        QuerySegment(3, 4, 5),
        QuerySegment(4, 5, 5, key_start=3, prefix_end=2),
    )


@pytest.mark.parametrize(
    "make, parameter",
    [
        (lambda: BlockCausal(chunk=0), "chunk"),
        (lambda: BlockCausal(chunk=1.5), "chunk"),
        (lambda: BlockCausal(window=0), "window"),
        (lambda: BlockCausal(window=2, sink=3), "sink"),
        (lambda: BlockCausal(sink=-1), "sink"),
        (lambda: WindowAttention(window=0), "window"),
        (lambda: WindowAttention(window=2, chunk=True), "chunk"),
        (lambda: WindowAttention(window=2, text_sees_video="yes"), "text_sees_video"),
    ],
)
def test_invalid_parameters_name_the_parameter(make, parameter):
    with pytest.raises(PatchParameterError, match=parameter) as caught:
        make()
    assert caught.value.parameter == parameter


# -- the issue's grid, every mask form of the attention-mask patch, both key-handling paths ------------------------

GRID = [
    BlockCausal(chunk, window, sink)
    for chunk in (1, 2, 3)
    for window in (None, 1, 3)
    for sink in (0, 1)
] + [WindowAttention(window, chunk, text_sees) for window in (1, 3) for chunk in (1, 2) for text_sees in (False, True)]


@pytest.mark.parametrize(
    "keys_writable, autograd",
    [(False, False), (True, False), (False, True)],
    ids=["concatenate-keys-not-writable", "prefix-copied-keys-writable", "concatenate-under-autograd"],
)
@pytest.mark.parametrize("pattern", GRID, ids=repr)
def test_every_pattern_of_the_grid_matches_its_reference_mask(pattern, keys_writable, autograd):
    layout = FrameLayout(text_tokens=3, frames=7, tokens_per_frame=2)
    check_against_reference(pattern, layout, keys_writable=keys_writable, autograd=autograd)
    text_keep = torch.ones(2, 3, dtype=torch.bool)
    text_keep[0, 1:] = False
    check_against_reference(pattern, layout, text_keep, keys_writable=keys_writable, autograd=autograd)


def concatenated_attention(query, key, value, segments):
    """Every segment with its ranges concatenated: what runs while autograd records q/k/v."""
    given = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    return attend_segments(*given, segments).detach()


def test_a_window_past_a_prefix_gets_the_prefix_copied_before_it_only_when_the_keys_are_writable():
    layout = FrameLayout(text_tokens=2, frames=6, tokens_per_frame=2)
    segments = structure_segments(BlockCausal(chunk=1, window=2, sink=1), layout)
    assert [segment.two_ranges for segment in segments].count(True) == 3  # frames 3, 4, 5
    query, key, value = random_qkv(1, layout.sequence_length, 0)
    untouched = key.clone(), value.clone()
    expected = concatenated_attention(query, key, value, segments)
    left_alone = attend_segments(query, key, value, segments)
    assert torch.equal(key, untouched[0]) and torch.equal(value, untouched[1])
    slid = attend_segments(query, key, value, segments, keys_writable=True)
    # the prefix [text ; frame 0] landed before the windows of frames 3, 4 and 5; the first copy overwrote part of the
    # prefix itself (tokens 2..5), which is why the prefix is saved before any copy
    assert not torch.equal(key[:, :, 2:4], untouched[0][:, :, 2:4])
    torch.testing.assert_close(left_alone, expected, rtol=0, atol=0)
    torch.testing.assert_close(slid, expected, rtol=0, atol=1e-12)


def test_run_plan_leaves_keys_and_values_alone_unless_told_they_are_writable():
    layout = FrameLayout(text_tokens=3, frames=7, tokens_per_frame=2)
    for pattern in (BlockCausal(chunk=1, window=3, sink=1), WindowAttention(window=2)):
        plan = plan_attention(pattern, layout, None, batch=2, heads=HEADS, device="cpu", dtype=torch.float64)
        query, key, value = random_qkv(2, layout.sequence_length, 3)
        untouched = key.clone(), value.clone()
        run_plan(plan, query, key, value)
        assert torch.equal(key, untouched[0]) and torch.equal(value, untouched[1])


@pytest.mark.parametrize("heads, groups", [(2, 2), (3, 2), (5, 3)])
def test_heads_split_into_groups_each_with_its_own_saved_prefix_match_the_reference(monkeypatch, heads, groups):
    """What the CUDA streams run, on the CPU: the heads in groups, one after the other, each group copying its own
    saved prefix before each window (a group given another group's prefix gives wrong keys)."""
    from contextlib import contextmanager, nullcontext

    from cogsurgeon.patches import attention

    @contextmanager
    def groups_in_turn(query, key, value, dense_mask):
        yield [(heads_slice, nullcontext) for heads_slice in attention.head_slices(query.shape[1], groups)]

    monkeypatch.setattr(attention, "_head_streams", groups_in_turn)
    layout = FrameLayout(text_tokens=3, frames=9, tokens_per_frame=2)
    for pattern in (BlockCausal(chunk=1, window=3, sink=1), WindowAttention(window=2), BlockCausal(chunk=2, window=2)):
        generator = torch.Generator().manual_seed(heads)
        query, key, value = (torch.randn(2, heads, layout.sequence_length, HEAD_DIM, generator=generator,
                                         dtype=torch.float64) for _ in range(3))
        expected = reference_attention(query, key, value, reference_mask_of(pattern, layout))
        plan = plan_attention(pattern, layout, None, batch=2, heads=heads, device="cpu", dtype=torch.float64)
        actual = run_plan(plan, query, key, value, keys_writable=True)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_head_slices_cover_every_head_once():
    from cogsurgeon.patches.attention import head_slices

    for heads in range(1, 9):
        for count in range(1, heads + 1):
            slices = head_slices(heads, count)
            assert [index for part in slices for index in range(heads)[part]] == list(range(heads))
            assert all(part.stop > part.start for part in slices)


def test_wide_row_copies_fall_back_when_the_rows_are_not_whole_words():
    from cogsurgeon.patches.attention import _copy_rows

    source = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)  # rows of 20 bytes: not whole 8-byte words
    destination = torch.zeros(2, 6, 5)
    _copy_rows(destination[:, 1:4], source)
    assert torch.equal(destination[:, 1:4], source) and not destination[:, 0].any() and not destination[:, 4:].any()
    wide = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    into = torch.zeros(2, 9, 8, dtype=torch.bfloat16)
    _copy_rows(into[:, 2:6], wide)
    assert torch.equal(into[:, 2:6], wide) and not into[:, :2].any() and not into[:, 6:].any()
    converted = torch.zeros(2, 9, 8, dtype=torch.float32)  # another dtype: converted, never reinterpreted as words
    _copy_rows(converted[:, 2:6], wide)
    assert torch.equal(converted[:, 2:6], wide.float())
    with pytest.raises(RuntimeError):  # shapes copy_ refuses are refused, not broadcast as words
        _copy_rows(torch.zeros(3, 8, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16))


# -- properties --------------------------------------------------------------------------------------------------

layouts = st.builds(
    FrameLayout,
    text_tokens=st.integers(0, 5),
    frames=st.integers(1, 8),
    tokens_per_frame=st.integers(1, 3),
)


@st.composite
def patterns(draw):
    chunk = draw(st.integers(1, 4))
    if draw(st.booleans()):
        window = draw(st.none() | st.integers(1, 5))
        sink = draw(st.integers(0, window if window is not None else 3))
        return BlockCausal(chunk, window, sink)
    return WindowAttention(draw(st.integers(1, 5)), chunk, draw(st.booleans()))


@st.composite
def key_masks(draw, layout: FrameLayout, batch: int):
    kind = draw(st.sampled_from(["none", "text", "keys"]))
    if kind == "none":
        return None
    width = layout.text_tokens if kind == "text" else layout.sequence_length
    if width == 0:
        return None
    bits = draw(st.lists(st.booleans(), min_size=batch * width, max_size=batch * width))
    return torch.tensor(bits).view(batch, width)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layout=layouts, pattern=patterns(), keys_writable=st.booleans(), autograd=st.booleans())
def test_property_planned_attention_equals_the_reference_mask(data, layout, pattern, keys_writable, autograd):
    user_mask = data.draw(key_masks(layout, 2))
    check_against_reference(pattern, layout, user_mask, keys_writable=keys_writable, autograd=autograd)


@settings(max_examples=60, deadline=None)
@given(layout=layouts, pattern=patterns())
def test_property_fp32_within_the_issue_tolerance(layout, pattern):
    query, key, value = random_qkv(2, layout.sequence_length, 1, dtype=torch.float32)
    expected = reference_attention(query, key, value, reference_mask_of(pattern, layout))
    plan = plan_attention(pattern, layout, None, batch=2, heads=HEADS, device=query.device, dtype=query.dtype)
    assert (run_plan(plan, query, key, value, keys_writable=True) - expected).abs().max() <= 1e-4


def test_under_autocast_with_mixed_dtypes_a_window_past_a_prefix_runs_as_sdpa_would():
    """Autocast runs CogVideoX's norm_q/norm_k in fp32 while V comes out in bf16: SDPA casts the three, and the
    copied prefix keeps each tensor's own dtype."""
    layout = FrameLayout(text_tokens=4, frames=7, tokens_per_frame=8)
    segments = structure_segments(BlockCausal(chunk=1, window=2, sink=1), layout)
    query, key, value = random_qkv(1, layout.sequence_length, 0, dtype=torch.float32)
    value = value.bfloat16()
    expected = concatenated_attention(query.bfloat16(), key.bfloat16(), value, segments)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = attend_segments(query, key, value, segments, keys_writable=True)
    torch.testing.assert_close(output.float(), expected.float(), atol=2e-2, rtol=0)
