"""The attention x-ray viewer: a layer × head overview coloured by head kind, the selected head's group×group mass as
a heat map with its statistics, per-word maps drawn per frame in half-block cells, step and batch selectors, and
export of the view as PNG (Pillow) and of its numbers as CSV and JSON.

A view over an `AttentionRecording` (`inspector.attention_recording`): every number shown was computed by the core.
Opened by `cogsurgeon attention show FILE` (`run_viewer`) or with `a` on the main screen, which records one seeded
forward of the open model in a worker (`AttentionScreen.recording_of`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from cogsurgeon.inspector.interrupts import interruptible
from cogsurgeon.inspector.tui.messages import ReportsWorkerFailures
from cogsurgeon.inspector.user_files import describe_os_error, write_atomically

KIND_COLOURS = {"spatial": "#4caf50", "temporal": "#42a5f5", "text": "#ffca28", "mixed": "#ec407a", None: "#757575"}
KIND_LETTERS = {"spatial": "S", "temporal": "T", "text": "X", "mixed": "M", None: "·"}
RAMP = ((0.0, (13, 8, 135)), (0.5, (204, 71, 120)), (1.0, (240, 249, 33)))  # plasma-like: low dark, high bright


def ramp_colour(value: float) -> tuple[int, int, int]:
    """A value in [0, 1] as an RGB colour of the heat ramp (clamped)."""
    value = min(1.0, max(0.0, value))
    for (start, low), (end, high) in zip(RAMP, RAMP[1:]):
        if value <= end:
            t = (value - start) / (end - start)
            return tuple(round(a + (b - a) * t) for a, b in zip(low, high))  # type: ignore[return-value]
    return RAMP[-1][1]


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


@dataclass(frozen=True)
class ViewState:
    """What the screen shows: one layer, head, step, batch item and (when maps were kept) word."""

    layer: int = 0
    head: int = 0
    step: int = 0
    batch: int = 0
    word: int = 0


# -- what the widgets render (pure functions of the recording and the state) ------------------------------------


def overview_text(recording: Any, state: ViewState) -> Text:
    """One row per layer, one cell per head, coloured by head kind; the selected head reversed."""
    text = Text()
    width = len(str(len(recording.layers) - 1))
    text.append(" " * (width + 2) + "heads 0-" + str(recording.heads - 1) + "\n", style="dim")
    for layer in range(len(recording.layers)):
        text.append(f"L{layer:<{width}} ", style="bold" if layer == state.layer else "dim")
        for head, stats in enumerate(recording.head_stats(layer, state.step, state.batch)):
            style = f"black on {KIND_COLOURS[stats.kind]}"
            if (layer, head) == (state.layer, state.head):
                style = f"bold {KIND_COLOURS[stats.kind]} on white"  # the selected head stands out
            text.append(KIND_LETTERS[stats.kind], style=style)
        text.append("\n")
    text.append("S spatial  ", style=KIND_COLOURS["spatial"])
    text.append("T temporal\n", style=KIND_COLOURS["temporal"])
    text.append("X text     ", style=KIND_COLOURS["text"])
    text.append("M mixed", style=KIND_COLOURS["mixed"])
    return text


def facts_text(recording: Any, state: ViewState) -> Text:
    stats = recording.head_stats(state.layer, state.step, state.batch)[state.head]
    text = Text()
    text.append(f"{recording.layers[state.layer]}  head {state.head}  ", style="bold")
    text.append(f"step {state.step}/{recording.steps - 1}  batch {state.batch}/{recording.batch - 1}\n")
    text.append(f"kind {stats.kind or '- (needs groups=frames)'}", style=KIND_COLOURS[stats.kind])
    for label, value in (("video→text", stats.video_to_text), ("text→video", stats.text_to_video),
                         ("own frame", stats.own_frame), ("first-frame sink", stats.first_frame_sink),
                         ("text sink", stats.text_sink)):
        text.append(f"  {label} " + ("-" if value is None else f"{value:.3f}"))
    return text


def heatmap_text(recording: Any, state: ViewState) -> Text:
    """The group×group mass of the selected head: rows are query groups, columns key groups, two cells per value."""
    mass = recording.mass(state.layer, state.step, state.batch)[state.head]
    names = recording.groups
    label_width = min(12, max(len(name) for name in names))
    text = Text(f"{'query ↓ key →':<{label_width}} mass (mean attention of a group's queries on each key group)\n",
                style="dim")
    for row, name in enumerate(names):
        text.append(f"{name[:label_width]:<{label_width}} ")
        for value in mass[row].tolist():
            text.append("  ", style=f"on {_hex(ramp_colour(value))}")
        text.append(f" {mass[row].max().item():.2f}\n", style="dim")
    return text


def word_map_text(recording: Any, state: ViewState, columns: int = 78) -> Text:
    """Each video token's attention on the selected word, per frame, two rows of tokens per character (▀: the
    upper token is the foreground, the lower the background), scaled to the map's largest value."""
    if not recording.words:
        return Text("no word maps in this recording (record with words=... / --words I,J)", style="dim")
    position, label = recording.words[state.word]
    values = recording.word_map(position, state.layer, state.step, state.batch, head=state.head)
    frames, height, width = values.shape
    top = float(values.max()) or 1.0
    per_line = max(1, (columns + 1) // (width + 1))
    text = Text(f"word {position} {label!r} (w: next word), largest {top:.3f}\n", style="bold")
    for first in range(0, frames, per_line):
        shown = range(first, min(frames, first + per_line))
        text.append(" ".join(f"f{frame:<{width - 1}}"[:width] for frame in shown) + "\n", style="dim")
        for y in range(0, height, 2):
            for frame in shown:
                for x in range(width):
                    upper = _hex(ramp_colour(float(values[frame, y, x]) / top))
                    lower = _hex(ramp_colour(float(values[frame, y + 1, x]) / top)) if y + 1 < height else "#000000"
                    text.append("▀", style=f"{upper} on {lower}")
                text.append(" ")
            text.append("\n")
    return text


# -- exports ---------------------------------------------------------------------------------------------------


def view_numbers(recording: Any, state: ViewState) -> dict[str, Any]:
    """The numbers of the view: the selected head's mass, its statistics, the word map when there is one."""
    from dataclasses import asdict

    document = {
        "layer": recording.layers[state.layer], "head": state.head, "step": state.step, "batch": state.batch,
        "groups": recording.groups,
        "mass": recording.mass(state.layer, state.step, state.batch)[state.head].tolist(),
        "stats": asdict(recording.head_stats(state.layer, state.step, state.batch)[state.head]),
    }
    if recording.words:
        position, label = recording.words[state.word]
        document["word"] = {"index": position, "label": label, "map": recording.word_map(
            position, state.layer, state.step, state.batch, head=state.head).tolist()}
    return document


def mass_csv(recording: Any, state: ViewState) -> str:
    """The selected head's mass as CSV: a header of key groups, one row per query group."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["query \\ key", *recording.groups])
    mass = recording.mass(state.layer, state.step, state.batch)[state.head]
    for name, row in zip(recording.groups, mass.tolist()):
        writer.writerow([name, *(f"{value:.6g}" for value in row)])
    return buffer.getvalue()


def view_png(recording: Any, state: ViewState, path: Path, cell: int = 20) -> Path:
    """The view as a PNG drawn with Pillow: the layer × head overview coloured by kind (selected head outlined), the
    selected head's heat map with group names, and the word map's frames when words were kept."""
    from PIL import Image, ImageDraw

    layers, heads, groups = len(recording.layers), recording.heads, recording.groups
    label = 8 * max(len(name[:14]) for name in groups) + 6
    overview_w, overview_h = 40 + heads * cell, 24 + layers * cell
    heat_w, heat_h = label + len(groups) * cell, 24 + len(groups) * cell
    maps = None
    if recording.words:
        maps = recording.word_map(recording.words[state.word][0], state.layer, state.step, state.batch, head=state.head)
    dot = 8  # pixels per token of a word map
    map_h = 0 if maps is None else 40 + maps.shape[1] * dot
    map_w = 0 if maps is None else maps.shape[0] * (maps.shape[2] * dot + dot)
    title = (f"{recording.model.get('class', '')}  groups {recording.group_info.spec}  step {state.step}  "
             f"batch {state.batch}  patches: {', '.join(recording.model.get('patches') or {}) or 'none'}")
    caption = f"{recording.layers[state.layer]} head {state.head}: mass (rows: query groups, columns: key groups)"
    width = max(overview_w + max(heat_w, map_w) + 30, 7 * len(title) + 16, overview_w + 20 + 7 * len(caption))
    image = Image.new("RGB", (width, max(overview_h, heat_h + map_h) + 40), "#1e1e1e")
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill="white")
    for layer in range(layers):
        draw.text((4, 24 + layer * cell), f"{layer}", fill="#aaaaaa")
        for head, stats in enumerate(recording.head_stats(layer, state.step, state.batch)):
            x, y = 36 + head * cell, 24 + layer * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=KIND_COLOURS[stats.kind])
            if (layer, head) == (state.layer, state.head):
                draw.rectangle([x - 1, y - 1, x + cell - 1, y + cell - 1], outline="white", width=2)
    left = overview_w + 20
    draw.text((left, 24), caption, fill="white")
    mass = recording.mass(state.layer, state.step, state.batch)[state.head]
    for row, name in enumerate(groups):
        y = 44 + row * cell
        draw.text((left, y), name[:14], fill="#cccccc")
        for column, value in enumerate(mass[row].tolist()):
            x = left + label + column * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=ramp_colour(value))
    if maps is not None:
        top = float(maps.max()) or 1.0
        base = 44 + len(groups) * cell + 10
        draw.text((left, base), f"word {recording.words[state.word][1]!r}: attention of each video token, frame by "
                                "frame", fill="white")
        for frame in range(maps.shape[0]):
            for y in range(maps.shape[1]):
                for x in range(maps.shape[2]):
                    px, py = left + frame * (maps.shape[2] * dot + dot) + x * dot, base + 20 + y * dot
                    draw.rectangle([px, py, px + dot - 1, py + dot - 1],
                                   fill=ramp_colour(float(maps[frame, y, x]) / top))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    write_atomically(path, encoded.getvalue())  # whole or not at all under the name asked for
    return path


# -- the screen ----------------------------------------------------------------------------------------------------


@dataclass
class AttentionRecorded(Message):
    """The seeded forward of the screen's model was recorded."""

    recording: Any


class AttentionScreen(ReportsWorkerFailures, Screen[None]):
    """Browse one attention recording; or, given a model, record one seeded forward of it first (in a worker)."""

    DEFAULT_CSS = """
    AttentionScreen #xray-body { height: 1fr; }
    AttentionScreen #xray-overview-scroll { width: auto; max-width: 50%; border-right: solid $primary-darken-2; }
    AttentionScreen #xray-overview { width: auto; padding: 0 1; }
    AttentionScreen #xray-detail { width: 1fr; padding: 0 1; }
    AttentionScreen #xray-facts { margin-bottom: 1; }
    AttentionScreen #xray-heatmap { margin-bottom: 1; }
    """
    BINDINGS = [
        Binding("up", "move(-1, 0)", "Layer", id="xray.layer-up", show=False),
        Binding("down", "move(1, 0)", "Layer", id="xray.layer-down", show=False),
        Binding("left", "move(0, -1)", "Head", id="xray.head-left", show=False),
        Binding("right", "move(0, 1)", "Head", id="xray.head-right", show=False),
        Binding("left_square_bracket", "step(-1)", "Step -", id="xray.step-back"),
        Binding("right_square_bracket", "step(1)", "Step +", id="xray.step-on"),
        Binding("b", "next_batch", "Batch", id="xray.batch"),
        Binding("w", "next_word", "Word", id="xray.word"),
        Binding("x", "export_png", "PNG", id="xray.png"),
        Binding("c", "export_numbers", "CSV+JSON", id="xray.numbers"),
        Binding("escape", "close", "Back", id="xray.back"),
    ]
    state: reactive[ViewState] = reactive(ViewState, init=False, always_update=True)

    def __init__(self, recording: Any = None, *, model: Any = None, source: str | None = None,
                 export_folder: Path | None = None) -> None:
        super().__init__()
        self.recording = recording
        self.model = model
        self.source = source
        self.export_folder = export_folder or Path.cwd()

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="xray-body"):
            with VerticalScroll(id="xray-overview-scroll"):
                yield Static(id="xray-overview")
            with VerticalScroll(id="xray-detail"):
                yield Static(id="xray-facts")
                yield Static(id="xray-heatmap")
                yield Static(id="xray-word-map")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "attention x-ray"
        if self.recording is not None:
            self.show_recording(self.recording)
            return
        self.query_one("#xray-body").loading = True
        self._record(self.model)

    @work(thread=True, exclusive=True, exit_on_error=False, group="xray", description="recording failed")
    def _record(self, model: Any) -> None:
        from cogsurgeon.inspector.attention_xray import record_seeded_forward
        from cogsurgeon.patches.verify import tiny_video_size

        self.post_message(AttentionRecorded(record_seeded_forward(model, tiny_video_size(model.config))))

    def on_attention_recorded(self, message: AttentionRecorded) -> None:
        self.show_recording(message.recording)

    def worker_ended(self, worker: Any) -> None:
        self.query_one("#xray-body").loading = False

    def show_recording(self, recording: Any) -> None:
        self.recording = recording
        self.query_one("#xray-body").loading = False
        patches = ", ".join(recording.model.get("patches") or {}) or "no patches"
        source = self.source or recording.model.get("class", "")
        self.sub_title = f"{source} · {recording.group_info.spec} · {patches}"
        self.state = ViewState()

    def watch_state(self, state: ViewState) -> None:
        recording = self.recording
        self.query_one("#xray-overview", Static).update(overview_text(recording, state))
        self.query_one("#xray-facts", Static).update(facts_text(recording, state))
        self.query_one("#xray-heatmap", Static).update(heatmap_text(recording, state))
        columns = max(20, self.query_one("#xray-detail").size.width - 2 or 78)
        self.query_one("#xray-word-map", Static).update(word_map_text(recording, state, columns))

    # -- actions ---------------------------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self.recording is not None and self.recording.steps > 0

    def action_move(self, layers: int, heads: int) -> None:
        if self._ready():
            state = self.state
            self.state = replace(state, layer=(state.layer + layers) % len(self.recording.layers),
                                 head=(state.head + heads) % self.recording.heads)

    def action_step(self, delta: int) -> None:
        if self._ready():
            self.state = replace(self.state, step=(self.state.step + delta) % self.recording.steps)

    def action_next_batch(self) -> None:
        if self._ready():
            self.state = replace(self.state, batch=(self.state.batch + 1) % self.recording.batch)

    def action_next_word(self) -> None:
        if self._ready() and self.recording.words:
            self.state = replace(self.state, word=(self.state.word + 1) % len(self.recording.words))

    def _export_stem(self) -> Path:
        state = self.state
        return self.export_folder / f"attention-L{state.layer}-h{state.head}-s{state.step}-b{state.batch}"

    def action_export_png(self) -> None:
        if self._ready():
            path = self._export_stem().with_suffix(".png")
            if self._exported(path, lambda: view_png(self.recording, self.state, path)):
                self.notify(f"wrote {path}")

    def action_export_numbers(self) -> None:
        if self._ready():
            stem = self._export_stem()
            csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
            table = mass_csv(self.recording, self.state).encode()
            numbers = json.dumps(view_numbers(self.recording, self.state), indent=2).encode()
            if (self._exported(csv_path, lambda: write_atomically(csv_path, table))
                    and self._exported(json_path, lambda: write_atomically(json_path, numbers))):
                self.notify(f"wrote {stem}.csv and {stem}.json")

    def _exported(self, path: Path, write: Callable[[], Any]) -> bool:
        """Run `write` (atomic: the file appears whole or not at all); a file that cannot be written (a full disk, a
        folder that is not writable) is a notification, not a crash."""
        try:
            write()
        except OSError as error:
            self.notify(describe_os_error(path, error), title="export", severity="error")
            return False
        return True

    def action_close(self) -> None:
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit()


class AttentionViewerApp(App[None]):
    """`cogsurgeon attention show FILE`: the viewer on its own."""

    TITLE = "cogsurgeon"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", id="xray-app.quit", priority=True)]

    def __init__(self, recording: Any, source: str | None = None, export_folder: Path | None = None) -> None:
        super().__init__()
        self.viewer = AttentionScreen(recording, source=source, export_folder=export_folder)

    def get_default_screen(self) -> AttentionScreen:
        return self.viewer


def run_viewer(recording: Any, source: str | None = None) -> None:
    with interruptible():  # the terminal must be given back: a SIGINT (kill -INT) unwinds through Textual's exit
        AttentionViewerApp(recording, source).run()


__all__ = [
    "AttentionScreen", "AttentionViewerApp", "ViewState", "overview_text", "run_viewer", "view_png",
]
