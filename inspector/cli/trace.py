"""`cogsurgeon trace`: the shape trace of `inspector.trace` on the command line, as JSON or readable tables.

Top-level imports stay light (click only): the CLI imports this module on every start.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import click

from cogsurgeon.inspector.cli.output import (
    POSITIVE,
    print_json,
    print_table_or_blocks,
    progress_line,
    stdout_console,
)

if TYPE_CHECKING:
    from cogsurgeon.inspector.trace import AttentionCall


@click.command(short_help="Every attention call's and module's shapes at a video size, without a GPU.")
@click.argument("model", required=False)
@click.option("--frames", default=49, show_default=True, type=POSITIVE, help="Video frames (4k+1: 49, 81).")
@click.option("--height", default=480, show_default=True, type=POSITIVE, help="Video height in pixels.")
@click.option("--width", default=720, show_default=True, type=POSITIVE, help="Video width in pixels.")
@click.option("--batch", default=2, show_default=True, type=POSITIVE,
              help="The transformer's batch: 2 is one video with classifier-free guidance.")
@click.option("--all", "show_all", is_flag=True,
              help="Show every attention call and every module's shapes; without it identical blocks are folded.")
@click.option("--ulysses", default=1, type=click.IntRange(min=1), metavar="N",
              help="The shapes of one rank of N under Ulysses context parallelism (cogsurgeon.parallel).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"sequence", "attention", "modules", "mask_memory", ...} as JSON.')
def trace(model: str | None, frames: int, height: int, width: int, batch: int, show_all: bool, ulysses: int,
          as_json: bool) -> None:
    """Trace MODEL's shapes at a video size with one forward on the meta device (no weights, no compute).

    Inputs are shaped as diffusers' CogVideoX pipelines shape them: latent frames (F-1)/4+1 (padded to whole
    temporal patches for CogVideoX1.5), latent size H/8 × W/8, rotary embeddings as the pipeline computes them,
    the config's text length (226). Shows how the joint sequence splits into text and video tokens, each attention
    call's query/key/value shapes, each module's input and output shapes, and what an explicit attention mask
    would take in memory at this size. A size the model cannot take is an error (exit 2).

    MODEL: see `cogsurgeon modules --help`; a model with real weights is traced through a meta copy.

    \b
    Examples:
      cogsurgeon trace                                       # cogvideox-5b-i2v at 49×480×720, batch 2
      cogsurgeon trace cogvideox1.5-5b --frames 81 --height 768 --width 1360
      cogsurgeon trace cogvideox-5b --json | jq '.attention[0]'
      cogsurgeon trace tiny --frames 9 --height 64 --width 64 --all
      cogsurgeon trace cogvideox-5b --ulysses 4 --json | jq '.attention[0]'   # one rank of 4: 12 heads, all tokens
    """
    config = _known_config(model)
    if config is not None:  # refuse a size the model cannot take before paying for torch and the model
        check_traceable(config, frames, height, width, batch)

    from cogsurgeon.inspector.loading import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

    with progress_line() as say:
        transformer = load_transformer(model, progress=say)
        if config is None:
            check_traceable(transformer.config, frames, height, width, batch)
        say(f"tracing one forward at {frames}×{height}×{width}, batch {batch}, on the meta device…")
        result = trace_shapes(transformer, frames=frames, height=height, width=width, batch=batch, ulysses=ulysses)
    if as_json:
        print_json(result.to_json())
        return
    _print_tables(result, show_all)


def check_traceable(config, frames: int, height: int, width: int, batch: int, what: str = "trace") -> None:
    """Refuse a size the model cannot take (`latent_geometry`'s reasons) or whose meta forward would make a tensor
    torch cannot size: its largest is one attention call's `(B, heads, L, L)` weights (SDPA's math path on meta)."""
    from cogsurgeon.inspector.geometry import TORCH_MAX_BYTES, VideoSizeError, latent_geometry

    geometry = latent_geometry(config, frames, height, width)
    tokens = int(config.get("max_text_seq_length", 226)) + geometry.token_frames * geometry.tokens_per_frame
    weight_bytes = batch * int(config.get("num_attention_heads", 1)) * tokens * tokens * 4
    if weight_bytes > TORCH_MAX_BYTES:
        raise VideoSizeError(
            f"{frames}×{height}×{width} at batch {batch} is too large to {what}: {tokens:,} tokens, so one attention "
            f"call's weights would take {weight_bytes:.3g} bytes, more than torch can size even on the meta device"
        )


def _known_config(model: str | None) -> dict | None:
    """The config of a published or tiny MODEL, read without torch; None for folders and hub ids."""
    from cogsurgeon.inspector.model_specs import builtin_config, resolve_spec

    resolved = resolve_spec(model)
    return builtin_config(resolved.spec) if resolved.kind in ("published", "tiny") else None


def _print_tables(result, show_all: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from cogsurgeon.inspector.trace import format_bytes, format_shape

    console = stdout_console()
    sequence, geometry = result.sequence, result.geometry
    console.print(
        f"[bold]{result.model_class}[/bold] at {result.frames}×{result.height}×{result.width}, "
        f"batch {result.batch}, {result.dtype}: latent {geometry.latent_frames}×{geometry.latent_height}×"
        f"{geometry.latent_width}, output {format_shape(result.output)}"
    )
    console.print(
        f"sequence: {sequence.sequence_length:,} tokens = {sequence.text_tokens:,} text + "
        f"{sequence.video_tokens:,} video ({sequence.frames} frames × {sequence.tokens_per_frame:,} tokens)"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")

    calls = Table(title=f"{len(result.attention)} attention calls", header_style="bold")
    for column in ("module", "query", "key", "value", "output", "mask", "causal"):
        calls.add_column(column, no_wrap=column == "module")
    rows = [(call, call.module, 1) for call in result.attention] if show_all else fold_calls(result.attention)
    for call, name, repeat in rows:
        shapes = (call.query, call.key, call.value, call.output, call.attn_mask)
        label = Text(name)
        if repeat > 1:
            label.append(f"  ×{repeat}", style="dim")
        calls.add_row(label, *(format_shape(shape) for shape in shapes), "yes" if call.is_causal else "no")
    print_table_or_blocks(console, calls)

    memory = Table(title="memory per attention call: a patch's rule as an explicit mask vs the patch",
                   header_style="bold")
    for column in ("patch", "diffusers' explicit mask", "bytes", "(1,1,L,L) bool", "patch takes"):
        memory.add_column(column)
    estimated = [entry for entry in result.mask_memory if entry.patch_bytes is not None]
    for entry in estimated:
        memory.add_row(entry.patch, f"{format_shape(entry.explicit_mask_shape)} {entry.explicit_mask_dtype}",
                       format_bytes(entry.explicit_mask_bytes), format_bytes(entry.broadcast_mask_bytes),
                       format_bytes(entry.patch_bytes))
    print_table_or_blocks(console, memory)
    unestimated = [entry.patch for entry in result.mask_memory if entry.patch_bytes is None]
    if unestimated:  # per-frame-timesteps masks nothing; a patch without an estimate has no row to compare
        console.print(f"[dim]not in the table (no attention-mask rule to compare): {', '.join(unestimated)}[/dim]")

    cache = Table(title="KV cache of patches.streaming: K and V of every layer", header_style="bold")
    for column in ("chunk", "window", "sink", "bytes"):
        cache.add_column(column)
    for entry in result.kv_cache:
        cache.add_row(str(entry["chunk"]), str(entry["window"] or "none"), str(entry["sink"]),
                      format_bytes(entry["bytes"]))
    print_table_or_blocks(console, cache)

    modules = Table(title="module shapes" + ("" if show_all else " (root, embeddings, first block, output; "
                                                               "--all for every module)"), header_style="bold")
    for column in ("module", "inputs", "outputs"):
        modules.add_column(column)
    for name, shapes in result.modules.items():
        if not show_all and name.startswith("transformer_blocks.") and not name.startswith("transformer_blocks.0"):
            continue
        modules.add_row(name or "(root)", format_shape(shapes.inputs), format_shape(shapes.outputs))
    print_table_or_blocks(console, modules)


_BLOCK_CALL = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)\.(?P<rest>[^.]+)$")


def fold_calls(calls: list[AttentionCall]) -> list[tuple[AttentionCall, str, int]]:
    """Runs of calls from consecutive blocks (`transformer_blocks.3.attn1`, `.4.attn1`, ...) with the same shapes
    as one row `transformer_blocks.(0-41).attn1` standing for `repeat` calls, as `modules` folds its blocks."""
    runs: list[list[AttentionCall]] = []
    for call in calls:
        if runs and _follows(runs[-1][-1], call):
            runs[-1].append(call)
        else:
            runs.append([call])
    rows = []
    for run in runs:
        if len(run) == 1:
            rows.append((run[0], run[0].module, 1))
            continue
        first, last = _BLOCK_CALL.match(run[0].module), _BLOCK_CALL.match(run[-1].module)
        rows.append((run[0], f"{first['prefix']}.({first['index']}-{last['index']}).{first['rest']}", len(run)))
    return rows


def _follows(previous: AttentionCall, call: AttentionCall) -> bool:
    before, after = _BLOCK_CALL.match(previous.module), _BLOCK_CALL.match(call.module)
    return (before is not None and after is not None
            and (before["prefix"], before["rest"]) == (after["prefix"], after["rest"])
            and int(after["index"]) == int(before["index"]) + 1
            and dataclasses.replace(call, module=previous.module) == previous)


__all__ = [
    "check_traceable", "trace",
]
