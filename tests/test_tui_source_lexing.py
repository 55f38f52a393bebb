"""The source view lexes a source once (`LexedOnceSyntax`): what it draws is what Rich's own `Syntax` draws with the
same options, at every width and in both themes, and a second render or a second view of the same source does not
lex again."""

from __future__ import annotations

import inspect

from rich.console import Console
from rich.syntax import Syntax

from cogsurgeon.inspector.tui.widgets import LexedOnceSyntax

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
