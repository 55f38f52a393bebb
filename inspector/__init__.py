"""cogsurgeon's inspection core: model specs and loading, module inventory, shape trace, doctor.

Exports resolve lazily so that `import inspector` (and the CLI's start-up) pays for torch and diffusers only when a
model is actually loaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_transformer": "cogsurgeon.inspector.loading",
    "module_inventory": "cogsurgeon.inspector.inventory",
    "ModuleInfo": "cogsurgeon.inspector.inventory",
    "trace_shapes": "cogsurgeon.inspector.trace",
    "run_doctor": "cogsurgeon.inspector.doctor",
    "CogsurgeonError": "cogsurgeon.inspector.errors",
    "ModelSpecError": "cogsurgeon.inspector.errors",
    "ModelLoadError": "cogsurgeon.inspector.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inspector' has no attribute {name!r}")
