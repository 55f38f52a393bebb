"""Small widgets of the main screen: the module tree, the details of one module with its source, the patches panel.

Each renders values the core produced (`ModuleNode`, `ModuleInfo`, `SourceText`, `PatchInfo`) and posts small
messages; none of them touches a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Group
from rich.rule import Rule
from rich.style import Style
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual._segment_tools import line_pad
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import Reactive
from textual.strip import Strip
from textual.widgets import DataTable, Input, LoadingIndicator, Static, Tree
from textual.widgets.tree import TreeNode

from cogsurgeon.inspector.browse import format_count
from cogsurgeon.inspector.inventory import ModuleInfo
from cogsurgeon.inspector.module_tree import ModuleNode, path_to
from cogsurgeon.inspector.patching import PatchRow
from cogsurgeon.inspector.source import SourceText, display_path


def facts_table(rows: list[tuple[str | Text, str | Text]]) -> Table:
    """Two columns, label and value. Plain strings become `Text`, so that a value such as `[text ; video]` or a
    path is shown as written, never read as Rich markup."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    return grid


class SlowLoadingIndicator(LoadingIndicator):
    """A pane's loading indicator: what is loading and the seconds so far, redrawn once a second. Textual's own
    animates at 16 frames a second: the TUI then took 15 % of a core while loading, cycles taken from the import
    of torch and diffusers in a thread of the same interpreter; with this one, 1 % (`bench/tui_idle_cpu.py`)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def _on_mount(self, event: events.Mount) -> None:
        event.prevent_default()  # LoadingIndicator's own handler would set 16 frames a second
        self._start_time = time.time()
        self.auto_refresh = 1.0

    def render(self) -> Text:
        seconds = int(time.time() - self._start_time)
        return Text(f"● {self.what}  {seconds} s", style="dim")


@dataclass(frozen=True)
class TreeLineStyles:
    """The styles one repaint of the module tree draws with. Textual's Tree looks each of them up again for every
    row (`rich_style` walks the widget's ancestors, and there are ten more), the largest part of drawing a row;
    `ModuleTree.render_lines` looks them up once per repaint."""

    base: Style
    highlight_line: Style
    guide: Style
    guide_hover: Style
    guide_selected: Style
    guide_hidden: bool
    guide_hover_hidden: bool
    guide_selected_hidden: bool
    label: Style
    highlight: Style
    cursor: Style
    has_focus: bool


class RepaintOnContentSize:
    """For a widget whose size the stylesheet fixes: a change of its content's size (`virtual_size`) is a repaint,
    not a layout of the whole screen. Widget declares `virtual_size` with `layout=True`, and every layout also
    repaints the scroll views' scrollbars one screen update (a 60 fps tick) later: the filter's text and the
    tree's rows change size on every filter keystroke, which cost it two extra screen updates."""

    virtual_size: Reactive[Size] = Reactive(Size(0, 0))


class FilterInput(RepaintOnContentSize, Input):
    """The tree's filter: fixed width, its text scrolls inside it."""


class ModuleTree(RepaintOnContentSize, Tree[ModuleNode]):
    """The module hierarchy; children are added when a node is first expanded, so a 1,067-module model costs only
    the rows on screen. Folded runs read `transformer_blocks (0-41): 42 × CogVideoXBlock`."""

    BINDINGS = [
        Binding("right", "expand_node", "Expand", show=False, id="tree.expand"),
        Binding("left", "collapse_node", "Collapse", show=False, id="tree.collapse"),
    ]

    @dataclass
    class ModuleHighlighted(Message):
        """The cursor moved onto a module (a group row reports its first member)."""

        info: ModuleInfo

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("(no model)", **kwargs)
        self.guide_depth = 2
        self.patched: set[str] = set()
        self.patched_within: set[str] = set()
        self._populated: set[int] = set()
        self._repaint_styles: TreeLineStyles | None = None

    def watch_virtual_size(self, size: Size) -> None:
        """The scrollbars follow the rows in the same repaint (a layout still happens when one appears or goes)."""
        if self.is_mounted:
            self._scroll_update(size)

    def set_patched(self, names: set[str]) -> None:
        """Mark these modules as patched, and their ancestors (a folded row too) as holding patched modules."""
        self.patched = set(names)
        self.patched_within = {name.rsplit(".", depth)[0] for name in names for depth in range(1, name.count(".") + 1)}
        if names:
            self.patched_within.add("")

    def _invalidate(self) -> None:
        """Tree's own `_invalidate` asks for a layout of the whole screen on every change, because a tree may size
        itself to its labels; this one's size is fixed by the stylesheet, so a repaint of the tree is enough (it
        takes a full-screen layout out of every filter keystroke)."""
        self._clear_line_cache()
        self._updates += 1
        self.root._reset()
        self.refresh()

    def get_label_width(self, node: TreeNode[ModuleNode]) -> int:
        """The width Tree sizes its lines by, without rendering the label as Tree's default does (that rendered
        every row of a narrowed tree, up to 1,067, on every keystroke)."""
        icon = (self.ICON_NODE_EXPANDED if node.is_expanded else self.ICON_NODE) if node.allow_expand else ""
        return cell_len(icon) + node._label.cell_len

    def _line_styles(self) -> TreeLineStyles:
        component = self.get_component_rich_style
        guide = component("tree--guides", partial=True)
        return TreeLineStyles(
            base=self.rich_style,
            highlight_line=component("tree--highlight-line"),
            guide=guide,
            guide_hover=guide + component("tree--guides-hover", partial=True),
            guide_selected=guide + component("tree--guides-selected", partial=True),
            guide_hidden=self.get_component_styles("tree--guides").color.a == 0,
            guide_hover_hidden=self.get_component_styles("tree--guides-hover").color.a == 0,
            guide_selected_hidden=self.get_component_styles("tree--guides-selected").color.a == 0,
            label=component("tree--label", partial=True),
            highlight=component("tree--highlight", partial=True),
            cursor=component("tree--cursor", partial=False),
            has_focus=self.has_focus,
        )

    def render_lines(self, crop: Region) -> list[Strip]:
        self._repaint_styles = self._line_styles()
        try:
            return super().render_lines(crop)
        finally:
            self._repaint_styles = None

    def render_line(self, y: int) -> Strip:
        styles = self._repaint_styles or self._line_styles()
        scroll_x, scroll_y = self.scroll_offset
        return self._render_line(y + scroll_y, scroll_x, scroll_x + self.size.width, styles.base)

    def _render_line(self, y: int, x1: int, x2: int, base_style: Style) -> Strip:
        """Textual 8.2's `Tree._render_line`, drawing the same cells (a test compares them row by row), with the
        styles taken from one lookup per repaint (`TreeLineStyles`)."""
        tree_lines = self._tree_lines
        width = self.size.width
        if y >= len(tree_lines):
            return Strip.blank(width, base_style)
        line = tree_lines[y]
        is_hover = self.hover_line >= 0 and any(node._hover for node in line.path)
        cache_key = (
            y,
            is_hover,
            width,
            self._updates,
            self._pseudo_class_state,
            tuple(node._updates for node in line.path),
        )
        strip = self._line_cache.get(cache_key)
        if strip is None:
            styles = self._repaint_styles or self._line_styles()
            strip = self._line_cache[cache_key] = self._draw_line(line, y, width, is_hover, styles)
        return strip.crop(x1, x2)

    def _guides(self, style: Style, hidden: bool) -> tuple[str, str, str, str]:
        if not self.show_guides or hidden:
            lines: tuple[str, ...] = ("  ", "  ", "  ", "  ")
        elif style.bold:
            lines = self.LINES["bold"]
        else:
            lines = self.LINES["double"] if style.underline2 else self.LINES["default"]
        depth = max(0, self.guide_depth - 2)
        space, vertical, terminator, cross = (f"{chars[0]}{chars[1] * depth} " for chars in lines)
        return space, vertical, terminator, cross

    def _draw_line(self, line: Any, y: int, width: int, is_hover: bool, styles: TreeLineStyles) -> Strip:
        line_style = (styles.highlight_line if is_hover else styles.base) + Style(meta={"line": y})
        guides = Text(style=line_style)
        guide_style = styles.guide
        hover = line.path[0]._hover
        selected = line.path[0]._selected and styles.has_focus
        hidden = True
        for node in line.path[1:]:
            hidden = styles.guide_hidden
            if hover:
                guide_style, hidden = styles.guide_hover, styles.guide_hover_hidden
            if selected:
                guide_style, hidden = styles.guide_selected, styles.guide_selected_hidden
            if node != line.path[-1]:
                space, vertical, _, _ = self._guides(guide_style, hidden)
                guides.append(space if node.is_last else vertical, style=guide_style)
            hover = hover or node._hover
            selected = (selected or node._selected) and styles.has_focus
        if len(line.path) > 1:
            _, _, terminator, cross = self._guides(guide_style, hidden)
            guides.append(terminator if line.last else cross, style=guide_style)
        label_style = styles.label
        if self.hover_line == y:
            label_style += styles.highlight
        if self.cursor_line == y:
            label_style += styles.cursor
        label = self.render_label(line.path[-1], line_style, label_style).copy()
        label.stylize(Style(meta={"node": line.node._id}))
        guides.append(label)
        segments = list(guides.render(self.app.console))
        pad_width = max(self.virtual_size.width, width)
        return Strip(line_pad(segments, 0, pad_width - guides.cell_len, line_style))

    def show_modules(self, root: ModuleNode, title: str, open_all: bool = False) -> None:
        """Replace the tree with `root`, its first level open. With `open_all` (for a tree narrowed by the filter,
        where every row is a match or leads to one) every row is opened, but a folded run only through its first
        member, so that the run's other members stay one row each."""
        self.clear()
        self._populated.clear()
        self.root.data = root
        self.root.set_label(self._label(root, title))
        self._populate(self.root)
        self.root.expand()
        if open_all:
            self._open_below(self.root)
        # build the line index now rather than on the next idle, so that the new rows and size go out in the same
        # screen update (bench/RESULTS-tui.md)
        self._tree_lines

    def _open_below(self, node: TreeNode[ModuleNode]) -> None:
        folded_members_seen = False
        for child in node.children:
            data = child.data
            if data is None or not data.children:
                continue
            if node.data is not None and node.data.fold is not None:
                if folded_members_seen:
                    continue
                folded_members_seen = True
            self._populate(child)
            child.expand()
            self._open_below(child)

    def _populate(self, node: TreeNode[ModuleNode]) -> None:
        if id(node) in self._populated or node.data is None:
            return
        self._populated.add(id(node))
        for child in node.data.children:
            node.add(self._label(child), data=child, allow_expand=bool(child.children))

    def _label(self, node: ModuleNode, title: str | None = None) -> Text:
        info = node.info
        text = Text()
        if info is None and node.fold is None:  # a placeholder row ("no module matches ...")
            return Text(node.label, style="italic")
        if info is None:  # a folded run among unlike siblings
            text.append(node.fold.describe(), style="bold")
            members = [child.info.params for child in node.children if child.info is not None]
            text.append(f"  {format_count(sum(members))}", style="dim")
            if any(child.info.name in self.patched_within for child in node.children if child.info is not None):
                text.append("  [patched inside]", style="magenta")
            return text
        text.append(title or node.label, style="bold")
        if node.fold is not None:
            text.append(f" {node.fold.describe()}", style="bold")
        else:
            text.append(f"  {info.class_name}", style="cyan")
        text.append(f"  {format_count(info.params)}", style="dim")
        if info.name in self.patched:
            text.append("  [patched]", style="bold magenta")
        elif info.name in self.patched_within:
            text.append("  [patched inside]", style="magenta")
        return text

    def go_to(self, name: str) -> bool:
        """Open the path to module `name` and put the cursor on it; False when it is not in the tree."""
        if self.root.data is None:
            return False
        path = path_to(self.root.data, name)
        if not path:
            return False
        node = self.root
        for step in path[1:]:
            self._populate(node)
            node.expand()
            node = next(child for child in node.children if child.data is step)
        self._tree_lines  # rebuilds the line index now, so that `node._line` is current for move_cursor
        self.move_cursor(node)
        if node.data is not None and node.data.info is not None:
            # the root row survives `clear()`, so landing on it again posts no NodeHighlighted
            self.post_message(self.ModuleHighlighted(node.data.info))
        return True

    @on(Tree.NodeExpanded)
    def _expand_lazily(self, event: Tree.NodeExpanded[ModuleNode]) -> None:
        self._populate(event.node)

    @on(Tree.NodeHighlighted)
    def _report_highlight(self, event: Tree.NodeHighlighted[ModuleNode]) -> None:
        event.stop()
        data = event.node.data
        while data is not None and data.info is None:
            data = data.children[0] if data.children else None
        if data is not None and data.info is not None:
            self.post_message(self.ModuleHighlighted(data.info))

    def action_expand_node(self) -> None:
        if self.cursor_node is not None and self.cursor_node.allow_expand:
            self.cursor_node.expand()

    def action_collapse_node(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded:
            node.collapse()
        elif node.parent is not None:
            self.move_cursor(node.parent)


class ModuleDetails(Static):
    """The selected module's facts: class, defining module, file and line, parameters, dtype, device, processor;
    for the root, the model's config."""

    def show(
        self,
        info: ModuleInfo,
        patched: bool,
        config: dict[str, Any] | None = None,
        shapes: tuple[str, str, str] | None = None,
    ) -> None:
        """`shapes`: (video size traced at, inputs, outputs) as the core formatted them, when traced."""
        location = display_path(info.file) + (f":{info.line}" if info.line else "")
        facts: list[tuple[str | Text, str | Text]] = [
            ("module", info.name or "(root)"),
            ("class", info.class_name),
            ("defined in", info.class_module),
            ("file", location),
            ("params", f"{info.params:,} total, {info.own_params:,} own"),
            ("dtype", info.dtype or "-"),
            ("device", info.device or "-"),
        ]
        if info.processor is not None:
            processor = Text(f"{info.processor} ({info.processor_module})")
            if patched:
                processor.append("  patched", style="bold magenta")
            facts.append(("processor", processor))
        if shapes is not None:
            size, inputs, outputs = shapes
            facts += [("traced at", size), ("inputs", inputs), ("outputs", outputs)]
        grid = facts_table(facts)
        if not config:
            self.update(grid)
            return
        settings = facts_table(
            [(key, repr(value) if isinstance(value, str) else str(value)) for key, value in sorted(config.items())]
        )
        self.update(Group(grid, Rule("config", style="dim"), settings))


class SourceView(VerticalScroll):
    """Syntax-highlighted source, starting at the line where it begins in its file."""

    def compose(self) -> ComposeResult:
        yield Static(id="source-code", expand=True)

    def waiting(self, text: str) -> None:
        self.border_title = "source"
        self.query_one("#source-code", Static).update(Text(text, style="dim"))

    def show(self, source: SourceText | None, what: str) -> None:
        code = self.query_one("#source-code", Static)
        if source is None:
            self.border_title = what
            code.update(Text(f"no Python source for {what}", style="dim"))
        else:
            self.border_title = f"{source.title}  {source.location}"
            code.update(
                Syntax(
                    source.text.rstrip("\n"),
                    "python",
                    line_numbers=True,
                    start_line=source.start_line,
                    theme="ansi_dark",
                    word_wrap=False,
                    indent_guides=True,
                )
            )
        self.scroll_home(animate=False)


class PatchesPanel(Vertical):
    """Every registered patch with its summary and state; `space` applies or reverts the one under the cursor,
    `v` verifies it on a tiny model."""

    BINDINGS = [
        Binding("space", "toggle_patch", "Apply/revert", id="patches.toggle"),
        Binding("v", "verify_patch", "Verify", id="patches.verify"),
    ]

    @dataclass
    class ToggleRequested(Message):
        name: str

    @dataclass
    class VerifyRequested(Message):
        name: str

    def compose(self) -> ComposeResult:
        table: DataTable[Any] = DataTable(id="patches-table", cursor_type="row", zebra_stripes=False)
        table.add_columns("patch", "state", "verify", "summary")
        yield table
        yield Static(id="patches-note")

    def show_rows(self, rows: list[PatchRow]) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            state = Text("applied", style="bold magenta") if row.applied else Text("off", style="dim")
            # Text, not str: a summary such as "[text ; video]" is not markup
            table.add_row(Text(row.name), state, Text(row.verdict or "-"), Text(row.summary), key=row.name)
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))

    def note(self, text: str) -> None:
        note = self.query_one("#patches-note", Static)
        note.update(Text(text))
        note.display = bool(text)

    def _current(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_toggle_patch(self) -> None:
        name = self._current()
        if name is not None:
            self.post_message(self.ToggleRequested(name))

    def action_verify_patch(self) -> None:
        name = self._current()
        if name is not None:
            self.post_message(self.VerifyRequested(name))


def source_for(info: ModuleInfo) -> tuple[SourceText | None, str]:
    """What the source view shows for a module: an attention module's processor `__call__` (the patched one
    while a patch is on), else the module's class."""
    from cogsurgeon.inspector.source import class_source, processor_call_source

    if info.processor is not None:
        return processor_call_source(info.processor_module, info.processor), f"{info.processor}.__call__"
    return class_source(info.class_module, info.class_name), f"class {info.class_name}"
