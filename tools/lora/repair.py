"""Rebuild a LoRA checkpoint into an adapter folder that its consumers load offline at the trained scale: by default
`adapter_config.json` + `adapter_model.safetensors` (PEFT) and `pytorch_lora_weights.safetensors` with
`lora_adapter_metadata` (diffusers); with `--to …,comfyui` also a kohya-style file (what each file holds:
tools/lora/export.py). Tensor bytes are streamed from the source; every value of the config is validated before
it is written, and the folder is published by tools/lora/publish.py (staging folder, lock, manifest, atomic rename;
never over anything but an unchanged earlier repair).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.errors import shown
from cogsurgeon.inspector.safetensors_header import library_rejection
from cogsurgeon.inspector.user_files import expand_user
from cogsurgeon.tools.lora.checkpoint import (
    ALPHA_RANGE,
    LoraCheckpoint,
    LoraCheckpointError,
    LoraReport,
    lora_digest,
    positive_int,
    positive_number,
    read_checkpoint,
)
from cogsurgeon.tools.lora.export import lora_config, output_files, parse_consumers
from cogsurgeon.tools.lora.publish import REPAIR, OutputError, output_path, publication, refuse_existing_output
from cogsurgeon.tools.lora.safetensors_io import Progress, ProgressCallback, write_safetensors


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


def _is_text(value: object) -> bool:
    """A non-empty str without lone surrogates: those cannot be written as UTF-8, and loaders refuse their escape."""
    return isinstance(value, str) and bool(value) and not any("\ud800" <= char <= "\udfff" for char in value)


def config_problems(config: dict[str, Any]) -> list[str]:
    """Every value of the LoraConfig a repair would write that PEFT or diffusers would refuse or misread: ranks
    that are not positive integers, lora_alpha that is not a positive number float32 holds (NaN, Infinity, 0,
    negative, a bool, 1e300: PEFT's alpha / r would make float32 outputs inf), patterns of the wrong type, module names
    that are not valid text."""
    problems = []
    if not positive_int(config["r"]):
        problems.append(f"rank r={config['r']!r} is not a positive integer")
    if not positive_number(config["lora_alpha"]):
        problems.append(f"lora_alpha={shown(config['lora_alpha'])} is not {ALPHA_RANGE}")
    for key, valid, what in (("rank_pattern", positive_int, "a positive integer"),
                             ("alpha_pattern", positive_number, ALPHA_RANGE)):
        pattern = config[key]
        if not isinstance(pattern, dict):
            problems.append(f"{key} is a {type(pattern).__name__}, not a mapping of module names to values")
            continue
        for module, value in pattern.items():
            if not _is_text(module) or not valid(value):
                problems.append(f"{key}[{module!r}]={shown(value)}: expected a module name and {what}")
                break
    modules = config["target_modules"]
    if not modules:
        problems.append("no target modules")
    bad_names = [module for module in modules if not _is_text(module)]
    if bad_names:
        problems.append(f"target module name {bad_names[0]!r} is not valid text (a lone surrogate or empty)")
    return problems


def source_record(checkpoint: LoraCheckpoint, request: dict[str, Any], *, bake_scale: bool) -> dict[str, Any]:
    """What the repair manifest keeps of the source: where it is, a digest of its LoRA tensors, how alpha was settled
    (the request that settles it again for the same file) and the alpha and patterns written. `lora verify` reads the
    source back from here and checks the adapter's α/r·B·A against the source's, module by module."""
    report = checkpoint.report
    return {"source": {
        "path": str(Path(report.path).absolute()),
        "file": str(Path(report.file).absolute()),
        "format": report.format,
        "lora_sha256": lora_digest(checkpoint),
        "request": request,
        "rank": report.rank,
        "rank_pattern": dict(report.rank_pattern),
        "lora_alpha": report.alpha,
        "alpha_source": report.alpha_source,
        "alpha_detail": report.alpha_detail,
        "alpha_pattern": dict(report.alpha_pattern),
        "bake_scale": bake_scale,
    }}


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
    override_stored_alpha: bool = False,
) -> RepairResult:
    """Write the adapter folder for the checkpoint at `path` into `out_dir`; `progress(done_bytes, total_bytes)`
    is called as tensor bytes stream. Raises `LoraCheckpointError` (input untouched, nothing written) when the
    checkpoint has problems, or `OutputError` when `out_dir` exists (without `force`: at all; with it: as anything
    but an unchanged earlier repair), appears or changes while the repair runs, or another repair holds it.
    SIGTERM/SIGHUP raise `PublicationInterrupted` (SIGINT: KeyboardInterrupt) after the partial output is removed.
    `alpha` sets lora_alpha only where the checkpoint stores none; one that contradicts a stored value is refused
    unless `override_stored_alpha`. Stored per-module alphas (alpha_pattern) are always kept."""
    if alpha is not None and not positive_number(alpha):
        raise LoraCheckpointError(f"alpha must be {ALPHA_RANGE}, got {alpha}")
    consumers = parse_consumers(to)
    given = expand_user(path)
    request = {"alpha": alpha, "trainer": trainer, "override_stored_alpha": override_stored_alpha}  # settles alpha
    checkpoint = read_checkpoint(given, step=step, latest=latest, **request)
    report = checkpoint.report
    if report.problems:
        others = len(report.problems) - 1
        more = f" (and {others} more; see `cogsurgeon lora inspect`)" if others else ""
        raise LoraCheckpointError(f"cannot repair {report.file}: {report.problems[0]}{more}")
    if report.alpha is None:  # several trainers fit and disagree: a repair at a guessed strength is the worst outcome
        raise LoraCheckpointError(report.unsettled_alpha_message())
    problems = config_problems(lora_config(report))
    if problems:
        raise LoraCheckpointError(f"cannot repair {report.file}: {problems[0]}")
    out = output_path(out_dir, (given, Path(report.file)))
    refuse_existing_output(out, force, REPAIR)

    files_to_write = output_files(checkpoint, consumers, bake_scale=bake_scale)
    record = source_record(checkpoint, request, bake_scale=bake_scale)
    tracker = Progress(sum(t.nbytes for f in files_to_write for t in f.tensors), progress)
    with publication(out, force=force, kind=REPAIR) as target:
        with (checkpoint.source_file.open("rb") if checkpoint.source_file is not None else nullcontext()) as source:
            for output in files_to_write:
                path = target.staging / output.name
                if output.text is not None:
                    path.write_text(output.text)
                    continue
                write_safetensors(path, list(output.tensors), output.metadata or {}, source=source, progress=tracker)
                rejection = library_rejection(path)  # what the loaders will read, asked of the safetensors library
                if rejection is not None:
                    raise OutputError(f"the repaired {output.name} would not load (safetensors: {rejection}); "
                                      "nothing was written")
        published = target.publish(record=record)
    files = tuple(str(out / name) for name in published)
    return RepairResult(str(out), files, report, tracker.done)


__all__ = [
    "RepairResult", "repair_checkpoint",
]
