"""`cogsurgeon.parallel`: Ulysses context parallelism on diffusers' engine keeps every patch exact.

The multi-process cases run once per world size, `torchrun --nproc-per-node 2` and `4` on CPU with gloo
(tests/parallel_cases.py, many cases per launch); every rank's output is compared here with the one-process output
that rank computed before context parallelism was enabled. Degree 4 runs the tiny models with 4 heads (the tiny
specs have 2, and each rank attends H/N heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogsurgeon import parallel, patches
from cogsurgeon.inspector import load_transformer
from cogsurgeon.patches.ulysses import (
    gathered_runs,
    padded_length,
    shard_bounds,
    to_gathered_order,
    to_original_order,
)

CASES_SCRIPT = Path(__file__).with_name("parallel_cases.py")
TOLERANCE = 1e-5  # fp32


def _diffusers_has_cp_engine() -> bool:
    try:
        import diffusers.hooks.context_parallel  # noqa: F401
    except ImportError:
        return False
    return True


needs_engine = pytest.mark.skipif(not _diffusers_has_cp_engine(), reason="diffusers < 0.36 has no context-parallel "
                                  "engine (test_refused_without_the_engine covers that)")


def _torchrun(world_size: int, out: Path) -> list[dict]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
               "--standalone", str(CASES_SCRIPT), str(out)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


# torchrun's ranks are processes of their own, each importing torch and diffusers: 11 s of CPU for 2, 23 s for 4
@pytest.fixture(scope="module", params=[pytest.param(2, id="ulysses2", marks=pytest.mark.slow),
                                        pytest.param(4, id="ulysses4", marks=pytest.mark.slow)])
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    if not _diffusers_has_cp_engine():
        pytest.skip("diffusers < 0.36 has no context-parallel engine")
    return request.param, _torchrun(request.param, tmp_path_factory.mktemp(f"ulysses{request.param}"))


def test_every_patch_on_every_rank_equals_one_process(ranks):
    degree, saved = ranks
    cases = list(saved[0]["one_process"])
    # 10 patch cases on tiny and tiny-1.5 (an even and a padded size) and tiny-i2v, and frame-causal with
    # fuse_qkv_projections() called while context-parallel (it swaps every processor)
    assert len(cases) == 51
    for rank, results in enumerate(saved):
        for case in cases:
            reference, output = results["one_process"][case], results["parallel"][case]
            assert output.shape == reference.shape
            error = (output - reference).abs().max().item()
            assert error <= TOLERANCE, f"rank {rank}, ulysses {degree}, {case}: {error}"


def test_each_rank_ran_its_shard_of_the_video(ranks):
    degree, saved = ranks
    for results in saved:
        for name, shard in results["block_tokens"].items():
            assert set(shard["seen"]) <= {shard["video_tokens"] // degree, shard["padded_video_tokens"] // degree}
            assert shard["video_tokens"] // degree in shard["seen"], name


def test_a_patch_applied_before_enable_keeps_its_meaning(ranks):
    _, saved = ranks
    for results in saved:
        reference = results["one_process"][("tiny", (13, 64, 64), "frame-causal")]
        assert (results["parallel"][("tiny", "patched-before-enable")] - reference).abs().max() <= TOLERANCE


def test_streaming_steps_equal_one_process_with_the_cache_sharded_by_heads(ranks):
    degree, saved = ranks
    for results in saved:
        for name in ("tiny", "tiny-1.5", "tiny-i2v"):
            steps, cache_bytes = results["stream"][(name, "one_process")]
            parallel_steps, parallel_cache_bytes = results["stream"][(name, "parallel")]
            assert len(parallel_steps) == len(steps) == 6
            for step, parallel_step in zip(steps, parallel_steps):
                assert (parallel_step - step).abs().max() <= TOLERANCE
            assert parallel_cache_bytes * degree == cache_bytes


def test_disable_restores_the_model_bit_for_bit_and_names_the_route(ranks):
    _, saved = ranks
    for results in saved:
        for name, (after_disable, never_parallel) in results["restored"].items():
            assert torch.equal(after_disable, never_parallel), name
        # CI has no accelerator: diffusers >= 0.42's enable_parallelism cannot pick a device there
        assert results["route"] in ("enable_parallelism", "apply_context_parallel")


# -- one process: the arithmetic and the refusals ------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 7, 8, 226, 17550])
@pytest.mark.parametrize("degree", [2, 3, 4, 8])
def test_shard_bounds_are_torch_chunk_of_the_padded_tokens(length, degree):
    """diffusers shards with `torch.chunk`; a length that does not divide is padded to one that does first."""
    padded = torch.arange(padded_length(length, degree))
    assert padded_length(length, degree) % degree == 0 and 0 <= padded_length(length, degree) - length < degree
    chunks = [piece.tolist() for piece in padded.chunk(degree)] if length else [[]] * degree
    assert [padded[start:end].tolist() for start, end in shard_bounds(length, degree)] == chunks


@pytest.mark.parametrize("text,video,degree", [(8, 48, 2), (226, 17550, 4), (7, 27, 4), (0, 16, 2), (1, 5, 4)])
def test_the_gathered_order_maps_back_to_the_original(text, video, degree):
    """What diffusers' all-to-all gathers (rank-major [text r ; video r], each shard padded) comes back in
    [text ; video] order without the padding, and back again with zeros for it."""
    sequence = torch.arange(1, text + video + 1)  # the padding is 0
    text_shards = torch.nn.functional.pad(sequence[:text], (0, padded_length(text, degree) - text)).chunk(degree) \
        if text else [sequence[:0]] * degree
    video_shards = torch.nn.functional.pad(sequence[text:], (0, padded_length(video, degree) - video)).chunk(degree)
    gathered = torch.cat([torch.cat([t, v]) for t, v in zip(text_shards, video_shards)])
    runs = gathered_runs(text, video, degree)
    assert torch.equal(to_original_order(gathered, runs, dim=0), sequence)
    assert torch.equal(to_gathered_order(sequence, runs, dim=0), gathered)


@pytest.mark.parametrize("heads,degree,valid", [(48, 5, "2, 3, 4, 6, 8, 12, 16, 24, 48"),
                                                (30, 4, "2, 3, 5, 6, 10, 15, 30")])
def test_a_degree_that_does_not_divide_the_heads_names_the_valid_ones(heads, degree, valid):
    with pytest.raises(parallel.ContextParallelError, match=f"does not divide this model's {heads} attention heads.*"
                       f"use one of {valid}$"):
        parallel.check_degree_for_heads(heads, degree)


@needs_engine
def test_without_a_process_group_enable_says_how_to_launch_and_changes_nothing():
    model = load_transformer("tiny")
    processors = [module.processor for module in model.modules() if hasattr(module, "set_processor")]
    with pytest.raises(parallel.ContextParallelError, match="initialised process group.*torchrun"):
        parallel.enable(model, ulysses=2)
    assert [module.processor for module in model.modules() if hasattr(module, "set_processor")] == processors
    assert parallel.ulysses_degree(model) is None and model._parallel_config is None


@pytest.mark.diffusers_versions
def test_refused_without_the_engine():
    """diffusers 0.32 to 0.35 have no context-parallel engine: a clear error naming the minimum version."""
    if _diffusers_has_cp_engine():
        pytest.skip("this diffusers has the engine (the multi-process tests cover it)")
    with pytest.raises(parallel.ContextParallelError, match=r"install diffusers>=0\.36"):
        parallel.enable(load_transformer("tiny"), ulysses=2)


# -- `cogsurgeon run --ulysses N`: an unchanged script, context-parallel under torchrun -----------------------------

UNCHANGED_SCRIPT = """
import os, sys, torch
from diffusers import CogVideoXTransformer3DModel
from cogsurgeon.inspector.geometry import pipeline_inputs
from cogsurgeon.inspector.model_specs import tiny_config

torch.manual_seed(0)
model = CogVideoXTransformer3DModel.from_config(tiny_config("tiny")).eval()   # the program knows nothing of ranks
inputs = pipeline_inputs(model.config, (13, 64, 64), batch=2, seed=3)
with torch.no_grad():
    output = model(**inputs, return_dict=False)[0]
state = (type(model.transformer_blocks[0].attn1.processor).__name__, getattr(model, "_cogsurgeon_parallel", None))
torch.save({"output": output, "processor": state[0], "degree": state[1] and state[1].degree},
           os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', 'alone')}.pt"))
"""


@pytest.mark.slow  # torchrun with 2 ranks under `run`
@needs_engine
def test_run_ulysses_runs_an_unchanged_script_context_parallel_with_its_patches(cli, tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(UNCHANGED_SCRIPT)
    environment = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = cli("run", "--ulysses", "2", "--patch", "frame-causal-attention", "--", sys.executable, str(script),
                 str(tmp_path), env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("frame-causal-attention, ulysses 2 -> CogVideoXTransformer3DModel") == 2
    model = load_transformer("tiny")
    from cogsurgeon.inspector.geometry import pipeline_inputs

    inputs = pipeline_inputs(model.config, (13, 64, 64), batch=2, seed=3)
    with torch.no_grad(), patches.patched(model, "frame-causal-attention"):
        reference = model(**inputs, return_dict=False)[0]
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert saved["degree"] == 2 and saved["processor"] == "PatchedCogVideoXAttnProcessor"
        assert (saved["output"] - reference).abs().max() <= TOLERANCE


FAILING_RANK_SCRIPT = UNCHANGED_SCRIPT.replace(
    "with torch.no_grad():",
    "if os.environ.get('RANK') == '1':\n    raise RuntimeError('rank 1 fails before the forward')\nwith torch.no_grad():")


@pytest.mark.slow  # torchrun with 2 ranks under `run`
@needs_engine
def test_run_ulysses_ends_when_one_rank_fails(cli, tmp_path):
    """A rank that ends on an exception leaves at once (no exit barrier: its peer is waiting for it inside the
    forward's all-to-all), so torchrun sees the failure and ends the job, instead of both waiting for ever."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK_SCRIPT)
    environment = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = cli("run", "--ulysses", "2", "--", sys.executable, str(script), str(tmp_path), env=environment,
                 timeout=240)
    assert result.returncode != 0
    assert "rank 1 fails before the forward" in result.stderr


# -- `plan --ulysses N`: one GPU's peak ----------------------------------------------------------------------------


@needs_engine
def test_plan_ulysses_books_one_rank_the_weights_whole_and_a_share_of_the_activations(cli):
    one, two = (json.loads(cli("plan", "tiny", "--frames", "13", "--height", "64", "--width", "64", "--ulysses",
                               str(n), "--patch", "frame-causal-attention", "--json").stdout) for n in (1, 2))
    assert two["settings"]["ulysses"] == 2
    assert two["breakdown"]["weights"] == one["breakdown"]["weights"] > 0  # every rank holds the whole model
    assert 0 < two["breakdown"]["activations"] < one["breakdown"]["activations"]
    assert two["peak_bytes"] < one["peak_bytes"]


def test_plan_ulysses_that_does_not_divide_the_heads_is_one_line_naming_the_valid_degrees(cli):
    result = cli("plan", "cogvideox-5b", "--ulysses", "5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "cogsurgeon: error: --ulysses 5 does not divide this model's 48 attention heads (each rank attends H/N heads): "
        "use one of 2, 3, 4, 6, 8, 12, 16, 24, 48"
    ]


@pytest.mark.slow
@needs_engine
def test_trace_ulysses_shows_one_ranks_shapes(cli):
    """5B at 49x480x720 over 4 ranks: 226 text and 17,550 video tokens padded to 228 and 17,552, a quarter each per
    rank in the blocks; attention on all 17,776 real tokens for 12 of the 48 heads; the video whole after the gather."""
    result = json.loads(cli("trace", "cogvideox-5b", "--ulysses", "4", "--json").stdout)
    assert result["attention"][0]["query"] == [2, 12, 17776, 64]
    modules = {module["name"]: module for module in result["modules"]}
    assert modules["transformer_blocks.1"]["inputs"]["hidden_states"] == [2, 4388, 3072]
    assert modules["transformer_blocks.1"]["inputs"]["encoder_hidden_states"] == [2, 57, 3072]
    assert modules["proj_out"]["inputs"]["input"] == [2, 17550, 3072]
    assert result["output"] == [2, 13, 16, 60, 90]
