"""Shared fixtures: the CLI (in this process, or as a real subprocess where the process is what a test checks), and
tiny real CogVideoX transformers."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The inventory cache of this test session lives in a temporary folder, never in the user's ~/.cache.
os.environ["COGSURGEON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cogsurgeon-test-cache-")
# One intra-op thread per test process (read when torch is first imported, here and in every CLI subprocess): the
# suite runs in parallel across tests (`-n auto`), and the tiny models' ops are too small to share. Two OpenMP threads
# per worker on a machine whose cores the other workers already fill spin waiting for each other: test_streaming.py
# cost 22 s of CPU within the whole suite, 7 s alone on one thread. A value the developer set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: the installed cogsurgeon (nothing of the checkout on the path, so a
    bare `import inspector` fails as it does for users), no colour codes, wide output."""
    environment = dict(os.environ)
    environment["NO_COLOR"] = "1"
    environment["COLUMNS"] = "200"
    environment.update(extra or {})
    return environment


# Variables the CLI reads while it runs; any other (PYTHONPATH, HF_HOME, HF_HUB_CACHE, ...) takes effect only when an
# interpreter starts or a library is first imported, so a run given one gets a process of its own.
IN_PROCESS_VARIABLES = frozenset({"NO_COLOR", "COLUMNS", "LINES", "TERM", "COGSURGEON_CACHE_DIR"})
# `run` launches a program that writes to the real file descriptors; the bare form opens the Textual app.
SUBPROCESS_COMMANDS = frozenset({"run", "tui"})


@dataclasses.dataclass
class CliResult:
    """What `subprocess.run(..., capture_output=True, text=True)` returns, for a run made in this process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300,
            in_process: bool | None = None):
    """Run `cogsurgeon ARGS...` and return its exit status and output (`returncode`, `stdout`, `stderr`, text).

    By default the run happens in this process (`cogsurgeon.inspector.cli.main(argv) -> int` with fresh standard
    streams, the environment, working directory, signal handlers and warning filters put back afterwards), which
    saves the ~2 s import of torch and diffusers per run; it is a subprocess (`python -m cogsurgeon.inspector`, the
    installed package) for `run` and the TUI, when `env` sets a variable read at start-up, or with `in_process=False`.
    Either way, a run still going after `timeout` seconds fails the test."""
    if in_process is None:
        in_process = runs_in_process(args, env)
    if not in_process:
        return subprocess.run(
            [sys.executable, "-m", "cogsurgeon.inspector", *args],
            capture_output=True,
            text=True,
            env=cli_environment(env),
            cwd=cwd or REPO_ROOT,
            timeout=timeout,
        )
    return run_cli_in_process(list(args), env=env, cwd=cwd or REPO_ROOT, timeout=timeout)


def runs_in_process(args: tuple[str, ...], env: dict[str, str] | None) -> bool:
    from cogsurgeon.inspector.cli import cli

    opens_tui = not args or (args[0] not in cli.commands and not args[0].startswith("-"))
    return not opens_tui and args[0] not in SUBPROCESS_COMMANDS and not set(env or {}) - IN_PROCESS_VARIABLES


class CliTimeout(BaseException):
    """An in-process run took longer than its `timeout`, as `subprocess.TimeoutExpired` says of a subprocess. Not an
    Exception: the code under test catches those (and OSError, which TimeoutError is) and would swallow it."""


def run_cli_in_process(args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT,
                       timeout: float | None = 300, text: bool = True) -> CliResult:
    """`cogsurgeon ARGS` through `main(argv)` in this process, isolated from the test and from the next run.

    As in a subprocess: stdout and stderr are pipes (not terminals; UTF-8, stderr with backslashreplace), stdin is
    empty, the environment is `cli_environment(env)`, the working directory `cwd`; an exception that escapes is
    printed as the interpreter prints it and gives status 1; past `timeout` seconds a Python-level hang raises
    CliTimeout (SIGALRM). Afterwards the environment, working directory, standard streams, `sys.argv`, the
    SIGINT/SIGTERM/SIGHUP/SIGALRM handlers and the warning filters are what they were. `text=False` gives stdout
    and stderr as the bytes written, as `subprocess.run` without `text`."""
    from cogsurgeon.inspector import offline
    from cogsurgeon.inspector.cli import main

    stdout_bytes, stderr_bytes = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(stdout_bytes, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(stderr_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    environment = cli_environment(env)
    with _process_state_restored(), warnings.catch_warnings():
        offline._users_values.clear()  # each run remembers the user's offline variables afresh, as a process does
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(cwd)
        sys.argv = ["cogsurgeon", *args]
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), stdout, stderr
        if timeout is not None:
            signal.signal(signal.SIGALRM, _time_out(args, timeout))
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            returncode = main(args)
        except CliTimeout:
            raise
        except Exception:  # a bug: the traceback, as the interpreter would print it
            traceback.print_exc(file=sys.stderr)
            returncode = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        with contextlib.suppress(ValueError):  # a stream the run closed (a broken pipe's clean-up)
            stdout.flush()
            stderr.flush()
    if not text:
        return CliResult(["cogsurgeon", *args], returncode, stdout_bytes.getvalue(), stderr_bytes.getvalue())
    return CliResult(["cogsurgeon", *args], returncode, _as_text(stdout_bytes), _as_text(stderr_bytes))


def _time_out(args: list[str], timeout: float):
    def handler(signum, frame):
        raise CliTimeout(f"cogsurgeon {' '.join(args)} still running after {timeout} s")

    return handler


def _as_text(written: io.BytesIO) -> str:
    """Decoded as `subprocess.run(text=True)` decodes: UTF-8, universal newlines (a progress line's \\r is a \\n)."""
    return io.TextIOWrapper(io.BytesIO(written.getvalue()), encoding="utf-8").read()


@contextlib.contextmanager
def _process_state_restored():
    from cogsurgeon.inspector import offline

    environment, directory = dict(os.environ), os.getcwd()
    streams, argv = (sys.stdin, sys.stdout, sys.stderr), sys.argv
    handlers = {signum: signal.getsignal(signum)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)}
    users_offline_values = dict(offline._users_values)
    try:
        yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = streams
        sys.argv = argv
        os.chdir(directory)
        os.environ.clear()
        os.environ.update(environment)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        offline._users_values.clear()
        offline._users_values.update(users_offline_values)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_model():
    from cogsurgeon.inspector import load_transformer

    return load_transformer("tiny")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (each file's own in their order, the rest after them in theirs): on two workers, a 20 s
    test handed out last keeps one core busy while the other has nothing left, so the long ones start while the many
    short ones can still fill in around them. The order is the same on every worker, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` starts one worker more than the cores this process may use (PYTEST_XDIST_AUTO_NUM_WORKERS still
    decides when set). The Textual tests spend about half their time waiting for the app to go idle after each key
    (Pilot probes in 20 ms windows); the extra worker runs other tests in those waits. On the 2-core development
    machine the whole suite took 3:07 with 3 workers and 3:47 with 2 (1-minute load 1.0-3.0 from others' work)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


def sigint_as_at_a_terminal() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: Ctrl-C's default action, as a program started
    from a terminal has it. A test suite started in the background of a non-interactive shell (`pytest ... &`) has
    SIGINT ignored, and a child inherits that, so without this the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
