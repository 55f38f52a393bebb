"""The planner screen: the peak GPU memory of the model on the main screen (inference, a training step, the VAE
decode) at a size, batch, dtype, training mode and set of patches you choose, with its breakdown, whether it fits a
card and which switches (alone or together) would make it fit. A view over `inspector.plan`.

One `PlanState`: the request the controls made and the plan computed for it, or the error it met; a new request
clears the last result before it runs, and the result restates what was planned. Each control is one labelled row
(`field_row`), so another choice is one more row and one more entry in `PlanScreen.request`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Select, SelectionList, Static
from textual.worker import Worker

from cogsurgeon.inspector.errors import renamed_parameters
from cogsurgeon.inspector.tui.messages import MemoryPlanned, ReportsWorkerFailures, describe_failure
from cogsurgeon.inspector.tui.widgets import facts_table

TRAINING_MODES = (("inference", "inference"), ("training: LoRA", "lora"), ("training: full", "full"))
DTYPES = ("bfloat16", "float16", "float32")
SWITCH = re.compile(r"--(\S+)(?: (?!--)(\S+))?")
SWITCH_NAMES = {"train": "training", "checkpointing": "checkpointing", "tiling": "tiling", "batch": "batch",
                "zero": "ZeRO"}
ZERO_STAGES = (("0: no DeepSpeed", "0"), ("1: optimizer state", "1"), ("2: + gradients", "2"), ("3: + weights", "3"))


def switches_in_screen_terms(switch: str) -> str:
    """A suggestion's switches ("--checkpointing --batch 1") as this screen's controls ("checkpointing + batch 1")."""
    return " + ".join(f"{SWITCH_NAMES.get(name, name)} {value}".strip() for name, value in SWITCH.findall(switch))


def settings_text(settings: Any) -> str:
    """What a plan was computed for, in one line: model, size, batch, dtype, mode, patches."""
    if settings.train is None:
        mode = "inference" + (" + VAE decode" + (" (tiled)" if settings.tiling else "") if settings.vae else "")
    else:
        mode = f"training {settings.train.label()}" + (" with checkpointing" if settings.checkpointing else "")
        mode += training_precision_text(settings)
    patches = ", ".join(settings.patches) or "no patches"
    return (f"{settings.model}, {settings.frames}x{settings.height}x{settings.width}, batch {settings.batch}, "
            f"{settings.dtype}, {mode}, {patches}")


def training_precision_text(settings: Any) -> str:
    """How a training step was planned to run: the trainer preset, accelerate's mixed precision, the LoRA dtype."""
    parts = [f"as {settings.trainer}"] if settings.trainer else []
    if settings.zero is not None:
        parts.append(f"DeepSpeed ZeRO-{settings.zero.stage}, per GPU of {settings.zero.gpus}")
    parts.append(f"{settings.mixed_precision} autocast" if settings.mixed_precision not in (None, "no")
                 else "no autocast")
    if settings.train.kind == "lora":
        parts.append(f"LoRA {settings.lora_dtype}")
    return f" ({', '.join(parts)})"


def plan_table(plan: Any) -> Table:
    """A `MemoryPlan` as what was planned, its peak, where it happens, what was live then, and the verdict for the
    card with the switches that would make it fit."""
    from cogsurgeon.inspector.trace import format_bytes

    peak = plan.peak
    rows: list[tuple[str | Text, str | Text]] = [
        ("planned", settings_text(plan.settings)),
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
            rows.append((f"  with {switches_in_screen_terms(suggestion.switch)}",
                         f"{format_bytes(suggestion.peak_bytes)} ({outcome})"))
    return facts_table(rows)


class PlanResult(Static):
    """The plan's answer, below the controls (off screen at 80x24). When an answer is shown it comes into view: after
    the next refresh, and again whenever it is laid out at a new height (scrolled to before that, the screen stops
    where the one-line placeholder ended and the peak stays below the fold)."""

    revealing = False  # an answer was shown: keep its top in view as it is laid out

    def reveal(self) -> None:
        self.revealing = True
        self.call_after_refresh(self.scroll_visible, animate=False, top=True)

    def on_resize(self) -> None:
        if self.revealing:  # once: a later resize (the terminal's) leaves the view where the user put it
            self.revealing = False
            self.scroll_visible(animate=False, top=True)


@dataclass(frozen=True)
class PlanState:
    """The request planned (plan_memory's keyword arguments), and its plan or the error it met."""

    request: dict[str, Any] | None = None
    plan: Any = None
    error: str | None = None


def field_row(label: str, widget: Widget) -> Horizontal:
    """One control with its label to the left (a fixed 12 columns, so labels survive 80 columns)."""
    return Horizontal(Label(label, classes="field-label"), widget, classes="form-row field-row")


class PlanScreen(ReportsWorkerFailures, Screen[None]):
    """Plan the peak GPU memory of a run of `spec` before running it."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="plan.back")]
    AUTO_FOCUS = "#plan-size"

    def __init__(self, spec: str, size: tuple[int, int, int] = (49, 480, 720), patches: tuple[str, ...] = (),
                 all_patches: tuple[str, ...] = ()) -> None:
        """`patches`: the specs (`NAME:k=v`) applied on the main screen, chosen at first; `all_patches`: the names
        offered."""
        super().__init__()
        self.spec = spec
        self.video_size = size
        self.applied_patches = patches
        self.all_patches = all_patches
        self.state = PlanState()

    def compose(self) -> ComposeResult:
        from cogsurgeon.inspector.plan import DEFAULT_MIXED_PRECISION, LORA_DTYPES, MIXED_PRECISION, TRAINER_PRESETS

        frames, height, width = self.video_size
        applied = {spec.partition(":")[0]: spec for spec in self.applied_patches}
        patch_choices = [(applied.get(name, name), applied.get(name, name), name in applied)
                         for name in dict.fromkeys([*applied, *self.all_patches])]
        yield Header()
        with VerticalScroll(id="plan"):
            yield Label(f"Plan GPU memory for {self.spec}", classes="form-label")
            yield field_row("video size", Input(value=f"{frames}x{height}x{width}", placeholder="FRAMESxHEIGHTxWIDTH",
                                                id="plan-size"))
            yield field_row("batch", Input(value="2", placeholder="2: one video with guidance", id="plan-batch"))
            yield field_row("mode", Select(TRAINING_MODES, value="inference", allow_blank=False, id="plan-mode"))
            yield field_row("LoRA rank", Input(value="128", placeholder="rank of the LoRA trained", id="plan-rank"))
            yield field_row("dtype", Select([(name, name) for name in DTYPES], prompt="the model's own",
                                            id="plan-dtype"))
            yield field_row("trainer", Select([(name, name) for name in TRAINER_PRESETS], prompt="none (the controls)",
                                              id="plan-trainer"))
            yield field_row("autocast", Select([(name, name) for name in MIXED_PRECISION],
                                                      prompt=f"{DEFAULT_MIXED_PRECISION} (training)", id="plan-mixed"))
            yield field_row("LoRA dtype", Select([(name, name) for name in LORA_DTYPES], prompt="auto (the weights')",
                                                 id="plan-lora-dtype"))
            yield field_row("ZeRO", Select(ZERO_STAGES, prompt="the trainer's (none)", id="plan-zero"))
            yield field_row("GPUs", Input(placeholder="ZeRO's GPUs (empty: the trainer's, or 1)", id="plan-gpus"))
            yield field_row("GPU memory", Input(placeholder="e.g. 80GiB (empty: no card)", id="plan-gpu"))
            yield field_row("patches", SelectionList(*patch_choices, id="plan-patches"))
            with Horizontal(classes="form-row checkboxes"):
                yield Checkbox("checkpointing", id="plan-checkpointing")
                yield Checkbox("VAE decode", id="plan-vae")
                yield Checkbox("tiling", id="plan-tiling")
                yield Button("Plan", id="plan-run")
            yield PlanResult(Text("set the run and press Enter or Plan", style="dim"), id="plan-result")
        yield Footer()

    def show_state(self, state: PlanState) -> None:
        """Make `state` the screen's and show its plan, its error, or that it is being planned."""
        self.state = state
        result = self.query_one("#plan-result", PlanResult)
        if state.plan is not None:
            result.update(plan_table(state.plan))
        elif state.error is not None:
            result.update(Text(f"could not plan: {state.error}", style="bold red"))
        elif state.request is not None:
            result.update(Text("planning…", style="dim"))
        result.reveal()

    def request(self) -> dict[str, Any]:
        """plan_memory's keyword arguments from the controls; a PlanError names the control that is wrong."""
        from cogsurgeon.inspector.plan import PlanError, parse_video_size

        value = lambda selector: self.query_one(selector, Input).value.strip()  # noqa: E731
        frames, height, width = parse_video_size(value("#plan-size"))
        batch_text = value("#plan-batch") or "2"
        if not batch_text.isdigit() or int(batch_text) < 1:
            raise PlanError(f"batch must be a positive whole number, got {batch_text!r}")
        mode = self.query_one("#plan-mode", Select).value
        train = None
        if mode == "lora":
            rank = value("#plan-rank")
            if not rank.isdigit() or int(rank) < 1:
                raise PlanError(f"LoRA rank must be a positive whole number, got {rank!r}")
            train = f"lora:{rank}"
        elif mode == "full":
            train = "full"
        gpus = value("#plan-gpus")
        if gpus and (not gpus.isdigit() or int(gpus) < 1):
            raise PlanError(f"GPUs must be a positive whole number, got {gpus[:20]!r}")
        zero = self.chosen("#plan-zero")
        return dict(frames=frames, height=height, width=width, batch=int(batch_text), train=train,
                    dtype=self.chosen("#plan-dtype"), trainer=self.chosen("#plan-trainer"),
                    mixed_precision=self.chosen("#plan-mixed"), lora_dtype=self.chosen("#plan-lora-dtype"),
                    patches=tuple(self.query_one("#plan-patches", SelectionList).selected),
                    gpu_memory=value("#plan-gpu") or None, zero=int(zero) if zero else None,
                    gpus=int(gpus) if gpus else None,
                    checkpointing=self.query_one("#plan-checkpointing", Checkbox).value,
                    vae=self.query_one("#plan-vae", Checkbox).value,
                    tiling=self.query_one("#plan-tiling", Checkbox).value)

    def chosen(self, selector: str) -> str | None:
        """A Select's value, or None while it shows its prompt (nothing chosen)."""
        value = self.query_one(selector, Select).value
        return value if isinstance(value, str) else None

    @on(Input.Submitted)
    @on(Button.Pressed, "#plan-run")
    def run_plan(self) -> None:
        from cogsurgeon.inspector.plan import PlanError

        try:
            request = self.request()
        except PlanError as error:
            message = plan_error_in_screen_terms(describe_failure(error))
            self.show_state(PlanState(error=message))  # the last result was not computed for these controls
            self.notify(message, title="plan", severity="error")
            return
        self.show_state(PlanState(request=request))
        self.query_one("#plan-result", Static).loading = True
        self.notify(f"planning {self.spec}…", title="plan")
        self._plan(request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="plan", description="plan failed")
    def _plan(self, request: dict[str, Any]) -> None:
        from cogsurgeon.inspector.plan import plan_memory

        self.post_message(MemoryPlanned(request, plan_memory(self.spec, **request)))

    def on_memory_planned(self, message: MemoryPlanned) -> None:
        if message.request == self.state.request:
            self.show_state(PlanState(request=message.request, plan=message.plan))
            verdict = "" if message.plan.fits is None else " (fits)" if message.plan.fits else " (does not fit)"
            from cogsurgeon.inspector.trace import format_bytes

            self.notify(f"peak {format_bytes(message.plan.peak_bytes)}{verdict}", title="plan")

    def worker_ended(self, worker: Worker[Any]) -> None:
        self.query_one("#plan-result", Static).loading = False

    def worker_failed(self, worker: Worker[Any]) -> None:
        self.show_state(PlanState(request=self.state.request, error=self.failure_text(worker.error)))

    def failure_text(self, error: BaseException) -> str:
        return plan_error_in_screen_terms(describe_failure(error))


# The keyword arguments of plan_memory that its messages name and that this screen's controls can lead to, as those
# controls (the trainer, dtype, batch and patches are lists or checked before planning: no message names them).
PLAN_CONTROLS = {"train": "the mode", "mixed_precision": "autocast", "lora_dtype": "LoRA dtype",
                 "checkpointing": "checkpointing", "vae": "VAE decode", "tiling": "tiling", "gpu_memory": "GPU memory",
                 "zero": "ZeRO", "gpus": "GPUs"}


def plan_error_in_screen_terms(text: str) -> str:
    """The planner's messages name plan_memory's keyword arguments; here they are the screen's controls."""
    return renamed_parameters(text, PLAN_CONTROLS)


__all__ = [
    "PlanScreen",
]
