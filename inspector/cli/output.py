"""What the commands share: JSON on stdout, a rich console for stdout, and the help and choices of common options."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

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


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def print_table_or_blocks(console: Console, table: Table) -> None:
    """`table` as drawn when it fits the console; else one block per row (its first cell, then a `column: value`
    line per other cell, wrapped, never cut), as `modules` does: a name or a shape is never shortened to `…`."""
    from rich.console import Console, Group
    from rich.text import Text

    if Console(width=100_000).measure(table).maximum <= console.width:
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


__all__ = [
    "DTYPE_CHOICE", "MODEL_HELP", "POSITIVE", "print_json", "print_table_or_blocks", "stdout_console",
]
