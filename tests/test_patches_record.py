"""The patch record on the transformer: copies (deepcopy, pickle, torch.save) carry the truth, diffusers'
`fuse_qkv_projections`/`unfuse_qkv_projections` interleave with apply/revert in any order, and a third-party patch
needs nothing but the record its `apply` returns."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.patches.processor import PatchedCogVideoXAttnProcessor, attention_modules
from cogsurgeon.patches.reference import RULE_MASKS, reference_processors
from cogsurgeon.patches.verify import (
    combined_reference_mask,
    forward,
    fresh_tiny,
    layout_of_inputs,
    sample_masks,
    tiny_inputs,
)


def processors_of(model):
    return [module.processor for _, module in attention_modules(model)]


def double(module, args, output):
    return output * 2


class DoubleOutput(patches.Patch):
    """A third-party patch written against the record API: no state of its own."""

    name = "double-output"
    summary = "doubles proj_out (a test patch)"

    def apply(self, transformer, **options):
        return transformer.proj_out.register_forward_hook(double)  # a module-level hook: picklable

    def revert(self, transformer, record):
        record.remove()


@pytest.fixture
def with_double_output(monkeypatch):
    from cogsurgeon.patches import registry

    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_loaded", False)
    patches.register(DoubleOutput())


def torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save": torch_save_load,
}


@pytest.mark.diffusers_versions
@pytest.mark.parametrize("how", COPIES)
def test_a_copy_of_a_patched_model_carries_its_patches(how, with_double_output):
    model = fresh_tiny("tiny", "plain")
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    mask = sample_masks(layout, batch=2, heads=2)["text bool (B,T)"]
    originals = [type(p) for p in processors_of(model)]
    state_before = {key: value.clone() for key, value in model.state_dict().items()}
    unpatched = forward(model, inputs)
    with reference_processors(model, combined_reference_mask(("frame-causal-attention",), layout, mask)):
        expected = forward(model, inputs) * 2

    patches.apply(model, "frame-causal-attention")
    patches.apply(model, "attention-mask")
    patches.apply(model, "double-output")
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()  # patching changes no parameter or buffer
    assert all(torch.equal(state_after[key], value) for key, value in state_before.items())
    patched = forward(model, inputs, mask)
    assert (patched - expected).abs().max() <= 1e-4

    twin = COPIES[how](model)
    assert patches.applied(twin) == patches.applied(model) == ["frame-causal-attention", "attention-mask", "double-output"]
    assert patches.applied_options(twin) == patches.applied_options(model)
    assert torch.equal(forward(twin, inputs, mask), patched)
    # the copy's processors, hook and record are its own, consistently: the state they share is the copy's
    twin_states = {p.state for p in processors_of(twin)}
    assert len(twin_states) == 1 and twin_states.isdisjoint({p.state for p in processors_of(model)})
    assert next(iter(twin_states)) is patches.registry.applied_records(twin)["attention-mask"]
    assert twin._cogsurgeon_patches.lock is not model._cogsurgeon_patches.lock

    patches.revert(twin)
    assert patches.applied(twin) == [] and not twin._forward_pre_hooks and not twin.proj_out._forward_hooks
    assert [type(p) for p in processors_of(twin)] == originals
    assert torch.equal(forward(twin, inputs), unpatched)
    # the original is untouched by what happened to its copy
    assert patches.applied(model) == ["frame-causal-attention", "attention-mask", "double-output"]
    assert torch.equal(forward(model, inputs, mask), patched)
    patches.revert(model)
    assert torch.equal(forward(model, inputs), unpatched)
    patches.apply(twin, "causal-attention")  # the copy takes patches again
    assert patches.applied(twin) == ["causal-attention"]


def test_reading_a_never_patched_model_leaves_it_as_it_was(tiny_model):
    assert patches.applied(tiny_model) == [] and patches.applied_options(tiny_model) == {}
    assert "_cogsurgeon_patches" not in vars(tiny_model)


def test_meta_twin_traces_the_patches_with_their_options():
    from cogsurgeon.inspector.trace import meta_twin

    model = fresh_tiny("tiny", "plain")
    patches.apply(model, "causal-attention")
    patches.apply(model, "attention-mask")
    twin = meta_twin(model)
    assert patches.applied_options(twin) == patches.applied_options(model)
    assert all(isinstance(p, PatchedCogVideoXAttnProcessor) for p in processors_of(twin))


# -- fuse_qkv_projections / unfuse_qkv_projections interleaved with apply / revert ---------------------------------

SEQUENCES = [
    ("apply", "fuse", "revert", "unfuse"),
    ("apply", "fuse", "forward", "unfuse", "revert"),
    ("apply", "fuse", "forward", "revert", "unfuse"),
    ("apply", "forward", "fuse", "forward", "revert", "unfuse"),
    ("apply", "fuse", "unfuse", "revert"),
    ("apply", "fuse", "unfuse", "forward", "revert"),
    ("fuse", "apply", "unfuse", "revert"),
    ("fuse", "apply", "forward", "unfuse", "forward", "revert"),
    ("fuse", "apply", "revert", "unfuse"),
    ("apply", "forward", "fuse", "revert", "forward", "unfuse"),
]
NAMES = ("causal-attention", "attention-mask")


def run_sequence(model, steps, inputs, mask, patched):
    for step in steps:
        if step == "apply" and patched:
            for name in NAMES:
                patches.apply(model, name)
        elif step == "revert" and patched:
            patches.revert(model)
        elif step == "fuse":
            model.fuse_qkv_projections()
        elif step == "unfuse":
            model.unfuse_qkv_projections()
        elif step == "forward":
            on = patched and bool(patches.applied(model))
            forward(model, inputs, mask if on else None)  # a masked forward leaves its mask behind in the state


@pytest.mark.diffusers_versions
@pytest.mark.parametrize("steps", SEQUENCES, ids=["-".join(s) for s in SEQUENCES])
def test_fuse_and_unfuse_interleaved_with_patches_end_as_never_patched(steps):
    model, never_patched = fresh_tiny("tiny", "plain"), fresh_tiny("tiny", "plain")
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    mask = sample_masks(layout, batch=2, heads=2)["text bool (B,T)"]
    run_sequence(model, steps, inputs, mask, patched=True)
    run_sequence(never_patched, steps, inputs, mask, patched=False)

    assert patches.applied(model) == []
    assert [type(p) for p in processors_of(model)] == [type(p) for p in processors_of(never_patched)]
    saved = getattr(model, "original_attn_processors", None) or {}
    assert not [p for p in saved.values() if isinstance(p, PatchedCogVideoXAttnProcessor)]
    assert not model._forward_pre_hooks
    assert torch.equal(forward(model, inputs), forward(never_patched, inputs))  # no stale mask, bit-identical

    for name in NAMES:  # re-apply works and is right
        patches.apply(model, name)
    expected = combined_reference_mask(("causal-attention",), layout, mask)
    with reference_processors(never_patched, expected):
        reference = forward(never_patched, inputs)
    assert (forward(model, inputs, mask) - reference).abs().max() <= 1e-4
    patches.revert(model)
    assert torch.equal(forward(model, inputs), forward(never_patched, inputs))


@pytest.mark.diffusers_versions
def test_a_forward_between_fuse_and_unfuse_keeps_the_patch_on_the_fused_and_unfused_processors():
    """`applied()` tells the truth at every forward: the patch follows the processors diffusers swaps in."""
    model = fresh_tiny("tiny", "plain")
    inputs = tiny_inputs(model)
    causal = RULE_MASKS["causal-attention"](layout_of_inputs(model.config, inputs))
    with reference_processors(model, causal):
        expected = forward(model, inputs)
    patches.apply(model, "causal-attention")
    model.fuse_qkv_projections()
    fused = forward(model, inputs)
    assert all(isinstance(p, PatchedCogVideoXAttnProcessor) and p.fused for p in processors_of(model))
    model.unfuse_qkv_projections()
    unfused = forward(model, inputs)
    assert all(isinstance(p, PatchedCogVideoXAttnProcessor) and not p.fused for p in processors_of(model))
    assert patches.applied(model) == ["causal-attention"]
    assert (fused - expected).abs().max() <= 1e-4 and (unfused - expected).abs().max() <= 1e-4
