"""What the commands share: JSON on stdout, a rich console for stdout, and the help and choices of common options."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, known_specs

if TYPE_CHECKING:
    from rich.console import Console

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


def stdout_console() -> Console:
    """A console for stdout: the terminal's width in a terminal; piped or redirected, wide enough that tables
    are not squeezed into 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
