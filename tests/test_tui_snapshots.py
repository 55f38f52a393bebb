"""What the TUI looks like (pytest-textual-snapshot, 160×48, tiny models, diffusers 0.42.1 and Textual 8.2.8 as
pinned in the dev environment): the main screen, the details with source, the patches panel, the LoRA screen.

Update after an intended change: `python -m pytest tests/test_tui_snapshots.py --snapshot-update`, then look at
the SVGs in the report before committing them.
"""

from __future__ import annotations

import pytest

from cogsurgeon.inspector.tui.app import CogsurgeonApp

from test_tui import wait_for_model

SIZE = (160, 48)


async def loaded(pilot) -> None:
    """Wait for the model load (the first one in a process imports torch and diffusers) and the screen."""
    await wait_for_model(pilot)


def test_main_screen(snap_compare):
    assert snap_compare(CogsurgeonApp("tiny"), terminal_size=SIZE, run_before=loaded)


@pytest.mark.slow
def test_details_with_the_processor_source(snap_compare):
    async def select_attention(pilot) -> None:
        await loaded(pilot)
        await pilot.press("slash", *"attn1", "enter")
        await pilot.pause()

    assert snap_compare(CogsurgeonApp("tiny"), terminal_size=SIZE, run_before=select_attention)


@pytest.mark.slow
def test_patches_panel_with_a_patch_applied(snap_compare):
    async def apply_causal(pilot) -> None:
        await loaded(pilot)
        await pilot.press("p", "space", "down")
        await pilot.pause()
        pilot.app.clear_notifications()
        await pilot.pause()

    assert snap_compare(CogsurgeonApp("tiny"), terminal_size=SIZE, run_before=apply_causal)


@pytest.mark.slow
def test_lora_screen_after_inspect(snap_compare, tmp_path, monkeypatch):
    from lora_helpers import save_cogvideo_checkpoint, train

    monkeypatch.chdir(tmp_path)  # the screen shows paths relative to the working folder: the same on every run
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "checkpoint-10")

    async def inspect(pilot) -> None:
        await loaded(pilot)
        await pilot.press("l")
        await pilot.pause()
        await pilot.press(*"checkpoint-10", "enter")
        await loaded(pilot)
        # Where focus lands after an inspect depends on when its worker ends relative to the key presses (the path
        # field keeps it, or the findings take it); the picture is of the findings, so no widget holds it.
        pilot.app.screen.set_focus(None)
        await pilot.pause()

    assert snap_compare(CogsurgeonApp("tiny"), terminal_size=SIZE, run_before=inspect)
