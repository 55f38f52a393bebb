"""`norm_on_meta` makes what torch's own meta kernels make for `aten.native_layer_norm`, its backward and
`aten.native_group_norm` (shape, dtype, strides, which gradients), so that a plan books the same bytes as with
torch's slower kernels."""

from __future__ import annotations

import itertools

import pytest
import torch

from cogsurgeon.inspector.plan import norm_on_meta

FORWARD = torch.ops.aten.native_layer_norm.default
BACKWARD = torch.ops.aten.native_layer_norm_backward.default
GROUP_NORM = torch.ops.aten.native_group_norm.default


def described(result):
    return [None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.stride(), tensor.device.type)
            for tensor in result]


def inputs(shape, dtype, layout):
    source = torch.empty(shape, dtype=dtype, device="meta")
    return source.transpose(0, 1) if layout == "transposed" else source


CASES = list(itertools.product(
    [(2, 17776, 3072), (3, 5, 4, 8)],
    [torch.bfloat16, torch.float16, torch.float32, torch.float64],
    ["contiguous", "transposed"],
    [1, 2],
    [True, False],
))


@pytest.mark.parametrize(("shape", "dtype", "layout", "normalized_dims", "affine"), CASES)
def test_forward_and_backward_are_torchs_own(shape, dtype, layout, normalized_dims, affine):
    source = inputs(shape, dtype, layout)
    normalized_shape = list(source.shape[-normalized_dims:])
    weight = torch.empty(normalized_shape, dtype=dtype, device="meta") if affine else None
    bias = torch.empty(normalized_shape, dtype=dtype, device="meta") if affine else None
    forward_args = (source, normalized_shape, weight, bias, 1e-5)
    expected = FORWARD(*forward_args)
    assert described(norm_on_meta(FORWARD, forward_args, {})) == described(expected)

    grad_output = torch.empty_like(expected[0])
    for mask in itertools.product([True, False], repeat=3):
        backward_args = (grad_output, source, normalized_shape, expected[1], expected[2], weight, bias, list(mask))
        assert described(norm_on_meta(BACKWARD, backward_args, {})) == described(BACKWARD(*backward_args)), mask


def test_it_leaves_a_tensor_not_on_meta_and_a_call_with_keywords_to_the_kernel():
    on_cpu = torch.zeros(2, 4)
    assert norm_on_meta(FORWARD, (on_cpu, [4], None, None, 1e-5), {}) is None
    on_meta = torch.empty(2, 4, device="meta")
    assert norm_on_meta(FORWARD, (on_meta, [4]), {"weight": None, "bias": None, "eps": 1e-5}) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last_3d", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_is_torchs_own(dtype, layout, affine):
    shape = (2, 8, 3, 6, 10) if layout != "channels_last" else (2, 8, 6, 10)
    source = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "transposed":
        source = source.transpose(2, 3)
    elif layout.startswith("channels_last"):
        source = source.to(memory_format=getattr(torch, layout))
    weight = torch.empty(8, dtype=dtype, device="meta") if affine else None
    per_channel = source[0, 0].numel()
    args = (source, weight, weight, 2, 8, per_channel, 4, 1e-6)
    assert described(norm_on_meta(GROUP_NORM, args, {})) == described(GROUP_NORM(*args))


def test_only_in_place_foreach_updates_of_meta_tensors_are_skipped():
    from cogsurgeon.inspector.plan import is_meta_foreach_update

    meta = [torch.empty(3, 4, device="meta") for _ in range(2)]
    assert is_meta_foreach_update(torch.ops.aten._foreach_mul_.Scalar, (meta, 0.9), {})
    assert is_meta_foreach_update(torch.ops.aten._foreach_addcdiv_.ScalarList, (meta, meta, meta, [1.0, 2.0]), {})
    assert not is_meta_foreach_update(torch.ops.aten._foreach_sqrt.default, (meta,), {})  # allocates its results
    assert not is_meta_foreach_update(torch.ops.aten.mul_.Tensor, (meta[0], meta[1]), {})
    steps = [torch.zeros(()) for _ in range(2)]  # Adam's step counts live on the CPU and must really count
    assert not is_meta_foreach_update(torch.ops.aten._foreach_add_.Scalar, (steps, 1), {})
    assert not is_meta_foreach_update(torch.ops.aten._foreach_add_.List, (meta, [meta[0], torch.zeros(3, 4)]), {})


@pytest.mark.parametrize("settings", [dict(train="full"), dict(train="full", zero=2, gpus=4),
                                      dict(train="lora:4", mixed_precision="fp16", dtype="float16", lora_dtype="fp32")])
def test_a_training_plan_is_the_same_with_torchs_own_foreach_kernels(monkeypatch, settings):
    from dataclasses import asdict

    import cogsurgeon.inspector.plan as plan

    fast = asdict(plan.plan_memory("tiny", **settings))
    monkeypatch.setattr(plan, "is_meta_foreach_update", lambda *args: False)
    assert asdict(plan.plan_memory("tiny", **settings)) == fast
