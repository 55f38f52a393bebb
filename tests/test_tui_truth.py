"""A result the TUI shows is the result of exactly what is shown beside it (issue 22): `v` verifies the row's
options and its verdict names them; new options or another model clear it; the LoRA screen keeps one state, and a
new checkpoint resets everything computed for the last one."""

from __future__ import annotations

import pytest

from test_tui import (
    SIZE,
    inspect_in_the_lora_screen,
    notifications,
    patch_rows,
    pilot_test,
    settle,
    shown_text,
    wait_for_model,
)

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        await inspect_in_the_lora_screen(pilot, "out/checkpoint-500")
        screen = app.screen
        field = screen.query_one("#lora-checkpoint")
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
        assert screen.query_one("#lora-adapter").value == ""
        screen.query_one("#lora-base").focus()
        await pilot.press("enter")  # the base field's Enter asks for a verify too
        await settle(pilot)
        assert "enter an adapter folder to verify" in notifications(app)[-1]
        assert not screen.query_one("#lora-verify-result").display

        screen.query_one("#lora-alpha").value = "4"
        await pilot.click("#lora-repair")
        await settle(pilot)
        assert shown_text(screen.query_one("#lora-repair-result")).startswith(
            "wrote out/checkpoint-900-adapter from out/checkpoint-900: ")
    assert tree_digest(tmp_path / "out" / "checkpoint-500-adapter") == first_adapter
    assert '"lora_alpha": 4' in (tmp_path / "out" / "checkpoint-900-adapter" / "adapter_config.json").read_text()


@pytest.mark.slow
@pilot_test
async def test_the_findings_do_not_say_ready_while_lora_alpha_is_unknown(tmp_path, monkeypatch):
    from lora_helpers import save_cogvideo_checkpoint, train

    monkeypatch.chdir(tmp_path)
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "checkpoint-10")
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await inspect_in_the_lora_screen(pilot, "checkpoint-10")
        findings = shown_text(app.screen.query_one("#lora-findings"))
        assert "UNKNOWN" in findings and "ready" not in findings
        assert "needs       the trained lora_alpha" in findings
        app.screen.query_one("#lora-alpha").value = "2"
        await pilot.pause()
        assert "ready       no problems" in shown_text(app.screen.query_one("#lora-findings"))


def cursor_row_is_visible(table) -> bool:
    visible = table.scrollable_content_region.height - (table.header_height if table.show_header else 0)
    return table.scroll_y <= table.cursor_row < table.scroll_y + visible


@pytest.mark.slow
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


@pytest.mark.slow
@pilot_test
async def test_the_options_dialog_keeps_what_was_typed_and_marks_the_field_the_patch_refuses():
    from cogsurgeon.inspector.tui.screens import PatchOptionsScreen

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        table = app.query_one("#patches-table")
        await pilot.press("p")
        table.move_cursor(row=list(patch_rows(app)).index(BLOCK))
        await pilot.press("o")
        await pilot.pause()
        await pilot.press("ctrl+u", "0", "tab", "ctrl+u", "7", "enter")  # chunk 0 is refused
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, PatchOptionsScreen)
        chunk, window = dialog.query_one("#option-chunk"), dialog.query_one("#option-window")
        assert chunk.has_class("-invalid") and not window.has_class("-invalid")
        assert (chunk.value, window.value) == ("0", "7")
        assert app.focused is chunk
        assert "chunk" in shown_text(dialog.query_one("#options-hint"))
        await pilot.press("ctrl+u", "2", "enter")
        await pilot.pause()
        assert not isinstance(app.screen, PatchOptionsScreen)
        assert patch_rows(app)[BLOCK][2] == "chunk=2, window=7, sink=0"


@pilot_test
async def test_the_model_dialog_highlights_the_open_model():
    from cogsurgeon.inspector.model_specs import known_specs

    app = CogsurgeonApp("tiny-1.5")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        await pilot.press("m")
        await pilot.pause()
        options = app.screen.query_one("#model-specs")
        assert options.highlighted == known_specs().index("tiny-1.5") != 0
        assert options.get_option_at_index(options.highlighted).id == "tiny-1.5"
        await pilot.press("enter")  # Enter on the highlight opens what is open: the same model
        await settle(pilot)
        assert app.main_screen.spec == "tiny-1.5"


@pilot_test
async def test_s_shows_the_source_at_80_columns_in_the_details_place_until_s_again():
    from cogsurgeon.inspector.tui.widgets import ModuleTree, SourceView

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        app.query_one(ModuleTree).go_to("transformer_blocks.0.attn1")
        await pilot.pause()
        source, details = app.query_one(SourceView), app.query_one("#details")
        assert not source.display or source.region.height == 0  # no room of its own at 80 columns
        await pilot.press("s")
        await pilot.pause()
        assert source.region.height >= 6 and app.focused is source
        assert details.region.height == 0
        assert source.border_title.startswith("CogVideoXAttnProcessor2_0.__call__")
        await pilot.press("s")
        await pilot.pause()
        assert source.region.height == 0 and details.region.height > 0
        assert app.focused is app.query_one(ModuleTree)


@pytest.mark.slow
@pilot_test
async def test_s_focuses_the_source_where_it_has_room():
    from cogsurgeon.inspector.tui.widgets import SourceView

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("s")
        await pilot.pause()
        assert app.focused is app.query_one(SourceView)
        assert app.query_one("#details").region.height > 0


@pilot_test
async def test_at_80_columns_every_footer_key_is_shown_whole():
    from textual.widgets._footer import FooterKey

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        keys = list(app.screen.query(FooterKey))
        shown = {key.description for key in keys}
        assert {"Filter", "Tree", "Patches", "Source", "Model", "LoRA", "Keys", "Quit"} <= shown, shown
        regions = sorted((key.region for key in keys), key=lambda region: region.x)
        assert all(region.right <= 80 and region.width > 0 for region in regions), regions
        assert all(left.right <= right.x for left, right in zip(regions, regions[1:])), regions  # none overlaps


@pilot_test
async def test_at_80x24_the_details_show_file_and_line_without_scrolling():
    from cogsurgeon.inspector.tui.widgets import ModuleDetails, ModuleTree

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        app.query_one(ModuleTree).go_to("transformer_blocks.0.attn1")
        await pilot.pause()
        details = app.query_one("#details")
        rows = details.scrollable_content_region.height
        shown = shown_text(app.query_one(ModuleDetails)).splitlines()[:rows]
        assert rows >= 3 and details.scroll_y == 0
        assert any(line.startswith("file ") and "attention_processor.py:" in line for line in shown), shown


@pytest.mark.slow
@pilot_test
async def test_the_filter_folds_a_run_of_blocks_as_modules_filter_does():
    from test_tui import tree_rows

    from cogsurgeon.inspector.tui.widgets import ModuleTree

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("slash", *"attn1")
        await pilot.pause()
        rows = [row.strip() for row in tree_rows(app.query_one(ModuleTree))]
        assert rows[:4] == ["tiny  CogVideoXTransformer3DModel  42.2K",
                            "transformer_blocks (0-1): 2 × CogVideoXBlock  38.6K", "0  CogVideoXBlock  19.3K",
                            "attn1  Attention  4.29K"], rows
        assert "1  CogVideoXBlock  19.3K" not in rows and rows.count("attn1  Attention  4.29K") == 1


@pytest.mark.slow
@pilot_test
async def test_scrollbars_stand_out_from_their_track_in_every_theme():
    """The details' scrollbar was dark teal on black in the default theme: the thumb must differ from the track (each
    blended over the screen's background) by a quarter of the brightness scale, in every theme the app offers. (The
    ANSI themes draw with the terminal's own palette, whose colours are not known here: they are left out.)"""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        faint = []
        for theme in sorted(name for name in app.available_themes if not name.startswith("ansi-")):
            app.theme = theme
            await pilot.pause()
            for selector in ("#details", "#tree", "#source"):
                styles = app.query_one(selector).styles
                track = app.screen.styles.background + styles.scrollbar_background
                thumb = track + styles.scrollbar_color
                if abs(thumb.brightness - track.brightness) < 0.25:
                    faint.append((theme, selector, thumb.hex, track.hex))
        assert not faint, faint


@pilot_test
async def test_at_80_columns_a_long_folder_name_leaves_the_roots_class_and_size_in_view(tmp_path, tiny_model):
    from test_tui import drawn_rows

    from cogsurgeon.inspector.tui.widgets import ModuleTree

    folder = tmp_path / ("a-folder-name-long-enough-to-fill-a-row-" * 2) / "transformer"
    tiny_model.save_pretrained(str(folder))
    app = CogsurgeonApp(str(folder))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        root = drawn_rows(app.query_one(ModuleTree))[0]
        assert root.startswith("▼ a-folder-name-") and root.endswith("(folder)  CogVideoXTransformer3DModel  42.2K"), root
        assert "…" in root and len(root) <= app.query_one(ModuleTree).scrollable_content_region.width


def lora_screen_messages(tmp_path, tiny_model) -> list[str]:
    """Every kind of message from tools.lora that the LoRA screen shows and that names a keyword argument of a call:
    refusals (inspect, repair, merge, verify, the output folder's checks), report warnings and alpha details. Each
    comes from the real call on real files."""
    import shutil

    import torch
    from lora_helpers import save_cogvideo_checkpoint, train
    from lora_trainers import peft_folder
    from lora_trainers import train as train_on
    from safetensors.torch import save_file

    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora import inspect_checkpoint, merge_loras, repair_checkpoint, verify_adapter
    from cogsurgeon.tools.lora.merge import parse_lora_spec
    from cogsurgeon.tools.lora.publish import MERGE, REPAIR, check_output

    trained = train(rank=4, lora_alpha=2)
    out = tmp_path / "out"
    unsettled = save_cogvideo_checkpoint(trained, out / "checkpoint-1")
    save_cogvideo_checkpoint(trained, out / "checkpoint-2")
    stored = save_cogvideo_checkpoint(trained, tmp_path / "stored", metadata=True)
    beside = tmp_path / "beside"  # a checkpoint of its own and numbered ones
    shutil.copytree(unsettled, beside / "checkpoint-3")
    shutil.copy(stored / "pytorch_lora_weights.safetensors", beside)
    clashing = tmp_path / "clashing"  # two problems
    clashing.mkdir()
    save_file({f"transformer.transformer_blocks.0.attn1.{name}.lora_{part}.weight": torch.zeros(shape)
               for name in ("to_q", "to_k") for part, shape in (("A", (4, 8)), ("B", (16, 3)))},
              clashing / "pytorch_lora_weights.safetensors")
    dora = peft_folder(train_on("tiny", 4, 6, seed=61, use_dora=True), tmp_path / "dora")
    base = tmp_path / "base"
    tiny_model.save_pretrained(str(base))
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    adapter = repair_checkpoint(unsettled, tmp_path / "adapter", alpha=2).out_dir

    messages = []
    for call in (
        lambda: inspect_checkpoint(out),
        lambda: inspect_checkpoint(unsettled / "pytorch_lora_weights.safetensors", step=1),
        lambda: inspect_checkpoint(stored, latest=True),
        lambda: inspect_checkpoint(stored, alpha=3),
        lambda: repair_checkpoint(unsettled, tmp_path / "refused"),
        lambda: repair_checkpoint(clashing, tmp_path / "refused", alpha=2),
        lambda: repair_checkpoint(dora, tmp_path / "refused", to="peft,comfyui"),
        lambda: repair_checkpoint(stored, tmp_path / "link"),
        lambda: merge_loras(base, [parse_lora_spec(str(unsettled))], tmp_path / "merged"),
        lambda: verify_adapter(tmp_path / "taken", "tiny"),
        lambda: verify_adapter(adapter, "cogvideox-5b"),
        *(lambda kind=kind, path=path, force=force: check_output(tmp_path / path, force, kind)
          for kind in (REPAIR, MERGE) for path, force in (("taken", False), ("a-file", True), ("taken", True))),
    ):
        with pytest.raises(CogsurgeonError) as caught:
            call()
        messages.append(str(caught.value))
    for report in (inspect_checkpoint(unsettled), inspect_checkpoint(unsettled, trainer="cogvideo-finetune"),
                   inspect_checkpoint(stored, alpha=3, override_stored_alpha=True),
                   inspect_checkpoint(stored, alpha=2, trainer="cogvideo-finetune"), inspect_checkpoint(beside),
                   inspect_checkpoint(unsettled, alpha=5)):
        messages += [*report.warnings, *([report.alpha_detail] if report.alpha_source in ("flag", "trainer") else [])]
    return messages


def test_every_message_the_lora_screen_shows_names_its_controls_and_every_control_entry_is_reached(tmp_path,
                                                                                                    tiny_model):
    """The core's messages name its calls' keyword arguments (`step=N`, `alpha=`), in errors and report warnings
    alike; the LoRA screen names its controls instead and leaves no keyword or `cogsurgeon lora` flag. Each entry of
    its phrase table and of its parameter table is used by one of those messages: none is dead."""
    import inspect
    import re

    from cogsurgeon.inspector.tui.lora_screen import PARAMETER_CONTROLS, SCREEN_CONTROLS, in_screen_terms
    from cogsurgeon.tools.lora import inspect_checkpoint, merge_loras, repair_checkpoint, verify_adapter

    messages = lora_screen_messages(tmp_path, tiny_model)
    parameters = {name for call in (inspect_checkpoint, repair_checkpoint, merge_loras, verify_adapter)
                  for name in inspect.signature(call).parameters}
    keyword = re.compile(rf"(?<![\w.])({'|'.join(sorted(parameters))})=")
    flag = re.compile(r"--(alpha|trainer|step|latest|override-stored-alpha|force|out|to|bake-scale|base)(?![\w-])")
    assert all(keyword.search(message) or any(phrase in message for phrase, _ in SCREEN_CONTROLS)
               for message in messages if message), messages
    assert not [message for message in messages if flag.search(message)]  # Python callers read keywords
    shown = [in_screen_terms(message) for message in messages]
    assert not [text for text in shown if keyword.search(text) or flag.search(text)], shown

    assert not [phrase for phrase, _ in SCREEN_CONTROLS if not any(phrase in message for message in messages)]
    left_to_rename = []
    for message in messages:
        for phrase, control in SCREEN_CONTROLS:
            message = message.replace(phrase, control)
        left_to_rename += keyword.findall(message)
    assert set(left_to_rename) == set(PARAMETER_CONTROLS)
