"""cogsurgeon's inspection core: model specs and loading, module inventory, shape trace, doctor.

Exports resolve lazily so that `import inspector` (and the CLI's start-up) pays for torch and diffusers only when a
model is actually loaded.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # not `typing`'s: the console script imports this package first, and typing costs 5 ms there
if TYPE_CHECKING:  # what editors and type checkers see; at run time the names below resolve on first use
    from cogsurgeon.inspector.attention_recording import AttentionRecording, load_recording
    from cogsurgeon.inspector.attention_xray import record_attention
    from cogsurgeon.inspector.doctor import run_doctor
    from cogsurgeon.inspector.errors import CogsurgeonError, ModelLoadError, ModelSpecError
    from cogsurgeon.inspector.inventory import ModuleInfo, module_inventory
    from cogsurgeon.inspector.loading import load_transformer
    from cogsurgeon.inspector.trace import trace_shapes

_EXPORTS = {
    "load_transformer": "cogsurgeon.inspector.loading",
    "module_inventory": "cogsurgeon.inspector.inventory",
    "ModuleInfo": "cogsurgeon.inspector.inventory",
    "trace_shapes": "cogsurgeon.inspector.trace",
    "run_doctor": "cogsurgeon.inspector.doctor",
    "record_attention": "cogsurgeon.inspector.attention_xray",
    "load_recording": "cogsurgeon.inspector.attention_recording",
    "AttentionRecording": "cogsurgeon.inspector.attention_recording",
    "CogsurgeonError": "cogsurgeon.inspector.errors",
    "ModelSpecError": "cogsurgeon.inspector.errors",
    "ModelLoadError": "cogsurgeon.inspector.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inspector' has no attribute {name!r}")
