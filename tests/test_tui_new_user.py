"""What a new user hit in the TUI (issue 16 item 12), each driven through Pilot on tiny real models: the patches
panel after a second patch, details during a model switch, the layout at 80×24, the LoRA screen's base, wording and
alpha, what `patch verify` runs, and the keys `?`, `e` and `c`; also the source view following the app's theme."""

from __future__ import annotations

import os
import re
import stat
import sys

import pytest

from test_tui import SIZE, hold_loads, notifications, patch_rows, pilot_test, settle, shown_text, wait_for_model

from cogsurgeon.inspector.tui.app import CogsurgeonApp
from cogsurgeon.inspector.tui.widgets import ModuleDetails, ModuleTree, SourceView


@pytest.mark.slow
@pilot_test
async def test_the_patches_panel_shows_a_second_patch_applied():
    """causal-attention then attention-mask (they compose): the second one's state must read applied, although the
    modules' processors (and so the model's inventory) are the same after it as before."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("p", "space", "down", "down", "space")
        await pilot.pause()
        rows = patch_rows(app)
        assert list(rows)[:3] == ["causal-attention", "frame-causal-attention", "attention-mask"]
        assert rows["causal-attention"][0] == "applied"
        assert rows["attention-mask"][0] == "applied"
        await pilot.press("space")  # and reverting it again
        await pilot.pause()
        assert patch_rows(app)["attention-mask"][0] == "off"


@pytest.mark.slow
@pilot_test
async def test_a_model_switch_clears_the_previous_models_details(monkeypatch, tmp_path, tiny_model):
    folder = tmp_path / "runs" / "my-tiny"
    tiny_model.save_pretrained(folder)
    release = hold_loads(monkeypatch, str(folder))
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        app.main_screen.go_to_module("transformer_blocks.0.attn1")
        await pilot.pause()
        assert "transformer_blocks.0.attn1" in shown_text(app.query_one(ModuleDetails))
        app.main_screen.open(str(folder))
        await pilot.pause()
        details = shown_text(app.query_one(ModuleDetails))
        assert "transformer_blocks.0.attn1" not in details and f"loading {folder}" in details
        assert "loading" in app.query_one(SourceView).border_title
        release[str(folder)].set()
        await wait_for_model(pilot)
        details = shown_text(app.query_one(ModuleDetails))
        assert "transformer_blocks.0.attn1" in details and "9×64×64 video, batch 2" in details


@pytest.mark.slow
@pilot_test
async def test_at_80_columns_the_details_stack_under_the_tree():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        tree, details = app.query_one(ModuleTree), app.query_one("#details")  # the details pane, around ModuleDetails
        assert details.region.width >= 70 and tree.region.width >= 70
        assert tree.region.y < details.region.y
        await pilot.resize_terminal(160, 48)
        await pilot.pause()
        left = app.query_one("#left")  # the filter and the tree
        assert left.region.y == details.region.y and details.region.x > left.region.x  # side by side when wide


@pilot_test
async def test_at_80_by_24_the_tree_has_room_and_the_patches_stay_reachable():
    """80×24 is most terminals' default: the tree must show enough rows to browse (it had 2 when the patches panel
    and the details took their full heights), the patches panel must still be on screen, and `p` still reaches it."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        tree, screen = app.query_one(ModuleTree), app.screen
        # the rows inside the border: 7 since the details give file:line its line (module, class, file)
        assert tree.scrollable_content_region.height >= 7
        patches = app.query_one("#patches")
        assert patches.region.height > 0 and screen.region.contains_region(patches.region)
        assert app.query_one("#patches-table").region.height >= 3  # its header and at least two patches
        await pilot.press("p", "space")
        await pilot.pause()
        assert app.focused is app.query_one("#patches-table")
        assert patch_rows(app)["causal-attention"][0] == "applied"


@pytest.mark.slow
@pilot_test
async def test_at_80_by_24_the_details_that_do_not_fit_scroll_from_the_keyboard():
    """At 80×24 the stacked details show their first lines only; `d` focuses them and the arrows and End scroll the
    rest (the root's config, tens of lines) into view; `t` goes back to the tree."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        details = app.query_one("#details")
        assert details.max_scroll_y > 0  # more lines than the pane shows
        await pilot.press("d")
        assert app.focused is details
        await pilot.press("down")
        await pilot.pause()
        assert details.scroll_y == 1
        await pilot.press("end")
        await pilot.pause()
        assert details.scroll_y == details.max_scroll_y > 1
        await pilot.press("t", "down")  # another module: its details from the top, its name in view
        await pilot.pause()
        assert app.focused is app.query_one(ModuleTree)
        assert details.scroll_y == 0 and "patch_embed" in shown_text(app.query_one(ModuleDetails))


@pytest.mark.slow
@pilot_test
async def test_at_80_by_24_a_patchs_options_are_typed_from_the_keyboard_with_the_hint_in_view():
    """`o` on a patch with three parameters at 80×24: the dialog is taller than the screen, so it scrolls; how to set
    or cancel is in view, the first field has the focus, and tab, typing and Enter set the options."""
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_model(pilot)
        table = app.query_one("#patches-table")
        await pilot.press("p")
        table.move_cursor(row=list(patch_rows(app)).index("block-causal-attention"))
        await pilot.press("o")
        await pilot.pause()
        dialog = app.screen
        shown = dialog.query_one("#options-dialog").scrollable_content_region  # what the dialog's border encloses
        assert shown.contains_region(dialog.query_one("#options-hint").region)
        assert app.focused is dialog.query_one("#option-chunk")
        await pilot.press("ctrl+u", "3", "tab", "ctrl+u", "4", "tab", "ctrl+u", "1", "enter")
        await pilot.pause()
        assert patch_rows(app)["block-causal-attention"][2] == "chunk=3, window=4, sink=1"


@pytest.mark.slow
@pilot_test
async def test_verify_says_what_it_runs_and_shows_its_progress(monkeypatch):
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        screen, seen = app.main_screen, []
        refresh_patches = screen.refresh_patches

        def recording_refresh() -> None:  # every state of the verdict column, however fast the run
            refresh_patches()
            seen.append(patch_rows(app)["causal-attention"][1])

        monkeypatch.setattr(screen, "refresh_patches", recording_refresh)
        notify, told = screen.notify, []  # notifications expire after seconds; verify may take longer
        monkeypatch.setattr(screen, "notify", lambda message, **kwargs: (told.append(message), notify(message, **kwargs)))
        await pilot.press("p", "v")
        await settle(pilot)
        assert "tiny, tiny-i2v, tiny-1.5 with plain and fused processors" in told[0]
        steps = [verdict for verdict in seen if verdict.startswith("running")]
        assert steps == [f"running {index}/6: {variant}, {processor} processor" for index, (variant, processor) in
                         enumerate(((v, p) for v in ("tiny", "tiny-i2v", "tiny-1.5") for p in ("plain", "fused")), 1)]
        assert seen[0] == "starting…" and seen[-1].startswith("passed, max error ")


@pytest.mark.slow
@pilot_test
async def test_question_mark_lists_the_keys():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        keys = shown_text(app.screen.query_one("#help-keys"))
        for key, what in (("/", "Filter"), ("e", "Open in $EDITOR"), ("c", "Copy file:line"), ("space", "Apply/revert"),
                          ("v", "Verify"), ("m", "Model"), ("l", "LoRA"), ("^q", "Quit"), ("^p", "palette")):
            assert re.search(rf"^\s*{re.escape(key)}\s+.*{re.escape(what)}", keys, re.MULTILINE), (key, keys)
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen


@pilot_test
async def test_e_opens_the_modules_file_and_line_in_the_editor(tmp_path, monkeypatch):
    record = tmp_path / "args.txt"
    editor = tmp_path / "record-args"
    editor.write_text(f"#!{sys.executable}\nimport sys\nopen({str(record)!r}, 'w').write('\\n'.join(sys.argv[1:]))\n")
    editor.chmod(editor.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("EDITOR", str(editor))
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        app.main_screen.go_to_module("transformer_blocks.0")
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        info = app.main_screen.selected
        assert record.read_text().splitlines() == [f"+{info.line}", info.file]
        assert os.path.isfile(info.file) and info.file.endswith("cogvideox_transformer_3d.py")


@pilot_test
async def test_e_without_an_editor_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("e")
        await pilot.pause()
        assert any("set $EDITOR" in message for message in notifications(app))


@pilot_test
async def test_c_copies_the_modules_file_and_line():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        app.main_screen.go_to_module("transformer_blocks.0.attn1")
        await pilot.pause()
        await pilot.press("c")
        await pilot.pause()
        info = app.main_screen.selected
        assert app.clipboard == f"{info.file}:{info.line}"
        assert info.file.endswith("attention_processor.py")
        assert any(message.startswith("copied ") and f":{info.line}" in message for message in notifications(app))


@pytest.mark.slow
@pilot_test
async def test_the_source_view_follows_the_apps_theme():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        source = app.query_one(SourceView)
        code = source.query_one("#source-code")
        drawn_dark = code.content
        assert app.current_theme.dark and source.syntax_theme == "ansi_dark"
        app.theme = "textual-light"
        await pilot.pause()
        assert source.syntax_theme == "ansi_light"
        assert code.content is not drawn_dark and "class CogVideoXTransformer3DModel" in shown_text(code)


@pytest.mark.slow
@pilot_test
async def test_the_lora_screen_offers_no_meta_base_speaks_of_its_own_controls_and_follows_the_alpha(tmp_path,
                                                                                                   monkeypatch):
    from lora_helpers import save_cogvideo_checkpoint, train

    from cogsurgeon.inspector.tui.lora_screen import LoraScreen

    monkeypatch.chdir(tmp_path)
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), tmp_path / "checkpoint-10")
    (tmp_path / "taken").mkdir()
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        app.push_screen(LoraScreen(base_spec="cogvideox-5b-i2v"))  # as from a main screen on the meta 5B-I2V
        await pilot.pause()
        base = app.screen.query_one("#lora-base")
        assert base.value == "" and "with weights" in base.placeholder  # verify refuses a meta base
        await pilot.press(*"checkpoint-10", "enter")
        await settle(pilot)
        findings = shown_text(app.screen.query_one("#lora-findings"))
        assert "lora_alpha  UNKNOWN: could be 64 (cogvideo-finetune), 128 (diffusers-scripts)" in findings
        assert "--" not in findings and "lora_alpha field" in findings  # the screen's controls, not the CLI's flags
        assert app.screen.query_one("#lora-alpha").value == ""

        app.screen.query_one("#lora-alpha").value = "2"
        await pilot.pause()
        findings = shown_text(app.screen.query_one("#lora-findings"))
        assert "lora_alpha  2 from the lora_alpha field, scale 0.5" in findings

        app.screen.query_one("#lora-out").value = "taken"
        await pilot.click("#lora-repair")
        await settle(pilot)
        refusal = notifications(app)[-1]
        assert "taken already exists" in refusal and "--" not in refusal and "replace an earlier repair" in refusal
        assert list((tmp_path / "taken").iterdir()) == []

        app.screen.query_one("#lora-out").value = "adapter"
        await pilot.click("#lora-repair")
        await settle(pilot)
        assert '"lora_alpha": 2' in (tmp_path / "adapter" / "adapter_config.json").read_text()


@pytest.mark.slow
@pilot_test
async def test_the_lora_screen_offers_the_open_tiny_model_as_base():
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        await pilot.press("l")
        await pilot.pause()
        assert app.screen.query_one("#lora-base").value == "tiny"


def scaled_output_patch():
    """A third-party patch with parameters, for the panel's options: multiplies proj_out's weight by `factor`."""
    from cogsurgeon import patches
    from cogsurgeon.patches.errors import PatchParameterError

    class Scaled(patches.Patch):
        name = "scaled-output"
        summary = "proj_out's weight times factor (a test patch)"
        parameters = (patches.PatchParameter("factor", float, 1.0, "the multiplier"),
                      patches.PatchParameter("label", (str, type(None)), None, "a note"))

        def check_options(self, options):
            if options["factor"] <= 0:
                raise PatchParameterError(self.name, "factor", "scaled-output: factor must be positive")

        def apply(self, transformer, **options):
            original = transformer.proj_out.weight.detach().clone()
            transformer.proj_out.weight.data.mul_(options["factor"])
            return original

        def revert(self, transformer, record):
            transformer.proj_out.weight.data.copy_(record)

    return Scaled()


@pytest.mark.slow
@pilot_test
async def test_the_patches_panel_shows_and_edits_a_patchs_parameters(monkeypatch):
    import torch

    from cogsurgeon import patches
    from cogsurgeon.patches import registry

    patches.available()  # the registry filled, then a third-party patch beside the built-ins for this test only
    monkeypatch.setitem(registry._registry, "scaled-output", scaled_output_patch())
    app = CogsurgeonApp("tiny")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_model(pilot)
        model = app.main_screen.loaded.model
        original = model.proj_out.weight.detach().clone()
        rows = patch_rows(app)
        assert rows["scaled-output"][:3] == ["off", "-", "factor=1.0, label=none"]
        assert rows["causal-attention"][2] == "-"
        await pilot.press("p", "o")
        await pilot.pause()
        assert "causal-attention takes no parameters" in notifications(app)[-1]
        app.query_one("#patches-table").move_cursor(row=list(rows).index("scaled-output"))
        await pilot.press("o")
        await pilot.pause()
        factor = app.screen.query_one("#option-factor")
        assert factor.value == "1.0"
        factor.value = "-1"
        factor.focus()
        await pilot.press("enter")
        await pilot.pause()
        # refused in place: the dialog stays open with what was typed, the field marked and the reason shown
        assert factor.value == "-1" and factor.has_class("-invalid")
        assert "factor must be positive" in shown_text(app.screen.query_one("#options-hint"))
        await pilot.press("escape")
        await pilot.pause()
        assert patch_rows(app)["scaled-output"][2] == "factor=1.0, label=none"  # unchanged

        await pilot.press("o")
        await pilot.pause()
        app.screen.query_one("#option-factor").value = "2"
        app.screen.query_one("#option-factor").focus()
        await pilot.press("enter", "space")
        await pilot.pause()
        assert patch_rows(app)["scaled-output"][:3] == ["applied", "-", "factor=2, label=none"]
        assert torch.equal(model.proj_out.weight, original * 2)
        assert patches.applied_options(model)["scaled-output"] == {"factor": 2, "label": None}

        await pilot.press("o")  # re-applied with a new value while on
        await pilot.pause()
        app.screen.query_one("#option-factor").value = "3"
        app.screen.query_one("#option-factor").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert torch.equal(model.proj_out.weight, original * 3)
        assert patch_rows(app)["scaled-output"][2] == "factor=3, label=none"
        await pilot.press("space")
        await pilot.pause()
        assert torch.equal(model.proj_out.weight, original) and patches.applied(model) == []
