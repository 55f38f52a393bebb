"""A result the TUI shows is the result of exactly what is shown beside it (issue 22): `v` verifies the row's
options and its verdict names them; new options or another model clear it; the LoRA screen keeps one state, and a
new checkpoint resets everything computed for the last one."""

from __future__ import annotations

import pytest

from test_tui import SIZE, notifications, patch_rows, pilot_test, settle, shown_text, wait_for_model

from cogsurgeon.inspector.tui.app import CogsurgeonApp

BLOCK = "block-causal-attention"


async def set_block_options(app, pilot, chunk: str, window: str, sink: str) -> None:
    table = app.query_one("#patches-table")
    await pilot.press("p")
    table.move_cursor(row=list(patch_rows(app)).index(BLOCK))
    await pilot.press("o")
    await pilot.pause()
    await pilot.press("ctrl+u", *chunk, "tab", "ctrl+u", *window, "tab", "ctrl+u", *sink, "enter")
    await pilot.pause()


@pilot_test
async def test_v_verifies_the_options_the_row_shows_and_the_verdict_names_them():
    from cogsurgeon.patches.verify import verify_patch

    expected = verify_patch(BLOCK, options={"chunk": 2, "window": 2, "sink": 1})  # independently, the same check
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await set_block_options(app, pilot, "2", "2", "1")
        assert patch_rows(app)[BLOCK][2] == "chunk=2, window=2, sink=1"
        await pilot.press("v")
        await settle(pilot)
        verdict = patch_rows(app)[BLOCK][1]
        assert verdict == (f"passed for chunk=2, sink=1, window=2: max error {expected.max_error:.2g}, "
                           "revert bit-exact"), verdict
        assert any("verifying block-causal-attention with chunk=2, window=2, sink=1" in message
                   for message in notifications(app))

        await set_block_options(app, pilot, "1", "2", "1")  # the verdict was not computed for these
        assert patch_rows(app)[BLOCK][1:3] == ["-", "chunk=1, window=2, sink=1"]
        await set_block_options(app, pilot, "2", "2", "1")  # back to what was verified: its verdict holds again
        assert patch_rows(app)[BLOCK][1] == verdict


@pilot_test
async def test_a_verdict_is_cleared_when_another_model_opens():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("p", "v")
        await settle(pilot)
        assert patch_rows(app)["causal-attention"][1].startswith("passed, max error ")
        await pilot.press("m")
        await pilot.pause()
        await pilot.click("#model-path")
        await pilot.press(*"tiny-i2v", "enter")
        await settle(pilot)
        await wait_for_model(pilot)
        assert app.main_screen.spec == "tiny-i2v"
        assert patch_rows(app)["causal-attention"][1] == "-"


@pilot_test
async def test_a_new_checkpoint_resets_everything_computed_for_the_last_one(tmp_path, monkeypatch):
    """Inspect A, repair, verify; inspect B: nothing of A is shown (output folder, progress, results, the replace
    switch); repairing B writes B's adapter beside B, and A's adapter is untouched."""
    from lora_helpers import BASE, save_cogvideo_checkpoint, train, tree_digest

    monkeypatch.chdir(tmp_path)
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "out" / "checkpoint-500")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=4, seed=7), tmp_path / "out" / "checkpoint-900")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        screen = app.screen
        field = screen.query_one("#lora-checkpoint")
        await pilot.press(*"out/checkpoint-500", "enter")
        await settle(pilot)
        screen.query_one("#lora-alpha").value = "2"
        await pilot.click("#lora-repair")
        await settle(pilot)
        assert shown_text(screen.query_one("#lora-repair-result")).startswith(
            "wrote out/checkpoint-500-adapter from out/checkpoint-500: ")
        screen.query_one("#lora-base").value = BASE
        await pilot.click("#lora-verify")
        await settle(pilot)
        verified = shown_text(screen.query_one("#lora-verify-result"))
        assert verified.splitlines()[0].split() == ["verify", "passed"]
        assert ["adapter", "out/checkpoint-500-adapter"] in [line.split() for line in verified.splitlines()]
        assert any("verify passed: out/checkpoint-500-adapter against" in m for m in notifications(app))
        first_adapter = tree_digest(tmp_path / "out" / "checkpoint-500-adapter")
        screen.query_one("#lora-force").value = True

        field.value = "out/checkpoint-900"  # typed, not yet inspected: A's results go at once
        await pilot.pause()
        assert not screen.query_one("#lora-repair-result").display
        assert not screen.query_one("#lora-verify-result").display
        assert screen.query_one("#lora-repair").disabled and screen.query_one("#lora-verify").disabled
        assert "press Enter to inspect out/checkpoint-900" in shown_text(screen.query_one("#lora-findings"))

        field.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert screen.query_one("#lora-out").value == "out/checkpoint-900-adapter"
        assert screen.query_one("#lora-force").value is False
        assert screen.query_one("#lora-progress").percentage == 0
        assert not screen.query_one("#lora-repair-result").display
        assert not screen.query_one("#lora-verify-result").display
        assert "out/checkpoint-900" in shown_text(screen.query_one("#lora-findings"))
        assert screen.query_one("#lora-verify").disabled  # nothing to verify for B yet: never A's adapter
        screen.query_one("#lora-base").focus()
        await pilot.press("enter")  # the base field's Enter asks for a verify too
        await settle(pilot)
        assert "repair a checkpoint first" in notifications(app)[-1]
        assert not screen.query_one("#lora-verify-result").display

        screen.query_one("#lora-alpha").value = "4"
        await pilot.click("#lora-repair")
        await settle(pilot)
        assert shown_text(screen.query_one("#lora-repair-result")).startswith(
            "wrote out/checkpoint-900-adapter from out/checkpoint-900: ")
    assert tree_digest(tmp_path / "out" / "checkpoint-500-adapter") == first_adapter
    assert '"lora_alpha": 4' in (tmp_path / "out" / "checkpoint-900-adapter" / "adapter_config.json").read_text()


@pilot_test
async def test_the_findings_do_not_say_ready_while_lora_alpha_is_unknown(tmp_path, monkeypatch):
    from lora_helpers import save_cogvideo_checkpoint, train

    monkeypatch.chdir(tmp_path)
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "checkpoint-10")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        await pilot.press(*"checkpoint-10", "enter")
        await settle(pilot)
        findings = shown_text(app.screen.query_one("#lora-findings"))
        assert "UNKNOWN" in findings and "ready" not in findings
        assert "needs       the trained lora_alpha" in findings
        app.screen.query_one("#lora-alpha").value = "2"
        await pilot.pause()
        assert "ready       no problems" in shown_text(app.screen.query_one("#lora-findings"))


def cursor_row_is_visible(table) -> bool:
    visible = table.scrollable_content_region.height - (table.header_height if table.show_header else 0)
    return table.scroll_y <= table.cursor_row < table.scroll_y + visible


@pilot_test
async def test_at_80x24_the_patches_cursor_stays_visible_and_actions_apply_to_its_row():
    """Home/End move the cursor in the patches list as in the tree; setting options keeps the cursor (and the
    scroll) on the row they were set for, so the next space applies the row the user sees."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        table = app.query_one("#patches-table")
        names = list(patch_rows(app))
        await pilot.press("p", "end")
        await pilot.pause()
        assert table.cursor_row == len(names) - 1 and cursor_row_is_visible(table)
        await pilot.press("home")
        await pilot.pause()
        assert table.cursor_row == 0 and cursor_row_is_visible(table)

        window = names.index("window-attention")
        for _ in range(window):
            await pilot.press("down")
        await pilot.press("o")
        await pilot.pause()
        await pilot.press("enter")  # the options as they are: set, the dialog closes
        await pilot.pause()
        assert table.cursor_row == window and cursor_row_is_visible(table)
        await pilot.press("space")
        await pilot.pause()
        rows = patch_rows(app)
        assert rows["window-attention"][0] == "applied" and rows["causal-attention"][0] == "off"
        assert table.cursor_row == window and cursor_row_is_visible(table)
