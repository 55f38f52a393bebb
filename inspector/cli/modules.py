"""`cogsurgeon modules`: every named module of a model, as JSON, a table, or (where the table would not fit the
terminal) one block per module with its location on its own line, so that file:line is never cut."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import click

from cogsurgeon.inspector.cli.output import DTYPE_CHOICE, MODEL_HELP, print_json, progress_line, stdout_console
from cogsurgeon.inspector.errors import counted
from cogsurgeon.inspector.inventory import ModuleInfo, filter_inventory, inventory_for_spec
from cogsurgeon.inspector.module_tree import ListedRow, listed_rows
from cogsurgeon.inspector.source import display_path

if TYPE_CHECKING:  # rich loads when a table is drawn, not on every start of the CLI
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text


@click.command()
@click.argument("model", required=False)
@click.option("--filter", "filter_text", metavar="TEXT", help="Keep rows whose name, class or file contains TEXT.")
@click.option("--dtype", type=DTYPE_CHOICE, help="Load in this dtype instead of as saved.")
@click.option("--all", "show_all", is_flag=True, help="List repeated blocks one by one instead of folded.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per module (never folded).")
@click.option(
    "--no-cache", is_flag=True, help="Rebuild a shipped model's inventory instead of reading the inventory cache."
)
def modules(
    model: str | None, filter_text: str | None, dtype: str | None, show_all: bool, as_json: bool, no_cache: bool
) -> None:
    """List every named module of MODEL.

    Each row: name, class, the file and line where the class is defined, parameters (the module's subtree),
    dtype, device, and the attention processor for attention modules. In a terminal, paths are shortened
    (from site-packages or the checkout on) and a table too wide for the window becomes one block per module;
    piped or redirected, every row is one line with the full path.

    {model_help}

    \b
    Examples:
      cogsurgeon modules                               # the default model, repeated blocks folded
      cogsurgeon modules cogvideox1.5-5b --filter attn1
      cogsurgeon modules ./my-finetune --json | jq '.[] | select(.processor) | .file'
    """
    with progress_line() as say:
        infos = inventory_for_spec(model, dtype, use_cache=not no_cache, progress=say)
    matching = filter_inventory(infos, filter_text)
    if as_json:
        print_json([info.to_json() for info in matching])
        return
    from rich.console import Console

    rows = listed_rows(infos, filter_text, fold=not show_all)
    console = stdout_console()
    full_paths = not console.is_terminal
    table = modules_table(rows, len(matching), full_paths)
    natural_width = Console(width=100_000).measure(table).maximum
    if full_paths:  # a file or a pipe: one line per module, however wide
        Console(width=natural_width).print(table)
    elif natural_width <= console.width:
        console.print(table)
    else:
        console.print(modules_blocks(rows, len(matching)))


modules.help = inspect.cleandoc(modules.help or "").replace("{model_help}", MODEL_HELP)


def location(info: ModuleInfo, full_path: bool = False) -> str:
    """`file:line` of the module's class; the path as recorded, or as `display_path` shortens it."""
    if not info.file:
        return "-"
    path = info.file if full_path else display_path(info.file)
    return f"{path}:{info.line}" if info.line else path


def _name(row: ListedRow, style: str = "") -> Text:
    from rich.text import Text

    name = Text(row.display_name or "(root)", style=style)
    if row.repeat > 1:
        name.append(f"  ×{row.repeat}", style="dim")
    return name


def modules_table(rows: list[ListedRow], total: int, full_paths: bool = False) -> Table:
    """One row per (folded) module; the location column never wraps and is never cut."""
    from rich.table import Table

    table = Table(title=counted(total, "module"), header_style="bold", expand=False)
    for column, justify in (
        ("module", "left"), ("class", "left"), ("params", "right"), ("dtype", "left"), ("device", "left"),
        ("processor", "left"), ("defined at", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("module", "defined at"))
    for row in rows:
        info = row.info
        table.add_row(_name(row), info.class_name, f"{info.params:,}", info.dtype or "-", info.device or "-",
                      info.processor or "-", location(info, full_paths))
    return table


def modules_blocks(rows: list[ListedRow], total: int) -> Group:
    """For a terminal too narrow for the table: per module its name, then its facts, then its location, each on
    a line of its own (the location wraps, never cut)."""
    from rich.console import Group
    from rich.text import Text

    lines: list[Text] = [Text(counted(total, "module"), style="bold")]
    for row in rows:
        info = row.info
        facts = [info.class_name, f"{info.params:,} params", info.dtype or "-", info.device or "-"]
        if info.processor:
            facts.append(info.processor)
        lines.append(_name(row, style="bold"))
        lines.append(Text("  " + " · ".join(facts)))
        lines.append(Text("  " + location(info), style="cyan", overflow="fold"))
    return Group(*lines)


__all__ = [
    "modules",
]
