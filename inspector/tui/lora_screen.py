"""The LoRA screen: inspect a checkpoint, choose lora_alpha and an output folder, repair with a progress bar, then
verify the adapter against a base model. A view over `tools.lora`; each slow step runs in a thread worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from cogsurgeon.inspector.tui.screens import describe_failure
from cogsurgeon.inspector.tui.widgets import facts_table


def shown_path(path: str | Path) -> str:
    """A path as the user would type it here: relative to the working folder when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def findings_table(report: Any) -> Table:
    """The `inspect` findings of a `LoraReport`: format, rank, alpha and where it came from, targets, problems."""
    rank = str(report.rank) if report.rank is not None else "-"
    if report.rank_pattern:
        rank += f"  ({len(report.rank_pattern)} modules differ: rank_pattern)"
    if report.alpha is None:  # several trainers fit: the screen asks, as the CLI does, instead of guessing
        candidates = ", ".join(f"{c['alpha']:g} ({c['trainer']})" for c in report.alpha_candidates)
        alpha_row: str | Text = Text(f"UNKNOWN: could be {candidates}; type the trained lora_alpha below",
                                     style="bold yellow")
    else:
        scale = f", scale {report.alpha / report.rank:g}" if report.rank else ""
        alpha_row = f"{report.alpha:g} from {report.alpha_source}{scale}"
    rows: list[tuple[str | Text, str | Text]] = [
        ("file", shown_path(report.file)),
        ("format", report.format),
        ("rank", rank),
        ("lora_alpha", alpha_row),
    ]
    if report.alpha_detail:
        rows.append(("", Text(report.alpha_detail, style="dim")))
    rows.append(("targets", f"{', '.join(report.target_modules)}  ({report.num_modules} modules)"))
    rows += [(Text("problem", style="bold red"), problem) for problem in report.problems]
    rows += [(Text("warning", style="bold yellow"), warning) for warning in report.warnings]
    if not report.problems:
        rows.append((Text("ready", style="bold green"), "no problems: this checkpoint can be repaired"))
    return facts_table(rows)


def verify_table(report: Any) -> Table:
    """An `AdapterVerifyReport` as a verdict and its figures."""
    verdict = Text("passed", style="bold green") if report.passed else Text("FAILED", style="bold red")
    rows: list[tuple[str | Text, str | Text]] = [("verify", verdict)]
    for label, value in (("outputs match", report.outputs_match), ("scales match", report.scales_match),
                         ("max |PEFT - diffusers|", report.max_abs_diff), ("LoRA effect", report.lora_effect)):
        if value is not None:
            rows.append((label, f"{value:.3g}" if isinstance(value, float) else str(value)))
    rows += [(Text("failure", style="bold red"), failure) for failure in report.failures]
    return facts_table(rows)


class LoraScreen(Screen[None]):
    """Repair a CogVideoX LoRA checkpoint that lacks adapter_config.json (and lost its lora_alpha)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="lora.back")]

    repair_total: reactive[int] = reactive(0, init=False)
    repair_done: reactive[int] = reactive(0, init=False)

    def __init__(self, base_spec: str = "tiny") -> None:
        super().__init__()
        self.base_spec = base_spec
        self.report: Any = None
        self.repaired_dir: str | None = None
        self._last_percent = -1

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="lora"):
            yield Label("1. Checkpoint", classes="lora-label")
            with Horizontal(classes="lora-row"):
                yield Input(placeholder="a .safetensors file, a checkpoint-N folder or a SAT iteration folder",
                            id="lora-checkpoint")
                yield Button("Inspect", id="lora-inspect")
            yield Static(Text("enter a checkpoint path and press Enter", style="dim"), id="lora-findings")
            yield Label("2. Repair into an adapter folder", classes="lora-label")
            with Horizontal(classes="lora-row"):
                yield Input(placeholder="lora_alpha", id="lora-alpha")
                yield Input(placeholder="output folder (must not exist)", id="lora-out")
                yield Button("Repair", id="lora-repair", disabled=True)
            # determinate from the start (an indeterminate bar animates, and says nothing here)
            yield ProgressBar(total=1, id="lora-progress", show_eta=False)
            yield Static(id="lora-repair-result")
            yield Label("3. Verify against a base model", classes="lora-label")
            with Horizontal(classes="lora-row"):
                yield Input(value=self.base_spec, placeholder="base MODEL (a tiny spec or a local folder)",
                            id="lora-base")
                yield Button("Verify", id="lora-verify", disabled=True)
            yield Static(id="lora-verify-result")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#lora-checkpoint", Input).focus()

    # inspect

    @on(Input.Submitted, "#lora-checkpoint")
    @on(Button.Pressed, "#lora-inspect")
    def inspect_checkpoint(self) -> None:
        path = self.query_one("#lora-checkpoint", Input).value.strip()
        if not path:
            self.notify("enter the path of a LoRA checkpoint", severity="warning")
            return
        self.query_one("#lora-findings", Static).loading = True
        self._inspect(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-inspect")
    def _inspect(self, path: str) -> Any:
        from cogsurgeon.tools.lora import inspect_checkpoint

        return inspect_checkpoint(path)

    def _show_report(self, report: Any) -> None:
        self.report = report
        self.query_one("#lora-findings", Static).update(findings_table(report))
        self.query_one("#lora-alpha", Input).value = f"{report.alpha:g}" if report.alpha is not None else ""
        out = self.query_one("#lora-out", Input)
        if not out.value:
            given = Path(self.query_one("#lora-checkpoint", Input).value.strip())
            out.value = f"{given.as_posix().rstrip('/')}-adapter"
        self.query_one("#lora-repair", Button).disabled = bool(report.problems)

    # repair

    @on(Button.Pressed, "#lora-repair")
    @on(Input.Submitted, "#lora-out")
    def repair(self) -> None:
        if self.report is None or self.report.problems:
            self.notify("inspect a checkpoint without problems first", severity="warning")
            return
        alpha_text = self.query_one("#lora-alpha", Input).value.strip()
        try:
            alpha = float(alpha_text) if alpha_text else None
        except ValueError:
            self.notify(f"lora_alpha must be a number, got {alpha_text!r}", severity="error")
            return
        out_dir = self.query_one("#lora-out", Input).value.strip()
        if not out_dir:
            self.notify("enter an output folder", severity="warning")
            return
        self.repair_done, self.repair_total = 0, 0
        self._last_percent = -1
        self.query_one("#lora-repair", Button).disabled = True
        self._repair(self.query_one("#lora-checkpoint", Input).value.strip(), out_dir, alpha)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-repair")
    def _repair(self, path: str, out_dir: str, alpha: float | None) -> Any:
        from cogsurgeon.tools.lora import repair_checkpoint

        return repair_checkpoint(path, out_dir, alpha=alpha, progress=self._progress_from_thread)

    def _progress_from_thread(self, done_bytes: int, total_bytes: int) -> None:
        """Called by the repair as bytes stream; hands the UI one update per percent, not one per tensor."""
        percent = 100 * done_bytes // total_bytes if total_bytes else 100
        if percent != self._last_percent:
            self._last_percent = percent
            self.app.call_from_thread(self._set_progress, done_bytes, total_bytes)

    def _set_progress(self, done_bytes: int, total_bytes: int) -> None:
        self.repair_total, self.repair_done = total_bytes, done_bytes

    def watch_repair_done(self, done: int) -> None:
        self.query_one(ProgressBar).update(total=max(self.repair_total, 1), progress=done)

    # verify

    @on(Button.Pressed, "#lora-verify")
    @on(Input.Submitted, "#lora-base")
    def verify(self) -> None:
        if self.repaired_dir is None:
            self.notify("repair a checkpoint first", severity="warning")
            return
        base = self.query_one("#lora-base", Input).value.strip() or self.base_spec
        result_box = self.query_one("#lora-verify-result", Static)
        result_box.display = True
        result_box.loading = True
        self._verify(self.repaired_dir, base)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-verify")
    def _verify(self, adapter_dir: str, base: str) -> Any:
        from cogsurgeon.tools.lora import verify_adapter

        return verify_adapter(adapter_dir, base)

    # results and failures of the three workers

    def _show_result(self, selector: str, content: Any) -> None:
        box = self.query_one(selector, Static)
        box.update(content)
        box.display = True

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker, state = event.worker, event.state
        if state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        if worker.group == "lora-inspect":
            self.query_one("#lora-findings", Static).loading = False
            if state == WorkerState.SUCCESS:
                self._show_report(worker.result)
        elif worker.group == "lora-repair":
            self.query_one("#lora-repair", Button).disabled = False
            if state == WorkerState.SUCCESS:
                result = worker.result
                self.repaired_dir = result.out_dir
                self.repair_total = max(self.repair_total, result.bytes_written, 1)
                self.repair_done = self.repair_total
                files = ", ".join(Path(file).name for file in result.files)
                self._show_result("#lora-repair-result", Text(
                    f"wrote {shown_path(result.out_dir)}: {files} (lora_alpha {result.report.alpha:g})"
                ))
                self.query_one("#lora-verify", Button).disabled = False
                self.notify(f"repaired into {shown_path(result.out_dir)}", title="LoRA")
        elif worker.group == "lora-verify":
            self.query_one("#lora-verify-result", Static).loading = False
            if state == WorkerState.SUCCESS:
                self._show_result("#lora-verify-result", verify_table(worker.result))
        else:
            return
        if state == WorkerState.ERROR:
            title = f"{worker.group.removeprefix('lora-')} failed"
            self.notify(describe_failure(worker.error), title=title, severity="error")
