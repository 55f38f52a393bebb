"""Rebuild a LoRA checkpoint into an adapter folder that PEFT and diffusers load offline at the trained scale:
`adapter_config.json` + `adapter_model.safetensors` (PEFT) and `pytorch_lora_weights.safetensors` with
`lora_adapter_metadata` (diffusers). Tensor bytes are streamed from the source; the folder appears atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpoint, LoraCheckpointError, LoraReport, read_checkpoint
from cogsurgeon.tools.lora.safetensors_io import OutputTensor, ProgressCallback, new_progress, write_safetensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_FILE_NAMES = frozenset({PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME})
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


def _check_output(out: Path, given: Path, tensor_file: Path, force: bool) -> None:
    resolved_out = out.resolve()
    for input_path in {given.resolve(), tensor_file.resolve()}:
        if resolved_out == input_path or resolved_out in input_path.parents:
            raise LoraCheckpointError(
                f"--out {out} would replace the checkpoint itself ({input_path}): choose another folder"
            )
    if out.exists() or out.is_symlink():
        if not force:
            raise LoraCheckpointError(f"{out} already exists: choose another --out, or pass --force to replace it")
        if out.is_symlink() or not out.is_dir():
            raise LoraCheckpointError(f"{out} exists and is not a folder: remove it yourself, --force replaces folders only")
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ADAPTER_FILE_NAMES)
        if foreign:
            raise LoraCheckpointError(
                f"{out} holds files that are not an adapter's ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): --force only replaces an earlier repair's folder; "
                "choose another --out"
            )
    if not out.parent.is_dir():
        raise LoraCheckpointError(f"the parent folder of --out, {out.parent}, does not exist")


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
    checkpoint has problems or the output exists without `force`."""
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoraCheckpointError(f"--alpha must be a positive finite number, got {alpha}")
    given = Path(path).expanduser()
    out = Path(out_dir).expanduser().resolve()
    checkpoint = read_checkpoint(given, alpha=alpha, trainer=trainer, step=step, latest=latest)
    report = checkpoint.report
    if report.problems:
        more = f" (and {len(report.problems) - 1} more; see `cogsurgeon lora inspect`)" if len(report.problems) > 1 else ""
        raise LoraCheckpointError(f"cannot repair {report.file}: {report.problems[0]}{more}")
    if report.alpha is None:  # several trainers fit and disagree: a repair at a guessed strength is the worst outcome
        raise LoraCheckpointError(report.unsettled_alpha_message())
    _check_output(out, given, Path(report.file), force)

    config = lora_config(report)
    data_bytes = sum(tensor.nbytes for tensor in checkpoint.tensors)
    tracker = new_progress(2 * data_bytes, progress)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise LoraCheckpointError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
    try:
        source = checkpoint.source_file.open("rb") if checkpoint.source_file is not None else None
        try:
            write_safetensors(staging / PEFT_WEIGHTS_NAME, output_tensors(checkpoint, PEFT_KEY_PREFIX),
                              {"format": "pt"}, source=source, progress=tracker)
            write_safetensors(staging / DIFFUSERS_WEIGHTS_NAME, output_tensors(checkpoint, DIFFUSERS_KEY_PREFIX),
                              diffusers_metadata(config), source=source, progress=tracker)
        finally:
            if source is not None:
                source.close()
        (staging / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _move_into_place(staging, out)
    except OSError as exc:  # a full disk, a folder that cannot be renamed: the input is untouched, nothing is left
        shutil.rmtree(staging, ignore_errors=True)
        raise LoraCheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(str(out / name) for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME))
    return RepairResult(str(out), files, report, tracker.done)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` (only with --force) is moved aside first and removed
    after, so that at every moment `out` is either the old folder or the complete new one."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, retired / out.name)
    except BaseException:
        retired.rmdir()
        raise
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired / out.name, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
