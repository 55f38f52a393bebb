"""Rich renderings of core values for the CLI (the TUI has its own widgets)."""

from __future__ import annotations

from rich.table import Table

from cogsurgeon.inspector.inventory import ModuleInfo, filter_inventory
from cogsurgeon.inspector.module_tree import listed_rows
from cogsurgeon.inspector.source import display_path


def modules_table(infos: list[ModuleInfo], filter_text: str | None = None, fold: bool = True) -> Table:
    """The `modules` table of the modules matching `filter_text`, runs of identical blocks folded (`listed_rows`)."""
    table = Table(title=f"{len(filter_inventory(infos, filter_text))} modules", header_style="bold", expand=False)
    for column, justify in (
        ("module", "left"),
        ("class", "left"),
        ("params", "right"),
        ("dtype", "left"),
        ("device", "left"),
        ("processor", "left"),
        ("defined at", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column == "module")
    for row in listed_rows(infos, filter_text, fold):
        name = row.display_name or "(root)"
        if row.repeat > 1:
            name = f"{name}  [dim]×{row.repeat}[/dim]"
        table.add_row(*_cells(row.info, name))
    return table


def _cells(info: ModuleInfo, name: str) -> tuple[str, ...]:
    location = display_path(info.file) + (f":{info.line}" if info.line else "")
    return (
        name,
        info.class_name,
        f"{info.params:,}",
        info.dtype or "-",
        info.device or "-",
        info.processor or "-",
        location,
    )
