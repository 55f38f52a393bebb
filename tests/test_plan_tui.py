"""The planner screen through Textual's Pilot on the tiny model: a plan at a typed size, the verdict for a card
with the switch that would make it fit, and a bad size as a notification."""

from __future__ import annotations

import re

import pytest

from test_tui import SIZE, notifications, pilot_test, settle, shown_text, wait_for_model

from cogsurgeon.inspector.tui.app import CogsurgeonApp
from cogsurgeon.inspector.tui.plan_screen import PlanScreen


async def planned_text(pilot, screen) -> str:
    """Press Plan, wait for the answer and return the result's text on one line."""
    await pilot.click("#plan-run")
    await settle(pilot)
    return " ".join(shown_text(screen.query_one("#plan-result")).split())


async def planned_by_keyboard(pilot, screen) -> str:
    """As `planned_text`, by Enter in the batch field (a toast may cover the Plan button, and a button pressed a
    moment ago ignores another press while it shows as pressed)."""
    screen.query_one("#plan-result").update("(not answered yet)")  # an Enter the screen missed shows as this
    screen.query_one("#plan-batch").focus()
    await pilot.press("enter")
    await settle(pilot)
    shown = " ".join(shown_text(screen.query_one("#plan-result")).split())
    assert shown != "(not answered yet)"
    return shown


async def open_plan_screen(pilot, app):
    """The planner for the model on the main screen, once it is loaded (`g`)."""
    await wait_for_model(pilot)
    await pilot.press("g")
    await pilot.pause()
    return app.screen


@pytest.mark.slow
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
        assert " ".join(shown.split("peak")[0].split()) == ("planned tiny, 9x64x64, batch 2, float32, training lora:4 "
                                                           "(bf16 autocast, LoRA auto), no patches")
        assert any(line.startswith("peak") for line in shown.splitlines()[1:3])
        assert "transformer training step (lora:4)" in shown
        assert "optimizer" in shown and "workspace" in shown
        assert re.search(r"40.0 MiB card +does not fit", shown)  # two 32 MiB cuBLAS workspaces alone
        assert "with batch 1" in shown and "--" not in shown

        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen


@pytest.mark.slow
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


@pytest.mark.slow
@pilot_test
async def test_plan_screen_plans_training_as_the_trainers_run_it():
    """The mixed-precision, LoRA dtype and trainer controls reach the planner, and the result says what was planned:
    the same bytes as plan_memory given the same settings."""
    from cogsurgeon.inspector.plan import plan_memory

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_plan_screen(pilot, app)
        screen.query_one("#plan-mode").value = "lora"
        screen.query_one("#plan-rank").value = "4"
        screen.query_one("#plan-mixed").value = "fp16"
        screen.query_one("#plan-lora-dtype").value = "fp32"
        shown = await planned_text(pilot, screen)
        expected = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="lora:4",
                               mixed_precision="fp16", lora_dtype="fp32")
        assert "training lora:4 (fp16 autocast, LoRA fp32)" in shown
        assert f"({expected.peak_bytes:,} bytes)" in shown

        screen.query_one("#plan-mode").value = "inference"
        screen.query_one("#plan-trainer").value = "cogvideox-factory"
        screen.query_one("#plan-mixed").clear()
        screen.query_one("#plan-lora-dtype").clear()
        shown = await planned_text(pilot, screen)
        preset = plan_memory("tiny", frames=9, height=64, width=64, batch=2, trainer="cogvideox-factory")
        assert f"(as cogvideox-factory, {preset.settings.mixed_precision} autocast" in shown
        assert f"({preset.peak_bytes:,} bytes)" in shown

        screen.query_one("#plan-trainer").clear()
        screen.query_one("#plan-mixed").value = "fp16"  # a training setting with inference: named as the control
        shown = await planned_text(pilot, screen)
        assert shown.startswith("could not plan: autocast and LoRA dtype are training settings")
        assert "--" not in shown


@pytest.mark.slow
@pilot_test
async def test_plan_screen_plans_a_full_finetune_under_deepspeed_zero():
    """Issue 25 item 3: the ZeRO stage and GPU count controls reach the planner; a trainer's full finetune is its
    launch's (CogVideo: ZeRO-2 over 8 GPUs); a stage without full training is named as the screen's controls."""
    from cogsurgeon.inspector.plan import plan_memory

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_plan_screen(pilot, app)
        screen.query_one("#plan-mode").value = "full"
        screen.query_one("#plan-trainer").value = "cogvideo-finetune"
        shown = await planned_text(pilot, screen)
        expected = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="full",
                               trainer="cogvideo-finetune")
        assert "(as cogvideo-finetune, DeepSpeed ZeRO-2, per GPU of 8, no autocast)" in shown
        assert f"({expected.peak_bytes:,} bytes)" in shown and "master_weights" in shown

        screen.query_one("#plan-trainer").clear()
        screen.query_one("#plan-zero").value = "3"
        screen.query_one("#plan-gpus").value = "4"
        shown = await planned_text(pilot, screen)
        expected = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="full", zero=3, gpus=4)
        assert "DeepSpeed ZeRO-3, per GPU of 4" in shown and f"({expected.peak_bytes:,} bytes)" in shown

        screen.query_one("#plan-mode").value = "inference"
        shown = await planned_text(pilot, screen)
        assert shown.startswith("could not plan: ZeRO 3 shards a full finetune's model states: add the mode "
                                "'full'"), shown
        assert "--" not in shown and "zero=" not in shown


@pytest.mark.slow
@pilot_test
async def test_at_80x24_the_plans_answer_comes_into_view_without_scrolling():
    """The result lies below the controls at 80x24; when a plan is shown it is scrolled to, once it is laid out at
    its new height (scrolling before that stopped where the one-line placeholder had ended: the peak stayed below the
    fold, as the tmux journey's capture showed)."""
    from test_tui_journeys import on_screen, without_toasts

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_for_model(pilot)
        await pilot.press("g")
        await pilot.pause()
        app.screen.query_one("#plan-mode").value = "lora"
        app.screen.query_one("#plan-rank").value = "4"
        field = app.screen.query_one("#plan-gpu")
        field.value = "40MiB"
        field.focus()
        await pilot.press("enter")
        await settle(pilot)
        await without_toasts(pilot)
        on_screen(app, "planned tiny, 9x64x64", "peak")


# Each refusal the planner screen can lead to, as the controls set for it (id: value) and the plan_memory keyword
# arguments its message names. Together they name every entry of PLAN_CONTROLS: an entry no message on this
# screen can name is dead, and a message naming a keyword the screen has no control for is caught below.
REFUSALS = [
    ({"#plan-gpu": "lots"}, {"gpu_memory"}),
    ({"#plan-mixed": "fp16"}, {"mixed_precision", "lora_dtype", "train"}),
    ({"#plan-mode": "full", "#plan-lora-dtype": "fp32"}, {"lora_dtype", "train"}),
    ({"#plan-checkpointing": True}, {"checkpointing", "train"}),
    ({"#plan-tiling": True}, {"tiling", "vae"}),
    ({"#plan-vae": True}, {"vae"}),  # the tiny model ships no VAE config
    ({"#plan-zero": "3"}, {"zero", "train"}),
    ({"#plan-mode": "full", "#plan-gpus": "4"}, {"gpus", "zero"}),
]


def test_every_control_the_planner_screen_names_is_one_a_refusal_can_reach():
    from cogsurgeon.inspector.tui.plan_screen import PLAN_CONTROLS

    assert set().union(*(named for _, named in REFUSALS)) == set(PLAN_CONTROLS)


@pytest.mark.slow
@pilot_test
async def test_each_refusal_on_the_planner_screen_names_its_controls_and_no_keyword():
    import inspect

    from cogsurgeon.inspector.plan import plan_memory
    from cogsurgeon.inspector.tui.plan_screen import PLAN_CONTROLS

    keyword = re.compile(rf"(?<![\w.])({'|'.join(inspect.signature(plan_memory).parameters)})=")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_plan_screen(pilot, app)  # one screen: each refusal's controls are put back after it
        defaults = {selector: screen.query_one(selector).value for controls, _ in REFUSALS for selector in controls}
        for controls, named in REFUSALS:
            for selector, value in controls.items():
                screen.query_one(selector).value = value
            shown = await planned_by_keyboard(pilot, screen)
            assert shown.startswith("could not plan: "), (controls, shown)
            assert not keyword.search(shown) and "--" not in shown, (controls, shown)
            assert all(PLAN_CONTROLS[name] in shown for name in named), (controls, shown)
            for selector in controls:
                screen.query_one(selector).value = defaults[selector]
        assert (await planned_by_keyboard(pilot, screen)).startswith("planned tiny, 9x64x64, batch 2")  # defaults plan
