"""The cogsurgeon Textual app: one App over the main screen (tree, details, patches), the model switcher and the
LoRA screen. `run_app(spec)` is what `cogsurgeon [MODEL]` calls; it returns when the user quits (ctrl+q).
"""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, resolve_spec
from cogsurgeon.inspector.tui.commands import CogsurgeonCommands
from cogsurgeon.inspector.tui.screens import MainScreen


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
    app.run()
