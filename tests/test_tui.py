"""The TUI driven through Textual's Pilot on tiny real models: tree, filter, selection, model switching, failed
loads, the command palette. Assertions read what the widgets show."""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from pathlib import Path

import pytest
from rich.console import Console
from textual.geometry import Region
from textual.worker import WorkerFailed

from cogsurgeon.inspector.tui.app import CogsurgeonApp
from cogsurgeon.inspector.tui import screens
from cogsurgeon.inspector.tui.widgets import ModuleDetails, ModuleTree, SlowLoadingIndicator, SourceView

SIZE = (160, 48)


def pilot_test(scenario):
    """Run an async Pilot scenario as a plain test (no async plugin needed); fixtures pass through."""

    @functools.wraps(scenario)
    def test(*args, **kwargs):
        asyncio.run(scenario(*args, **kwargs))

    return test


def shown_text(widget) -> str:
    """What a Static-like widget shows, as plain text."""
    content = widget.content if hasattr(widget, "content") else widget.renderable
    if isinstance(content, str):
        return content
    console = Console(width=200, record=True, color_system=None)
    console.print(content)
    return console.export_text()


def tree_rows(tree: ModuleTree) -> list[str]:
    """The labels of the rows the tree shows now (open rows' children only), indented by depth."""
    return ["  " * row.depth + tree._label_of(row).plain for row in tree.rows]


def drawn_rows(tree: ModuleTree) -> list[str]:
    """The tree's rows as the widget draws them now (guides, icons and labels), blank rows dropped."""
    rows = [tree.render_line(y).text.rstrip() for y in range(tree.size.height)]
    return [row for row in rows if row]


def hold_loads(monkeypatch, *specs: str) -> dict[str, threading.Event]:
    """Make the TUI's model loads of `specs` wait until the test sets their event (a real load of a published
    model takes seconds of imports; these let a test look at the screen while one is in progress)."""
    release = {spec: threading.Event() for spec in specs}
    real_open_model = screens.open_model

    def held_open_model(spec):
        if spec in release:
            release[spec].wait(60)
        return real_open_model(spec)

    monkeypatch.setattr(screens, "open_model", held_open_model)
    return release


async def until_the_tree_is_loading(pilot) -> ModuleTree:
    tree = pilot.app.query_one(ModuleTree)
    while not tree.loading:
        await pilot.pause(0.05)
    await pilot.pause()
    return tree


async def run_palette_command(pilot, command: str) -> None:
    """Open the command palette, type `command`, wait for its search, and run the first hit."""
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*command)
    await pilot.pause(0.5)
    await pilot.press("enter")


async def wait_for_model(pilot) -> None:
    """Until the main screen holds a built model (not only a cached preview), the tree's loading indicator is
    gone (the load worker may not have been started yet when a test begins) and its shapes are traced."""
    screen = pilot.app.main_screen
    while (
        screen.loaded is None
        or screen.loaded.model is None
        or screen.query_one(ModuleTree).loading
        or screen.traced is None
    ):
        await settle(pilot)
        await pilot.pause(0.05)
    await settle(pilot)  # the messages the last load posted (the highlighted row's details) are handled too


async def settle(pilot) -> None:
    """Let workers (model loads, verifications) finish and the screen catch up. A worker that failed is the app's
    to report (the tests assert on its notification), so its failure is not re-raised here."""
    try:
        await pilot.app.workers.wait_for_complete()
    except WorkerFailed:
        pass
    await pilot.pause()


async def inspect_in_the_lora_screen(pilot, checkpoint: str) -> None:
    """Once the model is loaded: open the LoRA screen (l), type `checkpoint`, Enter, and wait for the findings."""
    await wait_for_model(pilot)
    await pilot.press("l")
    await pilot.pause()
    await pilot.press(*checkpoint, "enter")
    await settle(pilot)


def notifications(app) -> list[str]:
    return [notification.message for notification in app._notifications]


@pilot_test
async def test_opens_on_the_tree_with_folded_blocks_and_the_root_details():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        rows = tree_rows(app.query_one(ModuleTree))
        assert rows[0] == "tiny  CogVideoXTransformer3DModel  42.2K"
        assert "  transformer_blocks (0-1): 2 × CogVideoXBlock  38.6K" in rows
        details = shown_text(app.query_one(ModuleDetails))
        assert "CogVideoXTransformer3DModel" in details
        assert "num_layers" in details and "max_text_seq_length" in details  # the root shows the config
        assert app.query_one(SourceView).border_title.startswith("class CogVideoXTransformer3DModel")
        assert app.sub_title == "tiny"


@pytest.mark.slow
@pilot_test
async def test_expanding_a_folded_row_lists_its_blocks():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        tree = app.query_one(ModuleTree)
        tree.go_to("transformer_blocks")
        await pilot.press("right")
        await pilot.pause()
        rows = tree_rows(tree)
        assert "    0  CogVideoXBlock  19.3K" in rows and "    1  CogVideoXBlock  19.3K" in rows
        await pilot.press("down")
        await pilot.pause()
        assert app.screen.selected.name == "transformer_blocks.0"


@pytest.mark.slow
@pilot_test
async def test_filter_narrows_the_tree_enter_selects_the_first_match_escape_restores():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("slash", *"attn1")
        await pilot.pause()
        filter_input = app.query_one("#filter")
        assert filter_input.has_focus and filter_input.value == "attn1"
        assert filter_input.border_subtitle == "18 of 67 match"
        rows = tree_rows(app.query_one(ModuleTree))
        assert not any("patch_embed" in row or "ff  FeedForward" in row for row in rows)
        assert "      attn1  Attention  4.29K" in rows
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one(ModuleTree).has_focus
        details = shown_text(app.query_one(ModuleDetails))
        assert "transformer_blocks.0.attn1" in details
        assert "diffusers/models/attention_processor.py:" in details
        assert "CogVideoXAttnProcessor2_0" in details
        source = app.query_one(SourceView)
        assert source.border_title.startswith("CogVideoXAttnProcessor2_0.__call__  diffusers/models/attention_processor.py:")
        assert "def __call__(" in shown_text(source.query_one("#source-code"))

        await pilot.press("slash", "escape")
        await pilot.pause()
        assert filter_input.value == ""
        assert filter_input.border_subtitle == "67 modules"
        assert any("patch_embed" in row for row in tree_rows(app.query_one(ModuleTree)))
        assert app.screen.selected.name == "transformer_blocks.0.attn1"  # the selection survives


@pytest.mark.slow
@pilot_test
async def test_the_narrowed_tree_is_drawn_scrolls_and_takes_clicks():
    """ModuleTree draws its own rows and updates its scrollbar without a layout of the screen: the rows drawn, the
    scrollbar, the scroll position and a click on a row must still follow the filter."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(160, 30)) as pilot:  # the tree's first level fits, all of it does not
        await wait_for_model(pilot)
        tree = app.query_one(ModuleTree)
        assert not tree.show_vertical_scrollbar
        await pilot.press("slash", "a")
        await pilot.pause()
        assert drawn_rows(tree)[:3] == [
            "▼ tiny  CogVideoXTransformer3DModel  42.2K",
            "├ ▼ patch_embed  CogVideoXPatchEmbed  1.09K",
            "│ ├ proj  Conv2d  544",
        ]
        assert tree.virtual_size.height > tree.size.height and tree.show_vertical_scrollbar
        tree.scroll_end(animate=False)
        await pilot.pause()
        assert tree.scroll_y == tree.max_scroll_y > 0
        await pilot.press(*"dalayernorm")
        await pilot.pause()
        assert drawn_rows(tree) == ["▼ tiny  CogVideoXTransformer3DModel  42.2K", "└ norm_out  AdaLayerNorm  1.15K"]
        assert tree.scroll_y == 0 and not tree.show_vertical_scrollbar
        await pilot.click(ModuleTree, offset=(6, 2))  # inside the border: the second row
        await pilot.pause()
        assert tree.has_focus and app.screen.selected.name == "norm_out"
        await pilot.press("slash", *"x" * 80)  # wider than the filter: its text scrolls, the cursor stays inside
        await pilot.pause()
        filter_input = app.query_one("#filter")
        assert filter_input.scroll_x > 0
        assert filter_input.region.contains_point(filter_input.cursor_screen_offset)


def screen_rows(tree: ModuleTree) -> list[str]:
    """The tree's rows as the screen shows them: the lines Textual keeps for the widget between repaints (the
    filter repaints only the lines that change), inside the border, blank rows dropped."""
    strips = tree.render_lines(Region(0, 0, *tree.outer_size))
    top, left = tree.styles.gutter.top, tree.styles.gutter.left
    rows = [strip.crop(left, left + tree.size.width).text.rstrip() for strip in strips[top:top + tree.size.height]]
    return [row for row in rows if row]


@pytest.mark.slow
@pilot_test
async def test_the_screen_shows_the_narrowed_tree_after_every_key():
    """A filter key repaints only the tree's lines whose row changed: after every key, typed or deleted, with the
    scrollbar coming and going, each line on screen is the row the tree has there now, none left from before."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(160, 30)) as pilot:
        await wait_for_model(pilot)
        tree = app.query_one(ModuleTree)
        await pilot.press("slash")
        keys = [*"attn1", *["backspace"] * 4, *"ttn2", *["backspace"] * 5, *"norm", "backspace", *"_k",
                *["backspace"] * 6, *"ff", "escape"]
        shown = []
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
            assert screen_rows(tree) == drawn_rows(tree), f"after {key!r}"
            shown.append(tuple(drawn_rows(tree)))
        assert len(set(shown)) > 8  # the keys did change the tree, and some left it as it was
        assert any(before == after for before, after in zip(shown, shown[1:]))


@pilot_test
async def test_details_show_the_shapes_traced_at_the_pipelines_default_size():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await settle(pilot)  # the trace worker
        pilot.app.main_screen.go_to_module("transformer_blocks.0.attn1")
        await settle(pilot)
        details = shown_text(app.query_one(ModuleDetails))
        # tiny: 9 frames of 64x64 -> 3 latent frames x (32/2)^2... = 3 x 16 video tokens after 2x2 patches; 8 text
        assert "9×64×64 video, batch 2" in details
        assert "hidden_states=(2, 48, 32)" in details and "encoder_hidden_states=(2, 8, 32)" in details
        assert "[(2, 48, 32), (2, 8, 32)]" in details  # outputs: video and text hidden states


@pytest.mark.slow
@pilot_test
async def test_the_roots_details_show_the_streaming_kv_cache_at_that_size():
    from cogsurgeon.inspector.model_specs import tiny_config
    from cogsurgeon.inspector.trace import format_bytes
    from cogsurgeon.patches.stream import kv_cache_bytes

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await settle(pilot)
        pilot.app.main_screen.go_to_module("")
        await settle(pilot)
        details = shown_text(app.query_one(ModuleDetails))
        whole = kv_cache_bytes(tiny_config("tiny"), frames=3, height=64, width=64, batch=2, dtype_bytes=4)
        assert "KV cache" in details and f"chunk 1: {format_bytes(whole)}" in details
        pilot.app.main_screen.go_to_module("transformer_blocks.0.attn1")
        await settle(pilot)
        assert "KV cache" not in shown_text(app.query_one(ModuleDetails))  # the root's fact only


@pytest.mark.slow
@pilot_test
async def test_filter_by_class_and_a_filter_that_matches_nothing():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("slash", *"adalayernorm")
        await pilot.pause()
        rows = tree_rows(app.query_one(ModuleTree))
        assert rows[1] == "  norm_out  AdaLayerNorm  1.15K"
        assert len(rows) == 2
        await pilot.press(*"zzz")
        await pilot.pause()
        assert tree_rows(app.query_one(ModuleTree)) == ["no module matches 'adalayernormzzz'"]
        await pilot.press("enter")
        await pilot.pause()
        assert "no module matches 'adalayernormzzz'" in notifications(app)


@pytest.mark.slow
@pilot_test
async def test_switch_to_a_folder_model_saved_with_save_pretrained(tmp_path, tiny_model):
    folder = tmp_path / "runs" / "my-tiny"
    tiny_model.save_pretrained(folder)
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("m")
        await pilot.pause()
        await pilot.click("#model-path")
        await pilot.press(*str(folder), "enter")
        await settle(pilot)
        assert app.sub_title == "runs/my-tiny (folder)"
        assert tree_rows(app.query_one(ModuleTree))[0].startswith("runs/my-tiny (folder)  CogVideoXTransformer3DModel")
        assert not app.query_one(ModuleTree).loading


@pytest.mark.slow
@pilot_test
async def test_a_failed_load_is_a_notification_and_the_old_model_stays(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        app.screen.open(str(empty))
        await settle(pilot)
        assert any("holds no config.json" in message for message in notifications(app))
        assert app.is_running
        tree = app.query_one(ModuleTree)
        assert not tree.loading
        assert tree_rows(tree)[0].startswith("tiny  CogVideoXTransformer3DModel")
        await pilot.press("down")  # still responsive
        await pilot.pause()
        assert app.screen.selected.name == "patch_embed"


@pytest.mark.slow
@pilot_test
async def test_while_the_model_loads_the_tree_says_what_and_redraws_once_a_second(monkeypatch):
    release = hold_loads(monkeypatch, "tiny")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        tree = await until_the_tree_is_loading(pilot)
        indicator = tree._cover_widget
        assert isinstance(indicator, SlowLoadingIndicator)
        assert re.fullmatch(r"● loading tiny  \d+ s", indicator.render().plain)
        assert indicator.auto_refresh == 1.0  # not LoadingIndicator's 16 frames a second
        await pilot.press("slash", "a")  # the interface answers meanwhile
        await pilot.pause()
        assert app.query_one("#filter").value == "a"
        release["tiny"].set()
        await wait_for_model(pilot)
        assert tree._cover_widget is None
        assert tree_rows(tree)[0] == "tiny  CogVideoXTransformer3DModel  42.2K"


@pilot_test
async def test_switching_models_during_a_load_shows_the_new_load_then_the_new_model(monkeypatch, tmp_path, tiny_model):
    folder = tmp_path / "runs" / "my-tiny"
    tiny_model.save_pretrained(folder)
    release = hold_loads(monkeypatch, "tiny", str(folder))
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        tree = await until_the_tree_is_loading(pilot)
        app.screen.open(str(folder))  # cancels the held load of tiny
        await pilot.pause()
        assert re.fullmatch(rf"● loading {re.escape(str(folder))}  \d+ s", tree._cover_widget.render().plain)
        assert tree.loading  # the cancelled load's end must not end the new load's indicator
        release[str(folder)].set()
        await wait_for_model(pilot)
        release["tiny"].set()
        await pilot.pause(0.2)
        assert app.sub_title == "runs/my-tiny (folder)"
        assert tree_rows(tree)[0].startswith("runs/my-tiny (folder)  CogVideoXTransformer3DModel")
        assert not tree.loading and app.screen.opening is None


@pytest.mark.slow
@pilot_test
async def test_model_switch_from_the_command_palette():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await run_palette_command(pilot, "model: open tiny-i2v")
        await settle(pilot)
        assert app.sub_title == "tiny-i2v"
        assert app.screen.loaded.config["in_channels"] == 8


@pytest.mark.slow
@pilot_test
async def test_ctrl_q_quits():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert not app.is_running
    assert app.return_code == 0


def test_an_unknown_model_fails_before_the_screen_opens(cli):
    result = cli("no-such-model")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("cogsurgeon: error: unknown model 'no-such-model'")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module", ["cogsurgeon.inspector.cli", "cogsurgeon.inspector.loading", "cogsurgeon.inspector.inventory", "cogsurgeon.inspector.browse",
                                    "cogsurgeon.inspector.module_tree", "cogsurgeon.inspector.source", "cogsurgeon.inspector.patching", "patches",
                                    "tools", "cogsurgeon.tools.lora"])
def test_the_core_never_imports_textual(module):
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'textual' not in sys.modules, sorted(m for m in sys.modules if 'textual' in m)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def patch_rows(app) -> dict[str, list[str]]:
    table = app.query_one("#patches-table")
    return {str(row[0]): [str(cell) for cell in row[1:]] for row in (table.get_row_at(i) for i in range(table.row_count))}


@pytest.mark.slow
@pilot_test
async def test_apply_and_revert_a_patch_from_the_panel():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        model = app.screen.loaded.model
        original = model.transformer_blocks[0].attn1.processor
        assert list(patch_rows(app))[:3] == ["causal-attention", "frame-causal-attention", "attention-mask"]
        assert patch_rows(app)["causal-attention"][0] == "off"

        await pilot.press("p", "space")  # the cursor starts on the first patch: causal-attention
        await pilot.pause()
        assert patch_rows(app)["causal-attention"][0] == "applied"
        assert "applied causal-attention" in notifications(app)
        tree = app.query_one(ModuleTree)
        assert "  transformer_blocks (0-1): 2 × CogVideoXBlock  38.6K  [patched inside]" in tree_rows(tree)
        tree.go_to("transformer_blocks.1.attn1")
        await pilot.pause()
        assert "attn1  Attention  4.29K  [patched]" in [row.strip() for row in tree_rows(tree)]
        details = shown_text(app.query_one(ModuleDetails))
        assert "PatchedCogVideoXAttnProcessor (cogsurgeon.patches.processor)  patched" in details
        assert app.query_one(SourceView).border_title.startswith("PatchedCogVideoXAttnProcessor.__call__  patches/processor.py:")

        await pilot.press("p", "space")
        await pilot.pause()
        assert patch_rows(app)["causal-attention"][0] == "off"
        assert model.transformer_blocks[0].attn1.processor is original
        assert "CogVideoXAttnProcessor2_0 (diffusers.models.attention_processor)" in shown_text(app.query_one(ModuleDetails))
        assert not any("[patched" in row for row in tree_rows(tree))


@pytest.mark.slow
@pilot_test
async def test_a_patch_that_does_not_compose_is_refused_with_a_notification():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("p", "space", "down", "space")
        await pilot.pause()
        rows = patch_rows(app)
        assert rows["causal-attention"][0] == "applied" and rows["frame-causal-attention"][0] == "off"
        assert any("frame-causal-attention" in message and "causal-attention" in message
                   for message in notifications(app)[1:])
        assert app.is_running


@pytest.mark.slow
@pilot_test
async def test_verify_runs_in_a_worker_and_shows_the_max_error():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("p", "v")
        await settle(pilot)
        verdict = patch_rows(app)["causal-attention"][1]
        assert verdict.startswith("passed, max error ") and verdict.endswith(", revert bit-exact")
        assert float(verdict.split("max error ")[1].split(",")[0]) < 1e-4


@pytest.mark.slow
@pilot_test
async def test_patch_apply_from_the_command_palette():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await run_palette_command(pilot, "patch: apply frame-causal-attention")
        await pilot.pause()
        assert patch_rows(app)["frame-causal-attention"][0] == "applied"


@pytest.mark.slow
@pilot_test
async def test_lora_screen_inspects_repairs_and_verifies_a_cogvideo_checkpoint(tmp_path, monkeypatch):
    from lora_helpers import BASE, save_cogvideo_checkpoint, train

    from cogsurgeon.inspector.tui.lora_screen import LoraScreen

    monkeypatch.chdir(tmp_path)
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "checkpoint-10")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, LoraScreen)
        await pilot.press(*"checkpoint-10", "enter")
        await settle(pilot)
        findings = shown_text(app.screen.query_one("#lora-findings"))
        assert "rank        4" in findings
        # the file has no alpha and three trainers write this layout: the screen lists them instead of guessing
        assert "lora_alpha  UNKNOWN: could be 64 (cogvideo-finetune), 128 (diffusers-scripts)" in findings
        assert app.screen.query_one("#lora-out").value == "checkpoint-10-adapter"

        alpha = app.screen.query_one("#lora-alpha")
        alpha.value = "2"
        await pilot.click("#lora-repair")
        await settle(pilot)
        progress = app.screen.query_one("#lora-progress")
        assert progress.percentage == 1.0
        result = shown_text(app.screen.query_one("#lora-repair-result"))
        assert result.startswith("wrote checkpoint-10-adapter from checkpoint-10: ") and "(lora_alpha 2, for peft, diffusers)" in result
        config = (tmp_path / "checkpoint-10-adapter" / "adapter_config.json").read_text()
        assert '"lora_alpha": 2' in config

        base = app.screen.query_one("#lora-base")
        base.value = BASE
        await pilot.click("#lora-verify")
        await settle(pilot)
        verdict = shown_text(app.screen.query_one("#lora-verify-result"))
        assert verdict.splitlines()[0].split() == ["verify", "passed"]

        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen


@pytest.mark.slow
@pilot_test
async def test_lora_screen_reports_a_bad_checkpoint_as_a_notification(tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        await pilot.press(*str(bogus), "enter")
        await settle(pilot)
        assert any(str(bogus) in message for message in notifications(app))
        assert app.screen.query_one("#lora-repair").disabled


@pytest.mark.slow
@pilot_test
async def test_a_published_model_with_a_cached_inventory_opens_complete():
    from cogsurgeon.inspector.inventory import inventory_for_spec

    inventory_for_spec("cogvideox-2b")  # the cache entry the screen paints first
    app = CogsurgeonApp("cogvideox-2b")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        rows = tree_rows(app.query_one(ModuleTree))  # painted from the cache, or already from the model
        assert "  transformer_blocks (0-29): 30 × CogVideoXBlock  1.68B" in rows
        await wait_for_model(pilot)
        assert app.main_screen.loaded.model is not None
        assert app.sub_title == "cogvideox-2b (meta)"
        assert app.query_one(SourceView).border_title.startswith("class CogVideoXTransformer3DModel")
        assert "device      meta" in shown_text(app.query_one(ModuleDetails))
