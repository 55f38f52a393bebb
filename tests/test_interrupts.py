"""Ctrl-C in the console script (`inspector/interrupts.py`): the process ends at once, one line, exit 130, whatever
code it is in, except inside `interruptible()` sections, where KeyboardInterrupt unwinds through their clean-up.

The programs below stand in for the two ways an asynchronous KeyboardInterrupt went wrong in a real `cogsurgeon plan`
(see the module's docstring): third-party code that swallows it (a broad `except`, as the import that left numpy
half-initialised) and code that cannot let it through. Real signals (`os.kill`), real processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import cli_environment, run_cli, sigint_as_at_a_terminal

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SWALLOWING_LIBRARY = """
import os, signal, sys, time
{install}
try:  # a library that catches everything, as the interrupted import did
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
except BaseException:
    pass
print("went on after Ctrl-C", flush=True)
"""

INSTALL = "from cogsurgeon.inspector.interrupts import install_exit_at_once; install_exit_at_once()"


def run_program(program: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=cli_environment(),
                          preexec_fn=sigint_as_at_a_terminal,
                          timeout=120, **options)


def test_ctrl_c_ends_the_console_process_even_inside_code_that_swallows_keyboardinterrupt():
    unprotected = run_program(SWALLOWING_LIBRARY.format(install=""))
    assert unprotected.stdout == "went on after Ctrl-C\n"  # Python's default: the library ate it and went on

    protected = run_program(SWALLOWING_LIBRARY.format(install=INSTALL))
    assert (protected.returncode, protected.stdout, protected.stderr) == (130, "", "cogsurgeon: aborted\n")


def test_the_line_starts_afresh_after_a_progress_bar():
    program = f"""
import sys
{INSTALL}
class Tracking:  # as the CLI's stderr: it knows the last write left the line open
    at_line_start = False
    def __getattr__(self, name): return getattr(sys.__stderr__, name)
sys.stderr = Tracking()
sys.__stderr__.write("repairing 40%\\r"); sys.__stderr__.flush()
import os, signal, time
os.kill(os.getpid(), signal.SIGINT); time.sleep(30)
"""
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, env=cli_environment(),
                               preexec_fn=sigint_as_at_a_terminal,
                               timeout=120)  # bytes: text mode would read a lone "\r" as a line end
    assert (completed.returncode, completed.stderr) == (130, b"repairing 40%\r\ncogsurgeon: aborted\n")


def test_interruptible_sections_raise_keyboardinterrupt_and_clean_up_then_end_at_once_again():
    program = f"""
import os, signal, sys, time
{INSTALL}
from cogsurgeon.inspector.interrupts import exit_at_once, interruptible
try:
    with interruptible():
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        try:
            os.kill(os.getpid(), signal.SIGINT); time.sleep(30)
        finally:
            print("cleaned up", flush=True)
except KeyboardInterrupt:
    print("raised", flush=True)
assert signal.getsignal(signal.SIGINT) is exit_at_once
os.kill(os.getpid(), signal.SIGINT); time.sleep(30)
print("not reached", flush=True)
"""
    completed = run_program(program)
    assert (completed.returncode, completed.stdout, completed.stderr) == (130, "cleaned up\nraised\n",
                                                                          "cogsurgeon: aborted\n")


def test_an_ignored_sigint_stays_ignored():
    """A background job or `nohup` starts with SIGINT ignored: the console script must not take that away."""
    program = f"""
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
{INSTALL}
print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
"""
    assert run_program(program).stdout == "True\n"


def test_a_program_importing_cogsurgeon_keeps_pythons_own_handler():
    """Only the console script installs the at-once handler: `interruptible()` changes nothing elsewhere, and the
    in-process CLI leaves the handler as it found it."""
    from cogsurgeon.inspector.interrupts import interruptible

    before = signal.getsignal(signal.SIGINT)
    with interruptible():
        assert signal.getsignal(signal.SIGINT) is before
    assert run_cli("patch", "list").returncode == 0
    assert signal.getsignal(signal.SIGINT) is before


REPAIR_INTERRUPTED_MID_WRITE = f"""
import os, signal, sys
{INSTALL}
from cogsurgeon.tools.lora.repair import repair_checkpoint

def interrupt_once(done, total, sent=[]):
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C mid-write: the staging folder exists now
try:
    repair_checkpoint(sys.argv[1], sys.argv[2], alpha=4, progress=interrupt_once)
except KeyboardInterrupt:
    print("interrupted, cleaned up", flush=True)
    sys.exit(130)
print("finished")
"""


def test_a_repair_interrupted_mid_write_still_removes_its_partial_output(tmp_path):
    """The writers keep their own handling under the console's handler: the staging folder goes."""
    from lora_helpers import save_cogvideo_checkpoint, train

    checkpoint = save_cogvideo_checkpoint(train(rank=4, lora_alpha=4), tmp_path / "ckpt")
    completed = subprocess.run([sys.executable, "-c", REPAIR_INTERRUPTED_MID_WRITE, str(checkpoint),
                                str(tmp_path / "out")], capture_output=True, text=True, env=cli_environment(),
                               preexec_fn=sigint_as_at_a_terminal, timeout=120)
    assert (completed.returncode, completed.stdout) == (130, "interrupted, cleaned up\n"), completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]  # no out, no .out.partial-*, no lock


DOCTOR_PROBE_INTERRUPTED = f"""
import os, signal, sys, time
{INSTALL}
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from cogsurgeon.inspector import doctor

def ctrl_c_in(function, on_call):  # Ctrl-C as `function` is called for the `on_call`-th time
    calls = []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            os.kill(os.getpid(), signal.SIGINT); time.sleep(30)
        return function(*args, **kwargs)
    return wrapped

if sys.argv[1] == "building":  # the second tiny model, built before the temporary folder exists
    doctor.build_tiny = ctrl_c_in(doctor.build_tiny, 2)
else:  # reloading the saved LoRA from the temporary folder
    CogVideoXPipeline.load_lora_weights = ctrl_c_in(CogVideoXPipeline.load_lora_weights, 1)
try:
    doctor.probe_lora_alpha_lost()
except KeyboardInterrupt:
    print("interrupted, cleaned up", flush=True)
    sys.exit(130)
print("finished")
"""


@pytest.mark.parametrize("where, stdout, stderr", [
    ("building", "", "cogsurgeon: aborted\n"),  # third-party work, nothing made yet: the process ends at once
    ("reloading", "interrupted, cleaned up\n", ""),  # the temporary folder exists: KeyboardInterrupt removes it
])
def test_doctor_is_interruptible_only_while_its_temporary_folder_exists(tmp_path, where, stdout, stderr):
    """`doctor`'s LoRA probe holds a temporary folder only for the save and the reload: building the tiny models
    before it runs under the console's exit-at-once handler, as third-party work should (the module's docstring:
    a KeyboardInterrupt raised in it can be swallowed or abort the process)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    completed = subprocess.run([sys.executable, "-c", DOCTOR_PROBE_INTERRUPTED, where], capture_output=True,
                               preexec_fn=sigint_as_at_a_terminal,
                               text=True, env=cli_environment({"TMPDIR": str(temporary)}), timeout=300)
    assert (completed.returncode, completed.stdout) == (130, stdout), completed.stderr
    assert completed.stderr.endswith(stderr), completed.stderr

