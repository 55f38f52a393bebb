"""The patches on real tiny CogVideoX transformers (every variant, plain and fused processors): equal to explicit-mask
reference attention, bit-exact after revert, causal where they say so, and the registry's rules and errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cogsurgeon import patches
from cogsurgeon.inspector.geometry import layout_of_inputs
from cogsurgeon.inspector.model_specs import TINY_SPECS
from cogsurgeon.patches.errors import (
    AttentionMaskError,
    PatchAlreadyAppliedError,
    PatchConflictError,
    PatchError,
    PatchNotAppliedError,
    PatchParameterError,
    PatchTargetError,
    UnknownPatchError,
)
from cogsurgeon.patches.processor import attention_modules
from cogsurgeon.patches.reference import RULE_MASKS, reference_processors
from cogsurgeon.patches.verify import combined_reference_mask, forward, fresh_tiny, sample_masks, tiny_inputs

pytestmark = pytest.mark.diffusers_versions
TOLERANCE = 1e-4
RULE_PATCHES = tuple(RULE_MASKS)


def reference_output(model, inputs, mask):
    with reference_processors(model, mask):
        return forward(model, inputs)


def processors_of(model):
    return [module.processor for _, module in attention_modules(model)]


@pytest.fixture(scope="module")
def models():
    """One fresh tiny model per (variant, processor), built once for the module; tests leave them unpatched."""
    return {(variant, kind): fresh_tiny(variant, kind) for variant in TINY_SPECS for kind in ("plain", "fused")}


@pytest.mark.parametrize("processor", ["plain", "fused"])
@pytest.mark.parametrize("variant", TINY_SPECS)
@pytest.mark.parametrize("name", RULE_PATCHES)
def test_rule_patch_equals_the_explicit_mask_reference_and_reverts_bit_exact(models, name, variant, processor):
    model = models[(variant, processor)]
    inputs = tiny_inputs(model)
    unpatched = forward(model, inputs)
    expected = reference_output(model, inputs, RULE_MASKS[name](layout_of_inputs(model.config, inputs)))
    assert (expected - unpatched).abs().max() > 1e-3  # the rule changes the output: the comparison means something

    handle = patches.apply(model, name)
    assert patches.applied(model) == [name]
    actual = forward(model, inputs)
    handle.revert()

    assert (actual - expected).abs().max() <= TOLERANCE
    assert patches.applied(model) == []
    assert torch.equal(forward(model, inputs), unpatched)


@pytest.mark.parametrize("processor", ["plain", "fused"])
@pytest.mark.parametrize("variant", TINY_SPECS)
def test_attention_mask_every_accepted_form_equals_the_reference(models, variant, processor):
    model = models[(variant, processor)]
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    unpatched = forward(model, inputs)
    masks = sample_masks(layout, batch=2, heads=model.config.num_attention_heads)
    expected = {form: reference_output(model, inputs, combined_reference_mask((), layout, m)) for form, m in masks.items()}
    with patches.patched(model, "attention-mask"):
        for form, mask in masks.items():
            assert (forward(model, inputs, mask) - expected[form]).abs().max() <= TOLERANCE, form
            assert (expected[form] - unpatched).abs().max() > 1e-4, form  # the mask reached attention
    assert torch.equal(forward(model, inputs), unpatched)


@pytest.mark.parametrize("variant", ["tiny", "tiny-1.5"])
@pytest.mark.parametrize("rule", RULE_PATCHES)
def test_a_mask_composes_with_each_rule(models, variant, rule):
    model = models[(variant, "plain")]
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    unpatched = forward(model, inputs)
    masks = sample_masks(layout, batch=2, heads=model.config.num_attention_heads)
    forms = ("text bool (B,T)", "keys additive bias (B,T+N)", "full bool (B,1,L,L)")
    expected = {form: reference_output(model, inputs, combined_reference_mask((rule,), layout, masks[form])) for form in forms}
    rule_alone = reference_output(model, inputs, RULE_MASKS[rule](layout))
    with patches.patched(model, rule, "attention-mask"):
        for form in forms:
            assert (forward(model, inputs, masks[form]) - expected[form]).abs().max() <= TOLERANCE, form
        patches.revert(model, "attention-mask")  # the rule stays on alone
        assert patches.applied(model) == [rule]
        assert (forward(model, inputs) - rule_alone).abs().max() <= TOLERANCE
    assert torch.equal(forward(model, inputs), unpatched)


@pytest.mark.parametrize("variant", TINY_SPECS)
def test_frame_causal_is_causal_changing_frame_t_changes_no_earlier_frame(models, variant):
    model = models[(variant, "plain")]
    inputs = tiny_inputs(model)
    frames_per_token_frame = model.config.patch_size_t or 1
    t = 1
    changed = dict(inputs)
    changed["hidden_states"] = inputs["hidden_states"].clone()
    changed["hidden_states"][:, t * frames_per_token_frame : (t + 1) * frames_per_token_frame] += 1.0
    with patches.patched(model, "frame-causal-attention"):
        before, after = forward(model, inputs), forward(model, changed)
    earlier = slice(0, t * frames_per_token_frame)
    assert torch.equal(before[:, earlier], after[:, earlier])
    assert not torch.allclose(before[:, t * frames_per_token_frame :], after[:, t * frames_per_token_frame :])
    # unpatched attention is bidirectional: the same change reaches the earlier frames
    assert not torch.allclose(forward(model, inputs)[:, earlier], forward(model, changed)[:, earlier])


def test_fusing_after_patching_keeps_the_patch_and_revert_restores_the_fused_processors():
    model = fresh_tiny("tiny", "plain")
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    patches.apply(model, "causal-attention")
    model.fuse_qkv_projections()  # replaces every processor with FusedCogVideoXAttnProcessor2_0
    actual = forward(model, inputs)
    assert all(type(p).__name__ == "PatchedCogVideoXAttnProcessor" and p.fused for p in processors_of(model))
    patches.revert(model)
    assert all(type(p).__name__ == "FusedCogVideoXAttnProcessor2_0" for p in processors_of(model))
    expected = reference_output(model, inputs, RULE_MASKS["causal-attention"](layout))
    assert (actual - expected).abs().max() <= TOLERANCE


def test_revert_puts_back_the_very_same_processor_objects_and_hooks(tiny_model):
    originals = processors_of(tiny_model)
    hooks = dict(tiny_model._forward_pre_hooks)
    patches.apply(tiny_model, "frame-causal-attention")
    patches.apply(tiny_model, "attention-mask")
    assert all(p is not o for p, o in zip(processors_of(tiny_model), originals))
    patches.revert(tiny_model, "frame-causal-attention")
    assert patches.applied(tiny_model) == ["attention-mask"]
    patches.revert(tiny_model)
    assert all(p is o for p, o in zip(processors_of(tiny_model), originals))
    assert dict(tiny_model._forward_pre_hooks) == hooks


def test_refusals_leave_the_model_unchanged(tiny_model):
    originals = processors_of(tiny_model)
    with pytest.raises(PatchTargetError, match="CogVideoXTransformer3DModel or a pipeline"):
        patches.apply(torch.nn.Linear(2, 2), "causal-attention")
    with pytest.raises(UnknownPatchError, match="unknown patch 'sliding-window'"):
        patches.apply(tiny_model, "sliding-window")
    with pytest.raises(PatchParameterError, match="causal-attention has no parameter 'window'") as refused:
        patches.apply(tiny_model, "causal-attention", window=3)
    assert refused.value.parameter == "window"
    assert processors_of(tiny_model) == originals and patches.applied(tiny_model) == []

    patches.apply(tiny_model, "causal-attention")
    patched_processors = processors_of(tiny_model)
    with pytest.raises(PatchAlreadyAppliedError):
        patches.apply(tiny_model, "causal-attention")
    with pytest.raises(PatchConflictError, match="causal-attention and frame-causal-attention do not compose"):
        patches.apply(tiny_model, "frame-causal-attention")
    with pytest.raises(PatchNotAppliedError):
        patches.revert(tiny_model, "attention-mask")
    assert processors_of(tiny_model) == patched_processors and patches.applied(tiny_model) == ["causal-attention"]
    patches.revert(tiny_model)
    assert processors_of(tiny_model) == originals


def test_a_foreign_attention_processor_is_refused_before_anything_changes(tiny_model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    blocks = tiny_model.transformer_blocks
    blocks[1].attn1.set_processor(AttnProcessor2_0())
    originals = processors_of(tiny_model)
    with pytest.raises(PatchTargetError, match="transformer_blocks.1.attn1 uses AttnProcessor2_0"):
        patches.apply(tiny_model, "causal-attention")
    assert processors_of(tiny_model) == originals and not tiny_model._forward_pre_hooks


def test_patched_reverts_on_error(tiny_model):
    originals = processors_of(tiny_model)
    with pytest.raises(RuntimeError, match="inside"):
        with patches.patched(tiny_model, "causal-attention", "attention-mask"):
            assert patches.applied(tiny_model) == ["causal-attention", "attention-mask"]
            raise RuntimeError("inside")
    assert processors_of(tiny_model) == originals and patches.applied(tiny_model) == []


def test_a_mask_without_the_attention_mask_patch_is_an_error_not_silently_dropped(tiny_model):
    inputs = tiny_inputs(tiny_model)
    mask = torch.ones(2, inputs["encoder_hidden_states"].shape[1], dtype=torch.bool)
    with patches.patched(tiny_model, "causal-attention"):
        with pytest.raises(AttentionMaskError, match="apply it as well"):
            forward(tiny_model, inputs, mask)


def test_a_mask_of_the_wrong_shape_names_the_accepted_forms(tiny_model):
    inputs = tiny_inputs(tiny_model)
    with patches.patched(tiny_model, "attention-mask"), pytest.raises(AttentionMaskError, match=r"\(B, 8\) over"):
        forward(tiny_model, inputs, torch.ones(2, 5, dtype=torch.bool))


class LargestTensors(TorchDispatchMode):
    """Records every tensor shape produced while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return result


@pytest.mark.parametrize("names", [("causal-attention",), ("frame-causal-attention",), ("frame-causal-attention", "attention-mask")])
def test_no_square_tensor_of_the_sequence_length_on_the_hot_path(tiny_model, names):
    inputs = tiny_inputs(tiny_model, size=(33, 128, 128))  # 9 latent frames of 16x16: L = 8 + 9 * 64 = 584
    length = 8 + 9 * 64
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    with patches.patched(tiny_model, *names), LargestTensors() as recorder:
        forward(tiny_model, inputs, mask if "attention-mask" in names else None)
    assert recorder.shapes
    assert not [shape for shape in recorder.shapes if sum(size >= length // 2 for size in shape) >= 2]


@pytest.mark.parametrize("processor", ["plain", "fused"])
@pytest.mark.parametrize("variant", TINY_SPECS)
def test_the_patched_projections_equal_diffusers_processor(models, variant, processor):
    """With a mask that keeps every key, the patched path (own q/k/v, rotary, output projection) runs instead of
    the original processor: it must agree with diffusers' processor."""
    model = models[(variant, processor)]
    inputs = tiny_inputs(model)
    keep_all = torch.ones(2, inputs["encoder_hidden_states"].shape[1], dtype=torch.bool)
    unpatched = forward(model, inputs)
    with patches.patched(model, "attention-mask"):
        torch.testing.assert_close(forward(model, inputs, keep_all), unpatched, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "names", [("causal-attention",), ("frame-causal-attention", "attention-mask"), ("causal-attention", "attention-mask")]
)
def test_patched_models_still_run_on_the_meta_device(names):
    """Shape-only forwards (the trace) work with patches on; a meta mask counts as keeping every key."""
    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.inspector.model_specs import tiny_config

    model = build_on_meta(tiny_config("tiny-1.5"))
    inputs = tiny_inputs(fresh_tiny("tiny-1.5", "plain"))
    meta = {
        key: value.to("meta") if isinstance(value, torch.Tensor)
        else tuple(part.to("meta") for part in value) if isinstance(value, tuple) else value
        for key, value in inputs.items()
    }
    mask = torch.ones(2, 8, device="meta")
    with patches.patched(model, *names):
        output = forward(model, meta, mask if "attention-mask" in names else None)
    assert output.device.type == "meta" and output.shape == inputs["hidden_states"].shape[:2] + (4, 8, 8)


@pytest.mark.parametrize("names", [("frame-causal-attention", "attention-mask"), ("causal-attention", "attention-mask")])
def test_training_gradients_with_checkpointing_equal_the_reference(names):
    """Finetuning runs backward through the patches, with gradient checkpointing recomputing attention."""
    model = fresh_tiny("tiny", "plain")
    model.train()
    model.enable_gradient_checkpointing()
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    mask = sample_masks(layout, batch=2, heads=2)["text bool (B,T)"]

    def gradients(attention_kwargs=None):
        model.zero_grad()
        model(**inputs, attention_kwargs=attention_kwargs)[0].square().mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    with reference_processors(model, combined_reference_mask(names, layout, mask)):
        expected = gradients()
    with patches.patched(model, *names):
        actual = gradients({"attention_mask": mask})
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
