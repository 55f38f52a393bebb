"""The cogsurgeon Textual app: one App over the main screen (tree, details, patches), the model switcher and the
LoRA screen. `run_app(spec)` is what `cogsurgeon [MODEL]` calls; when the user quits (ctrl+q) it ends the process.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from textual.app import App
from textual.binding import Binding

from cogsurgeon.inspector.interrupts import interruptible
from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, resolve_spec
from cogsurgeon.inspector.tui.commands import CogsurgeonCommands
from cogsurgeon.inspector.tui.screens import MainScreen
from cogsurgeon.inspector.tui.user_writes import wait_for_user_writes


class DaemonThreadExecutor(ThreadPoolExecutor):
    """The event loop's default executor for the TUI: each call in a daemon thread of its own, and a shutdown that
    does not wait. Textual runs thread workers (a shape trace, a verification, a plan, a LoRA step) in the loop's
    default executor, which the loop's close and the interpreter's exit join: ctrl+q then waited for whatever was
    still running (2 s on a loaded machine). A repair or merge cut off this way leaves only its hidden staging
    folder, which the next one removes (tools/lora/publish.py). A ThreadPoolExecutor by type only (asyncio accepts
    no other), whose pool is never used."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # handed to the awaiting worker, which reports it
                future.set_exception(error)

        threading.Thread(target=run, name="cogsurgeon-worker", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: the threads are daemons, and their results are no longer wanted."""


class CogsurgeonApp(App[None]):
    """Browse, patch and repair a CogVideoX transformer; opens on `spec` (loaded in a worker)."""

    CSS_PATH = "cogsurgeon.tcss"
    TITLE = "cogsurgeon"
    COMMANDS = App.COMMANDS | {CogsurgeonCommands}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
        Binding("a", "open_attention", "Attention x-ray (main screen)", id="app.attention", show=False),
    ]

    def __init__(self, spec: str = DEFAULT_SPEC) -> None:
        super().__init__()
        self.spec = spec
        self.main_screen = MainScreen(spec)

    def on_load(self) -> None:
        asyncio.get_running_loop().set_default_executor(DaemonThreadExecutor())

    def get_default_screen(self) -> MainScreen:
        return self.main_screen

    def action_open_attention(self) -> None:
        """`a` on the main screen: record one seeded forward of the open model and show its attention x-ray."""
        from cogsurgeon.inspector.tui.attention_screen import AttentionScreen

        model = self.main_screen.model
        if self.screen is not self.main_screen or model is None:
            return
        if any(parameter.is_meta for parameter in model.parameters()):
            self.notify("this model is on the meta device (no weights): the x-ray needs a model that runs (tiny, a "
                        "local folder), or open a recording with `cogsurgeon attention show FILE`", severity="warning")
            return
        self.push_screen(AttentionScreen(model=model, source=self.main_screen.spec))


def run_app(spec: str | None = None) -> None:
    """Open the TUI on `spec`. A spec that names nothing fails here, before the screen opens, as a
    `ModelSpecError` (the CLI prints it as one line, exit 2)."""
    resolve_spec(spec or DEFAULT_SPEC)
    app = CogsurgeonApp(spec or DEFAULT_SPEC)
    with interruptible():  # the terminal must be given back: a SIGINT (kill -INT) unwinds through Textual's exit
        app.run()
    # Quitting: the terminal is restored and the app's work is done; what is left is the interpreter's teardown of
    # torch and diffusers (4-5 s on a loaded 2-core machine, most of the time ctrl+q took). The process ends here,
    # with the app's exit code, after any repair or merge still writing the user's files has ended and the output is
    # flushed.
    wait_for_user_writes(lambda line: print(line, file=sys.stderr, flush=True))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(app.return_code or 0)


__all__ = [
    "CogsurgeonApp", "run_app",
]
