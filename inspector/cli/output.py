"""What the commands share: JSON on stdout, a rich console for stdout, a progress line on stderr, and the help and
choices of common options."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from cogsurgeon.inspector.errors import renamed_parameters
from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, known_specs

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

MODEL_HELP = (
    f"MODEL is one of {', '.join(known_specs())} (published configs load on the meta device, no download; "
    "tiny ones are runnable), a local diffusers model folder, or a hub id already in the local Hugging Face "
    f"cache. Default: {DEFAULT_SPEC}."
)

DTYPE_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class DtypeChoice(click.Choice):
    """A dtype by its torch name or its short name (`bf16`), handed to the command as the torch name; every
    `--dtype` takes the same names."""

    def __init__(self) -> None:
        super().__init__(["float32", "bfloat16", "float16", *DTYPE_SHORT_NAMES])

    def convert(self, value, param, ctx) -> str:
        name = super().convert(value, param, ctx)
        return DTYPE_SHORT_NAMES.get(name, name)


# Checked by click before any command body runs, so a wrong value costs no torch import.
DTYPE_CHOICE = DtypeChoice()
POSITIVE = click.IntRange(min=1)  # video sizes and batches


# The library's messages name the keyword arguments of its Python calls (`plan_memory(gpu_memory="lots")` says
# `gpu_memory='lots'`, `repair_checkpoint(..., step=7)` says `pass step=N`); on the command line they are these flags.
PARAMETER_FLAGS = {
    "train": "--train", "gpu_memory": "--gpu-memory", "mixed_precision": "--mixed-precision",
    "lora_dtype": "--lora-dtype", "trainer": "--trainer", "checkpointing": "--checkpointing", "vae": "--vae",
    "tiling": "--tiling", "zero": "--zero", "gpus": "--gpus", "dtype": "--dtype",  # plan
    "alpha": "--alpha", "override_stored_alpha": "--override-stored-alpha", "step": "--step", "latest": "--latest",
    "to": "--to", "out_dir": "--out", "force": "--force",  # lora inspect, repair, merge
    "base_spec": "--base",  # lora verify
    "command": "-- COMMAND", "patch_names": "--patch", "record": "--record-attention", "ulysses": "--ulysses",  # run
}


def in_cli_terms(text: str) -> str:
    """A library message (an error, a report's warning) with the keyword arguments it names as the CLI's flags."""
    return renamed_parameters(text, PARAMETER_FLAGS)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def print_table_or_blocks(console: Console, table: Table) -> None:
    """`table` as drawn when it fits the console; else one block per row (its first cell, then a `column: value`
    line per other cell, wrapped, never cut), as `modules` does: a name or a shape is never shortened to `…`.
    A title wider than its table is printed as a line of its own above it, not wrapped into the table's width."""
    from rich.cells import cell_len
    from rich.console import Console, Group
    from rich.text import Text

    width = Console(width=100_000).measure(table).maximum
    if width <= console.width:
        if table.title and cell_len(str(table.title)) > width:
            console.print(Text(str(table.title), style="bold"))
            table.title = None
        console.print(table)
        return
    columns = table.columns
    lines: list[Text] = [Text(str(table.title), style="bold")] if table.title else []
    for cells in zip(*(list(column.cells) for column in columns)):
        first = cells[0] if isinstance(cells[0], Text) else Text(str(cells[0]))
        lines.append(Text.assemble(first, style="bold", overflow="fold"))
        for column, cell in zip(columns[1:], cells[1:]):
            lines.append(Text.assemble(f"  {column.header}: ", cell if isinstance(cell, Text) else str(cell),
                                       overflow="fold"))
    console.print(Group(*lines))


def stdout_console() -> Console:
    """A console for stdout: the terminal's width in a terminal; piped or redirected, wide enough that tables
    are not squeezed into 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


# Back to the line's start and erase it: what a progress line is redrawn after, and what it ends with.
ERASE_LINE = "\r\x1b[K"


@contextmanager
def progress_line() -> Iterator[Callable[[str], None]]:
    """`say(message)` for slow work: in a terminal, one line on stderr redrawn with each message (cut to the
    terminal's width, so that it never wraps) and erased when the block ends, before anything is printed after it;
    where stderr is not a terminal (a script, a log, CI), nothing. stdout never gets progress, with or without
    `--json`.

        with progress_line() as say:
            result = plan_memory(..., progress=say)
    """
    from rich.cells import cell_len, set_cell_size

    stream = sys.stderr
    if not stream.isatty():
        yield lambda message: None
        return
    drawn = False

    def say(message: str) -> None:
        nonlocal drawn
        try:
            width = os.get_terminal_size(stream.fileno()).columns or 80  # 0: a terminal that does not say
        except (OSError, ValueError):
            width = 80
        # cut to the cells the terminal has, not to code points: a CJK character or an emoji takes two cells
        cells = max(width - 1, 1)
        stream.write(f"\r{message if cell_len(message) <= cells else set_cell_size(message, cells)}\x1b[K")
        stream.flush()
        drawn = True

    try:
        yield say
    finally:
        if drawn:
            stream.write(ERASE_LINE)
            stream.flush()


__all__ = [
    "DTYPE_CHOICE", "ERASE_LINE", "MODEL_HELP", "PARAMETER_FLAGS", "POSITIVE", "in_cli_terms", "print_json",
    "print_table_or_blocks", "progress_line", "stdout_console",
]
