"""Quitting the TUI waits for a repair or merge that is writing the user's files (`inspector/tui/user_writes.py`):
`run_app` ends the process with os._exit, which would otherwise cut a publish off and leave its staging folder."""

from __future__ import annotations

import threading

from cogsurgeon.inspector.tui.user_writes import threads_writing, wait_for_user_writes, writing_user_files


def test_quitting_waits_for_a_write_in_progress_and_says_so():
    release, entered, said = threading.Event(), threading.Event(), []

    def write():
        with writing_user_files():
            entered.set()
            release.wait()

    writer = threading.Thread(target=write)
    writer.start()
    entered.wait()
    waiter = threading.Thread(target=wait_for_user_writes, args=(said.append,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "the quit went on while a write was in progress"
    assert threads_writing() == [writer]
    release.set()
    waiter.join()
    writer.join()
    assert said == ["cogsurgeon: finishing the write in progress (a LoRA repair or merge) before exiting…"]
    assert threads_writing() == []


def test_nothing_in_progress_quits_at_once_and_silently():
    said = []
    with writing_user_files():
        pass
    wait_for_user_writes(said.append)
    assert said == [] and threads_writing() == []


def test_a_failed_write_is_no_longer_waited_for():
    try:
        with writing_user_files():
            raise OSError("disk full")
    except OSError:
        pass
    assert threads_writing() == []


CTRL_C_WHILE_WAITING = """
import os, signal, sys, threading, time
from cogsurgeon.inspector.interrupts import install_exit_at_once
from cogsurgeon.inspector.tui.user_writes import wait_for_user_writes, writing_user_files

install_exit_at_once()  # as the console script does
entered, interrupted = threading.Event(), threading.Event()

def write():
    with writing_user_files():
        entered.set()
        interrupted.wait()
        time.sleep(0.2)  # the write goes on after the Ctrl-C
        print("write finished", flush=True)

def ctrl_c():
    entered.wait()
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    interrupted.set()

threading.Thread(target=write).start()
threading.Thread(target=ctrl_c).start()
entered.wait()
wait_for_user_writes(lambda line: print(line, flush=True))
print("quit after the write", flush=True)
"""


def test_ctrl_c_while_waiting_does_not_cut_the_write_off():
    """Under the console's exit-at-once handler a Ctrl-C during the wait would end the process mid-publish."""
    import subprocess
    import sys

    from conftest import cli_environment

    completed = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_WAITING], capture_output=True, text=True,
                               env=cli_environment(), timeout=120)
    assert (completed.returncode, completed.stdout.splitlines()[1:]) == (0, ["write finished", "quit after the write"]), \
        completed.stderr
