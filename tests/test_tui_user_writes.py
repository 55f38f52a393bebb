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
