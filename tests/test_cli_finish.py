"""Issue 24's edges of the CLI and the Python API: each test here failed before its fix."""

from __future__ import annotations

import json


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# 2. A mistyped command is a mistyped command, not an unknown model.


def test_a_mistyped_command_gets_did_you_mean(cli):
    line = one_error_line(cli("plann"))
    assert "did you mean `plan`?" in line
    assert "unknown model" not in line


def test_a_word_near_no_command_is_still_an_unknown_model(cli):
    assert "unknown model 'zzzz'" in one_error_line(cli("zzzz"))


# 3. The same dtype names everywhere; frames that are not 4k+1 get the same note; one default size and dtype.


def test_every_dtype_option_takes_the_short_names(cli):
    modules = cli("modules", "tiny", "--dtype", "fp16", "--json")
    assert modules.returncode == 0, modules.stderr
    assert {row["dtype"] for row in json.loads(modules.stdout) if row["params"]} == {"float16"}
    plan = cli("plan", "tiny", "--dtype", "bf16", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["settings"]["dtype"] == "bfloat16"


def test_plan_and_trace_give_the_same_note_for_frames_that_are_not_4k_plus_1(cli):
    size = ("--frames", "10", "--height", "64", "--width", "64")
    plan = cli("plan", "tiny", *size, "--json")
    trace = cli("trace", "tiny", *size, "--json")
    assert plan.returncode == 0 and trace.returncode == 0, (plan.stderr, trace.stderr)
    note = "10 frames is not 4k+1: the VAE keeps 9"
    assert note in json.loads(trace.stdout)["notes"]
    assert note in json.loads(plan.stdout)["notes"]


def test_plan_tiny_and_plan_memory_tiny_plan_the_same_run(cli):
    from cogsurgeon.inspector.plan import plan_memory

    from_cli = json.loads(cli("plan", "tiny", "--json").stdout)["settings"]
    from_python = plan_memory("tiny").settings.to_json()
    assert from_python == from_cli
    trace = json.loads(cli("trace", "tiny", "--json").stdout)
    assert (from_python["frames"], from_python["height"], from_python["width"]) == (9, 64, 64)
    assert trace["dtype"].removeprefix("torch.") == from_python["dtype"] == "float32"
