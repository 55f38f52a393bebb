"""`cogsurgeon attention MODEL` (record one seeded forward and summarise it) and `cogsurgeon attention show FILE` (open
a recording in the viewer). Top-level imports stay light (click only): torch loads inside the commands.
"""

from __future__ import annotations

from typing import Any

import click

from cogsurgeon.inspector.cli.output import DTYPE_CHOICE, POSITIVE, print_json, progress_line, stdout_console

GROUPS_OPTION_HELP = 'How keys and queries are grouped: "frames", "grid:RxC" or "words".'


class AttentionGroup(click.Group):
    """`cogsurgeon attention MODEL ...` is `cogsurgeon attention record MODEL ...` (as `cogsurgeon MODEL` opens the
    TUI)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["record", *args]
        return super().parse_args(ctx, args)


@click.group("attention", cls=AttentionGroup, short_help="Exact attention statistics of every layer and head.")
def attention() -> None:
    """Exact attention statistics of every layer and head (the attention x-ray).

    Statistics are exact (SDPA over one-hot values: no L×L tensor) and those of the attention that runs, patches
    included. For each layer, head, step and batch item: mass[i][j], the mean over the query tokens of group i of
    their attention on the keys of group j; from it text→video, video→text, own-frame share, first-frame and text
    sinks and a head kind (spatial, temporal, text, mixed).

    \b
    Examples:
      cogsurgeon attention tiny                                 # record one seeded forward, per-layer summary
      cogsurgeon attention tiny --patch frame-causal-attention --groups grid:2x2 --json
      cogsurgeon attention ./my-model --frames 49 --height 480 --width 720 --device cuda --save run.json
      cogsurgeon attention show run.json                        # open a recording in the viewer
      cogsurgeon run --record-attention run.json -- python sample.py   # record an unchanged script
    """


@attention.command("record", short_help="Record one seeded forward of MODEL and print a per-layer summary.")
@click.argument("model", required=False)
@click.option("--frames", type=POSITIVE, help="Video frames (4k+1). Default: the model's sample size.")
@click.option("--height", type=POSITIVE, help="Video height in pixels. Default: the model's.")
@click.option("--width", type=POSITIVE, help="Video width in pixels. Default: the model's.")
@click.option("--batch", default=2, show_default=True, type=POSITIVE,
              help="The transformer's batch: 2 is one video with classifier-free guidance.")
@click.option("--patch", "patch_specs", multiple=True, metavar="NAME[:key=value,...]",
              help="Record with this patch applied (repeatable).")
@click.option("--groups", default="frames", show_default=True, help=GROUPS_OPTION_HELP)
@click.option("--words", default="", metavar="I,J,...", help="Text token positions whose per-video-token maps to keep.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs.")
@click.option("--dtype", type=DTYPE_CHOICE, help="Weights' dtype. Default: as loaded (tiny: float32).")
@click.option("--device", default="cpu", show_default=True, help="Where the forward runs (cpu, cuda, cuda:1).")
@click.option("--save", "save_path", metavar="FILE.json",
              help="Write the recording (a viewer opens it: attention show).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole recording as JSON (mass, stats, groups).")
def record(model: str | None, frames: int | None, height: int | None, width: int | None, batch: int,
           patch_specs: tuple[str, ...], groups: str, words: str, seed: int, dtype: str | None, device: str,
           save_path: str | None, as_json: bool) -> None:
    """Record the attention of one seeded forward of MODEL (tiny models and local folders: weights are needed) and
    print a per-layer summary.

    MODEL: see `cogsurgeon modules --help` (a published config has no weights and cannot be recorded).

    \b
    Examples:
      cogsurgeon attention tiny
      cogsurgeon attention tiny-1.5 --patch block-causal-attention:chunk=1,window=1 --groups frames
      cogsurgeon attention tiny --groups words --words 0,3 --json | jq '.stats[0][0][1]'
      cogsurgeon attention ./CogVideoX-5b --device cuda --dtype bfloat16 --save run.json
    """
    from cogsurgeon.inspector.attention_xray import parse_groups
    from cogsurgeon.inspector.cli.trace import _known_config
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.inspector.geometry import default_video_size, latent_geometry
    from cogsurgeon.inspector.model_specs import resolve_spec
    from cogsurgeon.patches.launcher import check_patch_names

    parse_groups(groups)  # flags refused before paying for torch and the model
    word_positions = _parse_words(words)
    specs = check_patch_names(patch_specs) if patch_specs else []
    if save_path is not None and not save_path.endswith(".json"):
        raise CogsurgeonError(f"--save {save_path}: a recording is saved as FILE.json")
    if resolve_spec(model).kind == "published":
        raise CogsurgeonError(f"{model or 'the default model'} is a published config on the meta device (no weights): "
                              "record a tiny model (tiny, tiny-i2v, tiny-1.5) or a local folder with weights")
    config = _known_config(model)
    size = _video_size(config, frames, height, width, default_video_size)
    if config is not None:
        latent_geometry(config, *size, batch)

    import torch

    from cogsurgeon import patches
    from cogsurgeon.inspector.attention_xray import record_seeded_forward
    from cogsurgeon.inspector.loading import load_transformer

    with progress_line() as say:
        transformer = load_transformer(model, dtype=dtype, progress=say)
        if config is None:
            size = _video_size(transformer.config, frames, height, width, default_video_size)
            latent_geometry(transformer.config, *size, batch)
        try:
            transformer.to(torch.device(device))
        except (RuntimeError, ValueError) as exc:
            raise CogsurgeonError(f"--device {device}: {str(exc).splitlines()[0]}") from None
        for spec in specs:
            name, options = patches.parse_patch_spec(spec)
            patches.apply(transformer, name, **options)
        say(f"recording one seeded forward at {size[0]}×{size[1]}×{size[2]}, batch {batch}, on {device}…")
        recording = record_seeded_forward(transformer, size, batch=batch, groups=groups, words=word_positions,
                                          seed=seed)
    recording.model["spec"] = model
    if save_path is not None:
        written = recording.save(save_path)
        click.echo(f"wrote {', '.join(map(str, written))}", err=True)
    if as_json:
        print_json(recording.to_json())
        return
    print_summary(recording)


def _parse_words(words: str) -> list[int]:
    from cogsurgeon.inspector.errors import CogsurgeonError

    items = [item.strip() for item in words.split(",") if item.strip()]
    if not all(item.isdigit() for item in items):
        raise CogsurgeonError(f"--words {words!r}: give text token positions separated by commas, e.g. 0,3,5")
    return [int(item) for item in items]


def _video_size(config: Any, frames: int | None, height: int | None, width: int | None,
                default: Any) -> tuple[int, int, int]:
    if config is None:
        return frames or 49, height or 480, width or 720
    default_frames, default_height, default_width = default(config)
    return frames or default_frames, height or default_height, width or default_width


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(recording: Any, step: int = 0, batch: int | None = None) -> None:
    """The per-layer table: head kinds and the mean statistics over each layer's heads, for each batch item."""
    from rich.table import Table

    console = stdout_console()
    model, layout = recording.model, recording.layout
    console.print(
        f"[bold]{model.get('class', 'model')}[/bold] {model.get('spec') or ''}: {len(recording.layers)} layers × "
        f"{recording.heads} heads, {recording.steps} step(s), batch {recording.batch}, groups "
        f"{recording.group_info.spec} ({len(recording.groups)}); {layout['text_tokens']} text + {layout['frames']} "
        f"frames of {layout['grid_height']}×{layout['grid_width']} tokens; patches: "
        f"{', '.join(model.get('patches') or {}) or 'none'}"
    )
    has_frames = any(frame is not None for frame in recording.group_info.frame)  # head kinds need frame groups
    for item in range(recording.batch) if batch is None else [batch]:
        table = Table(title=f"step {step}, batch item {item}", header_style="bold")
        for column in ("layer", "spatial", "temporal", "text", "mixed", "video→text", "text→video", "own frame",
                       "first-frame sink", "text sink"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in recording.summary(step, item):
            kinds = row["kinds"]
            counts = [str(kinds[kind]) if has_frames else "-" for kind in ("spatial", "temporal", "text", "mixed")]
            table.add_row(row["layer"], *counts,
                          *(_share(row[key]) for key in ("video_to_text", "text_to_video", "own_frame",
                                                         "first_frame_sink", "text_sink")))
        console.print(table)


@attention.command("show", short_help="Open a recording in the viewer (or print it, or export a PNG).")
@click.argument("file", metavar="FILE.json")
@click.option("--print", "print_only", is_flag=True, help="Print the per-layer summary instead of opening the viewer.")
@click.option("--png", "png_path", metavar="OUT.png",
              help="Write the viewer's first view (layer 0, head 0, step 0, batch 0) as a PNG instead of opening it.")
def show(file: str, print_only: bool, png_path: str | None) -> None:
    """Open a recording (from `attention --save`, `run --record-attention` or `rec.save`) in the viewer: a layer ×
    head overview coloured by head kind, the selected head's group×group heat map, per-word maps per frame.

    \b
    Examples:
      cogsurgeon attention show run.json
      cogsurgeon attention show run.json --print
      cogsurgeon attention show run.json --png view.png
    """
    from cogsurgeon.inspector.attention_recording import RecordingError, load_recording

    recording = load_recording(file)  # a bad file: one line, exit 2, before the screen opens
    if recording.steps == 0:
        raise RecordingError(f"{file} holds no recorded step")
    if print_only:
        print_summary(recording)
        return
    if png_path is not None:
        from pathlib import Path

        from cogsurgeon.inspector.tui.attention_screen import ViewState, view_png

        if not png_path.endswith(".png"):
            raise RecordingError(f"--png {png_path}: give a FILE.png")
        click.echo(f"wrote {view_png(recording, ViewState(), Path(png_path))}", err=True)
        return
    from cogsurgeon.inspector.tui.attention_screen import run_viewer

    run_viewer(recording, source=file)


__all__ = [
    "attention",
]
