"""Rich renderings of core values for the CLI (the TUI has its own widgets)."""

from __future__ import annotations

from rich.table import Table

from cogsurgeon.inspector.inventory import ModuleInfo, fold_repeated
from cogsurgeon.inspector.source import display_path


def modules_table(infos: list[ModuleInfo], fold: bool = True) -> Table:
    table = Table(title=f"{len(infos)} modules", header_style="bold", expand=False)
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
    rows = fold_repeated(infos) if fold else None
    for row in rows or ():
        info = row.info
        name = row.display_name or "(root)"
        if row.repeat > 1:
            name = f"{name}  [dim]×{row.repeat}[/dim]"
        table.add_row(*_cells(info, name))
    if rows is None:
        for info in infos:
            table.add_row(*_cells(info, info.name or "(root)"))
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
