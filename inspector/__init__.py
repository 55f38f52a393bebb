"""cogsurgeon's inspection core: model specs and loading, module inventory, shape trace, doctor, attention x-ray.

    from cogsurgeon.inspector import load_transformer, module_inventory, trace_shapes
    model = load_transformer("tiny")                  # or cogvideox-5b (meta), a folder, a cached hub id (revision=)
    rows = module_inventory(model)                    # [ModuleInfo(name, class, file:line, params, dtype, ...), ...]
    trace = trace_shapes(model, frames=9, height=64, width=64)   # every module's input and output shapes
    findings = run_doctor()                           # known CogVideoX pitfalls of the installed diffusers and peft

`record_attention(model_or_pipeline, groups="frames")` records where attention goes while the model runs;
`load_recording(path)` reads a saved one back as an `AttentionRecording`. Bad input raises a `CogsurgeonError`
(`ModelSpecError`: a MODEL that names nothing; `ModelLoadError`: files that are not a loadable CogVideoX transformer).

Exports resolve lazily so that `import cogsurgeon.inspector` (and the CLI's start-up) pays for torch and diffusers
only when a model is actually loaded.
"""

from __future__ import annotations

from cogsurgeon.inspector.lazy_exports import lazy_exports as _lazy_exports

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
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
