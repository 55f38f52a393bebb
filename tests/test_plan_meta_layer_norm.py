"""`layer_norm_on_meta` makes what torch's own meta kernels make for `aten.native_layer_norm` and its backward
(shape, dtype, strides, which gradients), so that a plan books the same bytes as with torch's slower kernels."""

from __future__ import annotations

import itertools

import pytest
import torch

from cogsurgeon.inspector.plan import layer_norm_on_meta

FORWARD = torch.ops.aten.native_layer_norm.default
BACKWARD = torch.ops.aten.native_layer_norm_backward.default


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
    assert described(layer_norm_on_meta(FORWARD, forward_args, {})) == described(expected)

    grad_output = torch.empty_like(expected[0])
    for mask in itertools.product([True, False], repeat=3):
        backward_args = (grad_output, source, normalized_shape, expected[1], expected[2], weight, bias, list(mask))
        assert described(layer_norm_on_meta(BACKWARD, backward_args, {})) == described(BACKWARD(*backward_args)), mask


def test_it_leaves_a_tensor_not_on_meta_and_a_call_with_keywords_to_the_kernel():
    on_cpu = torch.zeros(2, 4)
    assert layer_norm_on_meta(FORWARD, (on_cpu, [4], None, None, 1e-5), {}) is None
    on_meta = torch.empty(2, 4, device="meta")
    assert layer_norm_on_meta(FORWARD, (on_meta, [4]), {"weight": None, "bias": None, "eps": 1e-5}) is None
