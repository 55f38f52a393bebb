"""Issue 24's edges of the CLI and the Python API: each test here failed before its fix."""

from __future__ import annotations

import json

import pytest


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


# 4. Verdicts name what they verified; a missing folder and a bad weight are named as such.


def test_patch_verify_prints_the_parameters_it_verified(cli):
    result = cli("patch", "verify", "block-causal-attention:chunk=2,window=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PASS block-causal-attention with chunk=2, window=3, sink=0: max error"), result.stdout
    as_json = json.loads(cli("patch", "verify", "block-causal-attention:chunk=2,window=3", "--json").stdout)
    assert as_json["settings"] == [{"chunk": 2, "window": 3, "sink": 0}]


def test_lora_verify_of_a_missing_folder_says_it_does_not_exist(cli, tmp_path):
    line = one_error_line(cli("lora", "verify", str(tmp_path / "my-adapter"), "--base", "tiny"))
    assert f"{tmp_path / 'my-adapter'} does not exist" in line


def test_lora_merge_names_a_weight_that_is_not_a_number(cli, tmp_path):
    (tmp_path / "my-adapter").mkdir()
    line = one_error_line(cli("lora", "merge", str(tmp_path / "base"), f"{tmp_path / 'my-adapter'}:abc",
                              "--out", str(tmp_path / "merged")))
    assert "the weight after ':' must be a number" in line and "'abc'" in line
    assert not (tmp_path / "merged").exists()


# 6. Grammar.


def test_one_module_is_one_module_not_one_modules(cli):
    result = cli("modules", "tiny", "--filter", "proj_out")
    assert result.returncode == 0, result.stderr
    assert "1 module " in result.stdout.splitlines()[0] + " " and "1 modules" not in result.stdout


def test_a_one_layer_model_is_described_as_one_layer():
    from diffusers import CogVideoXTransformer3DModel

    from cogsurgeon.inspector.model_specs import tiny_config
    from cogsurgeon.patches.run_startup import _describe

    config = {key: value for key, value in tiny_config("tiny").items() if not key.startswith("_")}
    model = CogVideoXTransformer3DModel.from_config({**config, "num_layers": 1, "num_attention_heads": 2})
    assert "(1 layer, 2 heads)" in _describe(model, None)


# 1. trace never cuts a shape or a name.


@pytest.mark.slow
def test_trace_in_an_80_column_terminal_cuts_no_shape_and_no_name(cli):
    from test_cli_rough_edges import run_in_terminal

    from cogsurgeon.inspector.trace import format_shape

    traced = json.loads(cli("trace", "cogvideox-5b-i2v", "--json").stdout)
    status, output, stderr = run_in_terminal("trace", "cogvideox-5b-i2v", columns=80)
    assert status == 0, stderr
    assert max(len(line) for line in output.splitlines()) <= 80
    assert "…" not in output
    words = " ".join(output.split())
    expected = ["transformer_blocks.(0-41).attn1", "memory per attention call", "KV cache of patches.streaming"]
    for call in traced["attention"][:1]:
        expected += [format_shape(call[part]) for part in ("query", "key", "value", "output")]
    for module in traced["modules"]:
        if not module["name"].startswith("transformer_blocks.") or module["name"].startswith("transformer_blocks.0."):
            expected += [module["name"] or "(root)", format_shape(module["inputs"]), format_shape(module["outputs"])]
    missing = [text for text in expected if " ".join(text.split()) not in words]
    assert not missing, f"cut or missing at 80 columns: {missing[:5]}\n{output[:3000]}"
    # a patch that masks nothing has no row in the memory table
    memory_table = output.split("memory per attention call", 1)[1].split("KV cache", 1)[0]
    assert "no estimate" not in memory_table
    # a title wider than its table is a line of its own, not wrapped into the table's width
    assert "KV cache of patches.streaming: K and V of every layer" in output.splitlines()


# 5. Help that reads as finished: whole summaries, dedented paragraphs, examples last.


def _all_commands():
    import click

    from cogsurgeon.inspector.cli import cli

    def walk(group, path):
        for name, command in group.commands.items():
            yield (*path, name)
            if isinstance(command, click.Group):
                yield from walk(command, (*path, name))

    return list(walk(cli, ()))


def test_the_command_list_gives_whole_summaries(cli):
    for path in [(), ("lora",), ("patch",)]:
        listing = cli(*path, "--help").stdout.split("Commands:", 1)[1]
        assert "..." not in listing, listing


def test_every_commands_help_ends_with_examples(cli):
    for path in [(), *_all_commands()]:
        text = cli(*path, "--help").stdout
        description = text.split("\nOptions:", 1)[0].rstrip()
        last_paragraph = description.split("\n\n")[-1]
        assert last_paragraph.lstrip().startswith("Examples"), (path, last_paragraph)
        assert all(line.strip().startswith("cogsurgeon") for line in last_paragraph.splitlines()[1:]), (path, text)


def test_modules_help_is_dedented_and_lora_help_shows_merge_and_comfyui(cli):
    modules = cli("modules", "--help").stdout
    assert not [line for line in modules.split("Options:")[0].splitlines() if line.startswith("     ")
                and not line.lstrip().startswith("cogsurgeon")], modules
    lora = cli("lora", "--help").stdout
    assert "merge" in lora.split("Options:")[0] and "--to comfyui" in " ".join(lora.split())


# 7. The Python API stands alone.

PACKAGE_FOLDERS = ("inspector", "patches", "tools")


def test_no_docstring_cites_a_design_document_the_repository_does_not_ship():
    from conftest import REPO_ROOT

    if (REPO_ROOT / "DESIGN.md").exists():
        return
    citing = [str(path.relative_to(REPO_ROOT)) for folder in PACKAGE_FOLDERS
              for path in (REPO_ROOT / folder).rglob("*.py") if "DESIGN" in path.read_text()]
    assert citing == []


def test_help_of_tools_lora_shows_its_entry_points_merge_included():
    import pydoc

    from cogsurgeon.tools import lora

    text = pydoc.render_doc(lora, renderer=pydoc.plaintext)
    for entry in ("inspect_checkpoint(", "repair_checkpoint(", "verify_adapter(", "merge_loras("):
        assert entry in text, entry
    assert {"merge_loras", "parse_lora_spec"} <= set(lora.__all__) and "merge_loras" in dir(lora)
    from cogsurgeon.tools.lora.merge import merge_loras

    assert lora.merge_loras is merge_loras


def test_errors_of_python_calls_name_no_cli_flag():
    from cogsurgeon.inspector.plan import PlanError, plan_memory

    for bad in ({"gpu_memory": "lots"}, {"train": "lora:x"}):
        with pytest.raises(PlanError) as raised:
            plan_memory("tiny", **bad)
        assert "--" not in str(raised.value), raised.value
