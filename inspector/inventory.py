"""The module inventory: one frozen `ModuleInfo` per named module of a model, with where its class's code lives.

Reading never moves, casts or materialises the model: only parameter metadata (shape, dtype, device) is read,
which works the same on meta tensors. Source lookups are cached per class (a 5B model has 1,067 modules but only
a handful of classes; looking each module up took 13.2 s).
"""

from __future__ import annotations

import inspect
import linecache
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import counted

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class SourceLocation:
    file: str | None
    line: int | None


@dataclass(frozen=True)
class ModuleInfo:
    """What the inventory knows about one named module; `name` is "" for the root."""

    name: str
    class_name: str
    class_module: str
    file: str | None
    line: int | None
    own_params: int
    params: int
    dtype: str | None
    device: str | None
    processor: str | None
    processor_module: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON row of `cogsurgeon modules --json` (a stable contract for scripts: "class", "params", ...)."""
        return {
            "name": self.name,
            "class": self.class_name,
            "module": self.class_module,
            "file": self.file,
            "line": self.line,
            "params": self.params,
            "own_params": self.own_params,
            "dtype": self.dtype,
            "device": self.device,
            "processor": self.processor,
            "processor_module": self.processor_module,
        }


@lru_cache(maxsize=None)
def source_location(cls: type) -> SourceLocation:
    """File and first line of a class's definition; (None, None) for classes without Python source.

    A top-level class is found by scanning its file's lines for `class Name`; `inspect.findsource` parses the
    whole file into an AST (about 60 ms for diffusers' attention_processor.py), so it is only the fallback.
    """
    try:
        file = inspect.getsourcefile(cls) or inspect.getfile(cls)
    except (TypeError, OSError):
        return SourceLocation(None, None)
    if cls.__qualname__ == cls.__name__:
        line = _top_level_class_line(file, cls.__name__)
        if line is not None:
            return SourceLocation(file, line)
    try:
        _, line = inspect.findsource(cls)
        return SourceLocation(file, line + 1)
    except (OSError, TypeError, IndexError):
        return SourceLocation(file, None)


def _top_level_class_line(file: str, class_name: str) -> int | None:
    """The 1-based line where the one unindented `class class_name` statement in `file` starts, its decorators
    included (as `inspect.findsource` counts), else None."""
    lines = linecache.getlines(file)
    pattern = re.compile(rf"^class\s+{re.escape(class_name)}\b")
    matches = [index for index, text in enumerate(lines) if pattern.match(text)]
    if len(matches) != 1:
        return None
    start = matches[0]
    while start > 0 and lines[start - 1].startswith("@"):
        start -= 1
    return start + 1


def _describe(values: set[str]) -> str | None:
    """One value, or several joined with '+' when a module mixes them (e.g. float32+bfloat16)."""
    return "+".join(sorted(values)) if values else None


def module_inventory(model: nn.Module) -> list[ModuleInfo]:
    """One `ModuleInfo` per entry of `model.named_modules()`, in that order, the root first."""
    named = list(model.named_modules())
    own_counts: dict[str, int] = {}
    own_dtypes: dict[str, set[str]] = {}
    own_devices: dict[str, set[str]] = {}
    for name, module in named:
        tensors = list(module.parameters(recurse=False))
        own_counts[name] = sum(tensor.numel() for tensor in tensors)
        if own_counts[name] == 0:  # parameter-free modules report where their buffers live, if they have any
            tensors += module.buffers(recurse=False)
        own_dtypes[name] = {str(tensor.dtype).removeprefix("torch.") for tensor in tensors}
        own_devices[name] = {str(tensor.device) for tensor in tensors}

    totals = dict(own_counts)
    subtree_dtypes = {name: set(values) for name, values in own_dtypes.items()}
    subtree_devices = {name: set(values) for name, values in own_devices.items()}
    for name, _ in named:
        if not name:
            continue
        parts = name.split(".")
        for depth in range(len(parts)):
            ancestor = ".".join(parts[:depth])
            totals[ancestor] += own_counts[name]
            subtree_dtypes[ancestor] |= own_dtypes[name]
            subtree_devices[ancestor] |= own_devices[name]

    infos = []
    for name, module in named:
        cls = type(module)
        location = source_location(cls)
        processor = getattr(module, "processor", None)
        infos.append(
            ModuleInfo(
                name=name,
                class_name=cls.__name__,
                class_module=cls.__module__,
                file=location.file,
                line=location.line,
                own_params=own_counts[name],
                params=totals[name],
                dtype=_describe(subtree_dtypes[name]),
                device=_describe(subtree_devices[name]),
                processor=type(processor).__name__ if processor is not None else None,
                processor_module=type(processor).__module__ if processor is not None else None,
            )
        )
    return infos


@lru_cache(maxsize=8192)
def _haystack(info: ModuleInfo) -> str:
    # one lower-cased string per module, fields split by a character no filter contains, so that a filter
    # keystroke in the TUI costs one `in` per module instead of five `lower()` calls
    fields = (info.name, info.class_name, info.class_module, info.file, info.processor)
    return "\0".join((value or "").lower() for value in fields)


def matches(info: ModuleInfo, needle: str) -> bool:
    """Whether `needle` (already lower-cased) occurs in the module's name, class, defining module, file or
    processor: the one test behind `filter_inventory`, the `modules` table and the TUI's filter."""
    return needle in _haystack(info)


def filter_inventory(infos: list[ModuleInfo], text: str | None) -> list[ModuleInfo]:
    """The rows whose name, class, defining module, file or processor contains `text` (case-insensitive)."""
    needle = (text or "").strip().lower()
    if not needle:
        return infos
    return [info for info in infos if matches(info, needle)]


def inventory_for_spec(spec: str | None, dtype: str | None = None, use_cache: bool = True,
                       progress: Callable[[str], None] | None = None) -> list[ModuleInfo]:
    """The inventory of what a MODEL spec names. Shipped configs (published on meta, tiny) come from the inventory
    cache when it is fresh (no torch or diffusers import at all), else are built and cached. `progress(message)` is
    told each slow step of a build (the import, the build or load, the source lookups); a cache hit says nothing."""
    from cogsurgeon.inspector import inventory_cache
    from cogsurgeon.inspector.loading import load_transformer
    from cogsurgeon.inspector.model_specs import resolve_spec

    resolved = resolve_spec(spec)
    cacheable = use_cache and resolved.kind in ("published", "tiny")
    infos = inventory_cache.load_cached_inventory(resolved.spec, dtype) if cacheable else None
    if infos is None:
        model = load_transformer(resolved.spec, dtype=dtype, progress=progress)
        if progress is not None:
            modules = counted(sum(1 for _ in model.modules()), "module")
            progress(f"reading where the classes of {modules} are defined…")
        infos = module_inventory(model)
        if cacheable:
            inventory_cache.store_inventory(resolved.spec, dtype, infos)
    return infos


__all__ = [
    "ModuleInfo", "filter_inventory", "inventory_for_spec", "matches", "module_inventory", "source_location",
]
