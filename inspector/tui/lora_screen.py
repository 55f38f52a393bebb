"""The LoRA screen: inspect a checkpoint, choose lora_alpha and an output folder, repair with a progress bar, then
verify the adapter against a base model. A view over `tools.lora`; each slow step runs in a thread worker that posts
its result as a message (`CheckpointInspected`, `CheckpointRepaired`, `AdapterVerified`), naming what it was computed
for. The screen keeps one `LoraState`: a new checkpoint resets everything computed for the last one, and a result
that arrives for anything but the current state is dropped, so nothing is ever shown beside inputs it did not come
from."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, ProgressBar, Static
from textual.worker import Worker

from cogsurgeon.inspector.model_specs import TINY_SPECS, resolve_spec
from cogsurgeon.inspector.tui.messages import (
    AdapterVerified,
    CheckpointInspected,
    CheckpointRepaired,
    ReportsWorkerFailures,
    describe_failure,
)
from cogsurgeon.inspector.tui.widgets import facts_table

# The core's messages name the CLI's flags; on this screen each is a field or a switch.
SCREEN_CONTROLS = (
    ("Settle it with --alpha A or --trainer NAME", "Enter it in the lora_alpha field"),
    ("pass --alpha A or --trainer NAME", "enter it in the lora_alpha field"),
    ("pass --alpha A", "enter it in the lora_alpha field"),
    ("--alpha", "the lora_alpha field"),
    ("pass --force to replace it", "tick “replace an earlier repair” to replace it"),
    ("--force", "“replace an earlier repair”"),
    ("choose another --out", "choose another output folder"),
    ("--out", "the output folder"),
    ("--base", "the base model"),
)


def in_screen_terms(text: str) -> str:
    """A core message with the CLI's flags named as this screen's controls."""
    for flag, control in SCREEN_CONTROLS:
        text = text.replace(flag, control)
    return text


def default_base(spec: str) -> str:
    """The verify base to offer for the model open in the main screen: it, unless it is a published config, which
    loads on the meta device without weights and which verify refuses; then nothing (the field says what fits)."""
    try:
        return "" if resolve_spec(spec).kind == "published" else spec
    except Exception:  # a spec that no longer resolves (a removed folder): offer nothing
        return ""


def shown_path(path: str | Path) -> str:
    """A path as the user would type it here: relative to the working folder when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def findings_table(report: Any, alpha: float | None = None) -> Table:
    """The `inspect` findings of a `LoraReport`: format, rank, alpha and where it came from, targets, problems.
    `alpha`: the value in the screen's lora_alpha field, when it differs from what the checkpoint gave."""
    rank = str(report.rank) if report.rank is not None else "-"
    if report.rank_pattern:
        rank += f"  ({len(report.rank_pattern)} modules differ: rank_pattern)"
    if alpha is not None and alpha != report.alpha:
        chosen, source = alpha, "the lora_alpha field"
    else:
        chosen, source = report.alpha, report.alpha_source
    rows: list[tuple[str | Text, str | Text]] = [
        ("file", shown_path(report.file)),
        ("format", report.format),
        ("rank", rank),
    ]
    if chosen is None:  # several trainers fit: the screen asks, as the CLI does, instead of guessing
        candidates = ", ".join(f"{c['alpha']:g} ({c['trainer']})" for c in report.alpha_candidates)
        rows.append(("lora_alpha", Text(f"UNKNOWN: could be {candidates}; type the trained lora_alpha below",
                                        style="bold yellow")))
    else:
        scale = f", scale {chosen / report.rank:g}" if report.rank else ""
        rows.append(("lora_alpha", f"{chosen:g} from {source}{scale}"))
    if report.alpha_detail and chosen is report.alpha:
        rows.append(("", Text(in_screen_terms(report.alpha_detail), style="dim")))
    rows.append(("targets", f"{', '.join(report.target_modules)}  ({report.num_modules} modules)"))
    rows += [(Text("problem", style="bold red"), in_screen_terms(problem)) for problem in report.problems]
    rows += [(Text("warning", style="bold yellow"), in_screen_terms(warning)) for warning in report.warnings]
    if not report.problems and chosen is None:
        rows.append((Text("needs", style="bold yellow"), "the trained lora_alpha: the repair waits for it"))
    elif not report.problems:
        rows.append((Text("ready", style="bold green"), "no problems: this checkpoint can be repaired"))
    return facts_table(rows)


def verify_table(report: Any, adapter_dir: str, base: str) -> Table:
    """An `AdapterVerifyReport` as a verdict, what it verified (adapter and base) and its figures."""
    verdict = Text("passed", style="bold green") if report.passed else Text("FAILED", style="bold red")
    rows: list[tuple[str | Text, str | Text]] = [("verify", verdict), ("adapter", shown_path(adapter_dir)),
                                                 ("base", base)]
    for label, value in (("outputs match", report.outputs_match), ("scales match", report.scales_match),
                         ("max |PEFT - diffusers|", report.max_abs_diff), ("LoRA effect", report.lora_effect)):
        if value is not None:
            rows.append((label, f"{value:.3g}" if isinstance(value, float) else str(value)))
    rows += [(Text("failure", style="bold red"), failure) for failure in report.failures]
    return facts_table(rows)


@dataclass(frozen=True)
class LoraState:
    """What the screen shows was computed from: the checkpoint inspected, its report, the repair made from it (a
    `RepairResult`) and the verification of that repair (adapter, base, report). Each later part belongs to the
    earlier ones: a new checkpoint starts a new state."""

    checkpoint: str = ""
    report: Any = None
    repaired: Any = None
    verified: tuple[str, str, Any] | None = None


class LoraScreen(ReportsWorkerFailures, Screen[None]):
    """Repair a CogVideoX LoRA checkpoint that lacks adapter_config.json (and lost its lora_alpha)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="lora.back")]
    AUTO_FOCUS = "#lora-checkpoint"

    # the progress bar is bound to these (`data_bind`)
    repair_total: reactive[int] = reactive(1, init=False)
    repair_done: reactive[int] = reactive(0, init=False)

    def __init__(self, base_spec: str = "tiny") -> None:
        super().__init__()
        self.base_spec = base_spec
        self.state = LoraState()
        self._last_percent = -1

    def show_state(self, state: LoraState) -> None:
        """Make `state` the screen's and render every widget that shows a result from it."""
        self.state = state
        findings = self.query_one("#lora-findings", Static)
        if state.report is not None:
            findings.update(findings_table(state.report, self._typed_alpha()))
        elif state.checkpoint:
            findings.update(Text(f"inspecting {state.checkpoint}…", style="dim"))
        else:
            findings.update(Text("enter a checkpoint path and press Enter", style="dim"))
        self.query_one("#lora-repair", Button).disabled = state.report is None or bool(state.report.problems)
        repair_box = self.query_one("#lora-repair-result", Static)
        if state.repaired is None:
            repair_box.update("")
            self.repair_done, self.repair_total = 0, 1
        else:
            result = state.repaired
            files = ", ".join(Path(file).name for file in result.files)
            repair_box.update(Text(f"wrote {shown_path(result.out_dir)} from {shown_path(state.checkpoint)}: {files} "
                                   f"(lora_alpha {result.report.alpha:g})"))
        repair_box.display = state.repaired is not None
        self.query_one("#lora-verify", Button).disabled = state.repaired is None
        verify_box = self.query_one("#lora-verify-result", Static)
        verify_box.update("" if state.verified is None else verify_table(state.verified[2], *state.verified[:2]))
        verify_box.display = state.verified is not None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="lora"):
            yield Label("1. Checkpoint", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="a .safetensors file, a checkpoint-N folder or a SAT iteration folder",
                            id="lora-checkpoint")
                yield Button("Inspect", id="lora-inspect")
            yield Static(Text("enter a checkpoint path and press Enter", style="dim"), id="lora-findings")
            yield Label("2. Repair into an adapter folder", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="lora_alpha", id="lora-alpha")
                yield Input(placeholder="output folder (must not exist)", id="lora-out")
                yield Button("Repair", id="lora-repair", disabled=True)
            yield Checkbox("replace an earlier repair in the output folder (only a folder this tool wrote)",
                           id="lora-force")
            # determinate from the start (an indeterminate bar animates, and says nothing here)
            yield ProgressBar(total=1, id="lora-progress", show_eta=False).data_bind(
                total=LoraScreen.repair_total, progress=LoraScreen.repair_done)
            yield Static(id="lora-repair-result")
            yield Label("3. Verify against a base model", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(value=default_base(self.base_spec),
                            placeholder=f"base MODEL with weights: a local folder, a cached hub id or {TINY_SPECS[0]} "
                                        "(published configs load without weights)",
                            id="lora-base")
                yield Button("Verify", id="lora-verify", disabled=True)
            yield Static(id="lora-verify-result")
        yield Footer()

    # inspect

    @on(Input.Submitted, "#lora-checkpoint")
    @on(Button.Pressed, "#lora-inspect")
    def inspect_checkpoint(self) -> None:
        path = self.query_one("#lora-checkpoint", Input).value.strip()
        if not path:
            self.notify("enter the path of a LoRA checkpoint", severity="warning")
            return
        # a new checkpoint: nothing computed for the last one stays, nor the output folder derived from it
        self.show_state(LoraState(checkpoint=path))
        self.query_one("#lora-out", Input).value = f"{Path(path).as_posix().rstrip('/')}-adapter"
        self.query_one("#lora-alpha", Input).value = ""
        self.query_one("#lora-force", Checkbox).value = False
        self.query_one("#lora-findings", Static).loading = True
        self._inspect(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-inspect", description="inspect failed")
    def _inspect(self, path: str) -> None:
        from cogsurgeon.tools.lora import inspect_checkpoint

        self.post_message(CheckpointInspected(path, inspect_checkpoint(path)))

    def on_checkpoint_inspected(self, message: CheckpointInspected) -> None:
        if message.path != self.state.checkpoint or self.state.report is not None:
            return  # the report of a checkpoint this screen no longer shows
        report = message.report
        self.query_one("#lora-alpha", Input).value = f"{report.alpha:g}" if report.alpha is not None else ""
        self.show_state(LoraState(checkpoint=message.path, report=report))

    @on(Input.Changed, "#lora-checkpoint")
    def _checkpoint_edited(self, event: Input.Changed) -> None:
        """Another path typed: what was shown for the inspected one goes, until Enter inspects the new one."""
        if self.state.checkpoint and event.value.strip() != self.state.checkpoint:
            self.show_state(LoraState())
            self.query_one("#lora-findings", Static).update(
                Text(f"press Enter to inspect {event.value.strip() or 'a checkpoint'}", style="dim"))

    def _typed_alpha(self) -> float | None:
        text = self.query_one("#lora-alpha", Input).value.strip()
        try:
            return float(text) if text else None
        except ValueError:
            return None

    @on(Input.Changed, "#lora-alpha")
    def _alpha_edited(self) -> None:
        """The findings say which lora_alpha the repair will write, and its scale, as the field is edited."""
        if self.state.report is not None:
            self.query_one("#lora-findings", Static).update(findings_table(self.state.report, self._typed_alpha()))

    # repair

    @on(Button.Pressed, "#lora-repair")
    @on(Input.Submitted, "#lora-out")
    def repair(self) -> None:
        if self.state.report is None or self.state.report.problems:
            self.notify("inspect a checkpoint without problems first", severity="warning")
            return
        alpha_text, alpha = self.query_one("#lora-alpha", Input).value.strip(), self._typed_alpha()
        if alpha is None and alpha_text:
            self.notify(f"lora_alpha must be a number, got {alpha_text!r}", severity="error")
            return
        out_dir = self.query_one("#lora-out", Input).value.strip()
        if not out_dir:
            self.notify("enter an output folder", severity="warning")
            return
        self.show_state(replace(self.state, repaired=None, verified=None))
        self._last_percent = -1
        self.query_one("#lora-repair", Button).disabled = True
        force = self.query_one("#lora-force", Checkbox).value
        self._repair(self.state.checkpoint, out_dir, alpha, force)  # the checkpoint inspected, whatever is typed

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-repair", description="repair failed")
    def _repair(self, path: str, out_dir: str, alpha: float | None, force: bool) -> None:
        from cogsurgeon.tools.lora import repair_checkpoint

        result = repair_checkpoint(path, out_dir, alpha=alpha, force=force, progress=self._progress_from_thread)
        self.post_message(CheckpointRepaired(path, result))

    def _progress_from_thread(self, done_bytes: int, total_bytes: int) -> None:
        """Called by the repair as bytes stream; hands the UI one update per percent, not one per tensor."""
        percent = 100 * done_bytes // total_bytes if total_bytes else 100
        if percent != self._last_percent:
            self._last_percent = percent
            self.app.call_from_thread(self._set_progress, done_bytes, total_bytes)

    def _set_progress(self, done_bytes: int, total_bytes: int) -> None:
        self.repair_total, self.repair_done = max(total_bytes, 1), done_bytes

    # verify

    @on(Button.Pressed, "#lora-verify")
    @on(Input.Submitted, "#lora-base")
    def verify(self) -> None:
        if self.state.repaired is None:
            self.notify("repair a checkpoint first", severity="warning")
            return
        base = self.query_one("#lora-base", Input).value.strip()
        if not base:
            self.notify("enter a base model with weights (a local folder, a cached hub id or a tiny spec)",
                        severity="warning")
            return
        self.show_state(replace(self.state, verified=None))
        result_box = self.query_one("#lora-verify-result", Static)
        result_box.display = result_box.loading = True
        self._verify(self.state.repaired.out_dir, base)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-verify", description="verify failed")
    def _verify(self, adapter_dir: str, base: str) -> None:
        from cogsurgeon.tools.lora import verify_adapter

        self.post_message(AdapterVerified(adapter_dir, base, verify_adapter(adapter_dir, base)))

    # results and failures of the three workers

    def on_checkpoint_repaired(self, message: CheckpointRepaired) -> None:
        result = message.result
        if message.path != self.state.checkpoint:
            self.notify(f"repaired {shown_path(message.path)} into {shown_path(result.out_dir)}; this screen now shows "
                        f"{shown_path(self.state.checkpoint) or 'no checkpoint'}", title="LoRA")
            return
        self.show_state(replace(self.state, repaired=result, verified=None))
        self.repair_total = max(result.bytes_written, 1)
        self.repair_done = self.repair_total
        self.notify(f"repaired {shown_path(message.path)} into {shown_path(result.out_dir)}", title="LoRA")

    def on_adapter_verified(self, message: AdapterVerified) -> None:
        repaired = self.state.repaired
        if repaired is None or message.adapter_dir != repaired.out_dir:
            return  # the verification of an adapter this screen no longer shows
        self.show_state(replace(self.state, verified=(message.adapter_dir, message.base, message.report)))
        verdict = "passed" if message.report.passed else "FAILED"
        self.notify(f"verify {verdict}: {shown_path(message.adapter_dir)} against {message.base}", title="LoRA",
                    severity="information" if message.report.passed else "error")

    def worker_ended(self, worker: Worker[Any]) -> None:
        if worker.group == "lora-inspect":
            self.query_one("#lora-findings", Static).loading = False
        elif worker.group == "lora-repair":
            report = self.state.report
            self.query_one("#lora-repair", Button).disabled = report is None or bool(report.problems)
        elif worker.group == "lora-verify":
            self.query_one("#lora-verify-result", Static).loading = False

    def failure_text(self, error: BaseException) -> str:
        return in_screen_terms(describe_failure(error))
