"""The planner screen: the peak GPU memory of the model on the main screen at a size you type (inference, a training
step, the VAE decode), with its breakdown and whether it fits a card. A view over `inspector.plan`; the plan runs
in a thread worker that posts it as `MemoryPlanned`."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Static
from textual.worker import Worker

from cogsurgeon.inspector.tui.messages import MemoryPlanned, ReportsWorkerFailures
from cogsurgeon.inspector.tui.widgets import facts_table


def plan_table(plan: Any) -> Table:
    """A `MemoryPlan` as its peak, where it happens, what was live then, and the verdict for the card."""
    from cogsurgeon.inspector.trace import format_bytes

    peak = plan.peak
    rows: list[tuple[str | Text, str | Text]] = [
        ("peak", Text(f"{format_bytes(peak.peak_bytes)}  ({peak.peak_bytes:,} bytes)", style="bold")),
        ("at", f"{peak.phase}: {peak.peak_at}"),
    ]
    rows += [(f"  {name}", format_bytes(value)) for name, value in peak.breakdown.items() if value]
    if len(plan.phases) > 1:
        rows += [(phase.phase, format_bytes(phase.peak_bytes)) for phase in plan.phases]
    if plan.fits is not None:
        verdict = Text("fits", style="bold green") if plan.fits else Text("does not fit", style="bold red")
        rows.append((f"{format_bytes(plan.gpu_memory)} card", verdict))
        for suggestion in plan.suggestions:
            outcome = "fits" if suggestion.fits else "still too large"
            rows.append((f"  with {suggestion.switch}", f"{format_bytes(suggestion.peak_bytes)} ({outcome})"))
    return facts_table(rows)


class PlanScreen(ReportsWorkerFailures, Screen[None]):
    """Plan the peak GPU memory of a run of `spec` before running it."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="plan.back")]
    AUTO_FOCUS = "#plan-size"

    def __init__(self, spec: str, size: tuple[int, int, int] = (49, 480, 720)) -> None:
        super().__init__()
        self.spec = spec
        self.video_size = size

    def compose(self) -> ComposeResult:
        frames, height, width = self.video_size
        yield Header()
        with VerticalScroll(id="plan"):
            yield Label(f"Plan GPU memory for {self.spec}", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(value=f"{frames}x{height}x{width}", placeholder="FRAMESxHEIGHTxWIDTH", id="plan-size")
                yield Input(value="2", placeholder="batch", id="plan-batch")
                yield Input(placeholder="train: lora:RANK or full (empty: inference)", id="plan-train")
                yield Input(placeholder="GPU memory, e.g. 80GiB", id="plan-gpu")
            with Horizontal(classes="form-row"):
                yield Checkbox("checkpointing", id="plan-checkpointing")
                yield Checkbox("VAE decode", id="plan-vae")
                yield Checkbox("tiling", id="plan-tiling")
                yield Button("Plan", id="plan-run")
            yield Static(Text("set the run and press Enter or Plan", style="dim"), id="plan-result")
        yield Footer()

    @on(Input.Submitted)
    @on(Button.Pressed, "#plan-run")
    def run_plan(self) -> None:
        from cogsurgeon.inspector.plan import PlanError, parse_video_size

        value = lambda selector: self.query_one(selector, Input).value.strip()  # noqa: E731
        try:
            frames, height, width = parse_video_size(value("#plan-size"))
            batch_text = value("#plan-batch") or "2"
            if not batch_text.isdigit() or int(batch_text) < 1:
                raise PlanError(f"batch must be a positive whole number, got {batch_text!r}")
        except PlanError as error:
            self.notify(str(error), severity="error")
            return
        request = dict(frames=frames, height=height, width=width, batch=int(batch_text),
                       train=value("#plan-train") or None, gpu_memory=value("#plan-gpu") or None,
                       checkpointing=self.query_one("#plan-checkpointing", Checkbox).value,
                       vae=self.query_one("#plan-vae", Checkbox).value,
                       tiling=self.query_one("#plan-tiling", Checkbox).value)
        self.query_one("#plan-result", Static).loading = True
        self._plan(request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="plan", description="plan failed")
    def _plan(self, request: dict[str, Any]) -> None:
        from cogsurgeon.inspector.plan import plan_memory

        self.post_message(MemoryPlanned(plan_memory(self.spec, **request)))

    def on_memory_planned(self, message: MemoryPlanned) -> None:
        self.query_one("#plan-result", Static).update(plan_table(message.plan))

    def worker_ended(self, worker: Worker[Any]) -> None:
        self.query_one("#plan-result", Static).loading = False
