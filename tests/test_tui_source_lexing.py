"""The source view lexes a source once (`LexedOnceSyntax`): what it draws is what Rich's own `Syntax` draws with the
same options, at every width and in both themes, and a second render or a second view of the same source does not
lex again."""

from __future__ import annotations

import inspect

import pytest

from rich.console import Console
from rich.syntax import Syntax

from cogsurgeon.inspector.tui.widgets import LexedOnceSyntax
from test_tui import pilot_test

SOURCE = inspect.getsource(Console.__init__)  # a real source: indentation, strings, comments, a docstring


def drawn(renderable, width: int) -> str:
    console = Console(width=width, record=True, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(styles=True)


def test_it_draws_what_rich_draws_and_lexes_once(monkeypatch):
    lexed = []
    rich_highlight = Syntax.highlight
    monkeypatch.setattr(Syntax, "highlight", lambda self, *args: lexed.append(1) or rich_highlight(self, *args))
    LexedOnceSyntax.lexed.clear()
    options = dict(line_numbers=True, start_line=120, word_wrap=False, indent_guides=True)
    for theme in ("ansi_dark", "ansi_light"):
        plain = Syntax(SOURCE, "python", theme=theme, **options)
        expected = {width: drawn(plain, width) for width in (40, 93, 160)}
        lexed.clear()
        once = LexedOnceSyntax(SOURCE, theme=theme, **options)
        again = LexedOnceSyntax(SOURCE, theme=theme, **options)  # the same source shown anew (a model re-opened)
        assert {width: drawn(once, width) for width in (40, 93, 160)} == expected
        assert {width: drawn(again, width) for width in (40, 93, 160)} == expected
        assert len(lexed) == 1, theme  # six renders, one lexing per theme



@pytest.mark.slow
@pilot_test
async def test_the_source_view_is_as_tall_as_the_source_and_its_last_line_scrolls_into_view():
    """The source's height is given (one line per source line) instead of measured by rendering it: the view is as
    tall as Rich draws the source, and scrolling to the end brings its last line to the view's bottom edge, in a
    source longer than the view and in one shorter."""
    from dataclasses import replace

    from textual.widgets import Static

    from cogsurgeon.inspector.tui.app import CogsurgeonApp
    from cogsurgeon.inspector.tui.widgets import SourceView

    app = CogsurgeonApp("tiny")
    async with app.run_test(size=(160, 48)) as pilot:
        source_view = app.screen.query_one(SourceView)
        while source_view.shown is None or source_view.shown[0] is None:
            await pilot.pause(0.05)
        long_source = source_view.shown[0]
        for source in (long_source, replace(long_source, text="def f():\n    return 1\n")):
            source_view.show(source, "")
            await pilot.pause()
            code = source_view.query_one("#source-code", Static)
            lines = source.text.rstrip("\n").count("\n") + 1
            drawn_lines = drawn(code.content, code.content_region.width).rstrip("\n").split("\n")
            assert code.outer_size.height == len(drawn_lines) == lines
            source_view.scroll_end(animate=False)
            await pilot.pause()
            view = source_view.scrollable_content_region
            if lines > view.height:
                assert code.region.bottom == view.bottom  # the last line is the view's last
            else:
                assert code.region.y == view.y and code.region.height == lines  # nothing to scroll
