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
