"""The attention x-ray viewer through Textual's Pilot (keys, exports) and as snapshots at 80×24 and 160×48, on a real
recording of a tiny model; and `a` on the main screen recording the open model.

Update the snapshots after an intended change: `python -m pytest tests/test_attention_tui.py --snapshot-update`.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from cogsurgeon import patches
from cogsurgeon.inspector import record_attention
from cogsurgeon.inspector.loading import build_tiny
from cogsurgeon.inspector.tui.app import CogsurgeonApp
from cogsurgeon.inspector.tui.attention_screen import AttentionScreen, AttentionViewerApp, ViewState, overview_text
from cogsurgeon.patches.verify import tiny_inputs

from test_tui import pilot_test, wait_for_model


@pytest.fixture(scope="module")
def recording():
    """tiny-1.5, frame-causal, two steps, maps of two words."""
    model = build_tiny("tiny-1.5")
    patches.apply(model, "frame-causal-attention")
    with torch.no_grad(), record_attention(model, words=(1, 3)) as rec:
        for seed in (0, 1):
            model(**tiny_inputs(model, seed=seed))
    return rec


@pilot_test
async def test_keys_move_the_selection_and_the_view_follows(recording, tmp_path):
    app = AttentionViewerApp(recording, "tiny-1.5", export_folder=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, AttentionScreen) and screen.state == ViewState()
        await pilot.press("down", "down", "right", "right_square_bracket", "b", "w")
        await pilot.pause()
        assert screen.state == ViewState(layer=2, head=1, step=1, batch=1, word=1)
        facts = str(screen.query_one("#xray-facts").render())
        assert "transformer_blocks.2.attn1  head 1" in facts and "step 1/1  batch 1/1" in facts
        stats = recording.head_stats(2, step=1, batch=1)[1]
        assert f"video→text {stats.video_to_text:.3f}" in facts
        assert "word 3 't3'" in str(screen.query_one("#xray-word-map").render())
        await pilot.press("down")  # wraps to the first layer
        await pilot.pause()
        assert screen.state.layer == 0


@pilot_test
async def test_exports_write_the_numbers_of_the_view_and_a_png(recording, tmp_path):
    app = AttentionViewerApp(recording, "tiny-1.5", export_folder=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("down", "right", "x", "c")
        await pilot.pause()
    stem = tmp_path / "attention-L1-h1-s0-b0"
    with Image.open(stem.with_suffix(".png")) as image:
        assert image.format == "PNG" and image.width > 100
    rows = list(csv.reader(stem.with_suffix(".csv").open()))
    assert rows[0] == ["query \\ key", "text", "frame 0", "frame 1", "frame 2"]
    expected = recording.mass(1)[1]
    assert torch.allclose(torch.tensor([[float(v) for v in row[1:]] for row in rows[1:]]), expected, atol=1e-5)
    document = json.loads(stem.with_suffix(".json").read_text())
    assert torch.equal(torch.tensor(document["mass"]), expected) and document["word"]["index"] == 1
    assert document["stats"]["kind"] == recording.head_stats(1)[1].kind


def test_the_overview_colours_every_head_by_its_kind(recording):
    text = overview_text(recording, ViewState())
    letters = [line.split(" ", 1)[1] for line in text.plain.splitlines()[1:4]]
    kinds = {"spatial": "S", "temporal": "T", "text": "X", "mixed": "M"}
    assert letters == ["".join(kinds[s.kind] for s in recording.head_stats(layer)) for layer in range(3)]


@pytest.mark.slow
@pilot_test
async def test_a_on_the_main_screen_records_the_open_model(tmp_path):
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for_model(pilot)
        await pilot.press("a")
        screen = app.screen
        assert isinstance(screen, AttentionScreen)
        while screen.recording is None:
            await pilot.pause(0.05)
        await pilot.pause()
        assert screen.recording.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        assert "transformer_blocks.0.attn1  head 0" in str(screen.query_one("#xray-facts").render())
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen


@pytest.mark.slow
@pilot_test
async def test_a_on_a_meta_model_says_why_it_cannot_record():
    app = CogsurgeonApp("cogvideox-2b")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for_model(pilot)
        await pilot.press("a")
        await pilot.pause()
        assert app.screen is app.main_screen
        assert any("meta device" in str(n.message) for n in app._notifications)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_viewer_snapshot(snap_compare, recording, size):
    async def select(pilot) -> None:
        await pilot.pause()
        await pilot.press("down", "right", "w")
        await pilot.pause()

    assert snap_compare(AttentionViewerApp(recording, "tiny-1.5"), terminal_size=size, run_before=select)


@pilot_test
async def test_an_export_cut_off_leaves_the_earlier_files_whole_and_no_temporary_file(recording, tmp_path):
    """The exports are written beside their names and renamed: a write cut off (a file-size limit here, as a full
    disk would) keeps the files of the last export as they were (write_text truncated them and left half a CSV), no
    temporary file is left, and the screen says what failed instead of crashing."""
    import resource

    from test_tui import notifications

    app = AttentionViewerApp(recording, "tiny-1.5", export_folder=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("x", "c")
        await pilot.pause()
        written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
        assert sorted(written) == [f"attention-L0-h0-s0-b0.{suffix}" for suffix in ("csv", "json", "png")]
        assert all(len(data) > 100 for data in written.values())
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, limits[1]))  # Python ignores SIGXFSZ: writes fail, EFBIG
        try:
            await pilot.press("x", "c")
            await pilot.pause()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == written
        failed = [message for message in notifications(app) if "attention-L0-h0-s0-b0" in message
                  and not message.startswith("wrote")]
        assert len(failed) == 2, notifications(app)
