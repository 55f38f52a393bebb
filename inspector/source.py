"""Source text of the classes a model is made of, and of attention processors' `__call__`, for display.

Looked up by (defining module, class name) as the inventory records them, cached per class: a model has 1,067
modules but a handful of classes. Nothing here imports a module that is not already imported by the model.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SourceText:
    """Lines of source starting at `start_line` (1-based) of `file`; `title` says what they are."""

    title: str
    file: str | None
    start_line: int
    text: str

    @property
    def location(self) -> str:
        return f"{display_path(self.file)}:{self.start_line}"


def display_path(file: str | None) -> str:
    """A path that reads the same on every machine: from the package root inside site-packages
    (`diffusers/models/attention_processor.py`), from the checkout for cogsurgeon's own files
    (`patches/causal.py`), else as given; '-' when there is none."""
    if not file:
        return "-"
    parts = Path(file).parts
    for anchor in ("site-packages", "dist-packages"):  # first: the venv may live inside the checkout
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    try:
        return Path(file).resolve().relative_to(_PROJECT_ROOT).as_posix()
    except ValueError:
        return file


def _loaded_class(module_name: str | None, class_name: str | None) -> type | None:
    """The class named `class_name` in an already imported module, or None."""
    module = sys.modules.get(module_name or "")
    candidate = getattr(module, class_name or "", None) if module is not None else None
    return candidate if isinstance(candidate, type) else None


def _source_text(obj: Any, title: str) -> SourceText | None:
    """The source of a class or function, titled for the source pane, or None when it has no Python source."""
    try:
        lines, start = inspect.getsourcelines(obj)
        file = inspect.getsourcefile(obj)
    except (OSError, TypeError):
        return None
    return SourceText(title, file, start, "".join(lines))


@lru_cache(maxsize=256)
def class_source(module_name: str | None, class_name: str | None) -> SourceText | None:
    """The source of the class `module_name.class_name`, or None when it has no Python source."""
    cls = _loaded_class(module_name, class_name)
    return _source_text(cls, f"class {class_name}") if cls is not None else None


@lru_cache(maxsize=256)
def processor_call_source(module_name: str | None, class_name: str | None) -> SourceText | None:
    """The source of an attention processor class's `__call__`, or None."""
    cls = _loaded_class(module_name, class_name)
    call = getattr(cls, "__call__", None) if cls is not None else None
    return _source_text(inspect.unwrap(call), f"{class_name}.__call__") if call is not None else None


__all__ = [
    "SourceText", "class_source", "display_path", "processor_call_source",
]
