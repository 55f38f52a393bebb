"""Every code block of README.md runs as written.

The blocks are found generically (any fenced block, any section, whoever added it):

- ```python blocks run one by one, each in a fresh interpreter, so each must be complete on its own;
- ```bash blocks run line by line (a line ending in `\\` continues), each line one command through `bash` with the
  venv active (its bin first on PATH, as `. .venv/bin/activate` does), and must exit 0; one block is one test, its
  commands in order, since a later line may read what an earlier one wrote (`--save xray.json`, then `show xray.json`)
  and the suite runs its tests in parallel, on workers that do not share a folder. A line that is only `cogsurgeon`
  with plain words (no quotes, variables or redirections; a `# comment` or a `| jq ...` tail allowed) runs through
  conftest's `run_cli`, in this process where the command allows it (not `run`, which launches a program), as the
  other CLI tests do: the same exit status and output without a new interpreter's torch and diffusers import; its
  `| ...` tail then reads that output through `bash -o pipefail`, and both must exit 0;
- blocks of any other language, or none (the layout tree), are not code and are not run.

Everything runs in one folder laid out as a reader's would be (`readme_world`): a saved model `./my-finetune`, a
CogVideo trainer's LoRA checkpoint `out/checkpoint-500`, a base model root `./CogVideoX-5b-I2V`, a second repaired
adapter `other-adapter` and the scripts `test.py` and `train.py`, all made from the tiny models, so that commands
naming them run for real on a CPU; the commands of one block run in order (a repair before the verify of its
output), each block in its own copy of that folder, so no block depends on another's files or order. Commands that name published models run on them as written (meta device). A snippet that needs another
file: add it to `readme_world`.

Not runnable? Say why, in one of two ways:
- put `<!-- no-test: REASON -->` on the line just before the block's opening fence (the whole block is skipped);
- or, for one command of a bash block, add its exact line to `SKIPPED_COMMANDS` below with the reason.
Both show up as skips with that reason; a `SKIPPED_COMMANDS` entry that no longer matches a README line fails.
"""

from __future__ import annotations

import io
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli, runs_in_process

README = Path(__file__).resolve().parents[1] / "README.md"
NO_TEST = re.compile(r"<!--\s*no-test:\s*(?P<reason>.+?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<language>[\w+-]*)\s*$")

SKIPPED_COMMANDS = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/cogsurgeon":
        "set-up: makes a venv and installs from PyPI (this suite already runs in one), then opens the TUI",
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -n auto':
        "set-up: makes a venv and installs from PyPI, then runs this very suite",
    ". .venv/bin/activate":
        "set-up: every command here already runs with the venv's bin first on PATH, which is what it does",
    "cogsurgeon run --patch frame-causal-attention -- torchrun --nproc_per_node 2 train.py":
        "a two-process launch, slow on a CPU; torchrun under run is tests/test_patches_cli.py::"
        "test_run_patches_every_rank_of_a_torchrun_launch",
}


@dataclass(frozen=True)
class Snippet:
    language: str
    line: int  # 1-based line of the code in README.md
    code: str
    skip_reason: str | None

    @property
    def label(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"README.md:{self.line} {first[:60]}"


def fenced_blocks(text: str) -> list[Snippet]:
    """Every fenced block: its language, first line of code, code, and the reason of a `no-test` comment on the
    line before its opening fence."""
    lines = text.splitlines()
    blocks: list[Snippet] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence = opening["fence"]
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        previous = lines[index - 1] if index else ""
        marker = NO_TEST.search(previous)
        blocks.append(Snippet(opening["language"].lower(), index + 2, "\n".join(lines[index + 1 : end]) + "\n",
                              marker["reason"] if marker else None))
        index = end + 1
    return blocks


def bash_commands(snippet: Snippet) -> list[tuple[int, str]]:
    """(README line, command) for each command of a bash block; `\\` at a line end continues the command."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start = snippet.line
    for offset, line in enumerate(snippet.code.splitlines()):
        if not pending:
            start = snippet.line + offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        command = " ".join([*pending, line]) if pending else line
        pending = []
        if command.strip() and not command.strip().startswith("#"):
            commands.append((start, command.strip()))
    return commands


SNIPPETS = fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON = [snippet for snippet in SNIPPETS if snippet.language in ("python", "py")]
BASH_BLOCKS = [snippet for snippet in SNIPPETS if snippet.language in ("bash", "sh", "shell", "console")]
BASH = [(snippet, line, command) for snippet in BASH_BLOCKS for line, command in bash_commands(snippet)]


def skip_reason(snippet: Snippet, command: str) -> str | None:
    """Why a README command is not run here, or None: the block's `no-test` reason, else its SKIPPED_COMMANDS one."""
    return snippet.skip_reason or SKIPPED_COMMANDS.get(command)


def test_the_readme_has_code_and_every_listed_skip_still_names_a_readme_line():
    assert PYTHON and BASH
    readme_lines = {command for _, _, command in BASH}
    assert not [command for command in SKIPPED_COMMANDS if command not in readme_lines]


def test_a_no_test_comment_marks_the_block_after_it():
    text = "intro\n<!-- no-test: needs a GPU -->\n```bash\ncogsurgeon plan x\n```\n\n```python\nprint(1)\n```\n"
    first, second = fenced_blocks(text)
    assert (first.language, first.line, first.code, first.skip_reason) == ("bash", 4, "cogsurgeon plan x\n",
                                                                           "needs a GPU")
    assert (second.language, second.skip_reason) == ("python", None)
    assert bash_commands(Snippet("bash", 1, "a \\\n  b  # c\n# only a comment\nd\n", None)) == [
        (1, "a    b  # c"), (4, "d")]


# ---------------------------------------------------------------------------------------------------------------
# The reader's folder

TEST_SCRIPT = '''
"""A user's unchanged script: builds a model and runs it."""
import torch
from diffusers import CogVideoXTransformer3DModel

model = CogVideoXTransformer3DModel.from_pretrained("my-finetune")
with torch.no_grad():
    output = model(**torch.load("inputs.pt", weights_only=False))[0]
print("output", tuple(output.shape))
'''

TRAIN_SCRIPT = '''
"""A user's unchanged training script: one optimizer step on the model."""
import torch
from diffusers import CogVideoXTransformer3DModel

model = CogVideoXTransformer3DModel.from_pretrained("my-finetune").train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
output = model(**torch.load("inputs.pt", weights_only=False))[0]
output.square().mean().backward()
optimizer.step()
print("one step")
'''


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory) -> Path:
    import torch

    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.geometry import default_video_size, pipeline_inputs

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import lora_trainers
    finally:
        sys.path.pop(0)

    world = tmp_path_factory.mktemp("readme")
    tiny = load_transformer("tiny")
    tiny.save_pretrained(world / "my-finetune")
    torch.save(pipeline_inputs(tiny.config, default_video_size(tiny.config), 1, seed=0), world / "inputs.pt")
    (world / "test.py").write_text(TEST_SCRIPT)
    (world / "train.py").write_text(TRAIN_SCRIPT)
    load_transformer("tiny-i2v").save_pretrained(world / "CogVideoX-5b-I2V" / "transformer")  # the base's stand-in
    lora_trainers.save_cogvideo_finetune(lora_trainers.train("tiny-i2v", 8, 4), world / "out", 500)
    other = lora_trainers.save_cogvideo_finetune(lora_trainers.train("tiny-i2v", 4, 4, seed=2), world / "other", 100)
    _check(run_cli("lora", "repair", str(other), "--alpha", "4", "--out", "other-adapter", env=README_CLI_VARIABLES,
                   cwd=world), "making other-adapter")
    return world


def _environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    environment.update(NO_COLOR="1", COLUMNS="160")
    return environment


# `cogsurgeon` and plain words, then a `| ...` tail for bash or a `# comment`
PLAIN_COGSURGEON = re.compile(r"^cogsurgeon(?P<args>(?: +[\w./:,=@+%-]+)*) *(?:\|(?P<tail>.*)|#.*)?$")
README_CLI_VARIABLES = {"NO_COLOR": "1", "COLUMNS": "160"}  # those of _environment() that the CLI reads


def run_readme_command(command: str, world: Path):
    """One README command in `world`: a plain `cogsurgeon ...` line through `run_cli` (in this process unless the
    command needs its own) with a `| ...` tail fed its output through bash; any other line through bash."""
    plain = PLAIN_COGSURGEON.match(command)
    args = plain["args"].split() if plain else []
    if not plain or not runs_in_process(tuple(args), README_CLI_VARIABLES):
        return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=world, env=_environment(),
                              capture_output=True, text=True, timeout=600)
    result = run_cli(*args, env=README_CLI_VARIABLES, cwd=world, timeout=600)
    if result.returncode != 0 or plain["tail"] is None:
        return result
    return subprocess.run(["bash", "-o", "pipefail", "-c", plain["tail"]], input=result.stdout, cwd=world,
                          env=_environment(), capture_output=True, text=True, timeout=600)


def _check(completed, what: str) -> None:
    assert completed.returncode == 0, (
        f"{what} exited {completed.returncode}\n--- stdout\n{completed.stdout[-3000:]}\n--- stderr\n"
        f"{completed.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("snippet", PYTHON, ids=[snippet.label for snippet in PYTHON])
def test_python_snippet_runs(snippet, readme_world, tmp_path):
    if snippet.skip_reason:
        pytest.skip(snippet.skip_reason)
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)
    world = shutil.copytree(readme_world, tmp_path / "world", symlinks=True)
    _check(run_python_in_process(script, world, timeout=600), snippet.label)


def run_python_in_process(script: Path, world: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python SCRIPT` run in `world` as the README's reader runs it, in this process (each block saves the ~3 s
    import of torch and diffusers a new interpreter pays): a `__main__` namespace of its own, `world` the working
    directory and first on sys.path, the README's environment, empty stdin, stdout and stderr captured, an escaping
    exception printed as the interpreter prints it (status 1), SystemExit's status kept. Afterwards the environment,
    working directory, streams, argv, signal handlers, warning filters, torch's random state, default dtype, grad
    mode and threads, and the modules imported from `world` are what they were. Past `timeout` seconds, CliTimeout
    (a BaseException, which the code under test cannot swallow)."""
    import torch

    from cogsurgeon.inspector import offline
    from conftest import CliTimeout, _process_state_restored

    stdout, stderr = io.StringIO(), io.StringIO()
    random_state, modules = torch.get_rng_state(), set(sys.modules)
    default_dtype, grad_enabled, threads = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()

    def timed_out(signum, frame):
        raise CliTimeout(f"{script.name} still running after {timeout} s")

    with _process_state_restored(), warnings.catch_warnings():
        offline._users_values.clear()  # as a new process: the user's offline variables are read afresh
        os.environ.clear()
        os.environ.update(_environment())
        os.chdir(world)
        sys.argv = [str(script)]
        sys.path.insert(0, str(world))
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), stdout, stderr
        signal.signal(signal.SIGALRM, timed_out)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            runpy.run_path(str(script), run_name="__main__")
            returncode = 0
        except SystemExit as exit:
            returncode = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        except Exception:
            traceback.print_exc(file=sys.stderr)
            returncode = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.path.remove(str(world))
            torch.set_rng_state(random_state)
            torch.set_default_dtype(default_dtype)
            torch.set_grad_enabled(grad_enabled)
            torch.set_num_threads(threads)
            for name in set(sys.modules) - modules:
                if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(world)):
                    del sys.modules[name]
    return subprocess.CompletedProcess([sys.executable, str(script)], returncode, stdout.getvalue(),
                                       stderr.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("snippet", BASH_BLOCKS, ids=[snippet.label for snippet in BASH_BLOCKS])
def test_bash_block_runs_in_order(snippet, readme_world, tmp_path):
    runnable = [(line, command) for line, command in bash_commands(snippet) if not skip_reason(snippet, command)]
    if not runnable:
        pytest.skip("every command of this block is skipped: see test_skipped_readme_command")
    world = shutil.copytree(readme_world, tmp_path / "world", symlinks=True)  # blocks never see each other's files
    for line, command in runnable:
        _check(run_readme_command(command, world), f"README.md:{line} {command.strip()}")


SKIPPED = [(line, command, skip_reason(snippet, command)) for snippet, line, command in BASH
           if skip_reason(snippet, command)]


@pytest.mark.parametrize(("line", "command", "reason"), SKIPPED,
                         ids=[f"README.md:{line} {command.strip()[:60]}" for line, command, _ in SKIPPED])
def test_skipped_readme_command(line, command, reason):
    """Each command not run is reported as a skip with its reason (its block's test runs the rest)."""
    pytest.skip(reason)


def test_a_blocks_commands_run_in_one_test_in_order():
    """The regression CI met: `--save xray.json` and `show xray.json` ran as two tests, on two workers, so the second
    found no file. The block test is parametrized by whole blocks, and the block holding both runs them in order."""
    mark = next(mark for mark in test_bash_block_runs_in_order.pytestmark if mark.name == "parametrize")
    assert mark.args[0] == "snippet" and all(isinstance(block, Snippet) for block in mark.args[1])
    xray = [block for block in mark.args[1] if any("--save xray.json" in command for _, command in bash_commands(block))]
    assert len(xray) == 1
    commands = [command for _, command in bash_commands(xray[0])]
    saving = next(index for index, command in enumerate(commands) if "--save xray.json" in command)
    showing = next(index for index, command in enumerate(commands) if "show xray.json" in command)
    assert saving < showing


def test_a_plain_cogsurgeon_line_runs_through_run_cli_and_its_tail_through_bash(tmp_path):
    """`cogsurgeon --help | grep -c Examples` as a README line: the tail reads the CLI's output; a failing tail or
    CLI fails the line; a line with shell syntax before the pipe, or `run`, goes to bash whole."""
    assert PLAIN_COGSURGEON.match("cogsurgeon plan cogvideox-5b --json | jq '.fits'   # c")["tail"] == " jq '.fits'   # c"
    assert PLAIN_COGSURGEON.match("cogsurgeon modules   # the default")["args"] == " modules"
    assert not PLAIN_COGSURGEON.match("cogsurgeon modules $MODEL") and not PLAIN_COGSURGEON.match("cogsurgeon x > f")
    counted = run_readme_command("cogsurgeon --help | grep -c 'Examples:'", tmp_path)
    assert (counted.returncode, counted.stdout) == (0, "1\n")
    assert run_readme_command("cogsurgeon --help | grep -c no-such-line", tmp_path).returncode == 1
    assert run_readme_command("cogsurgeon modules no-such-model | cat", tmp_path).returncode == 2
    shell = run_readme_command("cogsurgeon --help > help.txt && test -s help.txt", tmp_path)
    assert shell.returncode == 0 and isinstance(shell, subprocess.CompletedProcess)
    assert not runs_in_process(("run", "--patch", "causal-attention", "--", "python", "test.py"), README_CLI_VARIABLES)


def test_ci_runs_the_readmes_test_command():
    """CI runs the suite as a reader of the README would: the README's test command is a line of `.ci/run`."""
    commands = [command for snippet, _, command in BASH if "-m pytest" in command and not snippet.skip_reason]
    assert len(commands) == 1, commands
    ci_lines = (README.parent / ".ci" / "run").read_text().splitlines()
    assert commands[0].strip() in (line.strip() for line in ci_lines)
