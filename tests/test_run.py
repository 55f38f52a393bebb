"""`cogsurgeon run` as a real process: the one `cogsurgeon` import namespace (a user's own `inspector`, `patches`
and `tools` neither shadow cogsurgeon nor are shadowed), terminating signals passed on to the program with the
startup folder removed, and a closing line when the program built no CogVideoX model (nothing was patched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cogsurgeon.inspector.model_specs import tiny_config

pytestmark = pytest.mark.slow  # every test here starts processes of its own


def clean_environment() -> dict[str, str]:
    """The environment of a user's shell: cogsurgeon only as installed (no checkout on PYTHONPATH), no colours."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["NO_COLOR"] = "1"
    return environment


def as_a_terminals_foreground_job() -> None:
    """What a shell gives the command a user types: SIGINT at its default, no signal blocked. The tests of Ctrl-C
    start `run` so, whatever pytest itself inherited (run in the background of a script, pytest has SIGINT ignored,
    and `run` rightly passes that on: then no Ctrl-C could stop the program, and such a test would time out)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def cogsurgeon_run(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cogsurgeon.inspector", "run", *args], cwd=cwd,
                            env=clean_environment(), text=True, **popen)


# ---------------------------------------------------------------------------------------------------------------
# One import namespace (issue 15 item 5, issue 16 item 11)


def test_cogsurgeon_imports_from_any_folder_and_installs_no_generic_top_level_names(tmp_path):
    code = ("import importlib.util, cogsurgeon.patches, cogsurgeon.inspector, cogsurgeon.tools.lora; "
            "print([name for name in ('inspector', 'patches', 'tools') if importlib.util.find_spec(name)])")
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_environment(),
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


USER_SCRIPT = '''
"""A user's script beside their own inspector.py, patches/ and tools/ (CogVideo's repository has a tools/)."""
import json
import sys

import torch
from diffusers import CogVideoXTransformer3DModel

import inspector
import patches
from tools.frames import frame_count

assert (inspector.OWNER, patches.OWNER, frame_count()) == ("user", "user", 49), "the user's modules were shadowed"
model = CogVideoXTransformer3DModel(**json.loads(sys.argv[1])).eval()
processor = type(model.transformer_blocks[0].attn1.processor).__name__

from cogsurgeon import patches as cogsurgeon_patches  # the user may also use cogsurgeon's API by its own name
from cogsurgeon.inspector.geometry import pipeline_inputs

inputs = pipeline_inputs(model.config, (9, 64, 64), 2, seed=0)
with torch.no_grad():
    patched = model(**inputs)[0]
    applied = cogsurgeon_patches.applied(model)
    cogsurgeon_patches.revert(model)
    unpatched = model(**inputs)[0]
print(json.dumps({"processor": processor, "applied": applied, "changed": not torch.equal(patched, unpatched)}))
'''


def test_run_from_a_folder_holding_its_own_inspector_patches_and_tools(tmp_path):
    (tmp_path / "inspector.py").write_text('OWNER = "user"\n')
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "__init__.py").write_text('OWNER = "user"\n')
    (tmp_path / "patches" / "errors.py").write_text("")  # the module name that broke `run` before the namespace
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "frames.py").write_text("def frame_count():\n    return 49\n")
    (tmp_path / "sample.py").write_text(USER_SCRIPT)
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, "sample.py",
                         json.dumps(tiny_config("tiny")), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == {"processor": "PatchedCogVideoXAttnProcessor", "applied": ["causal-attention"],
                      "changed": True}
    assert "causal-attention -> CogVideoXTransformer3DModel" in stderr
    assert "nothing was patched" not in stderr


# ---------------------------------------------------------------------------------------------------------------
# Signals and the startup folder (issue 16 item 10)

SLEEPER = '''
"""Records the first terminating signal it gets and exits 7; tells the test its pid and run's startup folder."""
import os
import signal
import sys
import time

record = sys.argv[1]


def received(signum, frame):
    with open(record, "w") as file:
        file.write(signal.Signals(signum).name)
    sys.exit(7)


for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, received)
print(os.getpid(), os.environ["PYTHONPATH"].split(os.pathsep)[0], flush=True)
time.sleep(120)
'''


def _start_sleeper(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, str(script), str(tmp_path / "got"),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=as_a_terminals_foreground_job)
    pid, folder = run.stdout.readline().split()
    return run, int(pid), Path(folder)


def _stop(run: subprocess.Popen, child_pid: int) -> None:
    """Leave no process behind, whatever the test saw."""
    for pid in (child_pid, run.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run.communicate()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_terminating_signal_reaches_the_program_and_the_startup_folder_goes(tmp_path, signum):
    run, child_pid, folder = _start_sleeper(tmp_path)
    try:
        assert folder.name.startswith("cogsurgeon-run-") and (folder / "sitecustomize.py").is_file()
        os.kill(run.pid, signum)
        stdout, stderr = run.communicate(timeout=60)
        assert (tmp_path / "got").read_text() == signum.name  # the program got it, not an orphan left running
        assert run.returncode == 7, stderr  # the program's own exit status
        assert not folder.exists()
    finally:
        _stop(run, child_pid)


def test_ctrl_c_reaches_the_program_once_through_its_process_group(tmp_path):
    """As a terminal does: SIGINT to the whole foreground group. `run` ignores it and waits for the program."""
    run, child_pid, folder = _start_sleeper(tmp_path)
    try:
        os.killpg(run.pid, signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
        assert (tmp_path / "got").read_text() == "SIGINT"
        assert run.returncode == 7, stderr
        assert not folder.exists()
    finally:
        _stop(run, child_pid)


def test_a_program_that_builds_no_model_is_told_nothing_was_patched(tmp_path):
    program = "import os, sys; print(os.environ['PYTHONPATH'].split(os.pathsep)[0]); sys.exit(3)"
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, "-c", program, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 3  # the program's status, unchanged
    assert stderr.strip().splitlines() == [
        "cogsurgeon run: the program ended without building a CogVideoXTransformer3DModel: nothing was patched"]
    assert not Path(stdout.strip()).exists()


def test_ctrl_c_stops_a_program_that_keeps_the_default_handler(tmp_path):
    """A program that sets no SIGINT handler (most programs) must still stop on Ctrl-C: `run` may not leave SIGINT
    ignored for the program it starts (an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler)."""
    program = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(120); print('slept through')"
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, "-c", program, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=as_a_terminals_foreground_job)
    child_pid = int(run.stdout.readline())
    try:
        os.killpg(run.pid, signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
        assert "slept through" not in stdout
        assert "KeyboardInterrupt" in stderr  # the program's own default handler ran
        assert run.returncode != 0
    finally:
        _stop(run, child_pid)


def test_a_program_started_with_sigint_ignored_keeps_it_ignored(tmp_path):
    """As without `run`: a background job (SIGINT ignored by the shell) passes that on to the program."""
    program = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, "-c", program, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert stdout.strip() == "True"


def test_one_patch_given_twice_with_the_same_options_is_applied_once(tmp_path):
    """`--patch block-causal-attention --patch block-causal-attention:chunk=1` name the same patch with the same
    options: `run` accepts it, so the program must get it once, not a PatchAlreadyAppliedError at model build."""
    program = (
        "from cogsurgeon.inspector import load_transformer\n"
        "from cogsurgeon import patches\n"
        "print(patches.applied_options(load_transformer('tiny')))\n"
    )
    run = cogsurgeon_run("--patch", "block-causal-attention", "--patch", "block-causal-attention:chunk=1", "--",
                         sys.executable, "-c", program, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert stdout.strip() == "{'block-causal-attention': {'chunk': 1, 'window': None, 'sink': 0}}"


def test_checking_the_causal_patches_options_before_a_run_loads_no_torch(tmp_path):
    """`run` checks every `--patch NAME:k=v` before it launches the program; for the causal-video patches that is a
    torch-free check (the patterns live in `patches.patterns`), so a bad option is refused in an instant."""
    script = (
        "import sys\n"
        "from cogsurgeon.patches.launcher import check_patch_names\n"
        "check_patch_names(['block-causal-attention:chunk=3,window=4,sink=1', 'per-frame-timesteps:text_timestep=0'])\n"
        "check_patch_names(['window-attention:window=2,chunk=2'])\n"
        "try:\n"
        "    check_patch_names(['block-causal-attention:window=2,sink=3'])\n"
        "except Exception as error:\n"
        "    print(type(error).__name__)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["PatchParameterError", "False"]


def test_a_subclass_that_resets_its_processors_in_init_is_patched_after_its_init(tmp_path):
    """A user's subclass whose `__init__` sets its own attention processors after `super().__init__()`: `run` must
    patch the model once the subclass's `__init__` is done, else the program's processors silently replace the patch
    while `applied()` still names it. Also a subclass of that subclass, and a subclass without an `__init__`."""
    program = (
        "from diffusers import CogVideoXTransformer3DModel\n"
        "from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0\n"
        "from cogsurgeon import patches\n"
        "from cogsurgeon.inspector.model_specs import tiny_config\n"
        "class Mine(CogVideoXTransformer3DModel):\n"
        "    def __init__(self, **config):\n"
        "        super().__init__(**config)\n"
        "        self.set_attn_processor(CogVideoXAttnProcessor2_0())\n"
        "class Deeper(Mine):\n"
        "    def __init__(self, **config):\n"
        "        super().__init__(**config)\n"
        "        self.marker = True\n"
        "class Plain(Mine):\n"
        "    pass\n"
        "for cls in (Mine, Deeper, Plain, CogVideoXTransformer3DModel):\n"
        "    model = cls(**tiny_config('tiny'))\n"
        "    kinds = {type(p).__name__ for p in model.attn_processors.values()}\n"
        "    print(cls.__name__, patches.applied(model), 'CogVideoXAttnProcessor2_0' in kinds)\n"
    )
    run = cogsurgeon_run("--patch", "causal-attention", "--", sys.executable, "-c", program, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert stdout.splitlines() == [
        f"{name} ['causal-attention'] False" for name in ("Mine", "Deeper", "Plain", "CogVideoXTransformer3DModel")
    ]
    assert stderr.count("causal-attention -> ") == 4  # each model patched (and said so) once
