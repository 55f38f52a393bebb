"""The pipelines' arithmetic (`inspector.geometry`), tested once against diffusers' own pipelines: the inputs
`pipeline_inputs` builds are what `CogVideoXPipeline` / `CogVideoXImageToVideoPipeline.__call__` hand the
transformer (captured at its forward on the meta device), and the rotary embeddings equal the pipelines'
`_prepare_rotary_positional_embeddings`, for the published configs at their sizes and the tiny ones."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.geometry import (
    FrameLayout,
    VideoSizeError,
    default_video_size,
    latent_frame_count,
    latent_geometry,
    layout_of_call,
    layout_of_inputs,
    pipeline_inputs,
    resize_crop_region_for_grid,
    rotary_embedding,
    video_frame_count,
)
from cogsurgeon.inspector.model_specs import TINY_CONFIGS, published_config, tiny_config

# ---------------------------------------------------------------------------------------------------------------
# Pure arithmetic


@pytest.mark.parametrize(
    ("frames", "patch_size_t", "expected"),
    [(49, None, 13), (1, None, 1), (50, None, 13), (53, None, 14), (81, None, 21), (81, 2, 22), (85, 2, 22),
     (49, 2, 14), (1, 2, 2)],
)
def test_latent_frame_count_follows_the_pipeline(frames, patch_size_t, expected):
    assert latent_frame_count(frames, 4, patch_size_t) == expected


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 13, 22])
def test_video_frame_count_is_the_4k_plus_1_that_gives_a_latent_frame_count(latent_frames):
    frames = video_frame_count(latent_frames)
    assert (frames - 1) % 4 == 0 and latent_frame_count(frames) == latent_frames
    assert latent_frame_count(frames - 1) == latent_frames - 1 or frames == 1


def test_geometry_of_5b_i2v_at_its_native_size():
    geometry = latent_geometry(published_config("cogvideox-5b-i2v"), 49, 480, 720)
    assert (geometry.latent_frames, geometry.latent_height, geometry.latent_width) == (13, 60, 90)
    assert (geometry.grid_height, geometry.grid_width, geometry.token_frames) == (30, 45, 13)
    assert geometry.padding_frames == 0
    layout = geometry.layout(226)
    assert (layout.text_tokens, layout.video_tokens, layout.frames, layout.tokens_per_frame,
            layout.sequence_length) == (226, 17550, 13, 1350, 17776)
    assert layout.to_json()["total"] == 17776


def test_geometry_of_1_5_counts_temporal_patches_and_padding():
    geometry = latent_geometry(published_config("cogvideox1.5-5b"), 81, 768, 1360)
    assert (geometry.latent_frames, geometry.padding_frames, geometry.token_frames) == (22, 1, 11)
    assert (geometry.grid_height, geometry.grid_width) == (48, 85)
    assert geometry.layout(226).sequence_length == 45106


def test_learned_positions_refuse_other_sizes():
    with pytest.raises(VideoSizeError, match=r"480×720"):
        latent_geometry(published_config("cogvideox-5b-i2v"), 49, 768, 1360)
    # the same size is fine for the text-to-video model, which has no learned positions
    latent_geometry(published_config("cogvideox-5b"), 49, 768, 1360)


@pytest.mark.parametrize(("height", "width", "message"), [
    (500, 720, r"height 500 is not a multiple of 16.*try 496 or 512"),
    (480, 8, r"width 8 is not a multiple of 16"),
])
def test_sizes_off_the_patch_grid_are_refused(height, width, message):
    with pytest.raises(VideoSizeError, match=message):
        latent_geometry(published_config("cogvideox-5b"), 49, height, width)


def test_1_5_rotary_grid_bounds_the_size():
    config = published_config("cogvideox1.5-5b")
    latent_geometry(config, 81, 2400, 2400)
    with pytest.raises(VideoSizeError, match=r"at most 2400×2400"):
        latent_geometry(config, 81, 2416, 1360)


def test_non_positive_sizes_are_refused_with_a_cogsurgeon_error():
    with pytest.raises(CogsurgeonError, match="frames must be a positive"):
        latent_geometry(published_config("cogvideox-5b"), 0, 480, 720)


def test_default_video_size_is_the_pipelines_default():
    assert default_video_size(published_config("cogvideox-5b-i2v")) == (49, 480, 720)
    assert default_video_size(published_config("cogvideox-2b")) == (49, 480, 720)
    assert default_video_size(published_config("cogvideox1.5-5b")) == (81, 768, 1360)
    assert default_video_size(TINY_CONFIGS["tiny"]) == (9, 64, 64)


def test_frame_layout_of_a_call_and_of_inputs():
    layout = FrameLayout(text_tokens=5, frames=3, tokens_per_frame=4)
    assert (layout.frame_start(1), layout.frame_end(1), layout.sequence_length) == (9, 13, 17)
    assert layout_of_call(5, 12, 4) == layout
    with pytest.raises(VideoSizeError, match="do not split into frames"):
        layout_of_call(5, 13, 4)
    config = tiny_config("tiny-1.5")
    inputs = pipeline_inputs(config, (21, 64, 64), 1, device="meta")  # 6 latent frames: 3 temporal patches
    assert layout_of_inputs(config, inputs) == FrameLayout(8, 3, 16)


@pytest.mark.parametrize("grid", [(30, 45), (60, 90), (45, 30), (20, 20), (48, 85), (7, 13)])
def test_rotary_crop_region_matches_diffusers(grid):
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    assert resize_crop_region_for_grid(grid, 45, 30) == get_resize_crop_region_for_grid(grid, 45, 30)


def test_seeded_inputs_are_reproducible_and_i2v_image_latents_fill_only_the_first_frame():
    config = tiny_config("tiny-i2v")
    first, second = (pipeline_inputs(config, (9, 64, 64), 2, seed=3) for _ in range(2))
    assert torch.equal(first["hidden_states"], second["hidden_states"])
    image = first["hidden_states"][:, :, config["out_channels"]:]
    assert image[:, 0].abs().sum() > 0 and not image[:, 1:].any()  # the encoded image, then the pipeline's zeros


# ---------------------------------------------------------------------------------------------------------------
# Against diffusers' pipelines


class _ForwardReached(Exception):
    """Raised from the transformer's pre-hook once the pipeline's inputs are recorded: nothing is computed."""


def _full_config(config: dict) -> SimpleNamespace:
    """A config with the transformer's defaults filled in, as `model.config` reads (attribute access)."""
    from diffusers import CogVideoXTransformer3DModel

    parameters = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return SimpleNamespace(**{**defaults, **config})


def _pipeline_class(config):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return CogVideoXImageToVideoPipeline if config["in_channels"] != config["out_channels"] else CogVideoXPipeline


def _pipeline_forward_inputs(config: dict, size: tuple[int, int, int]) -> dict:
    """Run the real pipeline for `config` on the meta device up to the transformer's first forward; return the
    keyword arguments it passed (one layer is enough: the geometry does not depend on depth)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    from cogsurgeon.inspector.loading import build_on_meta

    transformer = build_on_meta({**config, "num_layers": 1})
    pipeline_class = _pipeline_class(config)
    image_to_video = pipeline_class.__name__ == "CogVideoXImageToVideoPipeline"
    vae = None
    if image_to_video:
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX(latent_channels=config["in_channels"] - config["out_channels"])
    pipeline = pipeline_class(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                              scheduler=CogVideoXDDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    frames, height, width = size
    text = torch.zeros(1, config["max_text_seq_length"], config["text_embed_dim"])
    arguments = dict(prompt_embeds=text, negative_prompt_embeds=text, num_frames=frames, height=height,
                     width=width, num_inference_steps=1, output_type="latent")
    if image_to_video:
        arguments["image"] = torch.zeros(1, 3, height, width)
    seen: dict = {}

    def record(module, args, kwargs):
        seen.update(kwargs)
        raise _ForwardReached

    transformer.register_forward_pre_hook(record, with_kwargs=True)
    with pytest.raises(_ForwardReached):
        pipeline(**arguments)
    return seen


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, tuple):
        return tuple(_shapes(item) for item in value)
    return value


CASES = [
    ("cogvideox-2b", (49, 480, 720)),
    ("cogvideox-2b", (33, 320, 512)),
    ("cogvideox-5b", (49, 480, 720)),
    ("cogvideox-5b", (33, 320, 512)),  # another crop region of the rotary grid
    ("cogvideox-5b-i2v", (49, 480, 720)),
    ("cogvideox1.5-5b", (81, 768, 1360)),  # 21 latent frames, padded to 22
    ("cogvideox1.5-5b", (49, 480, 720)),
    ("cogvideox1.5-5b-i2v", (81, 768, 1360)),
    ("cogvideox1.5-5b-i2v", (85, 768, 1360)),  # 22 latent frames: no padding
    ("tiny", (9, 64, 64)),
    ("tiny-i2v", (9, 64, 64)),
    ("tiny-1.5", (9, 64, 64)),  # 3 latent frames, padded to 4
    ("tiny-1.5", (21, 32, 48)),
]


def _config(spec: str) -> dict:
    return tiny_config(spec) if spec in TINY_CONFIGS else published_config(spec)


@pytest.mark.diffusers_versions
@pytest.mark.parametrize(("spec", "size"), CASES, ids=[f"{spec}-{'x'.join(map(str, size))}" for spec, size in CASES])
def test_pipeline_inputs_are_what_the_pipeline_hands_the_transformer(spec, size):
    config = _config(spec)
    expected = _pipeline_forward_inputs(config, size)
    actual = pipeline_inputs(config, size, 2, device="meta")
    passed = {name: value for name, value in expected.items() if isinstance(value, (torch.Tensor, tuple))}
    assert {name: _shapes(value) for name, value in actual.items()} == {
        name: _shapes(value) for name, value in passed.items()}
    geometry = latent_geometry(config, *size)
    assert expected["hidden_states"].shape[1] == geometry.latent_frames


@pytest.mark.diffusers_versions
@pytest.mark.parametrize(("spec", "size"), [case for case in CASES
                                            if _config(case[0])["use_rotary_positional_embeddings"]])
def test_rotary_embedding_equals_the_pipelines(spec, size):
    config = _config(spec)
    geometry = latent_geometry(config, *size)
    pipeline = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=_full_config(config)))
    method = _pipeline_class(config)._prepare_rotary_positional_embeddings
    expected = method(pipeline, size[1], size[2], geometry.latent_frames, torch.device("cpu"))
    actual = rotary_embedding(config, geometry.latent_frames, geometry.latent_height, geometry.latent_width)
    assert len(actual) == len(expected) == 2
    for ours, theirs in zip(actual, expected):
        assert torch.equal(ours, theirs)
