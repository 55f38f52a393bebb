"""What Ctrl-C does in the `cogsurgeon` console script: the process ends at once (one line, exit 130) while there is
nothing to clean up, and raises KeyboardInterrupt only inside `interruptible()` sections, which own something that
must not be left half-made.

Why not Python's default everywhere: a KeyboardInterrupt raised at an arbitrary bytecode is only safe in code written
for it, and most of a command's time is spent in code that is not. Measured with the start-up test's runs
(`tests/test_cli_start_up_signal.py`, SIGINT 0.2-0.45 s into `cogsurgeon plan tiny`): 5 runs in 30 went wrong, in
two ways. Raised inside a third-party import (diffusers' lazy `loaders.peft` -> accelerate -> numpy) and swallowed
there, it left `numpy.dtypes` half-initialised, and numpy's `__getattr__` then recursed without end: exit 1 and a
RecursionError traceback. Raised inside a Python callback that torch's C++ was running (pybind11), it cannot cross
the C++ frame: `terminate called after throwing an instance of 'pybind11::error_already_set'`, SIGABRT. A handler
that leaves at once has neither problem, and loses nothing where nothing has been made yet.

Where something is made (a staging folder, a temporary file, the TUI's hold on the terminal) the code runs inside
`interruptible()`, so the KeyboardInterrupt unwinds through its `finally` clauses as before; `lora repair`/`merge`
install their own deferring handlers (`tools/lora/publish.py`), which take precedence while they run.

Only the console script installs this (`install_exit_at_once`): a program that imports cogsurgeon, and the tests that
call the CLI in-process, keep Python's own handler, and `interruptible()` changes nothing for them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ABORTED_STATUS = 130  # 128 + SIGINT, as a shell reports a job ended by Ctrl-C
ABORTED_LINE = "cogsurgeon: aborted"


def exit_at_once(signum: int, frame: object) -> None:
    """SIGINT's handler while nothing needs cleaning up: the CLI's one line, then `os._exit` (no `finally`, no
    `atexit`, no flush of buffered output: a result cut short is not printed half)."""
    line_open = not getattr(sys.stderr, "at_line_start", True)  # a progress bar drawn with `\r` holds the line
    try:
        os.write(2, (("\n" if line_open else "") + ABORTED_LINE + "\n").encode())
    except OSError:
        pass
    os._exit(ABORTED_STATUS)


def install_exit_at_once() -> None:
    """Make SIGINT end the process at once (the console script calls this first). Where SIGINT is ignored (a
    background job, `nohup`) it stays ignored."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, exit_at_once)


@contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt (Python's default), so that `finally` clauses remove what the section
    made; afterwards the handler before it comes back. Changes nothing where `exit_at_once` is not the handler (a
    program importing cogsurgeon, an in-process test, a worker thread)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not exit_at_once:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, exit_at_once)


__all__ = [
    "ABORTED_LINE", "ABORTED_STATUS", "exit_at_once", "install_exit_at_once", "interruptible",
]
