"""Writes to the user's files that quitting must wait for.

The LoRA screen's repair and merge publish folders from worker threads, and `run_app` ends the process with
`os._exit` once the terminal is restored (the interpreter's teardown of torch is most of what ctrl+q used to cost).
A thread cut off mid-publish would leave its staging folder behind, so each write runs inside `writing_user_files()`
and `run_app` calls `wait_for_user_writes()` first: a write then ends as it would have (published, or refused and
cleaned up — its progress calls fail once the app is gone, which aborts it through its own clean-up).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_writing: set[threading.Thread] = set()
_lock = threading.Lock()


@contextmanager
def writing_user_files() -> Iterator[None]:
    """Mark the calling thread as writing the user's files until the block ends."""
    thread = threading.current_thread()
    with _lock:
        _writing.add(thread)
    try:
        yield
    finally:
        with _lock:
            _writing.discard(thread)


def threads_writing() -> list[threading.Thread]:
    with _lock:
        return [thread for thread in _writing if thread.is_alive()]


def wait_for_user_writes(say: Callable[[str], None]) -> None:
    """Block until every thread inside `writing_user_files()` has left it, saying so once if any has to be waited for.
    Ctrl-C meanwhile is ignored (on the main thread, where handlers live): the console's handler would end the process
    at once, cutting the write off and leaving its staging folder; the write is the user's and ends first."""
    pending = threads_writing()
    if not pending:
        return
    say("cogsurgeon: finishing the write in progress (a LoRA repair or merge) before exiting…")
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main_thread else None
    try:
        for thread in pending:
            thread.join()
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, previous)


__all__ = [
    "threads_writing", "wait_for_user_writes", "writing_user_files",
]
