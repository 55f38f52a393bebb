"""LoRA checkpoint tools: inspect what a trainer left behind, repair it into an adapter folder that PEFT and diffusers
load offline at the trained scale, verify that folder against a base model, and merge adapters into a base's weights.

    from cogsurgeon.tools import lora
    report = lora.inspect_checkpoint("out/checkpoint-500")          # LoraReport: format, rank, lora_alpha, problems
    result = lora.repair_checkpoint("out/checkpoint-500", "my-adapter", alpha=64)   # RepairResult
    check = lora.verify_adapter("my-adapter", "tiny-i2v")            # AdapterVerifyReport; check.passed
    merged = lora.merge_loras("./CogVideoX-5b-I2V", [lora.parse_lora_spec("my-adapter:0.8")], "merged")

`inspect_checkpoint(path, *, alpha=None, trainer=None, step=None, latest=False, override_stored_alpha=False)` and
`repair_checkpoint(path, out_dir, *, alpha=None, trainer=None, ..., force=False, to="peft,diffusers")` are format
operations and import neither torch nor diffusers; `verify_adapter(adapter_dir, base_spec, *, progress=None)` and
`merge_loras(base, loras, out_dir, *, force=False, progress=None)` load torch and are imported when first used.
They return frozen values: `LoraReport`, `RepairResult`, `AdapterVerifyReport`, `MergeResult`; `parse_lora_spec`
reads `PATH[:WEIGHT]` into a `LoraSpec`. Bad input raises `LoraCheckpointError` (a `CogsurgeonError`) with a message
for people.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogsurgeon.inspector.lazy_exports import lazy_exports as _lazy_exports

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names below resolve on first use
    from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, LoraReport, inspect_checkpoint
    from cogsurgeon.tools.lora.repair import RepairResult, repair_checkpoint
    from cogsurgeon.tools.lora.merge import LoraSpec, MergeResult, merge_loras, parse_lora_spec
    from cogsurgeon.tools.lora.verify import AdapterVerifyReport, verify_adapter

_EXPORTS = {
    "inspect_checkpoint": "cogsurgeon.tools.lora.checkpoint",
    "LoraReport": "cogsurgeon.tools.lora.checkpoint",
    "LoraCheckpointError": "cogsurgeon.tools.lora.checkpoint",
    "repair_checkpoint": "cogsurgeon.tools.lora.repair",
    "RepairResult": "cogsurgeon.tools.lora.repair",
    "verify_adapter": "cogsurgeon.tools.lora.verify",
    "AdapterVerifyReport": "cogsurgeon.tools.lora.verify",
    "merge_loras": "cogsurgeon.tools.lora.merge",
    "parse_lora_spec": "cogsurgeon.tools.lora.merge",
    "LoraSpec": "cogsurgeon.tools.lora.merge",
    "MergeResult": "cogsurgeon.tools.lora.merge",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
