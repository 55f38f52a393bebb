"""Small widgets of the main screen: the module tree, the details of one module with its source, the patches panel.

Each renders values the core produced (`ModuleNode`, `ModuleInfo`, `SourceText`, `PatchInfo`) and posts small
messages; none of them touches a model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Group
from rich.rule import Rule
from rich.segment import Segment
from rich.style import Style
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import Reactive, reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import DataTable, Input, LoadingIndicator, Static

from cogsurgeon.inspector.browse import format_count
from cogsurgeon.inspector.inventory import ModuleInfo
from cogsurgeon.inspector.module_tree import ModuleNode, TreeRow, keys_to, opened_for_filter, visible_rows
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
        self.started = time.monotonic()

    def on_mount(self, event: events.Mount) -> None:
        event.prevent_default()  # LoadingIndicator's own handler would set 16 frames a second
        self.auto_refresh = 1.0

    def render(self) -> Text:
        seconds = int(time.monotonic() - self.started)
        return Text(f"● {self.what}  {seconds} s", style="dim")


class FilterInput(Input):
    """The tree's filter: fixed width, its text scrolls inside it. A change of its text's size (`virtual_size`) is
    a repaint, not a layout of the whole screen: Widget declares `virtual_size` with `layout=True`, and every
    layout also repaints the scroll views' scrollbars one screen update (a 60 fps tick) later; the text changes
    size on every filter keystroke, which cost it an extra screen update."""

    virtual_size: Reactive[Size] = Reactive(Size(0, 0))


@dataclass(frozen=True)
class TreeStyles:
    """The styles one repaint of the module tree draws with, looked up once per repaint rather than per row."""

    base: Style
    hover_line: Style
    guide: Style
    guide_hover: Style
    guide_selected: Style
    label: Style
    hover_label: Style
    cursor: Style
    has_focus: bool


@dataclass(frozen=True)
class _DrawnLabel:
    """A tree row's label: its parts (text, style name), the same with the styles parsed, and its width in cells;
    drawn on every repaint, made once per tree."""

    parts: tuple[tuple[str, str], ...]
    pieces: tuple[tuple[str, Style], ...]
    cells: int

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.parts)


@dataclass(frozen=True)
class _DrawnLines:
    """What the module tree's lines on screen show: `frame` is what every line's drawing depends on (scroll
    offset, size, focus, the cursor's and the hovered row), `lines` each line's row (None below the last row)."""

    frame: tuple[Any, ...]
    lines: tuple[tuple[Any, ...] | None, ...]


class ModuleTree(ScrollView, can_focus=True):
    """The module hierarchy, drawn line by line over `visible_rows` (toolong's `LogLines` is the model): a
    keystroke of the filter rebuilds a flat list of rows and repaints those of the ~40 on screen that changed,
    whatever the model's size. Folded runs read `transformer_blocks (0-41): 42 × CogVideoXBlock`; it looks like
    Textual's Tree."""

    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False, id="tree.up"),
        Binding("down", "move(1)", "Down", show=False, id="tree.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="tree.page-up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="tree.page-down"),
        Binding("home", "move_to(0)", "First row", show=False, id="tree.home"),
        Binding("end", "move_to(-1)", "Last row", show=False, id="tree.end"),
        Binding("right", "set_open(True)", "Expand", show=False, id="tree.expand"),
        Binding("left", "collapse_node", "Collapse", show=False, id="tree.collapse"),
        Binding("enter,space", "set_open", "Open/close", show=False, id="tree.toggle"),
    ]

    COMPONENT_CLASSES = {
        "module-tree--cursor",
        "module-tree--guides",
        "module-tree--guides-hover",
        "module-tree--guides-selected",
        "module-tree--highlight",
        "module-tree--highlight-line",
        "module-tree--label",
    }

    # Textual's Tree's look, for its own component classes
    DEFAULT_CSS = """
    ModuleTree {
        background: $surface;
        color: $foreground;
        overflow-x: hidden;
        & > .module-tree--guides { color: $surface-lighten-2; }
        & > .module-tree--guides-hover { color: $surface-lighten-2; }
        & > .module-tree--guides-selected { color: $block-cursor-blurred-background; }
        & > .module-tree--cursor {
            text-style: $block-cursor-blurred-text-style;
            background: $block-cursor-blurred-background;
        }
        & > .module-tree--highlight-line { background: $block-hover-background; }
        &:focus {
            background-tint: $foreground 5%;
            & > .module-tree--cursor {
                color: $block-cursor-foreground;
                background: $block-cursor-background;
                text-style: $block-cursor-text-style;
            }
            & > .module-tree--guides { color: $surface-lighten-3; }
            & > .module-tree--guides-hover { color: $surface-lighten-3; }
            & > .module-tree--guides-selected { color: $block-cursor-background; }
        }
        &:light {
            & > .module-tree--guides { color: $surface-darken-1; }
            & > .module-tree--guides-hover { color: $block-cursor-background; }
            & > .module-tree--guides-selected { color: $block-cursor-background; }
        }
    }
    ModuleTree:ansi {
        color: ansi_default;
        & > .module-tree--guides { color: $ansi-background; }
        &:nocolor > .module-tree--cursor { text-style: reverse; }
    }
    """

    ICON_CLOSED = "▶ "
    ICON_OPEN = "▼ "
    GUIDES = ("  ", "│ ", "└ ", "├ ")  # space, vertical, last child, middle child
    GUIDE_CELLS = cell_len(GUIDES[0])
    ICON_CELLS = cell_len(ICON_OPEN)

    cursor_line: reactive[int] = reactive(0)  # a change repaints: the cursor row and the guides below it
    hover_line: reactive[int] = reactive(-1)

    @dataclass
    class ModuleHighlighted(Message):
        """The cursor moved onto a module (a group row reports its first member)."""

        info: ModuleInfo

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root: ModuleNode = ModuleNode("(no model)", None)
        self.title = ""
        self.expanded: set[str] = {""}
        self.rows: list[TreeRow] = visible_rows(self.root, self.expanded)
        self.line_of: dict[str, int] = {"": 0}
        self.patched: set[str] = set()
        self.patched_within: set[str] = set()
        self._labels: dict[str, _DrawnLabel] = {}
        self._styles: TreeStyles | None = None

    # what is shown

    def show_modules(self, root: ModuleNode, title: str, open_all: bool = False) -> None:
        """Replace the tree with `root`, its first level open; with `open_all` (a tree narrowed by the filter, where
        every row is a match or leads to one) every row open but a folded run only through its first member. The
        cursor stays on the same row when the new tree has it, else goes to the first; no highlight is posted."""
        cursor_key = self.cursor_row.key if self.cursor_row is not None else ""
        drawn = self._drawn_lines()
        self.root, self.title = root, title
        self.expanded = opened_for_filter(root) if open_all else {""}
        self._labels.clear()
        self._rebuild(cursor_key, drawn)

    def set_patched(self, names: set[str]) -> None:
        """Mark these modules as patched, and their ancestors (a folded row too) as holding patched modules."""
        self.patched = set(names)
        self.patched_within = {name.rsplit(".", depth)[0] for name in names for depth in range(1, name.count(".") + 1)}
        if names:
            self.patched_within.add("")
        self._labels.clear()
        self.refresh()

    @property
    def cursor_row(self) -> TreeRow | None:
        return self.rows[self.cursor_line] if 0 <= self.cursor_line < len(self.rows) else None

    @property
    def hover_row(self) -> TreeRow | None:
        return self.rows[self.hover_line] if 0 <= self.hover_line < len(self.rows) else None

    def _rebuild(self, cursor_key: str | None = None, drawn: _DrawnLines | None = None) -> None:
        """Flatten the open rows again, keep the cursor on `cursor_key` when it is still shown, and size the
        scrollable area: a repaint, with a layout only when the scrollbar appears or goes. Given what the screen
        showed before (`drawn`), only the lines that now show something else are drawn again: the next character
        typed into the filter often leaves the narrowed tree's rows on screen as they were."""
        self.rows = visible_rows(self.root, self.expanded)
        self.line_of = {row.key: line for line, row in enumerate(self.rows)}
        if cursor_key is not None:
            self.set_reactive(ModuleTree.cursor_line, self.line_of.get(cursor_key, 0))
        height = len(self.rows)
        visible_height = self.scrollable_content_region.height
        size = Size(0, height)
        if not self.is_mounted:
            self.virtual_size = size
            self.refresh()
            return
        show_scrollbar = height > visible_height
        self.set_reactive(ModuleTree.virtual_size, size)
        if show_scrollbar != self.show_vertical_scrollbar:
            # The layout that places (or removes) the scrollbar is needed; telling the scroll view now rather than
            # letting that layout find out saves a second layout and a third repaint, each on its own 60 fps tick.
            # Not a repaint of every line (as setting the reactives would ask): the lines are refreshed below.
            self.set_reactive(ModuleTree.show_vertical_scrollbar, show_scrollbar)
            self.vertical_scrollbar.display = show_scrollbar
            self.refresh(layout=True, repaint=False)
        if show_scrollbar:
            bar = self.vertical_scrollbar
            bar.window_virtual_size, bar.window_size = height, visible_height
        self.scroll_y = min(self.scroll_y, self.max_scroll_y)
        # the scrollbar is drawn over the lines' last cell, so the lines stay as they are when it comes or goes
        now = self._drawn_lines() if drawn is not None else None
        if now is None or drawn is None or drawn.frame != now.frame:
            self.refresh()
            return
        for first, count in _changed_runs(drawn.lines, now.lines):
            self.refresh_lines(int(self.scroll_y) + first, count)

    def _drawn_lines(self) -> _DrawnLines:
        """What the lines on screen show, as far as `render_line` draws it."""
        cursor, hover = self.cursor_row, self.hover_row
        width, height = self.size
        frame = (int(self.scroll_y), width, height, self.has_focus, self.cursor_line, self.hover_line,
                 cursor.key if cursor is not None else None, hover.key if hover is not None else None)
        top = int(self.scroll_y)
        lines = tuple(
            (row.key, row.lasts, row.expanded, row.expandable, self._label_of(row).parts) if row is not None else None
            for row in (self.rows[line] if line < len(self.rows) else None for line in range(top, top + height))
        )
        return _DrawnLines(frame, lines)

    # moving

    def go_to(self, name: str) -> bool:
        """Open the path to module `name` and put the cursor on it (posting its highlight); False when it is not
        in the tree."""
        keys = keys_to(self.root, name)
        if not keys:
            return False
        self.expanded.update(keys[:-1])
        self._rebuild()
        self.move_cursor(self.line_of[keys[-1]], always_post=True)
        return True

    def move_cursor(self, line: int, always_post: bool = False) -> None:
        """Put the cursor on `line` (clamped), scroll it into view and post the module it stands for."""
        line = max(0, min(line, len(self.rows) - 1))
        moved = line != self.cursor_line
        self.cursor_line = line
        if self.is_mounted and self.scrollable_content_region.height:
            if line < self.scroll_y:
                self.scroll_y = line
            elif line >= self.scroll_y + self.scrollable_content_region.height:
                self.scroll_y = line - self.scrollable_content_region.height + 1
        module = self.rows[line].module
        if (moved or always_post) and module is not None:
            self.post_message(self.ModuleHighlighted(module))

    def set_open(self, line: int, is_open: bool | None = None) -> None:
        """Open or close the row at `line`; `is_open` None toggles it."""
        row = self.rows[line] if 0 <= line < len(self.rows) else None
        if row is None or not row.expandable or row.expanded == is_open:
            return
        if row.expanded:
            self.expanded.discard(row.key)
        else:
            self.expanded.add(row.key)
        self._rebuild(self.cursor_row.key if self.cursor_row is not None else None)

    def action_move(self, rows: int) -> None:
        self.move_cursor(self.cursor_line + rows)

    def action_page(self, pages: int) -> None:
        self.action_move(pages * max(1, self.scrollable_content_region.height - 1))

    def action_move_to(self, line: int) -> None:
        """Put the cursor on `line`; a negative one counts from the last row."""
        self.move_cursor(line % len(self.rows))

    def action_set_open(self, is_open: bool | None = None) -> None:
        self.set_open(self.cursor_line, is_open)

    def action_collapse_node(self) -> None:
        row = self.cursor_row
        if row is None:
            return
        if row.expanded:
            self.set_open(self.cursor_line, False)
        elif row.key:
            self.move_cursor(self.line_of[row.key.rsplit("/", 1)[0]])

    # the mouse: each drawn cell carries its line (and the icon a toggle) in its style's metadata

    def on_click(self, event: events.Click) -> None:
        meta = event.style.meta
        if "line" not in meta:
            return
        if not meta.get("toggle"):
            self.move_cursor(meta["line"])
        self.set_open(meta["line"])

    def on_mouse_move(self, event: events.MouseMove) -> None:
        self.hover_line = event.style.meta.get("line", -1)

    def on_leave(self, event: events.Leave) -> None:
        self.hover_line = -1

    # drawing

    def _line_styles(self) -> TreeStyles:
        component = self.get_component_rich_style
        guide = component("module-tree--guides", partial=True)
        label = component("module-tree--label", partial=True)
        return TreeStyles(
            base=self.rich_style,
            hover_line=component("module-tree--highlight-line"),
            guide=guide,
            guide_hover=guide + component("module-tree--guides-hover", partial=True),
            guide_selected=guide + component("module-tree--guides-selected", partial=True),
            label=label,
            hover_label=label + component("module-tree--highlight", partial=True),
            cursor=component("module-tree--cursor", partial=False),
            has_focus=self.has_focus,
        )

    def render_lines(self, crop: Region) -> list[Strip]:
        self._styles = self._line_styles()
        try:
            return super().render_lines(crop)
        finally:
            self._styles = None

    def render_line(self, y: int) -> Strip:
        styles = self._styles or self._line_styles()
        width = self.size.width
        line = y + int(self.scroll_y)
        if not 0 <= line < len(self.rows):
            return Strip.blank(width, styles.base)
        row = self.rows[line]
        cursor = self.cursor_row
        hover = self.hover_row
        line_style = (styles.hover_line if hover is not None and _within(row.key, hover.key) else styles.base)
        line_style += Style(meta={"line": line})
        # guides at a depth below the cursor's (or the hovered) row, on rows inside it, take its guide style
        under_cursor = styles.has_focus and cursor is not None and _within(row.key, cursor.key)
        below_cursor = cursor.depth if under_cursor else None
        below_hover = hover.depth if hover is not None and _within(row.key, hover.key) else None
        # the segments Rich's Text would render for guides, icon and label appended to a Text styled `line_style`,
        # built directly: each piece's style is `line_style` plus its own, as Text.render combines them
        segments: list[Segment] = []
        space, vertical, terminator, cross = self.GUIDES
        for level, last in enumerate(row.lasts):
            guide_style = styles.guide
            if below_hover is not None and level >= below_hover:
                guide_style = styles.guide_hover
            if below_cursor is not None and level >= below_cursor:
                guide_style = styles.guide_selected
            if level < row.depth - 1:
                segments.append(Segment(space if last else vertical, line_style + guide_style))
            else:
                segments.append(Segment(terminator if last else cross, line_style + guide_style))
        if row.expandable:
            icon_style = line_style + Style(meta={"toggle": True})
            segments.append(Segment(self.ICON_OPEN if row.expanded else self.ICON_CLOSED, line_style + icon_style))
        label_style = styles.hover_label if line == self.hover_line else styles.label
        if line == self.cursor_line:
            label_style += styles.cursor
        label = self._label_of(row)
        segments += [Segment(text, line_style + style + label_style) for text, style in label.pieces]
        cells = self.GUIDE_CELLS * row.depth + (self.ICON_CELLS if row.expandable else 0) + label.cells
        return Strip(segments, cells).extend_cell_length(width, line_style).crop(0, width)

    def _label_of(self, row: TreeRow) -> _DrawnLabel:
        label = self._labels.get(row.key)
        if label is None:
            parts = tuple(part for part in self._label(row.node, self.title if not row.key else None) if part[0])
            get_style = self.app.console.get_style
            pieces = tuple((text, get_style(style)) for text, style in parts)
            label = self._labels[row.key] = _DrawnLabel(parts, pieces, sum(cell_len(text) for text, _ in parts))
        return label

    def _label(self, node: ModuleNode, title: str | None = None) -> list[tuple[str, str]]:
        """The label's parts, each a text and its style."""
        info = node.info
        if info is None and node.fold is None:  # a placeholder row ("no module matches ...")
            return [(node.label, "italic")]
        if info is None:  # a folded run among unlike siblings
            members = [child.info.params for child in node.children if child.info is not None]
            parts = [(node.fold.describe(), "bold"), (f"  {format_count(sum(members))}", "dim")]
            if any(child.info.name in self.patched_within for child in node.children if child.info is not None):
                parts.append(("  [patched inside]", "magenta"))
            return parts
        parts = [(self._fitted_title(title, node, info) if title else node.label, "bold")]
        if node.fold is not None:
            parts.append((f" {node.fold.describe()}", "bold"))
        else:
            parts.append((f"  {info.class_name}", "cyan"))
        parts.append((f"  {format_count(info.params)}", "dim"))
        if info.name in self.patched:
            parts.append(("  [patched]", "bold magenta"))
        elif info.name in self.patched_within:
            parts.append(("  [patched inside]", "magenta"))
        return parts

    def _fitted_title(self, title: str, node: ModuleNode, info: ModuleInfo) -> str:
        """The root's title (a model name, or a folder's path) with its middle elided so that the root's label fits
        the tree's width: the class and size after it stay in view (a long path cut them off at 80 columns)."""
        width = self.scrollable_content_region.width if self.is_mounted else 0
        rest = len(f" {info.class_name}  {format_count(info.params)}") + 4 + len(self.ICON_OPEN)
        room = width - rest
        if not width or len(title) <= room or room < 12:
            return title
        keep = room - 1
        return f"{title[:keep // 2]}…{title[len(title) - (keep - keep // 2):]}"

    def on_resize(self) -> None:
        self._labels.pop("", None)  # the root's title is fitted to the width


def _changed_runs(before: Sequence[object], after: Sequence[object]) -> list[tuple[int, int]]:
    """The runs of positions where `before` and `after` differ, as (first, count)."""
    runs: list[tuple[int, int]] = []
    for index, (old, new) in enumerate(zip(before, after)):
        if old == new:
            continue
        if runs and sum(runs[-1]) == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def _within(key: str, ancestor_key: str) -> bool:
    """Whether the row `key` is the row `ancestor_key` or lies below it."""
    return key == ancestor_key or key.startswith(ancestor_key + "/") or ancestor_key == ""


class ModuleDetails(Static):
    """The selected module's facts: class, defining module, file and line, parameters, dtype, device, processor;
    for the root, the model's config."""

    def waiting(self, text: str) -> None:
        self.update(Text(text, style="dim"))

    def show(
        self,
        info: ModuleInfo,
        patched: bool,
        config: dict[str, Any] | None = None,
        shapes: tuple[str, str, str] | None = None,
        kv_cache: str | None = None,
    ) -> None:
        """`shapes`: (video size traced at, inputs, outputs) as the core formatted them, when traced; `kv_cache`: what
        a streaming KV cache holds at that size (the root only)."""
        location = display_path(info.file) + (f":{info.line}" if info.line else "")
        facts: list[tuple[str | Text, str | Text]] = [
            ("module", info.name or "(root)"),
            ("class", info.class_name),
            ("file", location),  # third: shown even where the details get three lines (80x24)
            ("defined in", info.class_module),
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
        if kv_cache:
            facts.append(("KV cache", kv_cache))
        grid = facts_table(facts)
        if not config:
            self.update(grid)
            return
        settings = facts_table(
            [(key, repr(value) if isinstance(value, str) else str(value)) for key, value in sorted(config.items())]
        )
        self.update(Group(grid, Rule("config", style="dim"), settings))


class LexedOnceSyntax(Syntax):
    """Rich's `Syntax`, lexing a source once: `Syntax` lexes the whole source on every render, and Textual renders the
    source view several times while it lays a screen out (opening the tiny model: 5 renders of 2 views of the same
    source; the lexing was 0.5 s of the 3.5 s of CPU three openings took, cProfile). The lexed text is kept for the
    last few (source, theme) pairs and each render gets a copy; everything after lexing is Rich's own."""

    LEXED_KEPT = 8
    lexed: dict[tuple[Any, ...], Text] = {}

    def __init__(self, code: str, *, theme: str, **options: Any) -> None:
        super().__init__(code, "python", theme=theme, **options)
        self.theme_name = theme

    def highlight(self, code: str, line_range: tuple[int | None, int | None] | None = None) -> Text:
        key = (code, line_range, self.theme_name, self.tab_size, self.word_wrap, self.background_color,
               self.dedent, self.line_numbers)
        text = self.lexed.get(key)
        if text is None:
            text = super().highlight(code, line_range)
            if len(self.lexed) >= self.LEXED_KEPT:
                self.lexed.pop(next(iter(self.lexed)))
            self.lexed[key] = text
        return text.copy()


class SourceView(VerticalScroll):
    """Syntax-highlighted source, starting at the line where it begins in its file; its colours follow the app's
    theme (light or dark), redrawn when the theme changes."""

    shown: tuple[SourceText | None, str] | None = None  # what `show` was last given, redrawn on a theme change

    def compose(self) -> ComposeResult:
        yield Static(id="source-code", expand=True)

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, self._theme_changed)

    @property
    def syntax_theme(self) -> str:
        return "ansi_dark" if self.app.current_theme.dark else "ansi_light"

    def _theme_changed(self, theme: Any) -> None:
        if self.shown is not None:
            self.show(*self.shown)

    def waiting(self, text: str) -> None:
        self.shown = None
        self.border_title = "source" if not text.startswith("loading") else text
        code = self.query_one("#source-code", Static)
        code.styles.height = "auto"
        code.update(Text(text, style="dim"))

    def show(self, source: SourceText | None, what: str) -> None:
        self.shown = (source, what)
        code = self.query_one("#source-code", Static)
        if source is None:
            self.border_title = what
            code.styles.height = "auto"
            code.update(Text(f"no Python source for {what}", style="dim"))
        else:
            self.border_title = f"{source.title}  {source.location}"
            text = source.text.rstrip("\n")
            # One line per source line (no wrapping): a height Textual need not render the whole source to measure.
            code.styles.height = text.count("\n") + 1
            code.update(
                LexedOnceSyntax(
                    text,
                    line_numbers=True,
                    start_line=source.start_line,
                    theme=self.syntax_theme,
                    word_wrap=False,
                    indent_guides=True,
                )
            )
        self.scroll_home(animate=False)


class PatchTable(DataTable[Any]):
    """The patches' rows: Home/End and PageUp/PageDown move the cursor, as in the tree (DataTable's own Home/End scroll
    sideways and leave the cursor where it was). Long cells are cut to the width the table has, never scrolled to:
    Enter shows the whole row in a popup."""

    BINDINGS = [
        Binding("home", "scroll_top", "First", show=False),
        Binding("end", "scroll_bottom", "Last", show=False),
    ]  # PageUp/PageDown: DataTable's own move the cursor


class PatchesPanel(Vertical):
    """Every registered patch with its state, verify verdict, options and summary; `space` applies or reverts the
    one under the cursor, `v` verifies it on the tiny models, `o` edits its options."""

    BINDINGS = [
        # not in the footer, which they would push past 80 columns: the panel's border lists them (KEYS_HINT)
        Binding("space", "request('toggle')", "Apply/revert", id="patches.toggle", show=False),
        Binding("v", "request('verify')", "Verify", id="patches.verify", show=False),
        Binding("o", "request('options')", "Options", id="patches.options", show=False),
        # listed by ?: the table's own Enter selects the row, which asks for it (`_row_selected`)
        Binding("enter", "request('show')", "Whole row (options, summary)", id="patches.show", show=False),
    ]
    KEYS_HINT = "space apply/revert · v verify · o options · enter whole row"
    HEADINGS = ("patch", "state", "verify", "options", "summary")
    FIXED_COLUMNS = 2  # patch and state: shown whole; verify, options and summary share what is left

    @dataclass
    class Requested(Message):
        """The user asked to `toggle`, `verify` or edit the `options` of patch `name`."""

        name: str
        what: str

    def compose(self) -> ComposeResult:
        table = PatchTable(id="patches-table", cursor_type="row", zebra_stripes=False)
        self.columns = table.add_columns(*self.HEADINGS)
        yield table

    def show_rows(self, rows: list[PatchRow]) -> None:
        """Show `rows`. The same patches as before are updated cell by cell, so the cursor and the scroll position
        stay where the user left them: an action always applies to the row that was under the cursor."""
        self.rows = rows
        table = self.query_one(DataTable)
        room = self._room(rows)
        cells = self._fitted_rows(rows, room)
        if [str(key.value) for key in table.rows] == [row.name for row in rows] and room == self._room_used:
            for row, values in zip(rows, cells):
                for column, value in zip(self.columns, values):
                    table.update_cell(row.name, column, value, update_width=True)
            return
        # other patches, or another width (a column only grows in place): rebuilt, the cursor and scroll kept
        self._room_used = room
        cursor, scroll_y = table.cursor_row, table.scroll_y
        table.clear(columns=True)
        self.columns = table.add_columns(*self.HEADINGS)
        for row, values in zip(rows, cells):
            table.add_row(*values, key=row.name)
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1), scroll=False)
            table.scroll_to(y=scroll_y, animate=False, immediate=True)

    rows: list[PatchRow] = []
    _room_used = 0

    def on_resize(self) -> None:
        if self.rows:
            self.show_rows(self.rows)

    def _room(self, rows: list[PatchRow]) -> int:
        """The columns that verdict, options and summary share: the table's width less the whole columns before them,
        DataTable's padding of one cell each side of every column, and the scrollbar."""
        width = self.scrollable_content_region.width or self.app.size.width - 2  # the panel's, inside its border
        fixed = sum(max((self._cells(row)[index].cell_len for row in rows), default=len(self.HEADINGS[index]))
                    for index in range(self.FIXED_COLUMNS))
        return max(width - fixed - 2 * self.FIXED_COLUMNS - 2 - 2, 40)

    @staticmethod
    def shared_widths(needed: list[int], room: int) -> list[int]:
        """Widths for the columns after the fixed ones (verdict, options, summary), which share `room` columns: each
        gets what its longest cell needs while leaving 12 (and its padding) to every column after it; the last gets
        what is left."""
        widths = []
        for index, need in enumerate(needed):
            later = len(needed) - index - 1
            room -= 2  # DataTable pads each column by one cell on each side
            width = max(min(need, room - 14 * later), 1) if later else max(room, 1)
            widths.append(width)
            room -= width
        return widths

    @classmethod
    def _fitted_rows(cls, rows: list[PatchRow], room: int) -> list[tuple[Text, ...]]:
        """Every row's cells, those after the fixed columns cut with … to the widths they share."""
        cells = [cls._cells(row) for row in rows]
        fixed = cls.FIXED_COLUMNS
        needed = [max((row[index].cell_len for row in cells), default=0) for index in range(fixed, len(cls.HEADINGS))]
        widths = cls.shared_widths(needed, room)
        fitted = []
        for row in cells:
            shared = []
            for cell, width in zip(row[fixed:], widths):
                cell = cell.copy()
                cell.truncate(width, overflow="ellipsis")
                shared.append(cell)
            fitted.append((*row[:fixed], *shared))
        return fitted

    @staticmethod
    def _cells(row: PatchRow) -> tuple[Text, ...]:
        state = Text("applied", style="bold magenta") if row.applied else Text("off", style="dim")
        # Text, not str: a summary such as "[text ; video]" is not markup
        return Text(row.name), state, Text(row.verdict or "-"), Text(row.options_text), Text(row.summary)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.Requested(str(event.row_key.value), "show"))

    def action_request(self, what: str) -> None:
        table = self.query_one(DataTable)
        if table.row_count:
            name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.post_message(self.Requested(str(name), what))


def source_for(info: ModuleInfo) -> tuple[SourceText | None, str]:
    """What the source view shows for a module: an attention module's processor `__call__` (the patched one
    while a patch is on), else the module's class."""
    from cogsurgeon.inspector.source import class_source, processor_call_source

    if info.processor is not None:
        return processor_call_source(info.processor_module, info.processor), f"{info.processor}.__call__"
    return class_source(info.class_module, info.class_name), f"class {info.class_name}"


__all__ = [
    "FilterInput", "ModuleDetails", "ModuleTree", "PatchesPanel", "SlowLoadingIndicator", "SourceView", "facts_table",
    "source_for",
]
