"""`cogsurgeon patch list|verify` and `cogsurgeon run` as real subprocesses: an unchanged script (and a two-process
torchrun launch) that only calls `from_pretrained` and a forward gets the causal reference's output."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cogsurgeon.inspector.geometry import layout_of_inputs
from cogsurgeon.patches.reference import causal_mask, reference_processors
from cogsurgeon.patches.verify import forward, tiny_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PLUGIN = '''
from cogsurgeon import patches


class ClaimsCausal(patches.Patch):
    """Claims causal attention but changes nothing: verify must catch it."""

    name = "claims-causal"
    summary = "a patch whose claim is false (test plugin)"

    def apply(self, transformer, **options):
        pass

    def revert(self, transformer, record):
        pass

    def reference_mask(self, layout):
        from cogsurgeon.patches.reference import causal_mask

        return causal_mask(layout)
'''

SCRIPT = '''
"""A user's script: knows nothing of cogsurgeon."""
import sys

import torch
from diffusers import CogVideoXTransformer3DModel

model = CogVideoXTransformer3DModel.from_pretrained(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=False)
with torch.no_grad():
    output = model(**inputs)[0]
torch.save(output, sys.argv[3])
sys.exit(int(sys.argv[4]))
'''

DISTRIBUTED_SCRIPT = '''
"""The same forward on every rank of a torchrun launch (gloo, CPU); rank r saves its output."""
import os
import sys

import torch
import torch.distributed as dist
from diffusers import CogVideoXTransformer3DModel

dist.init_process_group("gloo")
model = CogVideoXTransformer3DModel.from_pretrained(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=False)
with torch.no_grad():
    output = model(**inputs)[0]
checksum = output.sum().reshape(1)
dist.all_reduce(checksum)  # the ranks really ran together
torch.save(output, os.path.join(sys.argv[3], f"rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
'''


def test_patch_list_names_the_built_ins(cli):
    result = cli("patch", "list", "--json")
    assert result.returncode == 0, result.stderr
    names = [row["name"] for row in json.loads(result.stdout)]
    assert names[:3] == ["causal-attention", "frame-causal-attention", "attention-mask"]
    assert "frame-causal-attention" in cli("patch", "list").stdout


def test_patch_verify_passes_and_reports_every_case(cli):
    result = cli("patch", "verify", "frame-causal-attention", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["revert_bit_exact"] and report["max_error"] <= 1e-4
    cases = {(case["variant"], case["processor"]) for case in report["details"]}
    assert cases == {(v, p) for v in ("tiny", "tiny-i2v", "tiny-1.5") for p in ("plain", "fused")}


@pytest.mark.slow
def test_patch_verify_exits_1_when_a_patch_does_not_do_what_it_claims(cli, tmp_path):
    (tmp_path / "claims_causal.py").write_text(FAKE_PLUGIN)
    dist_info = tmp_path / "claims_causal-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: claims-causal\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[cogsurgeon.patches]\nclaims-causal = claims_causal:ClaimsCausal\n")
    result = cli("patch", "verify", "claims-causal", env={"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{tmp_path}"})
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("FAIL claims-causal: max error") and "revert bit-exact: yes" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("patch", "verify", "sliding-window"), "unknown patch 'sliding-window'"),
        (("run", "--patch", "sliding-window", "--", "true"), "unknown patch 'sliding-window'"),
        (("run", "--patch", "causal-attention"), "no command to run"),
        (("run", "--", "true"), "name at least one patch"),
        (("run", "--patch", "causal-attention", "--patch", "frame-causal-attention", "--", "true"), "do not compose"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    result = cli(*args, in_process=True)  # `run` refuses these before it launches anything: no process of its own
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and result.stdout == ""


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny transformer saved with save_pretrained, saved forward inputs, and the causal reference output."""
    from cogsurgeon.inspector.loading import build_tiny

    folder = tmp_path_factory.mktemp("tiny-model")
    model = build_tiny("tiny")
    model.save_pretrained(folder / "transformer")
    inputs = tiny_inputs(model)
    torch.save(inputs, folder / "inputs.pt")
    with reference_processors(model, causal_mask(layout_of_inputs(model.config, inputs))):
        expected = forward(model, inputs)
    return folder, expected, forward(model, inputs)


@pytest.mark.slow
@pytest.mark.diffusers_versions
def test_run_patches_an_unchanged_script_and_passes_its_exit_code_through(cli, saved_tiny, tmp_path):
    folder, expected, unpatched = saved_tiny
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    # The user's own sitecustomize must still run (cogsurgeon's shadows it on PYTHONPATH and chains to it).
    own_site = tmp_path / "own_site"
    own_site.mkdir()
    (own_site / "sitecustomize.py").write_text(
        f"open({str(tmp_path / 'own_site_ran')!r}, 'w').write('yes')\n"
    )
    output = tmp_path / "output.pt"
    result = cli(
        "run", "--patch", "causal-attention", "--",
        sys.executable, str(script), str(folder / "transformer"), str(folder / "inputs.pt"), str(output), "3",
        env={"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{own_site}"},
    )
    assert result.returncode == 3, result.stderr
    actual = torch.load(output)
    assert (actual - expected).abs().max() <= 1e-4
    assert (actual - unpatched).abs().max() > 1e-3
    assert f"cogsurgeon run: causal-attention -> CogVideoXTransformer3DModel from {folder / 'transformer'}" in result.stderr
    assert (tmp_path / "own_site_ran").read_text() == "yes"


@pytest.mark.slow
@pytest.mark.diffusers_versions
def test_run_patches_every_rank_of_a_torchrun_launch(cli, saved_tiny, tmp_path):
    folder, expected, _ = saved_tiny
    script = tmp_path / "distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = cli(
        "run", "--patch", "causal-attention", "--",
        str(torchrun), "--standalone", "--nproc_per_node", "2",
        str(script), str(folder / "transformer"), str(folder / "inputs.pt"), str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (torch.load(tmp_path / f"rank{rank}.pt") - expected).abs().max() <= 1e-4
        assert f"rank {rank}]" in result.stderr
    assert result.stderr.count("cogsurgeon run: causal-attention -> CogVideoXTransformer3DModel") == 2


# run_patched's refusals name its keyword arguments from Python and `cogsurgeon run`'s flags on the command line.
RUN_REFUSALS = [
    (dict(command=[], patch_names=["causal-attention"]), "no command to run: give command= (the program",
     ("--patch", "causal-attention"), "no command to run: give -- COMMAND (the program"),
    (dict(command=["true"], patch_names=[]), "name at least one patch (patch_names=), or record the attention "
     "(record=) or run context-parallel (ulysses=)", ("--", "true"), "name at least one patch (--patch), or record "
     "the attention (--record-attention) or run context-parallel (--ulysses)"),
    (dict(command=["true"], patch_names=["window-attention:window=2", "window-attention:window=3"]),
     "patch_names= names window-attention twice with different options",
     ("--patch", "window-attention:window=2", "--patch", "window-attention:window=3", "--", "true"),
     "--patch names window-attention twice with different options"),
    (dict(command=["true"], patch_names=["causal-attention"], ulysses=1), "ulysses=1: expected 2 or more", None, None),
    (dict(command=["true"], patch_names=[], ulysses=2, record="recording"), "record= and ulysses= cannot be combined",
     ("--ulysses", "2", "--record-attention", "out.json", "--", "true"),
     "--record-attention and --ulysses cannot be combined"),
]


@pytest.mark.parametrize("kwargs, python_message, args, cli_message", RUN_REFUSALS,
                         ids=[case[1].split(":")[0] for case in RUN_REFUSALS])
def test_run_patched_names_its_keywords_and_the_command_its_flags(cli, tmp_path, kwargs, python_message, args,
                                                                  cli_message):
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.patches.launcher import RecordRequest, run_patched

    if kwargs.get("record"):
        kwargs = {**kwargs, "record": RecordRequest(tmp_path / "out.json")}
    with pytest.raises(CogsurgeonError) as raised:
        run_patched(**kwargs)
    assert python_message in str(raised.value) and "--" not in str(raised.value), raised.value
    if args is not None:  # the CLI's --ulysses is an IntRange: click refuses 1 before run_patched is called
        result = cli("run", *args, cwd=tmp_path, in_process=True)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("cogsurgeon: error: ") and cli_message in line, line
