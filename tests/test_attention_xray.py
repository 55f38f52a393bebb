"""The attention x-ray against explicit softmax: on the tiny models (fp32, CPU) every recorded group mass and word map
equals the one computed here from the same q/k with an `(L, L)` softmax and the patch's reference mask, with and
without each attention patch and with attention masks; recording changes nothing about the model or its outputs."""

from __future__ import annotations

import json

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.inspector import attention_recording, load_recording, record_attention
from cogsurgeon.inspector.attention_recording import RecordingError
from cogsurgeon.inspector.geometry import layout_of_inputs
from cogsurgeon.inspector.loading import build_tiny
from cogsurgeon.patches.processor import attention_modules, joint_query_key_value
from cogsurgeon.patches.reference import combine_masks, frame_of_token, full_attention_mask, rule_mask
from cogsurgeon.patches.verify import sample_masks, tiny_inputs

VARIANTS = ("tiny", "tiny-1.5", "tiny-i2v")
TOLERANCE = 1e-6
RULES = [
    (None, {}),
    ("causal-attention", {}),
    ("frame-causal-attention", {}),
    ("block-causal-attention", {"chunk": 1, "window": 1, "sink": 1}),
    ("block-causal-attention", {"chunk": 2}),
    ("window-attention", {"window": 1, "chunk": 2}),
    ("window-attention", {"window": 2, "text_sees_video": True}),
]


class ExplicitWeights:
    """Every attention call's softmax weights `(B, heads, L, L)` in float64, from q/k computed by the CogVideoX
    processors' body after the call, with the reference mask of the rule and the user mask applied explicitly."""

    def __init__(self, model, rule, user_mask, layout):
        self.weights: list[torch.Tensor] = []
        self.mask = combine_masks(rule, None if user_mask is None else full_attention_mask(user_mask, layout))
        self.handles = [
            module.register_forward_hook(self._hook, with_kwargs=True) for _, module in attention_modules(model)
        ]

    def _hook(self, attn, args, kwargs, output):
        query, key, _ = joint_query_key_value(attn, kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                              kwargs.get("image_rotary_emb"), getattr(attn, "fused_projections", False))
        scores = (query.double() @ key.double().transpose(-2, -1)) * query.shape[-1] ** -0.5
        if self.mask is not None:
            mask = self.mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        self.weights.append(torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def groups_of_tokens(groups: str, model, inputs) -> tuple[torch.Tensor, int]:
    """The group of every token, written from the definitions (not the recorder's code)."""
    layout = layout_of_inputs(model.config, inputs)
    if groups == "frames":
        return frame_of_token(layout) + 1, layout.frames + 1
    if groups == "words":
        text = layout.text_tokens
        return torch.cat([torch.arange(text), torch.full((layout.video_tokens,), text)]), text + 1
    rows, cols = (int(n) for n in groups.removeprefix("grid:").split("x"))
    patch = model.config.patch_size
    height, width = inputs["hidden_states"].shape[-2] // patch, inputs["hidden_states"].shape[-1] // patch
    video = torch.arange(layout.video_tokens) % (height * width)
    y, x = video // width, video % width
    cells = 1 + (y * rows // height) * cols + x * cols // width
    return torch.cat([torch.zeros(layout.text_tokens, dtype=torch.long), cells]), rows * cols + 1


def explicit_mass(weights: torch.Tensor, group_of_token: torch.Tensor, count: int) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(group_of_token, count).double()
    return (one_hot.T @ weights @ one_hot) / one_hot.sum(0)[:, None]


def record_and_compare(variant, rule=None, options=None, mask_name=None, groups="frames", words=(), fused=False):
    """Record one forward of a fresh tiny model under a rule and a mask; return (largest mass error, largest word map
    error, recording, explicit weights)."""
    model = build_tiny(variant)
    if fused:
        model.fuse_qkv_projections()
    inputs = tiny_inputs(model)
    layout = layout_of_inputs(model.config, inputs)
    user_mask = None
    if mask_name is not None:
        patches.apply(model, "attention-mask")
        user_mask = sample_masks(layout, 2, model.config.num_attention_heads)[mask_name]
    if rule is not None:
        patches.apply(model, rule, **(options or {}))
    reference = ExplicitWeights(model, rule_mask(rule, layout, **(options or {})) if rule else None, user_mask, layout)
    kwargs = {} if user_mask is None else {"attention_kwargs": {"attention_mask": user_mask}}
    with torch.no_grad(), record_attention(model, groups=groups, words=words) as rec:
        model(**inputs, **kwargs)
    reference.remove()
    group_of_token, count = groups_of_tokens(groups, model, inputs)
    assert rec.groups and len(rec.groups) == count
    mass_error = max(
        (rec.mass(layer).double() - explicit_mass(weights[batch], group_of_token, count)).abs().max().item()
        if batch == 0 else
        (rec.mass(layer, batch=1).double() - explicit_mass(weights[1], group_of_token, count)).abs().max().item()
        for layer, weights in enumerate(reference.weights) for batch in (0, 1)
    )
    map_error = 0.0
    text = layout.text_tokens
    for number, position in enumerate(words):
        for layer, weights in enumerate(reference.weights):
            for batch in (0, 1):
                for head in range(model.config.num_attention_heads):
                    expected = weights[batch, head, text:, position].reshape(rec.word_map(position, layer).shape)
                    got = rec.word_map(position, layer, batch=batch, head=head).double()
                    map_error = max(map_error, (got - expected).abs().max().item())
    return mass_error, map_error, rec, reference.weights


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule, options", RULES, ids=lambda value: str(value))
def test_every_mass_equals_explicit_softmax_with_and_without_each_rule(variant, rule, options):
    mass_error, _, rec, _ = record_and_compare(variant, rule, options)
    assert mass_error <= TOLERANCE
    assert rec.steps == 1 and rec.batch == 2 and len(rec.layers) == build_tiny(variant).config.num_layers
    rows = rec.all_mass().sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # every query here sees some key


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_frame_causal_model_has_zero_mass_on_later_frames(variant):
    _, _, rec, _ = record_and_compare(variant, "frame-causal-attention")
    mass = rec.all_mass()  # frames: [text, frame 0, ...]; text sees text only, frame f text and frames <= f
    later = torch.ones(mass.shape[-2:], dtype=torch.bool).triu(1)
    assert mass[..., later].abs().max().item() == 0.0
    assert (mass[..., 1:, :].sum(-1) - 1).abs().max() < 1e-5


MASKED = [
    (None, "text bool (B,T)"),
    ("frame-causal-attention", "text bool (B,T)"),
    ("causal-attention", "text additive (B,T)"),
    ("block-causal-attention", "text additive -1e4 (B,T)"),
    ("frame-causal-attention", "keys bool (B,T+N)"),
    (None, "keys additive bias (B,T+N)"),
    ("causal-attention", "full bool (B,1,L,L)"),
    ("window-attention", "full additive (1,heads,L,L)"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule, mask_name", MASKED, ids=lambda value: str(value))
def test_masses_with_an_attention_mask_equal_explicit_softmax(variant, rule, mask_name):
    mass_error, _, _, _ = record_and_compare(variant, rule, mask_name=mask_name)
    assert mass_error <= TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", ["grid:2x2", "grid:3x4", "words"])
def test_grid_and_word_groups_and_word_maps_equal_explicit_softmax(variant, groups):
    mass_error, map_error, rec, _ = record_and_compare(
        variant, "frame-causal-attention", mask_name="text bool (B,T)", groups=groups, words=(0, 3, 7)
    )
    assert mass_error <= TOLERANCE and map_error <= TOLERANCE
    layout = rec.layout
    assert rec.word_map(3, 0).shape == (layout["frames"], layout["grid_height"], layout["grid_width"])


def test_the_fused_processor_and_more_groups_than_the_head_dim_are_exact():
    # tiny's head dim is 16: grid:4x4 has 17 groups, and 3 words make 20 value columns, so two passes run
    mass_error, map_error, rec, _ = record_and_compare(
        "tiny", "block-causal-attention", {"chunk": 1, "window": 1, "sink": 1}, groups="grid:4x4", words=(1, 2, 5),
        fused=True,
    )
    assert len(rec.groups) == 17
    assert mass_error <= TOLERANCE and map_error <= TOLERANCE


def test_heads_in_small_chunks_give_the_same_numbers():
    model = build_tiny("tiny")
    patches.apply(model, "window-attention", window=1)
    inputs = tiny_inputs(model)
    results = []
    for chunk_bytes in (1, 1 << 30):  # one head at a time; every head at once
        with torch.no_grad(), record_attention(model, words=(2,), chunk_bytes=chunk_bytes) as rec:
            model(**inputs)
        results.append(rec)
    assert torch.equal(results[0].all_mass(), results[1].all_mass())
    assert torch.equal(results[0].word_map(2, 1, head=1), results[1].word_map(2, 1, head=1))


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_recording_leaves_outputs_bit_identical_and_removes_itself(variant):
    model = build_tiny(variant)
    patches.apply(model, "attention-mask")
    patches.apply(model, "frame-causal-attention")
    inputs = tiny_inputs(model)
    mask = sample_masks(layout_of_inputs(model.config, inputs), 2, 2)["text bool (B,T)"]
    kwargs = {"attention_kwargs": {"attention_mask": mask}}
    processors = [module.processor for _, module in attention_modules(model)]
    options, hooks = patches.applied_options(model), hook_counts(model)
    with torch.no_grad():
        before = model(**inputs, **kwargs)[0]
        with record_attention(model, groups="words", words=(1,)) as rec:
            during = model(**inputs, **kwargs)[0]
        after = model(**inputs, **kwargs)[0]
    assert rec.steps == 1
    assert torch.equal(before, during) and torch.equal(before, after)
    assert patches.applied_options(model) == options and hook_counts(model) == hooks
    assert [module.processor for _, module in attention_modules(model)] == processors
    patches.revert(model)
    with torch.no_grad(), record_attention(model):
        plain = model(**inputs)[0]
    assert torch.equal(plain, build_tiny(variant)(**inputs)[0].detach())


def test_every_forward_is_a_step_and_the_pipeline_batch_items_stay_apart():
    model = build_tiny("tiny")
    first, second = tiny_inputs(model, seed=0), tiny_inputs(model, seed=1)
    with torch.no_grad(), record_attention(model) as rec:
        model(**first)
        model(**second)
    assert rec.steps == 2
    assert not torch.equal(rec.mass(0, step=0), rec.mass(0, step=1))
    assert not torch.equal(rec.mass(0, batch=0), rec.mass(0, batch=1))
    assert torch.equal(rec.mass("transformer_blocks.1.attn1", step=1), rec.mass(-1, step=1))
    with pytest.raises(RecordingError, match="out of range"):
        rec.mass(0, step=2)
    with pytest.raises(RecordingError, match="no recorded attention layer"):
        rec.mass("transformer_blocks.9.attn1")


def test_head_kinds_follow_the_documented_rule():
    model = build_tiny("tiny")
    patches.apply(model, "window-attention", window=1)  # video sees text and its own frame only: spatial or text
    with torch.no_grad(), record_attention(model) as rec:
        model(**tiny_inputs(model))
    for layer in range(len(rec.layers)):
        for stats in rec.head_stats(layer):
            assert stats.own_frame == pytest.approx(1.0)
            assert stats.kind == ("text" if stats.video_to_text >= 0.5 else "spatial")
            assert stats.first_frame_sink == 0.0
    assert attention_recording.head_kind(0.1, 0.2) == "temporal"
    assert attention_recording.head_kind(0.1, 0.5) == "mixed"
    assert attention_recording.head_kind(0.6, 0.9) == "text"
    assert attention_recording.head_kind(0.1, None) is None


@pytest.mark.parametrize("inline", [True, False], ids=["json", "safetensors"])
def test_a_saved_recording_loads_back_the_same(tmp_path, monkeypatch, inline):
    if not inline:
        monkeypatch.setattr(attention_recording, "INLINE_NUMBERS", 10)
    model = build_tiny("tiny-1.5")
    patches.apply(model, "causal-attention")
    with torch.no_grad(), record_attention(model, groups="grid:2x2", words=(0, 5)) as rec:
        model(**tiny_inputs(model))
    written = rec.save(tmp_path / "run.json")
    assert [path.suffix for path in written] == ([".json"] if inline else [".json", ".safetensors"])
    loaded = load_recording(tmp_path / "run.json")
    assert torch.equal(loaded.all_mass(), rec.all_mass())
    assert torch.equal(loaded.word_map(5, 2, head=0), rec.word_map(5, 2, head=0))
    assert loaded.groups == rec.groups and loaded.layers == rec.layers and loaded.layout == rec.layout
    assert loaded.model["patches"] == {"causal-attention": {}}
    assert loaded.summary() == rec.summary()
    document = json.loads((tmp_path / "run.json").read_text())
    assert document["format"] == attention_recording.FORMAT and ("tensors" in document) != inline


@pytest.mark.parametrize("groups", ["", "frame", "FRAMES", "grid:", "grid:2", "grid:0x2", "grid:ax2", "grid:2x2x2",
                                    "grid:99999x1", "words:3", "grid:-1x2", None, 3])
def test_bad_groups_are_one_clear_error(groups):
    with pytest.raises(RecordingError) as error:
        record_attention(build_tiny("tiny"), groups=groups)
    assert "\n" not in str(error.value) and ("frames" in str(error.value) or "cells" in str(error.value))


def test_requests_that_cannot_be_met_are_clear_errors(tmp_path):
    model = build_tiny("tiny")
    inputs = tiny_inputs(model)
    with pytest.raises(RecordingError, match="at most grid:4x4"):
        with torch.no_grad(), record_attention(model, groups="grid:5x5"):
            model(**inputs)
    mask = torch.ones(2, model.config.max_text_seq_length, dtype=torch.bool)
    with pytest.raises(RecordingError, match="attention-mask patch"):
        with torch.no_grad(), record_attention(model):
            model(**inputs, attention_kwargs={"attention_mask": mask})
    with pytest.raises(RecordingError, match="outside the 8 text tokens"):
        with torch.no_grad(), record_attention(model, words=(8,)):
            model(**inputs)
    with pytest.raises(RecordingError, match="tokenizer and prompt"):
        with torch.no_grad(), record_attention(model, words=("cat",)):
            model(**inputs)
    with pytest.raises(RecordingError, match="torch.compile"):
        record_attention(torch.compile(model, backend="eager"))
    with pytest.raises(patches.PatchTargetError):
        record_attention(torch.nn.Linear(2, 2))
    assert hook_counts(model) == hook_counts(build_tiny("tiny"))  # every failure removed its hooks
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(RecordingError, match="not a cogsurgeon attention recording"):
        load_recording(tmp_path / "other.json")
    with pytest.raises(RecordingError, match="saved as .json"):
        rec = record_attention(model).__enter__()
        rec.save(tmp_path / "run.txt")


def test_word_labels_come_from_the_prompt_tokens():
    model = build_tiny("tiny")
    labels = ["▁a", "▁cat", "▁on", "▁a", "▁mat", "</s>", "<pad>", "<pad>"]
    with torch.no_grad(), record_attention(model, groups="words", words=("cat", 4), token_labels=labels) as rec:
        model(**tiny_inputs(model))
    assert rec.groups == [*labels, "video"]
    assert rec.words == [(1, "▁cat"), (4, "▁mat")]
    assert torch.equal(rec.word_map("cat", 0), rec.word_map(1, 0))


def test_a_pipeline_run_records_every_denoising_step_with_guidance_apart():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model = build_tiny("tiny")
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                 scheduler=CogVideoXDDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    text, negative = torch.randn(2, 1, 8, model.config.text_embed_dim, generator=generator)
    arguments = dict(prompt_embeds=text, negative_prompt_embeds=negative, num_frames=9, height=64, width=64,
                     num_inference_steps=3, guidance_scale=6.0, output_type="latent", use_dynamic_cfg=False)
    plain = pipeline(**arguments, generator=torch.Generator().manual_seed(1)).frames
    with record_attention(pipeline, groups="frames") as rec:
        recorded = pipeline(**arguments, generator=torch.Generator().manual_seed(1)).frames
    assert torch.equal(plain, recorded)
    assert rec.steps == 3 and rec.batch == 2  # one forward per step; item 0 unconditioned, item 1 conditioned
    assert not torch.equal(rec.mass(0, step=0, batch=0), rec.mass(0, step=0, batch=1))
    assert not torch.equal(rec.mass(0, step=0, batch=1), rec.mass(0, step=2, batch=1))
