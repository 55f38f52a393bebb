"""The TUI's workflows end to end, as a person drives them, at 80×24 and at 160×48 (issue 22): browse to a module's
source; a patch with options, verified and reverted; LoRA inspect A, repair, inspect B (nothing of A shown), repair,
verify; verify an existing adapter and merge; a plan with a patch and training. Every step asserts what is on the
screen (the rendered lines), not only what the widgets hold. Tiny models; the LoRA checkpoints are made once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_tui import notifications, patch_rows, pilot_test, settle, wait_for_model

from cogsurgeon.inspector.tui.app import CogsurgeonApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
# the CLI's flags (a trainer's own, such as --lora_alpha cited as where a default comes from, are not ours)
FLAG = re.compile(r"--(alpha|trainer|step|latest|override-stored-alpha|force|out|to|bake-scale|base|batch|train"
                  r"|checkpointing|dtype|patch|gpu-memory|vae|tiling)(?![\w-])")


def screen_text(app) -> str:
    """The terminal as drawn now: every line of the screen (dialogs and toasts included), as plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def on_screen(app, *texts: str) -> None:
    """Each of `texts` is on one line of the screen (runs of spaces count as one: table columns vary)."""
    shown = screen_text(app)
    squeezed = re.sub(" +", " ", shown)
    missing = [text for text in texts if re.sub(" +", " ", text) not in squeezed]
    assert not missing, f"not on screen: {missing}\n{shown}"


def no_cli_flags(app) -> None:
    """The screen and its toasts speak of its own controls, never of the CLI's flags."""
    for text in [screen_text(app), *notifications(app)]:
        assert not FLAG.search(text), text


async def without_toasts(pilot) -> None:
    """Dismiss the toasts (they cover the screen's right side at 80 columns), as a person waits them out."""
    pilot.app.clear_notifications()
    await pilot.pause()


async def press_button(pilot, selector: str) -> None:
    """Focus a button (scrolling it into view, as Tab would) and press Enter."""
    pilot.app.screen.query_one(selector).focus()
    await pilot.pause()
    await pilot.press("enter")
    await settle(pilot)


async def type_into(pilot, selector: str, text: str, enter: bool = False) -> None:
    field = pilot.app.screen.query_one(selector)
    field.focus()
    field.value = ""
    await pilot.press(*text, *(["enter"] if enter else []))
    await settle(pilot)


async def tick(pilot, selector: str) -> None:
    pilot.app.screen.query_one(selector).focus()
    await pilot.pause()
    await pilot.press("space")
    await pilot.pause()


async def scroll_to(pilot, selector: str) -> None:
    """Scroll `selector` to the top of the screen, the toasts waited out (they cover the right side at 80 columns)."""
    pilot.app.screen.query_one(selector).scroll_visible(animate=False, top=True)
    await without_toasts(pilot)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pilot_test
async def test_browse_to_a_modules_source(size):
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_for_model(pilot)
        on_screen(app, "tiny  CogVideoXTransformer3DModel  42.2K", "transformer_blocks (0-1): 2 × CogVideoXBlock")
        await pilot.press("slash", *"attn1")
        await pilot.pause()
        on_screen(app, "18 of 67 match", "attn1  Attention  4.29K")
        await pilot.press("enter")
        await pilot.pause()
        on_screen(app, "transformer_blocks.0.attn1", "diffusers/models/attention_processor.py:")
        await pilot.press("s")
        await pilot.pause()
        on_screen(app, "CogVideoXAttnProcessor2_0.__call__", "def __call__(")
        if size[0] < 120:  # the source took the details' place: s gives it back
            assert "transformer_blocks.0.attn1" not in screen_text(app)
            await pilot.press("s")
            await pilot.pause()
            on_screen(app, "transformer_blocks.0.attn1", "attention_processor.py:")
        no_cli_flags(app)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pilot_test
async def test_a_patch_with_options_verified_then_reverted(size):
    block = "block-causal-attention"
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_for_model(pilot)
        table = app.query_one("#patches-table")
        await pilot.press("p")
        for _ in range(list(patch_rows(app)).index(block)):
            await pilot.press("down")
        await pilot.press("o")
        await pilot.pause()
        on_screen(app, "Enter sets them", "chunk (int)")
        await pilot.press("ctrl+u", "2", "tab", "ctrl+u", "2", "tab", "ctrl+u", "1", "enter")
        await without_toasts(pilot)
        on_screen(app, block, "chunk=2", "space apply/revert · v verify · o options")
        footer = screen_text(app).splitlines()[-1]
        assert footer.split() == ["/", "Filter", "t", "Tree", "p", "Patches", "s", "Source", "m", "Model", "l", "LoRA",
                                  "?", "Keys", "^q", "Quit", "▏^p", "palette"], footer  # whole, the panel focused
        await pilot.press("space")
        await settle(pilot)
        await without_toasts(pilot)
        on_screen(app, "applied", "[patched")
        await pilot.press("v")
        await settle(pilot)
        await pilot.pause(0.1)  # the toast is drawn
        screen = app.main_screen
        verdict = next(row.verdict for row in screen.patch_bench.rows(screen.model) if row.name == block)
        assert verdict.startswith("passed for chunk=2, sink=1, window=2: max error "), verdict
        # the toast names the options: in its text, and drawn (where its lines wrap depends on what else is shown)
        assert any(f"{block}: passed for chunk=2, sink=1, window=2: max error " in m for m in notifications(app)), \
            notifications(app)
        on_screen(app, f"{block}: passed for")
        await without_toasts(pilot)
        await pilot.press("enter")  # the whole row, wrapped, whatever the width
        await pilot.pause()
        on_screen(app, "passed for chunk=2, sink=1, window=2", "chunk=2, window=2, sink=1", "summary")
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is table
        await pilot.press("space")
        await settle(pilot)
        assert patch_rows(app)[block][0] == "off"
        assert "[patched" not in screen_text(app)
        no_cli_flags(app)


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """An output folder with two CogVideo checkpoints (steps 500 and 900, no lora_alpha stored, trained at 2 and 4),
    an adapter folder repaired earlier (as the CLI repairs) and a tiny-i2v base on disk for the merge."""
    from lora_helpers import save_cogvideo_checkpoint, train

    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.tools.lora import repair_checkpoint

    root = tmp_path_factory.mktemp("journeys")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), root / "out" / "checkpoint-500")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=4, seed=7), root / "out" / "checkpoint-900")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=8, seed=3), root / "trained")
    repair_checkpoint(root / "trained", root / "style", alpha=8)
    load_transformer("tiny-i2v").save_pretrained(str(root / "base"))
    return root


def copy_inputs(root: Path, into: Path) -> None:
    import shutil

    for name in ("out", "trained", "style", "base"):
        shutil.copytree(root / name, into / name)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pilot_test
async def test_lora_inspect_a_repair_inspect_b_repair_verify(size, lora_folders, tmp_path, monkeypatch):
    from lora_helpers import BASE, tree_digest

    copy_inputs(lora_folders, tmp_path)
    monkeypatch.chdir(tmp_path)
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        screen = app.screen
        await type_into(pilot, "#lora-checkpoint", "out", enter=True)
        on_screen(app, "out holds 2 checkpoints (steps 500, 900): choose one in the step list")
        assert app.focused is screen.query_one("#lora-step")

        screen.query_one("#lora-step").value = "500"  # A
        await settle(pilot)
        await scroll_to(pilot, "#lora-findings")
        on_screen(app, "inspected  out (step 500)", "UNKNOWN: could be 64 (cogvideo-finetune)")
        screen.query_one("#lora-trainer").value = "cogvideo-finetune"  # the trainer settles alpha: 64, then typed 2
        await settle(pilot)
        await scroll_to(pilot, "#lora-findings")
        on_screen(app, "out (step 500, trainer cogvideo-finetune)", "64 from trainer")
        await type_into(pilot, "#lora-alpha", "2")
        assert screen.query_one("#lora-out").value == "out-step-500-adapter"
        await tick(pilot, "#lora-to-comfyui")
        await press_button(pilot, "#lora-repair")
        assert any("repaired out (step 500" in message for message in notifications(app))
        await scroll_to(pilot, "#lora-repair-result")
        on_screen(app, "wrote out-step-500-adapter from out (step 500, trainer",
                  "comfyui_lora.safetensors", "lora_alpha 2, for peft, diffusers, comfyui")
        assert screen.query_one("#lora-progress").percentage == 1.0
        first = tree_digest(tmp_path / "out-step-500-adapter")

        screen.query_one("#lora-step").value = "900"  # B: nothing of A stays
        await settle(pilot)
        await scroll_to(pilot, "#lora-findings")
        shown = screen_text(app)
        on_screen(app, "inspected  out (step 900, trainer cogvideo-finetune)", "64 from trainer")
        assert "step 500" not in shown and "wrote " not in shown
        assert not screen.query_one("#lora-repair-result").display and not screen.query_one("#lora-verify-result").display
        assert screen.query_one("#lora-out").value == "out-step-900-adapter"
        assert screen.query_one("#lora-adapter").value == "" and screen.query_one("#lora-verify").disabled
        assert screen.query_one("#lora-progress").percentage == 0

        await type_into(pilot, "#lora-out", "out-step-500-adapter")  # A's folder: the screen warns
        await scroll_to(pilot, "#lora-out-warning")
        on_screen(app, "holds the repair of another checkpoint")
        await type_into(pilot, "#lora-out", "out-step-900-adapter")
        assert not screen.query_one("#lora-out-warning").display
        await type_into(pilot, "#lora-alpha", "4")
        await press_button(pilot, "#lora-repair")
        await scroll_to(pilot, "#lora-repair-result")
        on_screen(app, "wrote out-step-900-adapter from out (step 900, trainer")
        assert screen.query_one("#lora-adapter").value == "out-step-900-adapter"

        await type_into(pilot, "#lora-base", BASE)
        await press_button(pilot, "#lora-verify")
        assert any("verify passed: out-step-900-adapter against tiny-i2v" in m for m in notifications(app))
        no_cli_flags(app)
        await scroll_to(pilot, "#lora-verify-result")
        on_screen(app, "verify passed", "adapter out-step-900-adapter")
    assert tree_digest(tmp_path / "out-step-500-adapter") == first
    assert '"lora_alpha": 4' in (tmp_path / "out-step-900-adapter" / "adapter_config.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pilot_test
async def test_verify_an_existing_adapter_then_merge_it_into_a_base(size, lora_folders, tmp_path, monkeypatch):
    from lora_helpers import BASE

    copy_inputs(lora_folders, tmp_path)
    monkeypatch.chdir(tmp_path)
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        screen = app.screen
        await type_into(pilot, "#lora-adapter", "style")  # no repair: an adapter folder already on disk
        await type_into(pilot, "#lora-base", BASE, enter=True)
        assert any("verify passed: style against tiny-i2v" in m for m in notifications(app)), notifications(app)
        await scroll_to(pilot, "#lora-verify-result")
        on_screen(app, "verify passed", "adapter style")
        await type_into(pilot, "#lora-adapter", "out")  # another folder typed: the verdict goes
        assert not screen.query_one("#lora-verify-result").display

        await type_into(pilot, "#merge-base", "base")
        await type_into(pilot, "#merge-loras", "style:0.5")
        await type_into(pilot, "#merge-out", "merged", enter=True)
        assert any("merged base + style × 0.5 into merged" in m for m in notifications(app))
        await scroll_to(pilot, "#merge-result")
        on_screen(app, "wrote merged: base + style × 0.5, 8 weights fused")
        assert (tmp_path / "merged" / "cogsurgeon-merge.json").is_file()
        assert screen.query_one("#merge-progress").percentage == 1.0

        await type_into(pilot, "#merge-out", "merged", enter=True)  # again: refused in the screen's words
        assert "already exists" in notifications(app)[-1] and "replace an earlier merge" in notifications(app)[-1]
        no_cli_flags(app)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pilot_test
async def test_plan_with_a_patch_and_training(size):
    """The patch applied on the main screen is planned by default; the result restates what was planned; a bad
    input clears the old result; the suggestions name the screen's controls."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=size, notifications=True) as pilot:
        await wait_for_model(pilot)
        await pilot.press("p", "space")  # causal-attention, the first patch
        await settle(pilot)
        await pilot.press("g")
        await pilot.pause()
        screen = app.screen
        assert list(screen.query_one("#plan-patches").selected) == ["causal-attention"]
        on_screen(app, "video size", "batch", "mode", "GPU memory")  # every control labelled at this width
        screen.query_one("#plan-mode").value = "lora"
        await type_into(pilot, "#plan-rank", "4")
        await type_into(pilot, "#plan-gpu", "40MiB", enter=True)
        await scroll_to(pilot, "#plan-result")
        on_screen(app, "planned tiny, 9x64x64, batch 2, float32,", "training lora:4 (bf16 autocast,", "causal-attention",
                  "transformer training step (lora:4)", "40.0 MiB card does not fit", "with checkpointing + batch 1")
        no_cli_flags(app)

        await type_into(pilot, "#plan-size", "9x65x64", enter=True)  # refused: the old result goes
        await scroll_to(pilot, "#plan-result")
        on_screen(app, "could not plan:", "not a multiple of 16")
        assert "peak" not in screen_text(app)
