"""`attention-mask` with a real mask under `torch.compile(fullgraph=True)` (issue 16, item 9a): inside a compiled
graph the mask is not read on the host (it goes to SDPA as a key mask), so the masked forward compiles as one graph
and equals the eager masked forward.

The tests compile with the "eager" backend: the whole graph is captured by dynamo exactly as for inductor (a graph
break or a host read fails `fullgraph=True` there), without inductor's code generation, which takes minutes on a
small CPU. Checked once by hand with backend="inductor" on the two-block tiny model and the (B, T) bool mask: max
|compiled - eager| 3.6e-7.
"""

from __future__ import annotations

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.inspector.loading import transformer_class
from cogsurgeon.inspector.model_specs import tiny_config
from cogsurgeon.inspector.geometry import layout_of_inputs
from cogsurgeon.patches.verify import forward, sample_masks, tiny_inputs


def one_block_tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformer_class().from_config({**tiny_config("tiny"), "num_layers": 1}).eval()


@pytest.mark.parametrize(
    "names, form",
    [
        (("attention-mask",), "text bool (B,T)"),
        (("frame-causal-attention", "attention-mask"), "text additive -1e4 (B,T)"),
    ],
)
def test_a_masked_forward_compiles_as_one_graph_and_equals_eager(names, form):
    model = one_block_tiny()
    inputs = tiny_inputs(model)
    mask = sample_masks(layout_of_inputs(model.config, inputs), batch=2, heads=2)[form]
    for name in names:
        patches.apply(model, name)
    eager = forward(model, inputs, mask)
    assert (eager - forward(model, inputs, torch.ones_like(mask, dtype=torch.bool))).abs().max() > 1e-3  # it masks

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        output = compiled(**inputs, attention_kwargs={"attention_mask": mask})[0]
    torch.testing.assert_close(output, eager, rtol=0, atol=1e-5)
    patches.revert(model)


@pytest.mark.slow
def test_a_compiled_model_or_pipeline_transformer_is_patched_inside_and_recompiles():
    """`torch.compile(model)` (an OptimizedModule), or a pipeline whose `.transformer` is one: the patch goes on the
    module inside, the compiled model's next call runs it (dynamo's guards see the new processors), revert undoes it."""
    model = one_block_tiny()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], plain, rtol=0, atol=0)  # compiled before the patch

    patches.apply(compiled, "causal-attention")
    assert patches.applied(compiled) == patches.applied(model) == ["causal-attention"]
    with torch.no_grad():
        eager_patched = model(**inputs)[0]
        assert (eager_patched - plain).abs().max() > 1e-3
        torch.testing.assert_close(compiled(**inputs)[0], eager_patched, rtol=0, atol=0)

    class Pipeline:  # the shape of a diffusers pipeline after `pipe.transformer = torch.compile(pipe.transformer)`
        transformer = compiled

    patches.revert(Pipeline())
    assert patches.applied(model) == []
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], plain, rtol=0, atol=0)
