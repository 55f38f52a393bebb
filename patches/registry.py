"""The patch registry: unique names, built-ins plus third-party patches from the `cogsurgeon.patches` entry-point
group, and the bookkeeping of which patches are on which model (applied, reverted, composed).

Torch-free at import: listing patches (`cogsurgeon patch list`, the TUI) costs nothing; applying one imports what
that patch needs.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cogsurgeon.patches.errors import (
    PatchAlreadyAppliedError,
    PatchConflictError,
    PatchError,
    PatchNotAppliedError,
    PatchTargetError,
    UnknownPatchError,
)

ENTRY_POINT_GROUP = "cogsurgeon.patches"


@dataclass(frozen=True)
class PatchInfo:
    """A patch as listed: its unique name and a one-line summary."""

    name: str
    summary: str


class Patch:
    """Base of every patch. Subclasses set `name` and `summary` and implement `apply` / `revert`.

    `apply(transformer, **options)` changes a `CogVideoXTransformer3DModel` (already resolved from a pipeline) and
    must leave it unchanged when it raises; `revert(transformer)` restores exactly what `apply` replaced.
    `conflicts` names patches this one does not compose with (checked in both directions).
    `extra_memory_bytes(...)` estimates the memory the patch allocates beyond unpatched attention (None: unknown).
    `reference_mask(layout)` gives the `(L, L)` bool mask (True = attend) that `verify` compares the patched model
    with (None: the patch cannot be verified that way).
    """

    name: str = ""
    summary: str = ""
    conflicts: frozenset[str] = frozenset()

    def apply(self, transformer: Any, **options: Any) -> None:
        raise NotImplementedError

    def revert(self, transformer: Any) -> None:
        raise NotImplementedError

    def extra_memory_bytes(
        self,
        batch: int,
        heads: int,
        text_tokens: int,
        video_tokens: int,
        frames: int,
        dtype_bytes: int,
        *,
        head_dim: int = 64,
        training: bool = False,
    ) -> int | None:
        return None

    def reference_mask(self, layout: Any) -> Any:
        return None

    @property
    def info(self) -> PatchInfo:
        return PatchInfo(self.name, self.summary)


_registry: dict[str, Patch] = {}
_loaded = False


def register(patch: Patch) -> Patch:
    """Add a patch under its name; a name already taken is an error (names are unique)."""
    _all_patches()
    return _add(patch)


def _add(patch: Patch) -> Patch:
    if not isinstance(patch, Patch) or not patch.name:
        raise PatchError(f"{patch!r} is not a cogsurgeon Patch with a name (subclass patches.Patch)")
    existing = _registry.get(patch.name)
    if existing is not None and existing is not patch:
        raise PatchError(f"a patch named {patch.name!r} is already registered ({type(existing).__qualname__})")
    _registry[patch.name] = patch
    return patch


def _all_patches() -> dict[str, Patch]:
    """The registry, filled on first use: the built-ins, then the `cogsurgeon.patches` entry points."""
    global _loaded
    if not _loaded:
        _loaded = True
        from cogsurgeon.patches.builtin import BUILTIN_PATCHES

        for patch in BUILTIN_PATCHES:
            _add(patch)
        _load_entry_points()
    return _registry


def _load_entry_points() -> None:
    """Third-party patches: each entry point of the group names a Patch instance or a Patch subclass. A broken or
    clashing plugin is skipped with a warning: one bad package must not take the built-ins down."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
            _add(loaded() if isinstance(loaded, type) else loaded)
        except Exception as exc:  # a plugin's bug, reported, not raised
            warnings.warn(
                f"cogsurgeon: skipped patch entry point {entry_point.name!r} ({entry_point.value}): {exc}",
                stacklevel=2,
            )


def available() -> list[PatchInfo]:
    """Every registered patch, built-ins first."""
    return [patch.info for patch in _all_patches().values()]


def get_patch(name: str) -> Patch:
    patches = _all_patches()
    if name not in patches:
        raise UnknownPatchError(f"unknown patch {name!r}; available: {', '.join(patches)}")
    return patches[name]


# -- which patches are on which model ------------------------------------------------------------------------------

_applied: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


def resolve_transformer(target: Any) -> Any:
    """The CogVideoX transformer itself, or the `.transformer` of a pipeline holding one."""
    from cogsurgeon.patches.processor import is_cogvideox_transformer

    if is_cogvideox_transformer(target):
        return target
    inner = getattr(target, "transformer", None)
    if is_cogvideox_transformer(inner):
        return inner
    raise PatchTargetError(
        f"patches apply to a CogVideoXTransformer3DModel or a pipeline holding one as .transformer; "
        f"got {type(target).__name__}"
        + (f" whose .transformer is a {type(inner).__name__}" if inner is not None else "")
    )


class PatchHandle:
    """What `apply` returns: `.revert()` takes this patch (only) back off its model; reverting twice is a no-op."""

    def __init__(self, name: str, transformer: Any):
        self.name = name
        self._transformer = weakref.ref(transformer)

    @property
    def model(self) -> Any:
        return self._transformer()

    @property
    def active(self) -> bool:
        transformer = self._transformer()
        return transformer is not None and self.name in _applied.get(transformer, {})

    def revert(self) -> None:
        if self.active:
            revert(self._transformer(), self.name)

    def __repr__(self) -> str:
        return f"PatchHandle({self.name!r}, active={self.active})"


def check_composition(names: list[str]) -> None:
    """Raise `PatchConflictError` when two of `names` do not compose."""
    for index, name in enumerate(names):
        patch = get_patch(name)
        for other in names[index + 1 :]:
            if other in patch.conflicts or name in get_patch(other).conflicts:
                raise PatchConflictError(
                    f"{name} and {other} do not compose (their attention rules contradict each other); "
                    "apply one of them"
                )


def apply(target: Any, name: str, **options: Any) -> PatchHandle:
    """Apply patch `name` to a CogVideoX transformer or a pipeline holding one; the model is unchanged on error."""
    transformer = resolve_transformer(target)
    patch = get_patch(name)
    on_model = _applied.get(transformer, {})
    if name in on_model:
        raise PatchAlreadyAppliedError(f"{name} is already applied to this model; revert it before applying again")
    check_composition([*on_model, name])
    patch.apply(transformer, **options)
    _applied.setdefault(transformer, {})[name] = dict(options)
    return PatchHandle(name, transformer)


def applied(target: Any) -> list[str]:
    """Names of the patches on a model (or pipeline), in the order they were applied."""
    return list(_applied.get(resolve_transformer(target), {}))


def revert(target: Any, name: str | None = None) -> None:
    """Revert one patch, or all of them (most recent first) when `name` is None."""
    transformer = resolve_transformer(target)
    on_model = _applied.get(transformer, {})
    if name is not None and name not in on_model:
        raise PatchNotAppliedError(
            f"{name} is not applied to this model (applied: {', '.join(on_model) or 'none'})"
        )
    for patch_name in [name] if name is not None else list(reversed(on_model)):
        get_patch(patch_name).revert(transformer)
        del on_model[patch_name]
    if not on_model:
        _applied.pop(transformer, None)


@contextmanager
def patched(target: Any, *names: str, **options: Any) -> Iterator[Any]:
    """Apply `names` for the duration of a `with` block, then revert exactly those (also on error). Options are
    passed to every patch. Yields the transformer."""
    transformer = resolve_transformer(target)
    handles: list[PatchHandle] = []
    try:
        for name in names:
            handles.append(apply(transformer, name, **options))
        yield transformer
    finally:
        for handle in reversed(handles):
            handle.revert()


def memory_estimate(
    name: str,
    batch: int,
    heads: int,
    text_tokens: int,
    video_tokens: int,
    frames: int,
    dtype_bytes: int,
    *,
    head_dim: int = 64,
    training: bool = False,
) -> int | None:
    """Bytes patch `name` allocates beyond unpatched attention, per attention call, at this size: inference (no
    autograd) unless `training` (None: the patch gives no estimate)."""
    return get_patch(name).extra_memory_bytes(
        batch, heads, text_tokens, video_tokens, frames, dtype_bytes, head_dim=head_dim, training=training
    )


def explicit_mask_bytes(batch: int, heads: int, text_tokens: int, video_tokens: int, dtype_bytes: int) -> int:
    """Bytes of the mask that explicit-mask attention in diffusers materialises, per attention call:
    `prepare_attention_mask` repeats a full mask per head into `(batch * heads, L, L)` in the model dtype, L = text +
    video tokens. (B=2, 48 heads, L=17,776, bf16: 60,669,345,792 bytes = 56.5 GiB.)"""
    length = text_tokens + video_tokens
    return batch * heads * length * length * dtype_bytes

