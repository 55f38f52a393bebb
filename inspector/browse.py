"""A loaded model as the TUI browses it: the live transformer, its inventory and config, and what a patch changed.

Pure values and small functions over the core (loading, inventory); the TUI renders them and never walks the
`nn.Module` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cogsurgeon.inspector.inventory import ModuleInfo, module_inventory
from cogsurgeon.inspector.model_specs import published_config, resolve_spec


@dataclass(frozen=True)
class LoadedModel:
    """A model opened from `spec`: `infos` is its inventory now, `original_processors` the attention processor of
    each module as loaded (to tell which modules a patch changed). `model` is None for a preview from the
    inventory cache, until the real model has been built."""

    spec: str
    title: str
    model: Any
    infos: tuple[ModuleInfo, ...]
    config: dict[str, Any]
    original_processors: dict[str, str]

    def refreshed(self) -> LoadedModel:
        """The same model re-inventoried (after a patch swapped processors)."""
        return replace(self, infos=tuple(module_inventory(self.model)))

    def changed_modules(self) -> set[str]:
        """Names of the modules whose processor differs from the one they were loaded with."""
        return {
            info.name
            for info in self.infos
            if info.name in self.original_processors
            and self.original_processors[info.name] != f"{info.processor_module}.{info.processor}"
        }


def model_title(spec: str) -> str:
    """How a spec is named on screen: a published or tiny name as is, a folder by its last two path parts."""
    resolved = resolve_spec(spec)
    if resolved.kind == "folder":
        parts = Path(resolved.spec).parts
        return "/".join(parts[-2:]) + " (folder)"
    if resolved.kind == "published":
        return f"{resolved.spec} (meta)"
    return resolved.spec


def _processors(infos: tuple[ModuleInfo, ...]) -> dict[str, str]:
    return {info.name: f"{info.processor_module}.{info.processor}" for info in infos if info.processor is not None}


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def open_model(spec: str) -> LoadedModel:
    """Load `spec` (any MODEL `load_transformer` takes) and take its inventory; a published config's inventory is also
    stored in the inventory cache, for the next `preview_model`. Raises the loader's `CogsurgeonError`s."""
    from cogsurgeon.inspector.loading import load_transformer

    model = load_transformer(spec)
    infos = tuple(module_inventory(model))
    resolved = resolve_spec(spec)
    if resolved.kind == "published":
        from cogsurgeon.inspector.inventory_cache import load_cached_inventory, store_inventory

        if load_cached_inventory(resolved.spec) is None:
            store_inventory(resolved.spec, None, list(infos))
    return LoadedModel(spec, model_title(spec), model, infos, _public(dict(model.config)), _processors(infos))


def preview_model(spec: str) -> LoadedModel | None:
    """A published model as the inventory cache knows it, without torch or diffusers (`model` is None): what the
    TUI paints first while `open_model` imports and builds the real one. None when the spec is not published or
    its cache entry is missing or stale."""
    resolved = resolve_spec(spec)
    if resolved.kind != "published":
        return None
    from cogsurgeon.inspector.inventory_cache import load_cached_inventory

    cached = load_cached_inventory(resolved.spec)
    if cached is None:
        return None
    infos = tuple(cached)
    config = _public(published_config(resolved.spec))
    return LoadedModel(spec, model_title(spec), None, infos, config, _processors(infos))


def format_count(count: int) -> str:
    """A parameter count as people say it: 5.57B, 37.8M, 6.1K, 128."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if count >= size:
            value = count / size
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return str(count)


@dataclass(frozen=True)
class TracedShapes:
    """Every module's traced input and output shapes at one video size, formatted for the details pane."""

    size: str
    by_module: dict[str, tuple[str, str]]
    kv_cache: str = ""  # what a `patches.streaming` KV cache holds at this size, for the root's details

    def of(self, name: str) -> tuple[str, str, str] | None:
        """(size, inputs, outputs) of module `name`, or None when the traced forward did not call it."""
        shapes = self.by_module.get(name)
        return None if shapes is None else (self.size, *shapes)


def trace_for_details(model: Any) -> TracedShapes:
    """Trace `model` on the meta device at the video size its pipelines default to (batch 2: one video with
    classifier-free guidance)."""
    from cogsurgeon.inspector.geometry import default_video_size
    from cogsurgeon.inspector.trace import format_bytes, format_shape, trace_shapes

    frames, height, width = default_video_size(model.config)
    result = trace_shapes(model, frames=frames, height=height, width=width, batch=2)
    kv_cache = ", ".join(
        f"chunk {row['chunk']}" + (f" window {row['window']} sink {row['sink']}" if row["window"] else "")
        + f": {format_bytes(row['bytes'])}"
        for row in result.kv_cache
    )
    return TracedShapes(
        f"{frames}×{height}×{width} video, batch 2",
        {name: (format_shape(shapes.inputs), format_shape(shapes.outputs)) for name, shapes in result.modules.items()},
        kv_cache,
    )


__all__ = [
    "LoadedModel", "TracedShapes", "format_count", "model_title", "open_model", "preview_model", "trace_for_details",
]
