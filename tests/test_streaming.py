"""`patches.streaming`: chunk-by-chunk generation with a KV cache, against the one-shot forward of the whole video
with the same patches (`block-causal-attention(chunk, window, sink)` + `per-frame-timesteps(text_timestep)`), on
tiny models of every variant (2B-like sincos positions, 5B rotary, 5B-I2V learned positions, 1.5 temporal patches).
"""

from __future__ import annotations

import copy
import gc
import re
import threading
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogsurgeon import patches
from cogsurgeon.inspector import load_transformer
from cogsurgeon.inspector.geometry import rotary_embedding
from cogsurgeon.inspector.model_specs import tiny_config
from cogsurgeon.patches.stream import StreamError, kv_cache_bytes

BATCH = 2  # classifier-free guidance, as the pipelines run
HEIGHT = WIDTH = 64  # pixels: the tiny configs' 8 x 8 latent


def tiny_model(variant: str) -> torch.nn.Module:
    """A tiny model; `tiny-2b` is `tiny` with the 2B's sincos positions instead of rotary."""
    if variant != "tiny-2b":
        return load_transformer(variant).eval()
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    config = {**tiny_config("tiny"), "use_rotary_positional_embeddings": False}
    return CogVideoXTransformer3DModel.from_config(config).eval()


def patch_frames(model) -> int:
    return model.config.patch_size_t or 1


def video(model, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of `frames` frames (temporal patches) and prompt embeddings, seeded."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    latents = torch.randn(BATCH, frames * patch_frames(model), config.in_channels, 8, 8, generator=generator)
    text = torch.randn(BATCH, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    return latents, text


def one_shot(model, latents, text, timesteps, *, chunk, window, sink, text_timestep):
    """The whole video in one forward with the stream's patches: the reference every step must equal."""
    rotary = rotary_embedding(model.config, latents.shape[1], 8, 8)
    kwargs = {} if rotary is None else {"image_rotary_emb": rotary}
    with patches.patched(model, "block-causal-attention", chunk=chunk, window=window, sink=sink), \
            patches.patched(model, "per-frame-timesteps", text_timestep=text_timestep), torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps, return_dict=False,
                     **kwargs)[0]


def rollout_matches_one_shot(model, frames: int, chunk: int, window, sink: int, text_timestep=0, steps=(900, 400),
                             seed: int = 0) -> float:
    """Stream a video of `frames` frames; compare every step's output with the one-shot forward over
    [committed chunks (at timestep 0) ; this chunk (at t)], restricted to this chunk. Returns the largest error."""
    latents, text = video(model, frames, seed)
    p = patch_frames(model)
    twin = copy.deepcopy(model)  # the one-shot runs on an equal model: the streamed one has the patches on
    worst = 0.0
    with patches.streaming(model, chunk=chunk, window=window, sink=sink, text_timestep=text_timestep,
                           height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        for start in range(0, frames, chunk):
            end = min(frames, start + chunk)
            current = latents[:, start * p : end * p]
            for t in steps:
                out = stream.step(current, torch.full((BATCH,), t))
                timesteps = torch.zeros(BATCH, end * p, dtype=torch.long)
                timesteps[:, start * p :] = t
                reference = one_shot(twin, latents[:, : end * p], text, timesteps, chunk=chunk, window=window,
                                     sink=sink, text_timestep=text_timestep)[:, start * p :]
                assert out.shape == reference.shape
                worst = max(worst, (out - reference).abs().max().item())
            stream.commit(current, timestep=0)
    return worst


@pytest.mark.parametrize("variant", ["tiny-2b", "tiny", "tiny-i2v", "tiny-1.5"])
@pytest.mark.parametrize("chunk,window,sink", [(1, None, 0), (2, None, 0), (1, 2, 1)])
def test_every_step_equals_the_one_shot_causal_forward(variant, chunk, window, sink):
    model = tiny_model(variant)
    frames = 3 if variant == "tiny-i2v" else 5  # tiny-i2v's learned positions cover 3 latent frames
    assert rollout_matches_one_shot(model, frames, chunk, window, sink) < 1e-5


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 6), chunk=st.integers(1, 3), window=st.one_of(st.none(), st.integers(1, 3)),
       sink=st.integers(0, 2), text_timestep=st.sampled_from([0, 250, 999]))
def test_streaming_matches_one_shot_over_random_chunkings(frames, chunk, window, sink, text_timestep):
    if window is not None and sink > window:
        sink = window  # the patch refuses sink > window
    model = _TINY["tiny"]
    assert rollout_matches_one_shot(model, frames, chunk, window, sink, text_timestep, steps=(700,)) < 1e-5


_TINY = {"tiny": tiny_model("tiny")}


def test_a_step_does_not_change_the_cache_and_commit_does_not_depend_on_steps():
    model = tiny_model("tiny")
    latents, text = video(model, 4)
    outputs = []
    for noisy_steps in ((), (900, 500, 100)):
        with patches.streaming(model, chunk=2, height=HEIGHT, width=WIDTH) as stream:
            stream.prefill(text)
            for t in noisy_steps:
                stream.step(latents[:, :2] * 3, torch.full((BATCH,), t))
            stream.commit(latents[:, :2])
            outputs.append(stream.step(latents[:, 2:], torch.full((BATCH,), 600)))
    assert torch.equal(outputs[0], outputs[1])


def test_the_window_evicts_what_no_later_chunk_attends():
    model = tiny_model("tiny")
    latents, text = video(model, 6)
    with patches.streaming(model, chunk=1, window=2, sink=1, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        for frame in range(6):
            stream.step(latents[:, frame : frame + 1], 500)
            stream.commit(latents[:, frame : frame + 1])
            kept = [j for j, _ in stream._cached]
            assert kept == sorted({0} | {j for j in range(frame + 1) if j > frame + 1 - 2})
        # text + the sink + one window chunk + room for the stepped chunk: the cache never grew past that
        assert stream.cache_bytes() == kv_cache_bytes(model.config, frames=6, height=HEIGHT, width=WIDTH, batch=BATCH,
                                                      chunk=1, window=2, sink=1, dtype_bytes=4)


def test_cache_bytes_equals_the_planned_bytes_when_frames_are_given():
    model = tiny_model("tiny")
    latents, text = video(model, 4)
    with patches.streaming(model, chunk=2, height=HEIGHT, width=WIDTH, frames=4) as stream:
        stream.prefill(text)
        for start in (0, 2):
            stream.step(latents[:, start : start + 2], 500)
            stream.commit(latents[:, start : start + 2])
        planned = kv_cache_bytes(model.config, frames=4, height=HEIGHT, width=WIDTH, batch=BATCH, chunk=2,
                                 dtype_bytes=4)
        assert stream.cache_bytes() == planned
        layers, heads, head_dim = model.config.num_layers, model.config.num_attention_heads, 16
        assert planned == 2 * layers * BATCH * heads * (8 + 4 * 16) * model.config.attention_head_dim * 4
        with pytest.raises(StreamError, match="opened for 4 frames"):
            stream.step(latents[:, :1], 500)


def test_leaving_the_stream_reverts_bit_exactly_and_drops_the_model():
    model = tiny_model("tiny-i2v")
    latents, text = video(model, 3)
    rotary = rotary_embedding(model.config, 3, 8, 8)
    timestep = torch.full((BATCH,), 300)
    with torch.no_grad():
        before = model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                       image_rotary_emb=rotary, return_dict=False)[0]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        stream.step(latents[:, :1], 500)
        stream.commit(latents[:, :1])
        assert patches.applied(model) == ["block-causal-attention", "per-frame-timesteps"]
    assert patches.applied(model) == []
    assert "forward" not in model.patch_embed.__dict__
    assert stream.model is None and stream.cache_bytes() == 0
    with torch.no_grad():
        after = model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                      image_rotary_emb=rotary, return_dict=False)[0]
    assert torch.equal(before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None  # the stream object kept after the `with` holds no reference to the model


def test_bad_calls_are_typed_errors_naming_what_is_wrong():
    model = tiny_model("tiny-1.5")
    latents, text = video(model, 2)
    with pytest.raises(StreamError, match="text_timestep must be a number"):
        with patches.streaming(model, chunk=1, text_timestep="max", height=HEIGHT, width=WIDTH):
            pass
    with pytest.raises(StreamError, match="chunk must be an integer >= 1"):
        with patches.streaming(model, chunk=0, height=HEIGHT, width=WIDTH):
            pass
    # 72 pixels are 9 latent rows: diffusers' patch embedding would drop the last one and step would return 8
    with pytest.raises(StreamError, match="height 72 is not a multiple of 16"):
        with patches.streaming(model, chunk=1, height=72, width=WIDTH):
            pass
    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        with pytest.raises(StreamError, match="prefill"):
            stream.step(latents[:, :2], 500)
        stream.prefill(text)
        with pytest.raises(StreamError, match="whole temporal patches"):
            stream.step(latents[:, :1], 500)  # 1.5: one frame is 2 latent frames
        with pytest.raises(StreamError, match="timestep of shape"):
            stream.step(latents[:, :2], torch.zeros(3))
    assert patches.applied(model) == []


def test_learned_positions_past_their_table_are_refused_naming_the_limit():
    model = tiny_model("tiny-i2v")
    latents, text = video(model, 4)
    with patches.streaming(model, chunk=2, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        stream.commit(latents[:, :2])
        with pytest.raises(StreamError, match="cover 3 latent frames"):
            stream.step(latents[:, 2:4], 500)
    with pytest.raises(StreamError, match="learned positional embeddings are for 64x64"):
        with patches.streaming(model, chunk=1, height=128, width=64):
            pass


def test_trace_reports_the_cache_a_stream_holds():
    from cogsurgeon.inspector.trace import trace_shapes

    model = tiny_model("tiny")
    traced = trace_shapes(model, frames=9, height=HEIGHT, width=WIDTH, batch=BATCH)  # 3 latent frames
    by_setting = {(row["chunk"], row["window"], row["sink"]): row["bytes"] for row in traced.kv_cache}
    _, text = video(model, 3)
    for (chunk, window, sink), planned in by_setting.items():
        with patches.streaming(model, chunk=chunk, window=window, sink=sink, height=HEIGHT, width=WIDTH,
                               frames=3) as stream:
            stream.prefill(text)
            assert stream.cache_bytes() == planned


def test_a_prefill_that_fails_part_way_leaves_no_half_filled_cache():
    model = tiny_model("tiny")
    latents, text = video(model, 2)

    def fail(module, args):
        raise RuntimeError("out of memory (simulated)")

    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        handle = model.transformer_blocks[1].register_forward_pre_hook(fail)  # layer 0 has stored its text K/V
        with pytest.raises(RuntimeError, match="simulated"):
            stream.prefill(text)
        handle.remove()
        assert stream.cache_bytes() == 0
        stream.prefill(text)  # a second prefill is possible and complete
        assert stream.step(latents[:, :1], 500).shape == latents[:, :1].shape


# ---------------------------------------------------------------- threads and hostile inputs (issue 21 items 5, 14)


def pause_in_layer_1(model, thread_name: str) -> tuple[threading.Event, threading.Event]:
    """A forward of the thread named `thread_name` stops at layer 1 until released (other threads pass): a forced,
    deterministic overlap. Returns (paused, release)."""
    paused, release = threading.Event(), threading.Event()

    def hook(module, args):
        if threading.current_thread().name == thread_name:
            paused.set()
            assert release.wait(timeout=120), "the test never released the paused forward"

    model.transformer_blocks[1].register_forward_pre_hook(hook)
    return paused, release


def run_in_thread(name: str, function) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as exc:  # handed to the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread, result


def test_a_second_call_while_a_step_runs_on_another_thread_is_refused():
    model = tiny_model("tiny")
    latents, text = video(model, 2)
    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        alone = stream.step(latents[:, :1], 500)
        paused, release = pause_in_layer_1(model, "stepper")
        thread, result = run_in_thread("stepper", lambda: stream.step(latents[:, :1], 500))
        try:
            assert paused.wait(timeout=120)
            for call in (lambda: stream.step(latents[:, :1], 500), lambda: stream.commit(latents[:, :1]),
                         lambda: stream.prefill(text)):
                with pytest.raises(StreamError, match="another call of this stream runs"):
                    call()
        finally:
            release.set()
            thread.join(timeout=120)
        assert "error" not in result, result.get("error")
        assert torch.equal(result["value"], alone)  # the step under way was not disturbed
        assert torch.equal(stream.step(latents[:, :1], 500), alone)  # and the stream goes on


def test_a_model_with_an_open_stream_can_still_be_deep_copied():
    model = tiny_model("tiny")
    latents, text = video(model, 1)
    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        copy.deepcopy(model)  # the stream's lock is not copied (a lock cannot be)
        assert stream.step(latents, 500).shape == latents.shape


def test_a_forward_on_another_thread_during_a_step_never_touches_the_cache():
    model = tiny_model("tiny")
    twin = copy.deepcopy(model)  # an undisturbed stream, and the plain forward with the stream's patches
    latents, text = video(model, 3)
    timestep = torch.full((BATCH,), 300)
    rotary = rotary_embedding(model.config, 3, 8, 8)
    plain = one_shot(twin, latents, text, timestep, chunk=1, window=None, sink=0, text_timestep=0)
    with patches.streaming(twin, chunk=1, height=HEIGHT, width=WIDTH) as undisturbed:
        undisturbed.prefill(text)
        expected_first = undisturbed.step(latents[:, :1], 500)
        undisturbed.commit(latents[:, :1])
        expected_second = undisturbed.step(latents[:, 1:2], 500)

    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        stream.prefill(text)
        paused, release = pause_in_layer_1(model, "stepper")
        thread, result = run_in_thread("stepper", lambda: stream.step(latents[:, :1], 500))
        try:
            assert paused.wait(timeout=120)
            with torch.no_grad():  # the whole video, on this thread, while the stream's step is half-way
                other = model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                              image_rotary_emb=rotary, return_dict=False)[0]
        finally:
            release.set()
            thread.join(timeout=120)
        assert "error" not in result, result.get("error")
        assert torch.equal(other, plain)  # an ordinary forward with the model's patches, not the cache's
        assert torch.equal(result["value"], expected_first)
        stream.commit(latents[:, :1])
        assert torch.equal(stream.step(latents[:, 1:2], 500), expected_second)  # the cache is as it should be


def plain_output(model, latents, text) -> torch.Tensor:
    rotary = rotary_embedding(model.config, latents.shape[1], 8, 8)
    with torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.full((BATCH,), 300),
                     image_rotary_emb=rotary, return_dict=False)[0]


BAD_CALLS = [
    # (name, streaming options, the call on an open, prefilled stream (None: the opening itself fails), message)
    ("float64-latents", {}, lambda s, x, t: s.step(x.double(), 500), "torch.float64 on cpu, the model torch.float32"),
    ("int-latents", {}, lambda s, x, t: s.step(x.long(), 500), "torch.int64"),
    ("latents-not-a-tensor", {}, lambda s, x, t: s.step(x.tolist(), 500), "latents is a list"),
    ("three-channels", {}, lambda s, x, t: s.step(x[:, :, :3], 500), "latents of shape (2, 1, 3, 8, 8)"),
    ("timestep-none", {}, lambda s, x, t: s.step(x, None), "timestep None"),
    ("timestep-text", {}, lambda s, x, t: s.step(x, "500"), "timestep '500'"),
    ("timestep-bool", {}, lambda s, x, t: s.commit(x, True), "timestep True"),
    ("timestep-nan", {}, lambda s, x, t: s.step(x, float("nan")), "not finite"),
    ("timestep-1e39", {}, lambda s, x, t: s.step(x, torch.full((BATCH,), 1e39, dtype=torch.float64)), "beyond 2**63"),
    ("timestep-complex", {}, lambda s, x, t: s.step(x, torch.full((BATCH,), 1j)), "complex"),
    ("huge-frames", {"frames": 2**62}, None, "more than torch can make"),
    ("huge-height", {"height": 16 * 10**12}, None, "out of memory while streaming"),
    ("chunk-past-int64", {"chunk": 10**30}, None, "chunk must be an integer >= 1 (and below 2**63)"),
    ("window-past-int64", {"window": 10**30}, None, "window must be an integer"),
    ("text-timestep-1e39", {"text_timestep": 1e39}, None, "text_timestep must be within the timestep's range"),
]
BAD_PREFILLS = [
    ("prefill-float64", lambda t: t.double(), "encoder_hidden_states is torch.float64"),
    ("prefill-none", lambda t: None, "encoder_hidden_states is a NoneType"),
    ("prefill-batch-0", lambda t: t[:0], "with B >= 1"),
]


@pytest.mark.parametrize("name, options, call, message", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_bad_stream_inputs_are_stream_errors_and_leave_the_model_clean(name, options, call, message):
    model = tiny_model("tiny")
    latents, text = video(model, 2)
    before = plain_output(model, latents, text)
    with pytest.raises(StreamError, match=re.escape(message)):
        with patches.streaming(model, **{"chunk": 1, "height": HEIGHT, "width": WIDTH, **options}) as stream:
            stream.prefill(text)
            assert call is not None, "the stream opened"
            good = stream.step(latents[:, :1], 500)
            try:
                call(stream, latents[:, :1], text)
            finally:  # refused before anything ran: the stream is as it was and goes on
                assert patches.applied(model) == ["block-causal-attention", "per-frame-timesteps"]
                assert torch.equal(stream.step(latents[:, :1], 500), good)
    assert patches.applied(model) == [] and "forward" not in model.patch_embed.__dict__
    assert torch.equal(plain_output(model, latents, text), before)


@pytest.mark.parametrize("name, change, message", BAD_PREFILLS, ids=[case[0] for case in BAD_PREFILLS])
def test_bad_prompt_embeddings_are_stream_errors_and_the_stream_goes_on(name, change, message):
    model = tiny_model("tiny")
    latents, text = video(model, 2)
    with patches.streaming(model, chunk=1, height=HEIGHT, width=WIDTH) as stream:
        with pytest.raises(StreamError, match=re.escape(message)):
            stream.prefill(change(text))
        assert stream.cache_bytes() == 0
        stream.prefill(text)
        assert stream.step(latents[:, :1], 500).shape == latents[:, :1].shape
    assert patches.applied(model) == []
