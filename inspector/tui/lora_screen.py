"""The LoRA screen: everything `cogsurgeon lora` does, as four steps. 1. inspect a checkpoint (trainer, step of an
output folder, override of a stored lora_alpha); 2. repair it into an adapter folder (lora_alpha, output folder,
consumers, bake-scale, replace an earlier repair); 3. verify an adapter folder (the one just repaired, or any
other) against a base model; 4. merge LoRAs at weights into a base's weights. A view over `tools.lora`.

Each slow step runs in a thread worker that posts its result as a message naming what it was computed for, with a
toast and a progress bar or line. The screen keeps one `LoraState`: a new inspect request (checkpoint, trainer,
step, override) resets everything computed for the last one, a result that arrives for anything but the current
state is dropped, and every result names its inputs. The core's messages name its calls' keyword arguments; this
screen says them as its own controls (`in_screen_terms`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, ProgressBar, Select, Static
from textual.worker import Worker

from cogsurgeon.inspector.errors import renamed_parameters
from cogsurgeon.inspector.model_specs import TINY_SPECS, resolve_spec
from cogsurgeon.inspector.tui.messages import (
    AdapterVerified,
    CheckpointInspected,
    CheckpointRepaired,
    LorasMerged,
    ReportsWorkerFailures,
    describe_failure,
)
from cogsurgeon.inspector.tui.widgets import facts_table
from cogsurgeon.inspector.tui.user_writes import writing_user_files
from cogsurgeon.tools.lora.keys import TRAINERS

OVERRIDE_LABEL = "override the stored lora_alpha"
FORCE_LABEL = "replace an earlier repair"
MERGE_FORCE_LABEL = "replace an earlier merge"
BAKE_LABEL = "bake the scale into lora_B"
CONSUMERS = ("peft", "diffusers", "comfyui")

# The core's messages, errors and report warnings alike, name the keyword arguments of its calls (`alpha=A`,
# `latest=True`); on this screen each is a field, a list or a switch. These phrases read better rewritten whole (most
# specific first); `in_screen_terms` then names any parameter left as the control it is (PARAMETER_CONTROLS).
SCREEN_CONTROLS = (
    ("repair its checkpoint first (repair_checkpoint, or `cogsurgeon lora repair`)",
     "repair its checkpoint first (step 2)"),
    ("Settle it with alpha=A or trainer=NAME", "Enter it in the lora_alpha field or choose the trainer"),
    ("with alpha=A or trainer=NAME", "with the lora_alpha field or the trainer"),
    ("pass alpha=A or trainer=NAME", "enter it in the lora_alpha field or choose the trainer"),
    ("pass alpha=A", "enter it in the lora_alpha field"),
    ("pass step=N for one, or latest=True for", "choose one in the step list, or latest for"),
    ("step=N reads one of them", "the step list reads one of them"),
    ("step= and latest=True choose", "the step list chooses"),
    ("for latest=True to choose from", "for the step list to choose from"),
    ("drop alpha=, or pass override_stored_alpha=True", f"clear the lora_alpha field, or tick “{OVERRIDE_LABEL}”"),
    ("comfyui in to=", "writing for comfyui"),
    ("out of to=", "out of “write for”"),
    ("pass force=True to replace an earlier repair", f"tick “{FORCE_LABEL}” to replace it"),
    ("pass force=True to replace an earlier merge", f"tick “{MERGE_FORCE_LABEL}” to replace it"),
    ("force=True replaces earlier repairs", f"“{FORCE_LABEL}” replaces earlier repairs"),
    ("force=True replaces earlier merges", f"“{MERGE_FORCE_LABEL}” replaces earlier merges"),
    ("that force=True may replace", "that the replace switch may replace"),
    ("choose another out_dir=", "choose another output folder"),
    ("see `cogsurgeon lora inspect`", "see the findings"),
    ("Repair it first (repair_checkpoint or `cogsurgeon lora repair`, with", "Repair it first (step 2, with"),
)


# the keyword arguments of tools.lora's calls that its messages name outside those phrases, as this screen's controls
# (step=, latest=True, to= and force=True come only in the phrases above)
PARAMETER_CONTROLS = {"alpha": "the lora_alpha field", "trainer": "the trainer",
                      "override_stored_alpha": f"“{OVERRIDE_LABEL}”", "out_dir": "the output folder",
                      "base_spec": "the base model"}


def in_screen_terms(text: str) -> str:
    """A core message with the keyword arguments it names as this screen's controls; no `parameter=` of those is
    left in it."""
    for phrase, control in SCREEN_CONTROLS:
        text = text.replace(phrase, control)
    return renamed_parameters(text, PARAMETER_CONTROLS)


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


@dataclass(frozen=True)
class InspectRequest:
    """What an inspect reads: the checkpoint as typed, and the screen's trainer, step and override controls."""

    checkpoint: str
    trainer: str | None = None
    step: int | None = None
    latest: bool = False
    override_stored_alpha: bool = False

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `inspect_checkpoint` / `repair_checkpoint` this request stands for."""
        return {"trainer": self.trainer, "step": self.step, "latest": self.latest,
                "override_stored_alpha": self.override_stored_alpha}

    def describe(self) -> str:
        """The checkpoint and the choices made for it, as the findings and results name them."""
        chosen = [f"step {self.step}" if self.step is not None else "", "latest step" if self.latest else "",
                  f"trainer {self.trainer}" if self.trainer else "",
                  "stored lora_alpha overridden" if self.override_stored_alpha else ""]
        extra = ", ".join(choice for choice in chosen if choice)
        return shown_path(self.checkpoint) + (f" ({extra})" if extra else "")


def default_output(request: InspectRequest) -> str:
    """The adapter folder offered for a request: beside the checkpoint, named after it and the step chosen, so two
    steps of one output folder are never offered the same folder."""
    chosen = f"-step-{request.step}" if request.step is not None else "-latest" if request.latest else ""
    return f"{Path(request.checkpoint).as_posix().rstrip('/')}{chosen}-adapter"


@dataclass(frozen=True)
class RepairRequest:
    """What a repair is asked to write, beside the inspect request it repairs."""

    out_dir: str
    alpha: float | None
    force: bool
    consumers: tuple[str, ...]
    bake_scale: bool


@dataclass(frozen=True)
class MergeRequest:
    base: str
    loras: tuple[tuple[str, float], ...]  # (path, weight)
    out_dir: str
    force: bool

    def describe(self) -> str:
        loras = ", ".join(f"{shown_path(path)} × {weight:g}" for path, weight in self.loras)
        return f"{shown_path(self.base)} + {loras}"


@dataclass(frozen=True)
class LoraState:
    """What the screen shows was computed from: the inspect request, the steps its folder holds, its report, the
    repair made from it (request and `RepairResult`), the verification shown (adapter, base, report), and the last
    merge (request and `MergeResult`, which belongs to the merge fields only). A new inspect request starts a new
    state that keeps only the merge."""

    request: InspectRequest | None = None
    steps: tuple[int, ...] = ()
    report: Any = None
    repaired: tuple[RepairRequest, Any] | None = None
    verified: tuple[str, str, Any] | None = None
    merged: tuple[MergeRequest, Any] | None = None

    @property
    def checkpoint(self) -> str:
        return self.request.checkpoint if self.request is not None else ""

    def for_request(self, request: InspectRequest | None, steps: tuple[int, ...] = ()) -> LoraState:
        return LoraState(request=request, steps=steps, merged=self.merged)


def findings_table(report: Any, request: InspectRequest, alpha: float | None = None) -> Table:
    """The `inspect` findings of a `LoraReport` for `request`: what was read, format, steps, rank, alpha and where it
    came from, targets, problems. `alpha`: the value in the lora_alpha field, when it differs from the checkpoint's."""
    rank = str(report.rank) if report.rank is not None else "-"
    if report.rank_pattern:
        rank += f"  ({len(report.rank_pattern)} modules differ: rank_pattern)"
    if alpha is not None and alpha != report.alpha:
        chosen, source = alpha, "the lora_alpha field"
    else:
        chosen, source = report.alpha, report.alpha_source
    rows: list[tuple[str | Text, str | Text]] = [
        ("inspected", request.describe()),
        ("file", shown_path(report.file)),
        ("format", report.format),
    ]
    if report.steps:
        rows.append(("steps", ", ".join(str(step) for step in report.steps) + "  (the step list reads another)"))
    rows.append(("rank", rank))
    if chosen is None:  # several trainers fit: the screen asks, as the CLI does, instead of guessing
        candidates = ", ".join(f"{c['alpha']:g} ({c['trainer']})" for c in report.alpha_candidates)
        rows.append(("lora_alpha", Text(f"UNKNOWN: could be {candidates}; type the trained lora_alpha below or "
                                        "choose the trainer", style="bold yellow")))
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


def steps_needed_text(checkpoint: str, steps: tuple[int, ...]) -> Text:
    listed = ", ".join(str(step) for step in steps)
    return Text(f"{shown_path(checkpoint)} holds {len(steps)} checkpoints (steps {listed}): choose one in the step "
                "list (or latest)", style="bold yellow")


def repair_text(request: InspectRequest, repair: RepairRequest, result: Any) -> Text:
    files = ", ".join(Path(file).name for file in result.files)
    how = f"for {', '.join(repair.consumers)}" + (", scale baked into lora_B" if repair.bake_scale else "")
    return Text(f"wrote {shown_path(result.out_dir)} from {request.describe()}: {files} "
                f"(lora_alpha {result.report.alpha:g}, {how})")


def verify_table(report: Any, adapter_dir: str, base: str) -> Table:
    """An `AdapterVerifyReport` as a verdict, what it verified (adapter and base) and its figures."""
    verdict = Text("passed", style="bold green") if report.passed else Text("FAILED", style="bold red")
    rows: list[tuple[str | Text, str | Text]] = [("verify", verdict), ("adapter", shown_path(adapter_dir)),
                                                 ("base", base)]
    for label, value in (("outputs match", report.outputs_match), ("scales match", report.scales_match),
                         ("max |PEFT - diffusers|", report.max_abs_diff), ("LoRA effect", report.lora_effect)):
        if value is not None:
            rows.append((label, f"{value:.3g}" if isinstance(value, float) else str(value)))
    source = report.source_check or {}
    if source.get("compared"):
        rows.append(("source", f"α/r·B·A vs {shown_path(source['file'])}: max relative diff "
                               f"{source['max_rel_diff']:.3g}"))
    elif source:
        rows.append(("source", in_screen_terms(source.get("status", "not checked"))))
    rows += [(Text("failure", style="bold red"), in_screen_terms(failure)) for failure in report.failures]
    return facts_table(rows)


def merge_text(request: MergeRequest, result: Any) -> Text:
    return Text(f"wrote {shown_path(result.out_dir)}: {request.describe()}, {result.fused_modules} weights fused "
                f"({len(result.files)} files)")


def parse_merge_loras(text: str) -> tuple[tuple[str, float], ...]:
    """The merge's LoRA field: space-separated `PATH` or `PATH:WEIGHT` (quoted when a path holds spaces)."""
    from cogsurgeon.tools.lora.merge import parse_lora_spec

    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"the LoRA list cannot be read: {error}") from None
    return tuple((spec.path, spec.weight) for spec in map(parse_lora_spec, words))


@dataclass
class VerifyStep(Message):
    """The adapter verification of `adapter_dir` moved to its next stage."""

    adapter_dir: str
    step: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, VerifyStep)


class LoraScreen(ReportsWorkerFailures, Screen[None]):
    """Inspect, repair, verify and merge CogVideoX LoRAs: the `cogsurgeon lora` commands as one screen."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="lora.back")]
    AUTO_FOCUS = "#lora-checkpoint"

    # the progress bars are bound to these (`data_bind`)
    repair_total: reactive[int] = reactive(1, init=False)
    repair_done: reactive[int] = reactive(0, init=False)
    merge_total: reactive[int] = reactive(1, init=False)
    merge_done: reactive[int] = reactive(0, init=False)

    def __init__(self, base_spec: str = "tiny") -> None:
        super().__init__()
        self.base_spec = base_spec
        self.state = LoraState()
        self._last_percent: dict[str, int] = {}
        self._steps_offered: list[tuple[str, str]] | None = None  # what the step list offers now

    # the one state, rendered

    def show_state(self, state: LoraState) -> None:
        """Make `state` the screen's and render every widget that shows a result from it."""
        self.state = state
        findings = self.query_one("#lora-findings", Static)
        if state.report is not None:
            findings.update(findings_table(state.report, state.request, self._typed_alpha()))
        elif state.request is not None and len(state.steps) > 1 and state.request.step is None \
                and not state.request.latest:
            findings.update(steps_needed_text(state.checkpoint, state.steps))
        elif state.request is not None:
            findings.update(Text(f"inspecting {state.request.describe()}…", style="dim"))
        else:
            findings.update(Text("enter a checkpoint path and press Enter", style="dim"))
        self._show_steps(state)
        self.query_one("#lora-repair", Button).disabled = state.report is None or bool(state.report.problems)
        repair_box = self.query_one("#lora-repair-result", Static)
        if state.repaired is None:
            repair_box.update("")
            self.repair_done, self.repair_total = 0, 1
        else:
            repair_box.update(repair_text(state.request, *state.repaired))
        repair_box.display = state.repaired is not None
        self.query_one("#lora-verify", Button).disabled = not self.query_one("#lora-adapter", Input).value.strip()
        verify_box = self.query_one("#lora-verify-result", Static)
        verify_box.update("" if state.verified is None else verify_table(state.verified[2], *state.verified[:2]))
        verify_box.display = state.verified is not None
        merge_box = self.query_one("#merge-result", Static)
        merge_box.update("" if state.merged is None else merge_text(*state.merged))
        merge_box.display = state.merged is not None
        if state.merged is None:
            self.merge_done, self.merge_total = 0, 1
        self._warn_about_output()

    def _show_steps(self, state: LoraState) -> None:
        """The step list offers the steps of the folder inspected (latest first); it is off for anything else."""
        select = self.query_one("#lora-step", Select)
        steps = state.report.steps if state.report is not None and state.report.steps else state.steps
        options = [(f"latest (step {max(steps)})", "latest"), *((f"step {step}", str(step)) for step in steps)] \
            if steps else []
        if self._steps_offered != options:
            self._steps_offered = options
            with select.prevent(Select.Changed):
                select.set_options(options)
                request = state.request
                if request is not None and request.latest:
                    select.value = "latest"
                elif request is not None and request.step is not None and request.step in steps:
                    select.value = str(request.step)
        select.disabled = not steps

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="lora"):
            yield Label("1. Inspect a checkpoint", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="a .safetensors file, a checkpoint-N folder, an output folder or a SAT folder",
                            id="lora-checkpoint")
                yield Button("Inspect", id="lora-inspect")
            with Horizontal(classes="form-row"):
                yield Select([(name, name) for name in TRAINERS], prompt="trainer: as the file says",
                             id="lora-trainer")
                yield Select([], prompt="step", id="lora-step", disabled=True)
            yield Checkbox(OVERRIDE_LABEL + " with the lora_alpha field", id="lora-override")
            yield Static(Text("enter a checkpoint path and press Enter", style="dim"), id="lora-findings")
            yield Label("2. Repair into an adapter folder", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="lora_alpha", id="lora-alpha")
                yield Input(placeholder="output folder (must not exist)", id="lora-out")
                yield Button("Repair", id="lora-repair", disabled=True)
            yield Static(id="lora-out-warning")
            with Horizontal(classes="form-row checkboxes"):
                yield Label("write for:", classes="inline-label")
                for consumer in CONSUMERS:
                    yield Checkbox(consumer, value=consumer != "comfyui", id=f"lora-to-{consumer}")
            with Horizontal(classes="form-row checkboxes"):
                yield Checkbox(BAKE_LABEL, id="lora-bake")
                yield Checkbox(FORCE_LABEL + " (only a folder this tool wrote)", id="lora-force")
            # determinate from the start (an indeterminate bar animates, and says nothing here)
            yield ProgressBar(total=1, id="lora-progress", show_eta=False).data_bind(
                total=LoraScreen.repair_total, progress=LoraScreen.repair_done)
            yield Static(id="lora-repair-result")
            yield Label("3. Verify an adapter folder against a base model", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="adapter folder (a repair fills it in)", id="lora-adapter")
                yield Input(value=default_base(self.base_spec),
                            placeholder=f"base MODEL with weights: a local folder, a cached hub id or {TINY_SPECS[0]}",
                            id="lora-base")
                yield Button("Verify", id="lora-verify", disabled=True)
            yield Static(id="lora-verify-progress")
            yield Static(id="lora-verify-result")
            yield Label("4. Merge LoRAs into a base model's weights", classes="form-label")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="base: a local transformer folder", id="merge-base")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="LoRAs: PATH or PATH:WEIGHT, separated by spaces", id="merge-loras")
            with Horizontal(classes="form-row"):
                yield Input(placeholder="output folder (must not exist)", id="merge-out")
                yield Button("Merge", id="merge-run")
            yield Checkbox(MERGE_FORCE_LABEL + " (only a folder this tool wrote)", id="merge-force")
            yield ProgressBar(total=1, id="merge-progress", show_eta=False).data_bind(
                total=LoraScreen.merge_total, progress=LoraScreen.merge_done)
            yield Static(id="merge-result")
        yield Footer()

    # 1. inspect

    def _inspect_request(self, checkpoint: str) -> InspectRequest:
        trainer = self.query_one("#lora-trainer", Select).value
        step = self.query_one("#lora-step", Select).value
        return InspectRequest(
            checkpoint=checkpoint,
            trainer=trainer if isinstance(trainer, str) else None,
            step=int(step) if isinstance(step, str) and step.isdigit() else None,
            latest=step == "latest",
            override_stored_alpha=self.query_one("#lora-override", Checkbox).value,
        )

    @on(Input.Submitted, "#lora-checkpoint")
    @on(Button.Pressed, "#lora-inspect")
    def inspect_checkpoint(self) -> None:
        path = self.query_one("#lora-checkpoint", Input).value.strip()
        if not path:
            self.notify("enter the path of a LoRA checkpoint", severity="warning")
            return
        if path != self.state.checkpoint:  # another checkpoint: its own step, from none
            self._steps_offered = None
            self.query_one("#lora-step", Select).set_options([])
        self._start_inspect(self._inspect_request(path), new_checkpoint=path != self.state.checkpoint)

    def _start_inspect(self, request: InspectRequest, new_checkpoint: bool) -> None:
        # a new request: nothing computed for the last one stays, nor the folders derived from it
        self.show_state(self.state.for_request(request, self.state.steps if not new_checkpoint else ()))
        self.query_one("#lora-out", Input).value = default_output(request)
        self.query_one("#lora-force", Checkbox).value = False
        self.query_one("#lora-alpha", Input).value = ""
        self.query_one("#lora-adapter", Input).value = ""
        self.query_one("#lora-findings", Static).loading = True
        self._inspect(request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-inspect", description="inspect failed")
    def _inspect(self, request: InspectRequest) -> None:
        from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, checkpoint_steps, inspect_checkpoint

        folder = Path(request.checkpoint).expanduser()
        steps = tuple(checkpoint_steps(folder)) if folder.is_dir() else ()
        try:
            report = inspect_checkpoint(request.checkpoint, **request.options())
        except LoraCheckpointError:
            if len(steps) > 1 and request.step is None and not request.latest:
                # an output folder of several checkpoints, none chosen: the step list asks which one
                self.post_message(CheckpointInspected(request, None, steps))
                return
            raise
        self.post_message(CheckpointInspected(request, report, steps))

    def on_checkpoint_inspected(self, message: CheckpointInspected) -> None:
        if message.request != self.state.request or self.state.report is not None:
            return  # the report of a request this screen no longer shows
        report = message.report
        if report is None:
            self.show_state(replace(self.state, steps=message.steps))
            self.query_one("#lora-step", Select).focus()
            self.notify(f"{shown_path(message.request.checkpoint)} holds {len(message.steps)} checkpoints: choose "
                        "one in the step list", title="LoRA inspect", severity="warning")
            return
        self.query_one("#lora-alpha", Input).value = f"{report.alpha:g}" if report.alpha is not None else ""
        self.show_state(replace(self.state, steps=message.steps, report=report))
        self.query_one("#lora-findings").scroll_visible(animate=False)  # a result below the fold comes into view
        alpha = f"lora_alpha {report.alpha:g}" if report.alpha is not None else "lora_alpha unknown"
        self.notify(f"inspected {message.request.describe()}: {report.format}, rank {report.rank}, {alpha}",
                    title="LoRA inspect")

    @on(Select.Changed, "#lora-trainer, #lora-step")
    @on(Checkbox.Changed, "#lora-override")
    def _inspect_choice_changed(self) -> None:
        """A trainer, step or override chosen: the checkpoint is read again with it (a header read), and everything
        shown for the last choice goes."""
        path = self.query_one("#lora-checkpoint", Input).value.strip()
        if not path or path != self.state.checkpoint:
            return
        request = self._inspect_request(path)
        if request != self.state.request:
            self._start_inspect(request, new_checkpoint=False)

    @on(Input.Changed, "#lora-checkpoint")
    def _checkpoint_edited(self, event: Input.Changed) -> None:
        """Another path typed: what was shown for the inspected one goes, until Enter inspects the new one."""
        if self.state.checkpoint and event.value.strip() != self.state.checkpoint:
            self.show_state(self.state.for_request(None))
            self.query_one("#lora-adapter", Input).value = ""
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
            self.query_one("#lora-findings", Static).update(
                findings_table(self.state.report, self.state.request, self._typed_alpha()))

    # 2. repair

    @on(Input.Changed, "#lora-out")
    def _warn_about_output(self) -> None:
        """Warn when the output folder holds an earlier repair of another checkpoint: replacing it would put this
        checkpoint's adapter under that one's name."""
        from cogsurgeon.tools.lora.publish import records_another_source

        warning = self.query_one("#lora-out-warning", Static)
        out_dir = self.query_one("#lora-out", Input).value.strip()
        other = records_another_source(Path(out_dir).expanduser(), self.state.report.file) \
            if out_dir and self.state.report is not None else None
        warning.update(Text(f"{out_dir} holds the repair of another checkpoint, {shown_path(other)}: replacing it "
                            "would put this checkpoint's adapter under that name", style="bold yellow")
                       if other else "")
        warning.display = other is not None

    def _repair_request(self) -> RepairRequest | str:
        """The repair the fields ask for, or why it cannot run."""
        alpha_text, alpha = self.query_one("#lora-alpha", Input).value.strip(), self._typed_alpha()
        if alpha is None and alpha_text:
            return f"lora_alpha must be a number, got {alpha_text!r}"
        out_dir = self.query_one("#lora-out", Input).value.strip()
        if not out_dir:
            return "enter an output folder"
        consumers = tuple(name for name in CONSUMERS if self.query_one(f"#lora-to-{name}", Checkbox).value)
        if not consumers:
            return "tick at least one consumer to write for (peft, diffusers, comfyui)"
        # the field shows the checkpoint's own alpha: only a different value is the user's choice
        chosen = alpha if alpha != self.state.report.alpha else None
        return RepairRequest(out_dir, chosen, self.query_one("#lora-force", Checkbox).value, consumers,
                             self.query_one("#lora-bake", Checkbox).value)

    @on(Button.Pressed, "#lora-repair")
    @on(Input.Submitted, "#lora-out")
    def repair(self) -> None:
        if self.state.report is None or self.state.report.problems:
            self.notify("inspect a checkpoint without problems first", severity="warning")
            return
        request = self._repair_request()
        if isinstance(request, str):
            self.notify(request, severity="error" if "must" in request else "warning")
            return
        self.show_state(replace(self.state, repaired=None, verified=None))
        self._last_percent["repair"] = -1
        self.query_one("#lora-repair", Button).disabled = True
        self.notify(f"repairing {self.state.request.describe()} into {shown_path(request.out_dir)}…", title="LoRA")
        self._repair(self.state.request, request)  # the checkpoint inspected, whatever is typed

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-repair", description="repair failed")
    def _repair(self, inspect: InspectRequest, request: RepairRequest) -> None:
        from cogsurgeon.tools.lora import repair_checkpoint

        with writing_user_files():
            result = repair_checkpoint(inspect.checkpoint, request.out_dir, alpha=request.alpha, force=request.force,
                                       to=",".join(request.consumers), bake_scale=request.bake_scale,
                                       progress=lambda done, total: self._progress_from_thread("repair", done, total),
                                       **inspect.options())
        self.post_message(CheckpointRepaired(inspect, request, result))

    def _progress_from_thread(self, what: str, done_bytes: int, total_bytes: int) -> None:
        """Called by a repair or merge as bytes stream; hands the UI one update per percent, not one per tensor."""
        percent = 100 * done_bytes // total_bytes if total_bytes else 100
        if percent != self._last_percent.get(what):
            self._last_percent[what] = percent
            self.app.call_from_thread(self._set_progress, what, done_bytes, total_bytes)

    def _set_progress(self, what: str, done_bytes: int, total_bytes: int) -> None:
        setattr(self, f"{what}_total", max(total_bytes, 1))
        setattr(self, f"{what}_done", done_bytes)

    def on_checkpoint_repaired(self, message: CheckpointRepaired) -> None:
        result = message.result
        if message.request != self.state.request:
            self.notify(f"repaired {message.request.describe()} into {shown_path(result.out_dir)}; this screen now "
                        f"shows {self.state.request.describe() if self.state.request else 'no checkpoint'}",
                        title="LoRA")
            return
        self.show_state(replace(self.state, repaired=(message.repair, result), verified=None))
        self.query_one("#lora-adapter", Input).value = shown_path(result.out_dir)
        self.query_one("#lora-repair-result").scroll_visible(animate=False)  # a result below the fold comes into view
        self.repair_total = max(result.bytes_written, 1)
        self.repair_done = self.repair_total
        self.notify(f"repaired {message.request.describe()} into {shown_path(result.out_dir)}", title="LoRA")

    # 3. verify

    @on(Input.Changed, "#lora-adapter")
    def _adapter_edited(self, event: Input.Changed) -> None:
        """Another adapter folder: a verdict shown for the last one goes."""
        verified = self.state.verified
        if verified is not None and event.value.strip() != shown_path(verified[0]):
            self.show_state(replace(self.state, verified=None))
        self.query_one("#lora-verify", Button).disabled = not event.value.strip()

    @on(Button.Pressed, "#lora-verify")
    @on(Input.Submitted, "#lora-base, #lora-adapter")
    def verify(self) -> None:
        adapter = self.query_one("#lora-adapter", Input).value.strip()
        if not adapter:
            self.notify("enter an adapter folder to verify (a repair fills it in)", severity="warning")
            return
        base = self.query_one("#lora-base", Input).value.strip()
        if not base:
            self.notify("enter a base model with weights (a local folder, a cached hub id or a tiny spec)",
                        severity="warning")
            return
        self.show_state(replace(self.state, verified=None))
        progress = self.query_one("#lora-verify-progress", Static)
        progress.update(Text(f"verifying {adapter} against {base}…", style="dim"))
        progress.display = True
        self.notify(f"verifying {adapter} against {base} with PEFT and diffusers…", title="LoRA verify")
        self._verify(adapter, base)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-verify", description="verify failed")
    def _verify(self, adapter_dir: str, base: str) -> None:
        from cogsurgeon.tools.lora import verify_adapter

        report = verify_adapter(adapter_dir, base,
                                progress=lambda step: self.post_message(VerifyStep(adapter_dir, step)))
        self.post_message(AdapterVerified(adapter_dir, base, report))

    def on_verify_step(self, message: VerifyStep) -> None:
        if message.adapter_dir == self.query_one("#lora-adapter", Input).value.strip():
            self.query_one("#lora-verify-progress", Static).update(
                Text(f"verifying {message.adapter_dir}: {in_screen_terms(message.step)}", style="dim"))

    def on_adapter_verified(self, message: AdapterVerified) -> None:
        verdict = "passed" if message.report.passed else "FAILED"
        self.notify(f"verify {verdict}: {shown_path(message.adapter_dir)} against {message.base}", title="LoRA verify",
                    severity="information" if message.report.passed else "error")
        if message.adapter_dir != self.query_one("#lora-adapter", Input).value.strip():
            return  # the verification of an adapter this screen no longer shows
        self.show_state(replace(self.state, verified=(message.adapter_dir, message.base, message.report)))
        self.query_one("#lora-verify-result").scroll_visible(animate=False)  # a result below the fold comes into view

    # 4. merge

    @on(Input.Changed, "#merge-base, #merge-loras, #merge-out")
    def _merge_edited(self) -> None:
        if self.state.merged is not None:
            self.show_state(replace(self.state, merged=None))

    @on(Button.Pressed, "#merge-run")
    @on(Input.Submitted, "#merge-base, #merge-loras, #merge-out")
    def merge(self) -> None:
        value = lambda selector: self.query_one(selector, Input).value.strip()  # noqa: E731
        try:
            loras = parse_merge_loras(value("#merge-loras"))
        except Exception as error:  # a quote left open, a weight that is not finite
            self.notify(in_screen_terms(describe_failure(error)), title="merge", severity="error")
            return
        missing = [name for name, text in (("a base folder", value("#merge-base")), ("one LoRA at least", loras),
                                           ("an output folder", value("#merge-out"))) if not text]
        if missing:
            self.notify(f"enter {' and '.join(missing)} to merge", title="merge", severity="warning")
            return
        request = MergeRequest(value("#merge-base"), loras, value("#merge-out"),
                               self.query_one("#merge-force", Checkbox).value)
        self.show_state(replace(self.state, merged=None))
        self._last_percent["merge"] = -1
        self.query_one("#merge-run", Button).disabled = True
        self.notify(f"merging {request.describe()} into {shown_path(request.out_dir)}…", title="LoRA merge")
        self._merge(request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="lora-merge", description="merge failed")
    def _merge(self, request: MergeRequest) -> None:
        from cogsurgeon.tools.lora.merge import LoraSpec, merge_loras

        with writing_user_files():
            result = merge_loras(request.base, [LoraSpec(path, weight) for path, weight in request.loras],
                                 request.out_dir, force=request.force,
                                 progress=lambda done, total: self._progress_from_thread("merge", done, total))
        self.post_message(LorasMerged(request, result))

    def on_loras_merged(self, message: LorasMerged) -> None:
        self.notify(f"merged {message.request.describe()} into {shown_path(message.result.out_dir)}",
                    title="LoRA merge")
        self.show_state(replace(self.state, merged=(message.request, message.result)))
        self.query_one("#merge-result").scroll_visible(animate=False)  # a result below the fold comes into view
        self.merge_total = self.merge_done = 1

    # the workers' ends and failures

    def worker_ended(self, worker: Worker[Any]) -> None:
        if worker.group == "lora-inspect":
            self.query_one("#lora-findings", Static).loading = False
        elif worker.group == "lora-repair":
            report = self.state.report
            self.query_one("#lora-repair", Button).disabled = report is None or bool(report.problems)
        elif worker.group == "lora-verify":
            self.query_one("#lora-verify-progress", Static).display = False
        elif worker.group == "lora-merge":
            self.query_one("#merge-run", Button).disabled = False

    def worker_failed(self, worker: Worker[Any]) -> None:
        if worker.group == "lora-inspect" and self.state.report is None and self.state.request is not None:
            self.query_one("#lora-findings", Static).update(
                Text(f"could not inspect {self.state.request.describe()}: "
                     f"{self.failure_text(worker.error)}", style="bold red"))

    def failure_text(self, error: BaseException) -> str:
        return in_screen_terms(describe_failure(error))


__all__ = [
    "LoraScreen", "in_screen_terms",
]
