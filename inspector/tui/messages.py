"""What the TUI's workers post when they finish or make progress, and the one handler that turns a worker's failure
into a notification. A worker returns nothing the screen reads back: its result arrives as one of these messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message
from textual.worker import Worker, WorkerState

from cogsurgeon.inspector.browse import LoadedModel, TracedShapes
from cogsurgeon.inspector.errors import CogsurgeonError


def describe_failure(error: BaseException) -> str:
    """A worker's failure as one line for a notification: our errors as they are, anything else with its type."""
    if isinstance(error, CogsurgeonError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass
class ModelLoaded(Message):
    """A model finished loading (the whole model, not a cached preview)."""

    loaded: LoadedModel


@dataclass
class ShapesTraced(Message):
    """The shapes of `model`'s modules, traced on meta at its pipelines' default video size."""

    model: Any
    traced: TracedShapes


@dataclass
class VerifyProgress(Message):
    """A verification of patch `name` (with `options`) moved to its next step; a newer one replaces one not yet
    handled."""

    name: str
    options: dict[str, Any]
    step: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, VerifyProgress) and message.name == self.name


@dataclass
class PatchVerified(Message):
    """Patch `name` was verified on the tiny models with `options`; `result` is its `VerifyResult`."""

    name: str
    options: dict[str, Any]
    result: Any


@dataclass
class CheckpointInspected(Message):
    request: Any  # the LoRA screen's InspectRequest: the checkpoint as given, trainer, step, override
    report: Any  # a tools.lora LoraReport; None when the folder holds several checkpoints and none was chosen
    steps: tuple[int, ...] = ()  # the checkpoints of the folder given, by step


@dataclass
class CheckpointRepaired(Message):
    request: Any  # the InspectRequest of the checkpoint repaired
    repair: Any  # the RepairRequest: output folder, alpha, consumers, bake-scale, force
    result: Any  # a tools.lora RepairResult


@dataclass
class AdapterVerified(Message):
    adapter_dir: str
    base: str
    report: Any  # a tools.lora AdapterVerifyReport


@dataclass
class LorasMerged(Message):
    request: Any  # the LoRA screen's MergeRequest: base, LoRAs with weights, output folder
    result: Any  # a tools.lora.merge MergeResult


@dataclass
class MemoryPlanned(Message):
    request: dict[str, Any]  # plan_memory's keyword arguments, as the plan screen's controls made them
    plan: Any  # an inspector.plan MemoryPlan


class ReportsWorkerFailures:
    """For a screen: the one handler of its workers' ends. A worker that raised becomes an error notification
    titled by the worker's description ("could not load model"), then `worker_failed` lets the screen undo what it
    showed while the work ran; successes arrive as the messages above, posted by the workers themselves. A worker
    cancelled was replaced by a newer one of its group (exclusive), or its screen closed: nothing to show."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state in (WorkerState.SUCCESS, WorkerState.ERROR):
            self.worker_ended(worker)
        if event.state == WorkerState.ERROR and worker.error is not None:
            self.notify(self.failure_text(worker.error),  # type: ignore[attr-defined]
                        title=worker.description, severity="error")
            self.worker_failed(worker)

    def failure_text(self, error: BaseException) -> str:
        """A failure as the notification says it."""
        return describe_failure(error)

    def worker_ended(self, worker: Worker[Any]) -> None:
        """A worker finished or failed."""

    def worker_failed(self, worker: Worker[Any]) -> None:
        """A worker raised; its failure has been notified."""


__all__ = [
    "AdapterVerified", "CheckpointInspected", "CheckpointRepaired", "LorasMerged", "MemoryPlanned", "ModelLoaded",
    "PatchVerified", "ReportsWorkerFailures", "ShapesTraced", "VerifyProgress", "describe_failure",
]
