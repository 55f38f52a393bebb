"""The screens: the main screen (module tree, details and source, patches panel) and the model switcher.

The main screen holds the loaded model as reactive state; loading (in a daemon thread), the shape trace and
verification (thread workers) run off the UI and post typed messages (`ModelLoaded`, `ShapesTraced`,
`PatchVerified`), and one handler (`ReportsWorkerFailures`) turns their failures into notifications: the app never
crashes on bad input.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult, SuspendNotSupported
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import var
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Input, Label, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker

from cogsurgeon.inspector.browse import LoadedModel, TracedShapes, open_model, preview_model, trace_for_details
from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.inventory import ModuleInfo
from cogsurgeon.inspector.model_specs import known_specs
from cogsurgeon.inspector.module_tree import ModuleNode, build_module_tree, fold_for_filter, narrow_inventory
from cogsurgeon.inspector.patching import PatchBench, PatchRow
from cogsurgeon.patches.errors import PatchParameterError
from cogsurgeon.patches.parameters import format_patch_spec, format_value
from cogsurgeon.inspector.tui.messages import (
    ModelLoaded,
    PatchVerified,
    ReportsWorkerFailures,
    ShapesTraced,
    VerifyProgress,
    describe_failure,
)
from cogsurgeon.inspector.tui.widgets import (
    FilterInput,
    ModuleDetails,
    ModuleTree,
    PatchesPanel,
    SlowLoadingIndicator,
    SourceView,
    source_for,
)

T = TypeVar("T")


async def in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` in a daemon thread and await its result (or its exception)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(*args), None)
        except BaseException as error:  # delivered to the awaiting worker, which reports it
            outcome = (None, error)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the app has quit and its loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name=f"cogsurgeon-{function.__name__}", daemon=True).start()
    return await future


def editor_command(editor: str, file: str, line: int | None) -> list[str]:
    """The command that opens `file` at `line` in `editor` ($EDITOR, maybe with arguments): `+LINE FILE`, which
    vi, vim, nvim, nano, emacs, micro, kak and helix understand; `-g FILE:LINE` for VS Code."""
    command = shlex.split(editor)
    if not line:
        return [*command, file]
    if os.path.basename(command[0]) in ("code", "code-insiders", "codium"):
        return [*command, "-g", f"{file}:{line}"]
    return [*command, f"+{line}", file]


class MainScreen(ReportsWorkerFailures, Screen[None]):
    """Tree on the left with the filter above it; details and source on the right; the patches along the bottom."""

    BINDINGS = [
        Binding("slash", "focus('#filter')", "Filter", id="main.filter"),
        Binding("escape", "clear_filter", "Clear filter", id="main.clear-filter", show=False),
        Binding("t", "focus('#tree')", "Tree", id="main.tree"),
        Binding("p", "focus('#patches-table')", "Patches", id="main.patches"),
        Binding("d", "focus('#details')", "Details (arrows scroll)", id="main.details", show=False),  # listed by ?
        Binding("s", "toggle_source", "Source", id="main.source"),
        Binding("m", "switch_model", "Model", id="main.switch-model"),
        Binding("l", "open_lora", "LoRA", id="main.lora"),
        Binding("e", "open_in_editor", "Open in $EDITOR", id="main.editor", show=False),  # listed by ?
        Binding("c", "copy_location", "Copy file:line", id="main.copy", show=False),
        Binding("question_mark", "help", "Keys", id="main.help"),
        Binding("g", "open_plan", "GPU memory plan", id="main.plan", show=False),  # listed by ?
    ]

    AUTO_FOCUS = "#tree"

    loaded: var[LoadedModel | None] = var(None, init=False)
    # always_update: the same module of another model (an equal ModuleInfo) must still redraw the details
    selected: var[ModuleInfo | None] = var(None, init=False, always_update=True)

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = spec
        self.opening: str | None = None  # the spec being loaded, for the loading indicators
        self.details_shown_for: str | None = None  # the module whose facts the details pane shows
        self.load_worker: Worker[LoadedModel] | None = None
        self.full_tree: ModuleNode | None = None
        self.patch_bench = PatchBench()
        self.verifying: dict[str, dict[str, Any]] = {}  # patch -> the options its running verification checks
        self.matched: set[str] = set()
        self.narrowed: dict[str, tuple[ModuleNode | None, set[str]]] = {}
        self.traced: TracedShapes | None = None

    @property
    def model(self) -> Any:
        """The loaded transformer; None while none is, or while a cached preview shows."""
        return self.loaded.model if self.loaded is not None else None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield FilterInput(placeholder="/ filter by name, class or file", id="filter")
                yield ModuleTree(id="tree")
            with Vertical(id="right"):
                with VerticalScroll(id="details"):  # focusable (d), so a short terminal scrolls what does not fit
                    yield ModuleDetails()
                yield SourceView(id="source")
        yield PatchesPanel(id="patches")
        yield Footer()

    NARROW_BELOW = 120  # columns: below this the details and source go under the tree instead of beside it
    SHORT_BELOW = 36  # rows: below this the header, the patches panel and the stacked details give height to the tree

    def on_resize(self) -> None:
        self.query_one("#main").set_class(self.size.width < self.NARROW_BELOW, "narrow")
        self.query_one(Footer).compact = self.size.width < self.NARROW_BELOW  # every key's label fits in 80 columns
        self.set_class(self.size.height < self.SHORT_BELOW, "short")

    def get_loading_widget(self) -> SlowLoadingIndicator:
        return SlowLoadingIndicator(f"loading {self.opening}")  # set by open() before any pane is loading

    def on_mount(self) -> None:
        patches = self.query_one("#patches", PatchesPanel)
        patches.border_title, patches.border_subtitle = "patches", PatchesPanel.KEYS_HINT
        self.query_one("#details").border_title = "details"
        # a watcher runs as the filter's text changes, so the narrowed tree goes out in the same screen update as
        # the typed character (an Input.Changed message arrives after that update, a second one at 60 fps)
        self.watch(self.query_one("#filter", FilterInput), "value", self.show_tree, init=False)
        self.refresh_patches()
        self.open(self.spec)

    # loading

    def open(self, spec: str) -> None:
        """Load `spec` in a worker. A published model whose inventory is cached is shown at once (tree and details;
        the source and the patches wait for the real model); otherwise the tree shows a loading indicator."""
        try:
            preview = preview_model(spec)
        except CogsurgeonError as error:
            self.notify(describe_failure(error), title="could not load model", severity="error")
            return
        self.opening = spec
        tree, source = self.query_one(ModuleTree), self.query_one(SourceView)
        tree.loading = source.loading = False  # a fresh indicator, naming this spec, also over a load in progress
        if preview is not None:
            self.loaded = preview
            source.loading = True
        else:
            tree.loading = True
            # the previous model's module must not read as this one's while it loads
            self.query_one(ModuleDetails).waiting(f"loading {spec}")
            source.waiting(f"loading {spec}")
        self.load_worker = self._load(spec)

    @work(exclusive=True, exit_on_error=False, group="load", description="could not load model")
    async def _load(self, spec: str) -> None:
        # a daemon thread, not Textual's thread worker: ctrl+q during the first seconds (torch and diffusers being
        # imported) must not wait for the import to finish, and the default executor is joined at exit
        self.post_message(ModelLoaded(await in_daemon_thread(open_model, spec)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="trace", description="could not trace shapes")
    def _trace(self, loaded: LoadedModel) -> None:
        self.post_message(ShapesTraced(loaded.model, trace_for_details(loaded.model)))

    def _verify(self, name: str, options: dict[str, Any]) -> None:
        result = self.patch_bench.verify(name, options,
                                         progress=lambda step: self.post_message(VerifyProgress(name, options, step)))
        self.post_message(PatchVerified(name, options, result))

    def worker_ended(self, worker: Worker[Any]) -> None:
        if worker is self.load_worker:  # not a load that a newer one replaced (and cancelled)
            self.opening = None
            self.query_one(ModuleTree).loading = self.query_one(SourceView).loading = False

    def worker_failed(self, worker: Worker[Any]) -> None:
        if worker is self.load_worker:
            self.watch_selected(self.selected)  # the model that stays: its details again
        elif worker.group == "verify":
            name, options = worker.name, self.verifying.pop(worker.name, {})
            self.patch_bench.set_verdict(name, options, "error")
            self.refresh_patches()

    def on_model_loaded(self, message: ModelLoaded) -> None:
        if message.loaded.spec != self.spec:
            self.patch_bench.verdicts.clear()  # verdicts belong to what was open when they were asked for
        self.spec = message.loaded.spec
        self.loaded = message.loaded

    def on_shapes_traced(self, message: ShapesTraced) -> None:
        if self.model is message.model:
            self.traced = message.traced
            self.watch_selected(self.selected)

    def on_verify_progress(self, message: VerifyProgress) -> None:
        if self.verifying.get(message.name) == message.options:
            self.patch_bench.set_verdict(message.name, message.options, message.step)
            self.refresh_patches()

    def on_patch_verified(self, message: PatchVerified) -> None:
        if self.verifying.get(message.name) == message.options:
            del self.verifying[message.name]
        verdict = self.patch_bench.record_verdict(message.name, message.options, message.result)
        self.notify(f"{message.name}: {verdict.shown()}", title="verify")
        self.refresh_patches()

    def watch_loaded(self, previous: LoadedModel | None, loaded: LoadedModel | None) -> None:
        if loaded is None:
            return
        self.app.sub_title = loaded.title
        if loaded.model is not None and (previous is None or previous.model is not loaded.model):
            self.traced = None
            # after the screen has painted this model: the trace would share the interpreter with that paint
            self.call_after_refresh(self._trace, loaded)
        if previous is not None and previous.model is None and previous.infos == loaded.infos:
            # the real model behind a cached preview: same tree, now with source and patches
            self.refresh_patches()
            self.watch_selected(self.selected)
            return
        self.full_tree = build_module_tree(list(loaded.infos))
        self.narrowed = {}
        tree = self.query_one(ModuleTree)
        tree.set_patched(loaded.changed_modules())
        keep = self.selected.name if self.selected is not None else None
        self.show_tree(self.query_one("#filter", Input).value)
        if keep is None or not tree.go_to(keep):
            tree.go_to("")
        self.refresh_patches()

    # tree and filter

    def show_tree(self, filter_text: str) -> None:
        """Show the whole tree, or only the modules matching `filter_text` with their ancestors."""
        loaded, tree = self.loaded, self.query_one(ModuleTree)
        if loaded is None or self.full_tree is None:
            return
        filter_input = self.query_one("#filter", Input)
        if not filter_text.strip():
            filter_input.border_subtitle = f"{len(loaded.infos):,} modules"
            tree.show_modules(self.full_tree, loaded.title)
            return
        key = filter_text.strip().lower()
        if key not in self.narrowed:  # backspacing returns to trees already built
            infos, matched = narrow_inventory(list(loaded.infos), key)
            self.narrowed[key] = (fold_for_filter(build_module_tree(infos)) if matched else None, matched)
        narrowed_tree, self.matched = self.narrowed[key]
        filter_input.border_subtitle = f"{len(self.matched):,} of {len(loaded.infos):,} match"
        if narrowed_tree is None:
            tree.show_modules(ModuleNode(f"no module matches {filter_text!r}", None), "")
            return
        tree.show_modules(narrowed_tree, loaded.title, open_all=True)

    @on(Input.Submitted, "#filter")
    def _select_first_match(self, event: Input.Submitted) -> None:
        """Enter in the filter: the first match (in model order) becomes the selection, the tree takes focus."""
        loaded = self.loaded
        if loaded is None or not event.value.strip():
            return
        first = next((info for info in loaded.infos if info.name in self.matched), None)
        if first is None:
            self.notify(f"no module matches {event.value!r}", severity="warning")
            return
        tree = self.query_one(ModuleTree)
        tree.go_to(first.name)
        tree.focus()

    def action_toggle_source(self) -> None:
        """`s`: show and focus the selected module's source. Below NARROW_BELOW columns, where the source has no
        room of its own, it takes the details' place until `s` (or escape) gives it back."""
        main, source = self.query_one("#main"), self.query_one(SourceView)
        if main.has_class("narrow") and main.has_class("show-source"):
            main.remove_class("show-source")
            self.query_one(ModuleTree).focus()
            return
        main.add_class("show-source")
        source.focus()

    def action_clear_filter(self) -> None:
        self.query_one("#main").remove_class("show-source")
        filter_input = self.query_one("#filter", Input)
        tree = self.query_one(ModuleTree)
        if filter_input.value:
            filter_input.value = ""  # the filter's watcher shows the whole tree
            if self.selected is not None:
                tree.go_to(self.selected.name)
        tree.focus()

    def go_to_module(self, name: str) -> None:
        """Clear any filter and put the tree's cursor on module `name`."""
        self.query_one("#filter", Input).value = ""  # if it held a filter, its watcher shows the whole tree
        tree = self.query_one(ModuleTree)
        tree.go_to(name)
        tree.focus()

    # details

    @on(ModuleTree.ModuleHighlighted)
    def _module_highlighted(self, event: ModuleTree.ModuleHighlighted) -> None:
        self.selected = event.info

    def watch_selected(self, info: ModuleInfo | None) -> None:
        if info is None or self.loaded is None:
            return
        patched = info.name in self.loaded.changed_modules()
        config = self.loaded.config if info.name == "" else None
        shapes = self.traced.of(info.name) if self.traced is not None else None
        kv_cache = self.traced.kv_cache if self.traced is not None and info.name == "" else None
        self.query_one(ModuleDetails).show(info, patched, config, shapes, kv_cache)
        if info.name != self.details_shown_for:  # another module: its facts from the top (a trace's redraw stays put)
            self.query_one("#details").scroll_home(animate=False)
            self.details_shown_for = info.name
        if self.loaded.model is None:  # a cached preview: the classes are not imported yet
            self.query_one(SourceView).waiting("importing the model's code: the source appears when it is loaded")
        else:
            self.query_one(SourceView).show(*source_for(info))

    # patches

    def refresh_patches(self) -> None:
        self.query_one(PatchesPanel).show_rows(self.patch_bench.rows(self.model))

    @on(PatchesPanel.Requested)
    def _patch_requested(self, event: PatchesPanel.Requested) -> None:
        handlers = {"toggle": self.toggle_patch, "verify": self.verify_patch, "options": self.edit_patch_options,
                    "show": self.show_patch_row}
        handlers[event.what](event.name)

    def toggle_patch(self, name: str, apply: bool | None = None) -> None:
        """Apply `name` (or revert it when it is on); `apply` forces one direction."""
        if self.model is None:
            self.notify("the model is still loading", severity="warning")
            return
        try:
            message = self.patch_bench.toggle(self.model, name, apply)
        except Exception as error:  # a refusal (patches that do not compose) or a bug: tell, don't crash
            self.notify(describe_failure(error), title=f"patch {name}", severity="error")
            return
        self.notify(message, title="patch")
        self.loaded = self.loaded.refreshed()  # the selection stays, and shows its new processor
        # a second patch may leave every processor as it was (the inventory, so `loaded`, compares equal and its
        # watcher does not run): the state column is refreshed here in any case
        self.refresh_patches()

    def show_patch_row(self, name: str) -> None:
        """Enter on a patch: its whole row (state, verdict, options, summary) in a popup, wrapped to the terminal."""
        row = next(row for row in self.patch_bench.rows(self.model) if row.name == name)
        self.app.push_screen(PatchRowScreen(row))

    def edit_patch_options(self, name: str) -> None:
        """Open the options dialog of patch `name`; what it sets is applied by `set_patch_options`."""
        row = next(row for row in self.patch_bench.rows(self.model) if row.name == name)
        if not row.parameters:
            self.notify(f"{row.name} takes no parameters", title="patch options")
            return
        self.app.push_screen(PatchOptionsScreen(row), partial(self.set_patch_options, row.name))

    def set_patch_options(self, name: str, texts: dict[str, str] | None) -> None:
        """Set patch `name`'s options from the fields' texts (None: the dialog was cancelled); a patch that is on is
        re-applied with them."""
        if texts is None:
            return
        try:
            message = self.patch_bench.set_options(self.model, name, texts)
        except CogsurgeonError as error:
            self.notify(describe_failure(error), title=f"patch {name}", severity="error")
            return
        self.notify(message, title="patch options")
        if self.model is not None:
            self.loaded = self.loaded.refreshed()
        self.refresh_patches()

    def verify_patch(self, name: str) -> None:
        """Verify patch `name` with exactly the options its row shows; the verdict names them."""
        row = next(row for row in self.patch_bench.rows(self.model) if row.name == name)
        scope = self.patch_bench.verify_scope()
        with_options = f" with {row.options_text}" if row.parameters else ""
        self.notify(f"verifying {name}{with_options} on the tiny models {scope}, against explicit-mask reference "
                    "attention", title="verify")
        self.verifying[name] = dict(row.options)
        self.patch_bench.set_verdict(name, row.options, "starting…")
        self.refresh_patches()
        self.run_worker(partial(self._verify, name, dict(row.options)), name=name, group="verify",
                        description=f"could not verify {name}", thread=True, exit_on_error=False)

    # the selected module's file

    def _selected_location(self) -> tuple[str, int | None] | None:
        info = self.selected
        if info is None or not info.file:
            self.notify("this module's class has no source file", severity="warning")
            return None
        return info.file, info.line

    def action_copy_location(self) -> None:
        location = self._selected_location()
        if location is None:
            return
        text = f"{location[0]}:{location[1]}" if location[1] else location[0]
        self.app.copy_to_clipboard(text)
        self.notify(f"copied {text}", title="clipboard")

    def action_open_in_editor(self) -> None:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
        if not editor:
            self.notify("set $EDITOR (or $VISUAL) to open files, e.g. export EDITOR=vim", severity="warning")
            return
        location = self._selected_location()
        if location is None:
            return
        command = editor_command(editor, *location)
        try:
            with self.app.suspend():
                failed = subprocess.run(command).returncode != 0
        except SuspendNotSupported:  # no terminal to hand over (a headless run): the editor runs beside the app
            failed = subprocess.run(command, stdin=subprocess.DEVNULL).returncode != 0
        except OSError as error:
            self.notify(f"could not run {command[0]}: {error}", title="editor", severity="error")
            return
        if failed:
            self.notify(f"{' '.join(command)} exited with an error", title="editor", severity="warning")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    # other screens

    def action_switch_model(self) -> None:
        def switch(spec: str | None) -> None:
            if spec:
                self.open(spec)

        self.app.push_screen(ModelScreen(self.spec), switch)

    def action_open_lora(self) -> None:
        from cogsurgeon.inspector.tui.lora_screen import LoraScreen

        self.app.push_screen(LoraScreen(base_spec=self.spec))

    def action_open_plan(self) -> None:
        from cogsurgeon.inspector.geometry import default_video_size
        from cogsurgeon.inspector.tui.plan_screen import PlanScreen

        size = default_video_size(self.model.config) if self.model is not None else (49, 480, 720)
        rows = self.patch_bench.rows(self.model)
        applied = tuple(format_patch_spec(row.name, row.options) for row in rows if row.applied)
        self.app.push_screen(PlanScreen(self.spec, size, applied, tuple(row.name for row in rows)))


class ModelScreen(ModalScreen[str | None]):
    """Pick a published or tiny spec, or type a local folder (or a cached hub id); the open model is highlighted
    (a folder or hub id that is open is typed in the field instead)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="model.cancel")]

    def __init__(self, open_spec: str | None = None) -> None:
        super().__init__()
        self.open_spec = open_spec

    def compose(self) -> ComposeResult:
        specs = known_specs()
        options = OptionList(*(Option(spec, id=spec) for spec in specs), id="model-specs")
        if self.open_spec in specs:
            options.highlighted = specs.index(self.open_spec)
        with Vertical(id="model-dialog"):
            yield Label("Open a model", id="model-title")
            yield options
            yield Input(value="" if self.open_spec in specs or self.open_spec is None else self.open_spec,
                        placeholder="or a local folder / cached hub id, then Enter", id="model-path")
            yield Static("published configs load on the meta device; nothing is downloaded", id="model-hint")

    @on(OptionList.OptionSelected, "#model-specs")
    def _spec_chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @on(Input.Submitted, "#model-path")
    def _path_entered(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())


class HelpScreen(ModalScreen[None]):
    """`?`: every key of the main screen, the tree and the patches panel, with what it does."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss(None)", "Close", id="help.close")]

    def compose(self) -> ComposeResult:
        lines = []
        for where, bindings in (("anywhere", self.app.BINDINGS), ("main screen", MainScreen.BINDINGS),
                                ("module tree", ModuleTree.BINDINGS), ("patches panel", PatchesPanel.BINDINGS)):
            lines.append(Text(where, style="bold"))
            for binding in bindings:
                keys = ", ".join(self.app.get_key_display(Binding(key, "")) for key in binding.key.split(","))
                lines.append(Text.assemble(f"  {keys:<14}", (binding.description, "")))
            if where == "anywhere":
                palette = self.app.get_key_display(Binding(self.app.COMMAND_PALETTE_BINDING, ""))
                lines.append(Text.assemble(f"  {palette:<14}", "Command palette: patches, modules, models, LoRA"))
        with VerticalScroll(id="help-dialog"):  # taller than a 24-row terminal: it scrolls there
            yield Label("Keys", id="help-title")
            yield Static(Text("\n").join(lines), id="help-keys")
            yield Static("escape closes", id="help-hint")


class PatchRowScreen(ModalScreen[None]):
    """A patch's whole row, wrapped: what the panel cuts to fit (a long verdict, options, summary) at 80 columns."""

    BINDINGS = [Binding("escape,enter,q", "dismiss(None)", "Close", id="patch-row.close")]

    def __init__(self, row: PatchRow) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        from cogsurgeon.inspector.tui.widgets import facts_table

        row = self.row
        with VerticalScroll(id="patch-row-dialog"):
            yield Label(row.name, id="patch-row-title")
            yield Static(facts_table([("state", "applied" if row.applied else "off"),
                                      ("verify", row.verdict or "not verified"),
                                      ("options", row.options_text or "none"),
                                      ("summary", row.summary)]), id="patch-row-facts")
            yield Static("escape closes; space, v and o act on this row in the panel", id="patch-row-hint")


class PatchOptionsScreen(ModalScreen[dict[str, str] | None]):
    """A patch's parameters, one field each (as `NAME:key=value` spells values: `none`, `true`, numbers); Enter
    sets them, escape leaves them as they were."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="options.cancel")]
    AUTO_FOCUS = ".option-value"  # the first field, not the scrolling dialog around the fields

    def __init__(self, row: PatchRow) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="options-dialog"):  # taller than a 24-row terminal for three parameters: it scrolls
            yield Label(f"Options of {self.row.name}", id="options-title")
            yield Static("Enter sets them (a patch that is on is re-applied); escape cancels", id="options-hint")
            for parameter in self.row.parameters:
                yield Label(Text.assemble((parameter.name, "bold"), f" ({parameter.type_name}): {parameter.doc}"))
                yield Input(value=format_value(self.row.options.get(parameter.name, parameter.default)),
                            id=f"option-{parameter.name}", classes="option-value")

    @on(Input.Submitted, ".option-value")
    def _submitted(self) -> None:
        """Close with the typed values only when the patch accepts them; otherwise stay open, keep every typed
        value, mark the field the patch refuses and say why."""
        texts = {parameter.name: self.query_one(f"#option-{parameter.name}", Input).value
                 for parameter in self.row.parameters}
        for field in self.query(".option-value"):
            field.remove_class("-invalid")
        try:
            PatchBench.check_options(self.row.name, texts)
        except PatchParameterError as error:
            bad = self.query(f"#option-{error.parameter}")
            if bad:
                bad.first().add_class("-invalid")
                bad.first().focus()
            self.query_one("#options-hint", Static).update(Text(describe_failure(error), style="bold red"))
            return
        self.dismiss(texts)


__all__ = [
    "MainScreen", "PatchOptionsScreen",
]
