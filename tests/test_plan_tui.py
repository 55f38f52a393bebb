"""The planner screen through Textual's Pilot on the tiny model: a plan at a typed size, the verdict for a card
with the switch that would make it fit, and a bad size as a notification."""

from __future__ import annotations

import re

from test_tui import SIZE, notifications, pilot_test, settle, shown_text, wait_for_model

from cogsurgeon.inspector.tui.app import CogsurgeonApp
from cogsurgeon.inspector.tui.plan_screen import PlanScreen


@pilot_test
async def test_plan_screen_plans_the_loaded_model_at_a_typed_size():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("g")
        await pilot.pause()
        assert isinstance(app.screen, PlanScreen)
        assert app.screen.query_one("#plan-size").value == "9x64x64"  # the tiny model's pipeline size
        app.screen.query_one("#plan-mode").value = "lora"
        app.screen.query_one("#plan-rank").value = "4"
        app.screen.query_one("#plan-gpu").value = "40MiB"
        await pilot.click("#plan-run")
        await settle(pilot)
        shown = shown_text(app.screen.query_one("#plan-result"))
        assert shown.splitlines()[0].split() == ["planned", "tiny,", "9x64x64,", "batch", "2,", "float32,", "training",
                                                 "lora:4,", "no", "patches"]
        assert shown.splitlines()[1].startswith("peak")
        assert "transformer training step (lora:4)" in shown
        assert "optimizer" in shown and "workspace" in shown
        assert re.search(r"40.0 MiB card +does not fit", shown)  # two 32 MiB cuBLAS workspaces alone
        assert "with batch 1" in shown and "--" not in shown

        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen


@pilot_test
async def test_plan_screen_reports_a_bad_size_as_a_notification():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("g")
        await pilot.pause()
        size = app.screen.query_one("#plan-size")
        size.value = "9x65x64"
        size.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert any("not a multiple of 16" in message for message in notifications(app))
        size.value = "nine"  # the notification above may cover the Plan button: Enter in the field plans too
        await pilot.press("enter")
        await settle(pilot)
        assert any("FRAMESxHEIGHTxWIDTH" in message for message in notifications(app))
