"""`cogsurgeon lora inspect|repair|verify`: the command line over tools.lora. Imports stay light (click only at the
top); verify pulls in torch, peft and diffusers inside its function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import click

from cogsurgeon.inspector.cli.output import in_cli_terms, print_json, progress_line
from cogsurgeon.inspector.errors import counted

ALPHA_HELP = ("lora_alpha the LoRA was trained with, where the checkpoint stores none (it settles trainer defaults); "
              "one that contradicts a stored lora_alpha is refused, see --override-stored-alpha.")
OVERRIDE_HELP = ("Let --alpha replace the lora_alpha the checkpoint stores (metadata, a config beside it); "
                 "what changes is printed. Stored per-module alphas (alpha_pattern) are kept.")
TRAINER_HELP = ("The trainer that wrote CKPT, when the file does not store lora_alpha and several trainers fit: its "
                "default lora_alpha is used (inspect lists the candidates).")


def checkpoint_options(function):
    """--alpha, --override-stored-alpha, --trainer, --step, --latest: what settles lora_alpha and which checkpoint
    of a folder is read."""
    from cogsurgeon.tools.lora.keys import TRAINERS

    for option in reversed((
        click.option("--alpha", type=float, callback=_positive_finite_alpha, metavar="A", help=ALPHA_HELP),
        click.option("--override-stored-alpha", "override_stored_alpha", is_flag=True, help=OVERRIDE_HELP),
        click.option("--trainer", type=click.Choice(sorted(TRAINERS)), metavar="NAME", help=TRAINER_HELP),
        click.option("--step", type=int, metavar="N", help="Read the checkpoint of step N of an output folder."),
        click.option("--latest", is_flag=True, help="Read the newest checkpoint of an output folder."),
    )):
        function = option(function)
    return function


def _in_cli_terms(report):
    """A `LoraReport` whose warnings and alpha detail name the CLI's flags (`pass --alpha A`), not the keyword
    arguments of the Python calls (`pass alpha=A`): what the commands print, as text and as JSON."""
    return replace(report, warnings=tuple(map(in_cli_terms, report.warnings)),
                   alpha_detail=in_cli_terms(report.alpha_detail))


def _print_warnings(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        click.secho(f"warning: {warning}", fg="yellow", bold=warning.isupper() or "NOT STORED" in warning, err=True)


def _pattern_text(pattern: dict) -> str:
    """`N modules differ: a=2, b=3, ...` for a rank_pattern or alpha_pattern."""
    return f"{counted(len(pattern), 'module')} {'differs' if len(pattern) == 1 else 'differ'}: " + ", ".join(
        f"{module}={value:g}" for module, value in list(pattern.items())[:4]) + (", ..." if len(pattern) > 4 else "")


def _format_report(report) -> list[str]:
    rank_line = f"{report.rank}"
    if report.rank_pattern:
        rank_line += f" ({_pattern_text(report.rank_pattern)})"
    scale = f", scale {report.scale:g}" if report.scale is not None else ""
    if report.alpha is None:
        alpha_lines = ["lora_alpha    UNKNOWN: not stored, and several trainers write this format; candidates:"]
        alpha_lines += [f"  - {c['alpha']} ({c['trainer']}: {c['source']})" for c in report.alpha_candidates]
        alpha_lines.append("              settle it with --alpha A or --trainer NAME")
    else:
        alpha_lines = [f"lora_alpha    {report.alpha} from {report.alpha_source} ({report.alpha_detail}){scale}"]
        if report.alpha_pattern:
            alpha_lines.append(f"alpha_pattern {_pattern_text(report.alpha_pattern)}")
    return [
        f"file          {report.file}",
        f"format        {report.format}: {report.format_description}",
        *([f"steps         {', '.join(str(s) for s in report.steps)}"] if report.steps else []),
        f"rank          {rank_line}",
        *alpha_lines,
        f"targets       {', '.join(report.target_modules)} ({counted(report.num_modules, 'module')})",
        f"fits          {report.fit_detail}",
        f"dtype         {report.dtype}",
        f"size          {report.size_bytes:,} bytes",
        f"problems      {len(report.problems) or 'none'}",
        *(f"  - {problem}" for problem in report.problems),
    ]


def _positive_finite_alpha(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    from cogsurgeon.tools.lora.checkpoint import ALPHA_RANGE, positive_number

    if value is not None and not positive_number(value):
        raise click.BadParameter(f"must be {ALPHA_RANGE}, got {value}")
    return value


@click.group()
def lora() -> None:
    """Inspect, repair, verify and merge CogVideoX LoRA checkpoints.

    Trainers (CogVideo finetune, diffusers scripts, CogKit, SAT) save LoRA weights without adapter_config.json
    and without lora_alpha: PEFT then refuses the folder or goes to the Hub, and diffusers loads it at
    alpha = rank (a default CogVideo LoRA, rank 128 / alpha 64, runs at twice its strength). `repair` writes an
    adapter folder for PEFT and diffusers (`--to comfyui` adds a ComfyUI file); `merge` fuses adapters into a
    local base's weights.

    \b
    Examples (a trainer's output folder out/ holding checkpoint-500/):
      cogsurgeon lora inspect out/checkpoint-500
      cogsurgeon lora repair out/checkpoint-500 --out my-adapter --alpha 64
      cogsurgeon lora repair out/ --latest --out my-adapter --alpha 64 --to peft,diffusers,comfyui --force
      cogsurgeon lora verify my-adapter --base tiny-i2v
      cogsurgeon lora merge ./CogVideoX-5b-I2V my-adapter:0.8 --out merged
    """


@lora.command(short_help="Format, ranks, targets, lora_alpha and its source, problems.")
@click.argument("ckpt", type=click.Path(path_type=str))
@checkpoint_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(ckpt: str, alpha: float | None, override_stored_alpha: bool, trainer: str | None, step: int | None,
            latest: bool, as_json: bool) -> None:
    """Say what a LoRA checkpoint holds: format (the trainer-table row), rank and per-module ranks, targets, which
    CogVideoX variants it fits, dtype, size, lora_alpha and where it came from (flag, metadata, config, trainer,
    default) — or, when several trainers write this layout with different defaults, alpha null and the candidates
    (alpha_candidates in --json) — and problems.

    CKPT is a checkpoint folder (checkpoint-N/, an adapter folder, a SAT save folder, a CogKit DCP checkpoint), a
    trainer's output folder (several checkpoints: --step N or --latest), or the weights file.

    \b
    Examples:
      cogsurgeon lora inspect out/checkpoint-500
      cogsurgeon lora inspect out/ --latest --json
      cogsurgeon lora inspect out/checkpoint-500/pytorch_lora_weights.safetensors --json
    """
    from cogsurgeon.tools.lora.checkpoint import inspect_checkpoint

    report = _in_cli_terms(inspect_checkpoint(ckpt, alpha=alpha, trainer=trainer, step=step, latest=latest,
                                              override_stored_alpha=override_stored_alpha))
    _print_warnings(report.warnings)
    if as_json:
        print_json(report.to_json())
        return
    click.echo("\n".join(_format_report(report)))


class _ByteProgress:
    """`progress(done, total)` of a copy big enough to wait for, said on the progress line (`progress_line`'s `say`)
    at most ten times a second."""

    MIN_BYTES = 64 * 1024 * 1024

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.last_draw = 0.0  # monotonic time of the last redraw

    def __call__(self, done: int, total: int) -> None:
        if total < self.MIN_BYTES:
            return
        now = time.monotonic()
        if done < total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self.say(f"writing: {done / 2**20:8.1f} / {total / 2**20:.1f} MiB ({100 * done / total:5.1f}%)")


@lora.command(short_help="Rebuild a checkpoint into an adapter folder PEFT and diffusers load offline.")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="DIR",
              help="The adapter folder to create (missing parent folders are created); it must not exist, unless "
                   "--force.")
@checkpoint_options
@click.option("--force", is_flag=True,
              help="Replace DIR if it is an earlier repair, unchanged (its cogsurgeon-repair.json manifest and every "
                   "hash match), in one atomic swap; any other folder is left alone.")
@click.option("--to", "to", default="peft,diffusers", show_default=True, metavar="LIST",
              help="Consumers to write for: peft (adapter_config.json + adapter_model.safetensors), diffusers "
                   "(pytorch_lora_weights.safetensors with metadata), comfyui (comfyui_lora.safetensors, kohya keys "
                   "with .alpha, merged at the trained scale by kijai's CogVideoXWrapper).")
@click.option("--bake-scale", is_flag=True,
              help="Fold lora_alpha / r into lora_B (written alpha = r), for consumers that ignore alpha: strength 1.0 "
                   "is then the trained strength.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def repair(ckpt: str, out_dir: str, alpha: float | None, override_stored_alpha: bool, trainer: str | None,
           step: int | None, latest: bool, force: bool, to: str, bake_scale: bool, as_json: bool) -> None:
    """Rebuild CKPT into an adapter folder that PEFT and diffusers load offline at the trained scale.

    DIR gets adapter_config.json + adapter_model.safetensors (PEFT: PeftModel.from_pretrained(transformer, DIR))
    and pytorch_lora_weights.safetensors with lora_adapter_metadata (diffusers >= 0.34: load_lora_weights(DIR)).
    Tensors are copied byte for byte; CKPT is never written to; DIR appears only when complete.
    diffusers < 0.34 ignores the metadata and loads at alpha = rank: there use PEFT, or pass the alpha yourself
    (load_lora_adapter(..., network_alphas=...), plus LoraLayer.set_scale where ranks differ), as
    `cogsurgeon lora verify` does.

    Without a stored lora_alpha and with several trainers fitting the layout, it refuses (exit 2) and lists the
    candidates: settle with --alpha A or --trainer NAME.

    \b
    Examples:
      cogsurgeon lora repair out/checkpoint-500 --out my-adapter --trainer cogvideo-finetune
      cogsurgeon lora repair cogkit/adapter_model.safetensors --out my-adapter --alpha 64
      cogsurgeon lora repair videox-out/ --latest --out my-adapter --trainer videox-fun --to peft,diffusers,comfyui
    """
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    with progress_line() as say:
        result = repair_checkpoint(ckpt, out_dir, alpha=alpha, trainer=trainer, step=step, latest=latest, force=force,
                                   to=to, bake_scale=bake_scale, progress=_ByteProgress(say),
                                   override_stored_alpha=override_stored_alpha)
    result = replace(result, report=_in_cli_terms(result.report))
    _print_warnings(result.report.warnings)
    if as_json:
        print_json(result.to_json())
        return
    report = result.report
    click.echo(
        f"wrote {result.out_dir}: {counted(report.num_modules, 'module')}, rank {report.rank}, "
        f"lora_alpha {report.alpha} ({report.alpha_source}), {result.bytes_written:,} tensor bytes"
    )
    if report.alpha_pattern:
        click.echo(f"  alpha_pattern kept: {_pattern_text(report.alpha_pattern)}")
    for path in result.files:
        click.echo(f"  {path}")


@lora.command(short_help="Load an adapter folder with PEFT and diffusers; exit 1 on any mismatch.")
@click.argument("adapter_dir", type=click.Path(path_type=str))
@click.option("--base", "base", required=True, metavar="MODEL",
              help="The base transformer: tiny, tiny-i2v, tiny-1.5, or a local diffusers model folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, adapter_dir: str, base: str, as_json: bool) -> None:
    """Load the adapter in DIR onto MODEL with PEFT and with diffusers, offline, and check both.

    Reports matched, missing and unexpected modules, the scale each loader applied (measured from its LoRA
    layers' outputs), and each loader's output against a reference built from the raw tensors (x·Aᵀ·Bᵀ·α/r added
    by plain forward hooks). Exit 1 on any mismatch (a loader at another strength; the silent no-op load: no key
    matched and lora_B left at zero); exit 2 when the LoRA does not fit MODEL (the mismatch is named).

    \b
    Examples:
      cogsurgeon lora verify my-adapter --base tiny-i2v
      cogsurgeon lora verify my-adapter --base /models/CogVideoX-5b-I2V --json
    """
    from cogsurgeon.tools.lora.verify import verify_adapter

    with progress_line() as say:
        report = verify_adapter(adapter_dir, base, progress=say)
    report = replace(report, failures=tuple(map(in_cli_terms, report.failures)))  # they quote the alpha's source
    if as_json:
        print_json(report.to_json())
    else:
        click.echo("\n".join(report.summary_lines()))
    if not report.passed:
        ctx.exit(1)


@lora.command(short_help="Fuse LoRAs into a local base's weights; write a diffusers transformer folder.")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:WEIGHT]...")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="DIR",
              help="The transformer folder to create (missing parents are created; it must not exist, see --force).")
@click.option("--force", is_flag=True,
              help="Replace DIR if it is an earlier `lora merge` output, unchanged (its cogsurgeon-merge.json "
                   "hashes match); anything else at DIR is refused.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(base: str, loras: tuple[str, ...], out_dir: str, force: bool, as_json: bool) -> None:
    """Fuse each LORA into BASE at its trained scale times WEIGHT (default 1.0) and write DIR: same dtype and shards
    as BASE, config copied, streamed tensor by tensor. BASE is a local transformer folder (or a model root with
    transformer/). A LORA whose lora_alpha is not settled is refused: repair it with --alpha first.

    \b
    Examples:
      cogsurgeon lora merge /models/CogVideoX-5b/transformer style-adapter detail-adapter:0.5 --out merged
      cogsurgeon lora merge ./CogVideoX-5b-I2V my-adapter:0.8 --out merged --json
    """
    from cogsurgeon.tools.lora.merge import merge_loras, parse_lora_spec

    with progress_line() as say:
        result = merge_loras(base, [parse_lora_spec(text) for text in loras], out_dir, force=force,
                             progress=_ByteProgress(say))
    if as_json:
        print_json(result.to_json())
        return
    click.echo(f"wrote {result.out_dir}: {counted(result.fused_modules, 'weight')} fused from "
               f"{counted(len(result.loras), 'LoRA')}")
    for path in result.files:
        click.echo(f"  {path}")


__all__ = [
    "lora",
]
