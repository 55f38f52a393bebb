"""Rebuild a LoRA checkpoint into an adapter folder that its consumers load offline at the trained scale: by default
`adapter_config.json` + `adapter_model.safetensors` (PEFT) and `pytorch_lora_weights.safetensors` with
`lora_adapter_metadata` (diffusers); with `--to …,comfyui` also a kohya-style file (what each file holds:
tools/lora/export.py). Tensor bytes are streamed from the source; the folder appears atomically.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, LoraReport, read_checkpoint
from cogsurgeon.tools.lora.export import (  # noqa: F401  (names verify and callers import from here)
    COMFYUI_WEIGHTS_NAME,
    DIFFUSERS_KEY_PREFIX,
    DIFFUSERS_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
    diffusers_metadata,
    lora_config,
    output_files,
    parse_consumers,
)
from cogsurgeon.tools.lora.safetensors_io import ProgressCallback, new_progress, write_safetensors

ADAPTER_FILE_NAMES = frozenset({PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, COMFYUI_WEIGHTS_NAME})


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
    to: str | tuple[str, ...] | None = None,
    bake_scale: bool = False,
    progress: ProgressCallback | None = None,
) -> RepairResult:
    """Write the adapter folder for the checkpoint at `path` into `out_dir`; `progress(done_bytes, total_bytes)`
    is called as tensor bytes stream. Raises `LoraCheckpointError` (input untouched, nothing written) when the
    checkpoint has problems or the output exists without `force`."""
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoraCheckpointError(f"--alpha must be a positive finite number, got {alpha}")
    consumers = parse_consumers(to)
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

    files_to_write = output_files(checkpoint, consumers, bake_scale=bake_scale)
    tracker = new_progress(sum(t.nbytes for f in files_to_write for t in f.tensors), progress)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise LoraCheckpointError(f"cannot write into {out.parent}: {exc.strerror or exc}") from None
    try:
        source = checkpoint.source_file.open("rb") if checkpoint.source_file is not None else None
        try:
            for output in files_to_write:
                if output.text is not None:
                    (staging / output.name).write_text(output.text)
                else:
                    write_safetensors(staging / output.name, list(output.tensors), output.metadata or {},
                                      source=source, progress=tracker)
        finally:
            if source is not None:
                source.close()
        _move_into_place(staging, out)
    except OSError as exc:  # a full disk, a folder that cannot be renamed: the input is untouched, nothing is left
        shutil.rmtree(staging, ignore_errors=True)
        raise LoraCheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(str(out / output.name) for output in files_to_write)
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
