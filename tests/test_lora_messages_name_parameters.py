"""Issue 24 item 7: an error raised by a `tools.lora` call names that call's keyword arguments (`step=N`,
`latest=True`, `alpha=`, `to=`), not the CLI's flags; the CLI, for the same mistake, names its flags (`--step N`,
`--latest`), exit 2, one line. Real checkpoints written by VideoX-Fun's save code on the tiny model."""

from __future__ import annotations

import re

import pytest

from lora_trainers import save_videox_fun_peft, train


CLI_FLAG = re.compile(r"--(alpha|trainer|step|latest|override-stored-alpha|to|out|force|base|bake-scale)(?![\w-])")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A VideoX-Fun output folder with the checkpoints of steps 50 and 100, no lora_alpha stored (two trainer
    defaults fit its format)."""
    trained = train("tiny", 4, 2, inject=True)
    out = save_videox_fun_peft(trained, tmp_path_factory.mktemp("videox") / "out", 50)
    save_videox_fun_peft(trained, out, 100)
    return out


def python_message(call) -> str:
    from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError

    with pytest.raises(LoraCheckpointError) as raised:
        call()
    message = str(raised.value)
    assert not CLI_FLAG.search(message), message  # a trainer's own flags, cited (`--network_alpha=32`), stay
    return message


def cli_line(cli, *args: str) -> str:
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("cogsurgeon: error: "), line
    return line


def test_several_checkpoints_name_step_and_latest(two_steps, cli):
    from cogsurgeon.tools.lora import inspect_checkpoint

    assert "pass step=N for one, or latest=True for step 100" in python_message(lambda: inspect_checkpoint(two_steps))
    assert "pass --step N for one, or --latest for step 100" in cli_line(cli, "lora", "inspect", str(two_steps))


def test_one_file_with_latest_names_step_and_latest(two_steps, cli):
    from cogsurgeon.tools.lora import inspect_checkpoint

    file = two_steps / "checkpoint-50.safetensors"
    assert "is one file: step= and latest=True choose among the checkpoints of a folder" in python_message(
        lambda: inspect_checkpoint(file, latest=True))
    assert "is one file: --step and --latest choose among the checkpoints of a folder" in cli_line(
        cli, "lora", "inspect", str(file), "--latest")


def test_a_folder_without_numbered_checkpoints_names_latest(two_steps, tmp_path, cli):
    import shutil

    from cogsurgeon.tools.lora import inspect_checkpoint

    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(two_steps / "checkpoint-50.safetensors", folder / "adapter_model.safetensors")
    assert "holds no numbered checkpoints for latest=True to choose from" in python_message(
        lambda: inspect_checkpoint(folder, latest=True))
    assert "holds no numbered checkpoints for --latest to choose from" in cli_line(
        cli, "lora", "inspect", str(folder), "--latest")


def test_an_unsettled_alpha_names_alpha_and_trainer(two_steps, tmp_path, cli):
    from cogsurgeon.tools.lora import repair_checkpoint

    file = two_steps / "checkpoint-50.safetensors"
    assert "Settle it with alpha=A or trainer=NAME" in python_message(
        lambda: repair_checkpoint(file, tmp_path / "refused"))
    assert "Settle it with --alpha A or --trainer NAME" in cli_line(
        cli, "lora", "repair", str(file), "--out", str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_an_unknown_consumer_names_to(two_steps, tmp_path, cli):
    from cogsurgeon.tools.lora import repair_checkpoint

    file = two_steps / "checkpoint-50.safetensors"
    assert "to='peft,a1111': expected a comma-separated list" in python_message(
        lambda: repair_checkpoint(file, tmp_path / "out", alpha=2, to="peft,a1111"))
    assert "--to 'peft,a1111': expected a comma-separated list" in cli_line(
        cli, "lora", "repair", str(file), "--out", str(tmp_path / "out"), "--alpha", "2", "--to", "peft,a1111")


def test_an_unknown_trainer_names_trainer(two_steps):
    from cogsurgeon.tools.lora import inspect_checkpoint

    # the CLI's --trainer is a choice: click names the flag itself before the library is called
    assert "trainer='nope': unknown trainer" in python_message(
        lambda: inspect_checkpoint(two_steps, trainer="nope"))


def test_an_existing_output_names_out_dir_and_force(two_steps, tmp_path, cli):
    from cogsurgeon.tools.lora import repair_checkpoint
    from cogsurgeon.tools.lora.publish import OutputError

    file = two_steps / "checkpoint-50.safetensors"
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError) as raised:
        repair_checkpoint(file, tmp_path / "taken", alpha=2)
    assert "already exists: choose another out_dir=, or pass force=True to replace an earlier repair" in str(
        raised.value)
    assert not CLI_FLAG.search(str(raised.value))
    assert "already exists: choose another --out, or pass --force to replace an earlier repair" in cli_line(
        cli, "lora", "repair", str(file), "--out", str(tmp_path / "taken"), "--alpha", "2")


def test_an_output_through_a_symlink_names_out_dir(two_steps, tmp_path, cli):
    from cogsurgeon.tools.lora import repair_checkpoint
    from cogsurgeon.tools.lora.publish import OutputError

    file = two_steps / "checkpoint-50.safetensors"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError) as raised:
        repair_checkpoint(file, tmp_path / "link", alpha=2)
    assert f"out_dir={tmp_path / 'link'} is a symlink to" in str(raised.value)
    assert f"--out {tmp_path / 'link'} is a symlink to" in cli_line(
        cli, "lora", "repair", str(file), "--out", str(tmp_path / "link"), "--alpha", "2")


def test_verify_on_a_published_config_names_base_spec(tmp_path, cli):
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora import repair_checkpoint, verify_adapter

    trained = train("tiny", 4, 2, inject=True)
    adapter = tmp_path / "adapter"
    repair_checkpoint(save_videox_fun_peft(trained, tmp_path / "out", 1) / "checkpoint-1.safetensors", adapter,
                      alpha=2)
    with pytest.raises(CogsurgeonError) as raised:
        verify_adapter(adapter, "cogvideox-5b")
    assert "so base_spec= must be tiny" in str(raised.value) and not CLI_FLAG.search(str(raised.value))
    assert "so --base must be tiny" in cli_line(cli, "lora", "verify", str(adapter), "--base", "cogvideox-5b")


# The report's warnings and alpha detail follow the same rule as the errors: keywords from Python, flags from the
# CLI (text and JSON), controls on the TUI's LoRA screen.

def test_report_warnings_and_alpha_detail_name_keywords_in_python(two_steps):
    from cogsurgeon.tools.lora import inspect_checkpoint

    file = two_steps / "checkpoint-50.safetensors"
    unsettled = inspect_checkpoint(file)
    assert any(w.endswith("pass alpha=A or trainer=NAME") for w in unsettled.warnings), unsettled.warnings
    by_trainer = inspect_checkpoint(file, trainer="videox-fun")
    assert by_trainer.alpha_detail.startswith("trainer='videox-fun': VideoX-Fun"), by_trainer.alpha_detail
    assert any("If your training used another value, pass alpha=A." in w for w in by_trainer.warnings)
    assert inspect_checkpoint(file, alpha=3).alpha_detail == "alpha="
    for report in (unsettled, by_trainer):
        assert not [text for text in (*report.warnings, report.alpha_detail) if CLI_FLAG.search(text)]


def test_report_warnings_and_alpha_detail_name_flags_on_the_command_line(two_steps, cli):
    import json

    file = str(two_steps / "checkpoint-50.safetensors")
    result = cli("lora", "inspect", file)
    assert result.returncode == 0 and "pass --alpha A or --trainer NAME" in result.stderr, result.stderr
    result = cli("lora", "inspect", file, "--trainer", "videox-fun")
    assert "lora_alpha    32 from trainer (--trainer 'videox-fun': VideoX-Fun" in result.stdout, result.stdout
    assert "If your training used another value, pass --alpha A." in result.stderr, result.stderr
    report = json.loads(cli("lora", "inspect", file, "--trainer", "videox-fun", "--json").stdout)
    assert report["alpha_detail"].startswith("--trainer 'videox-fun': ")
    assert any("pass --alpha A." in warning for warning in report["warnings"])
    assert "from flag (--alpha)" in cli("lora", "inspect", file, "--alpha", "3").stdout
    assert not re.search(r"(?<![\w.])(alpha|trainer)=", result.stdout + result.stderr + json.dumps(report))


@pytest.mark.slow
def test_report_warnings_and_alpha_detail_name_controls_on_the_lora_screen(two_steps):
    import asyncio

    from test_tui import SIZE, settle, shown_text, wait_for_model

    from cogsurgeon.inspector.tui.app import CogsurgeonApp

    async def scenario() -> tuple[str, str]:
        app = CogsurgeonApp("tiny")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for_model(pilot)
            await pilot.press("l")
            await pilot.pause()
            await pilot.press(*str(two_steps / "checkpoint-50.safetensors"), "enter")
            await settle(pilot)
            unsettled = " ".join(shown_text(app.screen.query_one("#lora-findings")).split())
            app.screen.query_one("#lora-trainer").value = "videox-fun"
            await settle(pilot)
            return unsettled, " ".join(shown_text(app.screen.query_one("#lora-findings")).split())

    unsettled, by_trainer = asyncio.run(scenario())
    assert "enter it in the lora_alpha field or choose the trainer" in unsettled, unsettled
    assert "the trainer 'videox-fun': VideoX-Fun" in by_trainer, by_trainer
    assert "If your training used another value, enter it in the lora_alpha field." in by_trainer, by_trainer
    for shown in (unsettled, by_trainer):
        assert not CLI_FLAG.search(shown) and not re.search(r"(?<![\w.])(alpha|trainer)=", shown), shown
