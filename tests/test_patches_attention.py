"""The attention planning of `patches.attention` against explicit-mask reference attention, on random tensors:
every rule, every accepted mask form, their compositions, and the fallbacks (many runs, chunked dense masks)."""

from __future__ import annotations

import pytest
import torch

from cogsurgeon.patches import attention
from cogsurgeon.patches.attention import (
    KeptKeyPlan,
    QuerySegment,
    SegmentPlan,
    compact_segments,
    normalize_attention_mask,
    plan_attention,
    run_plan,
    structure_segments,
)
from cogsurgeon.patches.errors import AttentionMaskError
from cogsurgeon.inspector.geometry import FrameLayout, layout_of_call
from cogsurgeon.patches.reference import (
    causal_mask,
    combine_masks,
    frame_causal_mask,
    frame_of_token,
    full_attention_mask,
    reference_attention,
)

LAYOUT = FrameLayout(text_tokens=5, frames=3, tokens_per_frame=4)  # L = 17
BATCH, HEADS, HEAD_DIM = 3, 2, 8
RULES = {None: None, "causal": causal_mask, "frame-causal": frame_causal_mask}


def qkv(seed: int = 0, length: int = LAYOUT.sequence_length):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(3)]


def masks(layout: FrameLayout = LAYOUT) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text, length = layout.text_tokens, layout.sequence_length
    text_keep = torch.ones(BATCH, text, dtype=torch.bool)
    text_keep[0, 3:] = False  # right padding
    text_keep[1, :2] = False  # left padding: under causal rules, query 0 sees no key
    keys = torch.rand(BATCH, length, generator=generator) > 0.4
    return {
        "text bool": text_keep,
        "text bool batch 1": text_keep[:1],
        "text additive -inf": torch.zeros(BATCH, text).masked_fill(~text_keep, float("-inf")),
        "text additive -1e4": torch.zeros(BATCH, text).masked_fill(~text_keep, -1.0e4),
        "text all kept": torch.ones(BATCH, text, dtype=torch.bool),
        "keys bool": keys,
        "keys bool same rows": keys[:1].expand(BATCH, -1),
        "keys additive bias": torch.randn(BATCH, length, generator=generator, dtype=torch.float64),
        "full bool": torch.rand(BATCH, 1, length, length, generator=generator) > 0.5,
        "full bool batch 1": torch.rand(1, 1, length, length, generator=generator) > 0.5,
        "full additive per head": torch.randn(1, HEADS, length, length, generator=generator, dtype=torch.float64),
    }


def expected_output(structure, user_mask, layout=LAYOUT, seed=0):
    query, key, value = qkv(seed, layout.sequence_length)
    rule = RULES[structure](layout) if structure else None
    user = full_attention_mask(user_mask, layout) if user_mask is not None else None
    return reference_attention(query, key, value, combine_masks(rule, user))


def planned_output(structure, user_mask, layout=LAYOUT, seed=0, keys_writable=False):
    query, key, value = qkv(seed, layout.sequence_length)
    plan = plan_attention(
        structure, layout, user_mask, batch=BATCH, heads=HEADS, device=query.device, dtype=query.dtype
    )
    return run_plan(plan, query, key, value, keys_writable=keys_writable), plan


def test_frame_of_token_and_rule_masks_follow_the_definitions():
    layout = FrameLayout(text_tokens=2, frames=2, tokens_per_frame=3)
    assert frame_of_token(layout).tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    frame_causal = frame_causal_mask(layout)
    assert frame_causal[0].tolist() == [True, True] + [False] * 6  # text sees text only
    assert frame_causal[2].tolist() == [True] * 5 + [False] * 3  # frame 0 sees text and all of frame 0
    assert frame_causal[7].all()  # the last frame sees everything
    assert causal_mask(layout)[3].tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("structure", [None, "causal", "frame-causal"])
def test_rules_without_mask_match_the_reference(structure):
    actual, plan = planned_output(structure, None)
    torch.testing.assert_close(actual, expected_output(structure, None), rtol=0, atol=1e-12)
    assert isinstance(plan, SegmentPlan) and plan.dense_mask is None  # no mask tensor at all


@pytest.mark.parametrize("keys_writable", [False, True], ids=["gather", "reorder-in-place"])
@pytest.mark.parametrize("structure", [None, "causal", "frame-causal"])
@pytest.mark.parametrize("form", list(masks()))
def test_every_mask_form_composed_with_every_rule_matches_the_reference(structure, form, keys_writable):
    user_mask = masks()[form]
    actual, _ = planned_output(structure, user_mask, keys_writable=keys_writable)
    torch.testing.assert_close(actual, expected_output(structure, user_mask), rtol=0, atol=1e-10)


def test_text_padding_reorders_the_kept_keys_in_place_instead_of_copying_them():
    query, key, value = qkv()
    original_video_keys = key[:, :, LAYOUT.text_tokens :].clone()
    plan = plan_attention(None, LAYOUT, masks()["text bool"], batch=BATCH, heads=HEADS, device=key.device, dtype=key.dtype)
    run_plan(plan, query, key, value, keys_writable=True)
    assert torch.equal(key[0, :, 2:5], qkv()[1][0, :, 0:3])  # item 0 keeps text 0..2: moved up against the video
    assert torch.equal(key[:, :, LAYOUT.text_tokens :], original_video_keys)  # the video keys stay where they are


def test_key_masks_drop_keys_instead_of_building_a_mask():
    _, plan = planned_output("frame-causal", masks()["text bool"])
    assert isinstance(plan, KeptKeyPlan)
    groups = {group.items: group for group in plan.groups}  # one group per distinct mask row
    assert sorted(groups) == [(0,), (1,), (2,)]
    assert groups[(2,)].kept_index is None  # item 2 keeps every key: nothing gathered
    assert groups[(0,)].kept_index.tolist() == [0, 1, 2, *range(5, 17)]
    _, plan = planned_output(None, masks()["keys bool same rows"])
    assert isinstance(plan, KeptKeyPlan) and len(plan.groups) == 1 and plan.groups[0].items is None


def test_finite_padding_values_drop_keys_only_while_every_query_keeps_one():
    soft = masks()["text additive -1e4"]
    assert isinstance(planned_output("frame-causal", soft)[1], KeptKeyPlan)
    # causal + left padding: query 0 sees only key 0, which has -1e4 added, so it must still attend to it
    assert isinstance(planned_output("causal", soft)[1], SegmentPlan)


def test_a_general_additive_key_bias_stays_a_broadcast_row_not_a_square():
    _, plan = planned_output("frame-causal", masks()["keys additive bias"])
    assert isinstance(plan, SegmentPlan) and tuple(plan.dense_mask.shape) == (BATCH, 1, 1, LAYOUT.sequence_length)


def test_many_causal_runs_fall_back_to_dense_masks(monkeypatch):
    monkeypatch.setattr(attention, "MAX_SEGMENTS", 2)
    user_mask = masks()["keys bool"]
    actual, plan = planned_output("causal", user_mask)
    assert isinstance(plan, SegmentPlan) and plan.dense_mask is not None
    torch.testing.assert_close(actual, expected_output("causal", user_mask), rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["full bool", "full additive per head", "keys additive bias"])
def test_causal_with_a_dense_mask_in_small_chunks(monkeypatch, form):
    monkeypatch.setattr(attention, "CHUNK_MASK_ELEMENTS", 3 * LAYOUT.sequence_length)  # a few rows per chunk
    user_mask = masks()[form]
    actual, _ = planned_output("causal", user_mask)
    torch.testing.assert_close(actual, expected_output("causal", user_mask), rtol=0, atol=1e-10)


def test_frame_causal_segments_are_key_prefixes():
    segments = structure_segments("frame-causal", LAYOUT)
    assert segments[0] == QuerySegment(0, 5, 5)
    assert segments[1:] == (QuerySegment(5, 9, 9), QuerySegment(9, 13, 13), QuerySegment(13, 17, 17))


def test_compacting_a_causal_segment_splits_kept_and_dropped_runs():
    keep = [False, True, True, False, False, True]
    compacted = compact_segments((QuerySegment(0, 6, 6, causal=True),), keep)
    assert compacted == (
        QuerySegment(0, 1, 0),  # query 0 sees no kept key
        QuerySegment(1, 3, 2, causal=True),
        QuerySegment(3, 5, 2),  # dropped positions see every kept key before them
        QuerySegment(5, 6, 3, causal=True),
    )


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(BATCH, 7, dtype=torch.bool), "does not fit"),
        (torch.ones(2, LAYOUT.text_tokens, dtype=torch.bool), "does not fit"),
        (torch.ones(BATCH, 3, 17, 17, dtype=torch.bool), "does not fit"),
        (torch.ones(BATCH, LAYOUT.text_tokens, dtype=torch.long), "dtype torch.int64"),
        ([[True]], "must be a torch.Tensor"),
    ],
)
def test_masks_of_other_shapes_or_dtypes_are_refused_clearly(mask, message):
    with pytest.raises(AttentionMaskError, match=message):
        normalize_attention_mask(mask, LAYOUT, BATCH, HEADS)


def test_layout_of_call_checks_the_frame_split():
    assert layout_of_call(5, 12, 4) == LAYOUT
    with pytest.raises(Exception, match="do not split into frames"):
        layout_of_call(5, 13, 4)
