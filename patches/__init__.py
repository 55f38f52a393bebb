"""Named, reversible, verified runtime patches of CogVideoX attention.

    from cogsurgeon import patches
    patches.available()                               # [PatchInfo(name, summary), ...]
    handle = patches.apply(model_or_pipeline, "frame-causal-attention")
    patches.applied(model)                            # ["frame-causal-attention"]
    patches.applied_options(model)                    # {"frame-causal-attention": {}}: the options in force
    handle.revert()                                   # or patches.revert(model[, name])
    with patches.patched(model, "causal-attention", "attention-mask"): ...
    with patches.streaming(model, chunk=3, height=480, width=720) as stream: ...   # KV-cache generation

`apply` returns a `PatchHandle`; `available()` lists `PatchInfo` values and `get_patch(name)` gives the `Patch`
itself, its options described by `PatchParameter`s. `parse_patch_spec("NAME:k=v,...")` and `format_patch_spec` read
and write the CLI's spelling of a patch with options, `resolve_options` checks options against a patch's parameters,
and `memory_estimate` / `explicit_mask_bytes` size the attention a patch runs (`cogsurgeon trace` uses them).

Errors are `PatchError`s: `UnknownPatchError`, `PatchSpecError`, `PatchParameterError`, `PatchTargetError`,
`PatchConflictError`, `PatchAlreadyAppliedError`, `PatchNotAppliedError`, `AttentionMaskError`.

Third-party patches register through the entry-point group `cogsurgeon.patches` (`ENTRY_POINT_GROUP`; a
`patches.Patch` instance or subclass) or with `register(patch)`. Importing this package is light: torch and diffusers
load when a patch is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogsurgeon.inspector.lazy_exports import lazy_exports as _lazy_exports
from cogsurgeon.patches.errors import (
    AttentionMaskError,
    PatchAlreadyAppliedError,
    PatchConflictError,
    PatchError,
    PatchNotAppliedError,
    PatchParameterError,
    PatchSpecError,
    PatchTargetError,
    UnknownPatchError,
)
from cogsurgeon.patches.parameters import PatchParameter, format_patch_spec, parse_patch_spec
from cogsurgeon.patches.registry import (
    ENTRY_POINT_GROUP,
    Patch,
    PatchHandle,
    PatchInfo,
    applied,
    applied_options,
    apply,
    available,
    explicit_mask_bytes,
    get_patch,
    memory_estimate,
    patched,
    register,
    resolve_options,
    revert,
)

if TYPE_CHECKING:  # what editors see; at run time `streaming` resolves on first use (it imports torch)
    from cogsurgeon.patches.stream import streaming

_EXPORTS = {"streaming": "cogsurgeon.patches.stream"}  # generate chunk by chunk with a KV cache
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionMaskError",
    "Patch",
    "PatchAlreadyAppliedError",
    "PatchConflictError",
    "PatchError",
    "PatchHandle",
    "PatchInfo",
    "PatchNotAppliedError",
    "PatchParameter",
    "PatchParameterError",
    "PatchSpecError",
    "PatchTargetError",
    "UnknownPatchError",
    "applied",
    "applied_options",
    "apply",
    "available",
    "explicit_mask_bytes",
    "format_patch_spec",
    "get_patch",
    "memory_estimate",
    "parse_patch_spec",
    "patched",
    "register",
    "resolve_options",
    "revert",
]  # `streaming` stays out: a star import would import torch through it (reach it as `patches.streaming`)
