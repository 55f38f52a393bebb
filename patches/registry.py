"""The patch registry: unique names, built-ins plus third-party patches from the `cogsurgeon.patches` entry-point
group, and the bookkeeping of which patches are on which model (applied, reverted, composed).

Torch-free at import: listing patches (`cogsurgeon patch list`, the TUI) costs nothing; applying one imports what
that patch needs.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from cogsurgeon.patches.errors import (
    PatchAlreadyAppliedError,
    PatchConflictError,
    PatchError,
    PatchNotAppliedError,
    PatchParameterError,
    PatchTargetError,
    UnknownPatchError,
)
from cogsurgeon.patches.parameters import PatchParameter, check_options

ENTRY_POINT_GROUP = "cogsurgeon.patches"


@dataclass(frozen=True)
class PatchInfo:
    """A patch as listed: its unique name, a one-line summary and the parameters it takes."""

    name: str
    summary: str
    parameters: tuple[PatchParameter, ...] = ()


class Patch:
    """Base of every patch. Subclasses set `name` and `summary` and implement `apply` / `revert`.

    `parameters` declares the options the patch takes; `apply` receives every one of them, validated, defaults filled
    in (`check_options(options)` may refuse combinations, raising `PatchParameterError`).
    `apply(transformer, **options)` changes a `CogVideoXTransformer3DModel` (already resolved from a pipeline), must
    leave it unchanged when it raises, and returns a record of what it replaced (any object; the registry keeps it on
    the transformer, so it is copied, pickled and saved with the model); `revert(transformer, record)` gets that
    record back and restores exactly what `apply` replaced. The registry calls both under the model's lock.
    `conflicts` names patches this one does not compose with (checked in both directions); patches with the same
    non-empty `exclusive` role (e.g. "attention-pattern": which keys a query sees) do not compose either.
    `extra_memory_bytes(...)` estimates the memory the patch allocates beyond unpatched attention (None: unknown).
    `reference_mask(layout)` gives the `(L, L)` bool mask (True = attend) that `verify` compares the patched model
    with (None: the patch cannot be verified that way).
    """

    name: str = ""
    summary: str = ""
    conflicts: frozenset[str] = frozenset()
    exclusive: str = ""
    parameters: tuple[PatchParameter, ...] = ()

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse values or combinations the types alone allow (e.g. a chunk of 0); raise `PatchParameterError`."""

    def apply(self, transformer: Any, **options: Any) -> Any:
        raise NotImplementedError

    def revert(self, transformer: Any, record: Any) -> None:
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
        **options: Any,
    ) -> int | None:
        return None

    def reference_mask(self, layout: Any, **options: Any) -> Any:
        return None

    @property
    def info(self) -> PatchInfo:
        return PatchInfo(self.name, self.summary, tuple(self.parameters))


_registry: dict[str, Patch] = {}
_loaded = False  # set only once the registry is filled
_filling = False  # the thread holding _registry_lock is filling it (an entry point may call register meanwhile)
_registry_lock = threading.RLock()


def register(patch: Patch) -> Patch:
    """Add a patch under its name; a name already taken is an error (names are unique)."""
    _all_patches()
    with _registry_lock:
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
    global _loaded, _filling
    if _loaded:
        return _registry
    with _registry_lock:
        if not _loaded and not _filling:
            _filling = True
            try:
                from cogsurgeon.patches.builtin import BUILTIN_PATCHES

                for patch in BUILTIN_PATCHES:
                    _add(patch)
                _load_entry_points()
                _loaded = True
            finally:
                _filling = False
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
    return [patch.info for patch in list(_all_patches().values())]  # a copy: another thread may register meanwhile


def get_patch(name: str) -> Patch:
    patches = _all_patches()
    if name not in patches:
        raise UnknownPatchError(f"unknown patch {name!r}; available: {', '.join(patches)}")
    return patches[name]


# -- which patches are on which model ------------------------------------------------------------------------------

RECORD_ATTRIBUTE = "_cogsurgeon_patches"


@dataclass
class AppliedPatch:
    """One patch on a model: the options in force and what its `apply` returned (given back to its `revert`)."""

    options: dict[str, Any]
    record: Any


class PatchRecord:
    """The patches on one transformer, kept on it (`transformer._cogsurgeon_patches`, as diffusers keeps
    `_diffusers_hook`), so that copies, pickles and `torch.save` of a patched model carry the truth with them: an
    ordered map name -> `AppliedPatch`, and the lock that serialises apply and revert on that model. The lock is
    not copied: a copy gets its own."""

    def __init__(self) -> None:
        self.entries: dict[str, AppliedPatch] = {}
        self.lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {"entries": self.entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entries = state["entries"]
        self.lock = threading.RLock()


def patch_record(transformer: Any) -> PatchRecord:
    """The record on a transformer, made on first use (once, under the registry's lock) and kept from then on."""
    with _registry_lock:  # a plain attribute: nn.Module keeps it in the instance's __dict__
        return vars(transformer).setdefault(RECORD_ATTRIBUTE, PatchRecord())


def _entries(transformer: Any) -> dict[str, AppliedPatch]:
    """A snapshot of a transformer's record ({} for a model never patched: reading creates nothing)."""
    record = vars(transformer).get(RECORD_ATTRIBUTE)
    if record is None:
        return {}
    with record.lock:
        return dict(record.entries)


def uncompiled(module: Any) -> Any:
    """The module a `torch.compile` wrapper (`OptimizedModule`) runs, or `module` itself."""
    return module._orig_mod if type(module).__name__ == "OptimizedModule" else module


def resolve_transformer(target: Any) -> Any:
    """The CogVideoX transformer itself, or the `.transformer` of a pipeline holding one; either may be wrapped by
    `torch.compile` (the patch goes on the module inside, whose changed processors make dynamo recompile)."""
    from cogsurgeon.patches.processor import is_cogvideox_transformer

    target = uncompiled(target)
    if is_cogvideox_transformer(target):
        return target
    inner = uncompiled(getattr(target, "transformer", None))
    if is_cogvideox_transformer(inner):
        return inner
    raise PatchTargetError(
        f"patches apply to a CogVideoXTransformer3DModel or a pipeline holding one as .transformer; "
        f"got {type(target).__name__}"
        + (f" whose .transformer is a {type(inner).__name__}" if inner is not None else "")
    )


class PatchHandle:
    """What `apply` returns: `.revert()` takes this application of the patch (only) back off its model; reverting
    twice, or after the patch was reverted another way, is a no-op."""

    def __init__(self, name: str, transformer: Any, entry: AppliedPatch):
        self.name = name
        self._transformer = weakref.ref(transformer)
        self._entry = entry

    @property
    def active(self) -> bool:
        transformer = self._transformer()
        return transformer is not None and _entries(transformer).get(self.name) is self._entry

    def revert(self) -> None:
        transformer = self._transformer()
        if transformer is None:
            return
        with patch_record(transformer).lock:
            if self.active:
                revert(transformer, self.name)

    def __repr__(self) -> str:
        return f"PatchHandle({self.name!r}, active={self.active})"


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Patch `name`'s options as `apply` passes them: checked against its declared parameters (unknown key, wrong
    type, then the patch's own `check_options`), defaults filled in. Raises `PatchParameterError`."""
    patch = get_patch(name)
    resolved = check_options(name, patch.parameters, options)
    patch.check_options(resolved)
    return resolved


def check_composition(names: list[str]) -> None:
    """The one place that decides composition: raise `PatchConflictError` when two of `names` do not compose (one
    names the other in `conflicts`, or both claim the same non-empty `exclusive` role)."""
    for name, other in combinations(names, 2):
        patch, other_patch = get_patch(name), get_patch(other)
        if (
            other in patch.conflicts
            or name in other_patch.conflicts
            or (patch.exclusive and patch.exclusive == other_patch.exclusive)
        ):
            raise PatchConflictError(
                f"{name} and {other} do not compose (their attention rules contradict each other); apply one of them"
            )


def apply(target: Any, name: str, **options: Any) -> PatchHandle:
    """Apply patch `name` to a CogVideoX transformer or a pipeline holding one; the model is unchanged on error."""
    transformer = resolve_transformer(target)
    patch = get_patch(name)
    resolved = resolve_options(name, options)
    record = patch_record(transformer)
    with record.lock:
        if name in record.entries:
            raise PatchAlreadyAppliedError(
                f"{name} is already applied to this model; revert it before applying again"
            )
        check_composition([*record.entries, name])
        entry = AppliedPatch(resolved, patch.apply(transformer, **resolved))
        record.entries[name] = entry
    return PatchHandle(name, transformer, entry)


def applied(target: Any) -> list[str]:
    """Names of the patches on a model (or pipeline), in the order they were applied."""
    return list(_entries(resolve_transformer(target)))


def applied_options(target: Any) -> dict[str, dict[str, Any]]:
    """The patches on a model (or pipeline) in the order applied, each with the options in force (defaults filled
    in): what `apply(model, name, **options)` needs to put the same patches on another model."""
    return {name: dict(entry.options) for name, entry in _entries(resolve_transformer(target)).items()}


def applied_records(transformer: Any) -> dict[str, Any]:
    """What each applied patch's `apply` returned, by name: for patches that share machinery on one model."""
    return {name: entry.record for name, entry in _entries(transformer).items()}


def revert(target: Any, name: str | None = None) -> None:
    """Revert one patch, or all of them (most recent first) when `name` is None. Each patch's `revert` gets the
    record its `apply` returned."""
    transformer = resolve_transformer(target)
    record = patch_record(transformer)
    with record.lock:
        if name is not None and name not in record.entries:
            raise PatchNotAppliedError(
                f"{name} is not applied to this model (applied: {', '.join(record.entries) or 'none'})"
            )
        for patch_name in [name] if name is not None else list(reversed(record.entries)):
            get_patch(patch_name).revert(transformer, record.entries[patch_name].record)
            del record.entries[patch_name]


@contextmanager
def patched(target: Any, *names: str, **options: Any) -> Iterator[Any]:
    """Apply `names` for the duration of a `with` block, then revert exactly those (also on error). Each option goes
    to the patches among `names` that declare it; one that none declares is a `PatchParameterError`. Yields the
    transformer."""
    transformer = resolve_transformer(target)
    declared = {name: {p.name for p in get_patch(name).parameters} for name in names}
    for key in options:
        if not any(key in keys for keys in declared.values()):
            raise PatchParameterError(
                names[0] if names else "", key, f"none of {', '.join(names) or 'no patches'} has a parameter {key!r}"
            )
    handles: list[PatchHandle] = []
    try:
        for name in names:
            handles.append(apply(transformer, name, **{k: v for k, v in options.items() if k in declared[name]}))
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
    options: dict[str, Any] | None = None,
) -> int | None:
    """Bytes patch `name` allocates beyond unpatched attention, per attention call, at this size: inference (no
    autograd) unless `training` (None: the patch gives no estimate). A patch with parameters gets its options
    (defaults filled in) as keywords."""
    patch = get_patch(name)
    resolved = resolve_options(name, options or {}) if patch.parameters else {}
    return patch.extra_memory_bytes(
        batch, heads, text_tokens, video_tokens, frames, dtype_bytes, head_dim=head_dim, training=training, **resolved
    )


def explicit_mask_bytes(batch: int, heads: int, text_tokens: int, video_tokens: int, dtype_bytes: int) -> int:
    """Bytes of the mask that explicit-mask attention in diffusers materialises, per attention call:
    `prepare_attention_mask` repeats a full mask per head into `(batch * heads, L, L)` in the model dtype, L = text +
    video tokens. (B=2, 48 heads, L=17,776, bf16: 60,669,345,792 bytes = 56.5 GiB.)"""
    length = text_tokens + video_tokens
    return batch * heads * length * length * dtype_bytes



__all__ = [
    "ENTRY_POINT_GROUP", "Patch", "PatchHandle", "PatchInfo", "applied", "applied_options", "applied_records", "apply",
    "available", "check_composition", "explicit_mask_bytes", "get_patch", "memory_estimate", "patched", "register",
    "resolve_options", "resolve_transformer", "revert",
]
