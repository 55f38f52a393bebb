"""Rebuild a LoRA checkpoint into an adapter folder that PEFT and diffusers load offline at the trained scale:
`adapter_config.json` + `adapter_model.safetensors` (PEFT) and `pytorch_lora_weights.safetensors` with
`lora_adapter_metadata` (diffusers). Tensor bytes are streamed from the source; every value of the config is
validated before it is written, and the folder is published by tools/lora/publish.py (staging folder, lock,
manifest, atomic rename; never over anything but an unchanged earlier repair).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.user_files import expand_user
from cogsurgeon.tools.lora.checkpoint import LoraCheckpoint, LoraCheckpointError, LoraReport, read_checkpoint
from cogsurgeon.tools.lora.publish import OutputError, output_path, publication, refuse_existing_output
from cogsurgeon.tools.lora.safetensors_io import (
    OutputTensor,
    ProgressCallback,
    library_rejection,
    new_progress,
    write_safetensors,
)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
DIFFUSERS_KEY_PREFIX = "transformer."


@dataclass(frozen=True)
class RepairResult:
    out_dir: str
    files: tuple[str, ...]
    report: LoraReport  # the checkpoint as read, with the alpha written into the adapter
    bytes_written: int

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "files": list(self.files),
            "bytes_written": self.bytes_written,
            "report": self.report.to_json(),
        }


def lora_config(report: LoraReport) -> dict[str, Any]:
    """The LoraConfig of the repaired adapter. target_modules are full module names, so that the adapter goes
    exactly where it was trained and nowhere else; ranks and alpha per module follow PEFT's patterns."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": report.rank,
        "lora_alpha": report.alpha,
        "rank_pattern": dict(report.rank_pattern),
        "alpha_pattern": dict(report.alpha_pattern),
        "target_modules": list(report.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def diffusers_metadata(config: dict[str, Any]) -> dict[str, str]:
    """Safetensors metadata as diffusers >= 0.34 writes it: the LoraConfig under `transformer.`-prefixed keys."""
    loadable = {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "inference_mode", "task_type")}
    packed = {f"{DIFFUSERS_KEY_PREFIX}{key}": value for key, value in loadable.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def output_tensors(checkpoint: LoraCheckpoint, prefix: str) -> list[OutputTensor]:
    return [
        OutputTensor(
            name=f"{prefix}{tensor.module}.lora_{tensor.part}.weight",
            dtype=tensor.dtype,
            shape=tensor.shape,
            nbytes=tensor.nbytes,
            source_start=tensor.source_start,
            payload=tensor.payload,
        )
        for tensor in checkpoint.tensors
    ]


def _is_text(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")  # a lone surrogate cannot be written as UTF-8, and loaders refuse its escape
    except UnicodeEncodeError:
        return False
    return True


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0  # float() of a 401-digit int overflows: not finite
    except OverflowError:
        return False


def config_problems(config: dict[str, Any]) -> list[str]:
    """Every value of the LoraConfig a repair would write that PEFT or diffusers would refuse or misread: ranks
    that are not positive integers, lora_alpha that is not a positive finite number (NaN, Infinity, 0, negative,
    a bool, too large for a float), patterns of the wrong type, module names that are not valid text."""
    problems = []
    if not _is_rank(config["r"]):
        problems.append(f"rank r={config['r']!r} is not a positive integer")
    if not _is_alpha(config["lora_alpha"]):
        problems.append(f"lora_alpha={_shown(config['lora_alpha'])} is not a positive finite number")
    for key, valid, what in (("rank_pattern", _is_rank, "a positive integer"),
                             ("alpha_pattern", _is_alpha, "a positive finite number")):
        pattern = config[key]
        if not isinstance(pattern, dict):
            problems.append(f"{key} is a {type(pattern).__name__}, not a mapping of module names to values")
            continue
        for module, value in pattern.items():
            if not _is_text(module) or not valid(value):
                problems.append(f"{key}[{module!r}]={_shown(value)}: expected a module name and {what}")
                break
    modules = config["target_modules"]
    if not modules:
        problems.append("no target modules")
    bad_names = [module for module in modules if not _is_text(module)]
    if bad_names:
        problems.append(f"target module name {bad_names[0]!r} is not valid text (a lone surrogate or empty)")
    return problems


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def repair_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    alpha: float | None = None,
    trainer: str | None = None,
    step: int | None = None,
    latest: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> RepairResult:
    """Write the adapter folder for the checkpoint at `path` into `out_dir`; `progress(done_bytes, total_bytes)`
    is called as tensor bytes stream. Raises `LoraCheckpointError` (input untouched, nothing written) when the
    checkpoint has problems, or `OutputError` when `out_dir` exists (without `force`: at all; with it: as anything
    but an unchanged earlier repair), appears or changes while the repair runs, or another repair holds it.
    SIGTERM/SIGHUP raise `RepairInterrupted` (SIGINT: KeyboardInterrupt) after the partial output is removed."""
    if alpha is not None and not _is_alpha(alpha):
        raise LoraCheckpointError(f"--alpha must be a positive finite number, got {alpha}")
    given = expand_user(path)
    checkpoint = read_checkpoint(given, alpha=alpha, trainer=trainer, step=step, latest=latest)
    report = checkpoint.report
    if report.problems:
        more = f" (and {len(report.problems) - 1} more; see `cogsurgeon lora inspect`)" if len(report.problems) > 1 else ""
        raise LoraCheckpointError(f"cannot repair {report.file}: {report.problems[0]}{more}")
    if report.alpha is None:  # several trainers fit and disagree: a repair at a guessed strength is the worst outcome
        raise LoraCheckpointError(report.unsettled_alpha_message())
    config = lora_config(report)
    problems = config_problems(config)
    if problems:
        raise LoraCheckpointError(f"cannot repair {report.file}: {problems[0]}")
    out = output_path(out_dir, (given, Path(report.file)))
    refuse_existing_output(out, force)

    data_bytes = sum(tensor.nbytes for tensor in checkpoint.tensors)
    tracker = new_progress(2 * data_bytes, progress)
    with publication(out, force=force) as target:
        staging = target.staging
        source = checkpoint.source_file.open("rb") if checkpoint.source_file is not None else None
        try:
            write_safetensors(staging / PEFT_WEIGHTS_NAME, output_tensors(checkpoint, PEFT_KEY_PREFIX),
                              {"format": "pt"}, source=source, progress=tracker)
            write_safetensors(staging / DIFFUSERS_WEIGHTS_NAME, output_tensors(checkpoint, DIFFUSERS_KEY_PREFIX),
                              diffusers_metadata(config), source=source, progress=tracker)
        finally:
            if source is not None:
                source.close()
        (staging / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        for name in (PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME):  # what the loaders will read, asked of safetensors
            rejection = library_rejection(staging / name)
            if rejection is not None:
                raise OutputError(f"the repaired {name} would not load (safetensors: {rejection}); nothing was written")
        published = target.publish()
    files = tuple(str(out / name) for name in published)
    return RepairResult(str(out), files, report, tracker.done)
