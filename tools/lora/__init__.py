"""LoRA checkpoint tools: inspect what a trainer left behind, repair it into an adapter folder that PEFT and diffusers
load offline at the trained scale, and verify that folder against a base model.

`inspect_checkpoint` and `repair_checkpoint` are format operations and import neither torch nor diffusers;
`verify_adapter` (tools.lora.verify) loads models and is imported only when asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names below resolve on first use
    from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, LoraReport, inspect_checkpoint
    from cogsurgeon.tools.lora.repair import RepairResult, repair_checkpoint
    from cogsurgeon.tools.lora.verify import AdapterVerifyReport, verify_adapter

_EXPORTS = {
    "inspect_checkpoint": "cogsurgeon.tools.lora.checkpoint",
    "LoraReport": "cogsurgeon.tools.lora.checkpoint",
    "LoraCheckpointError": "cogsurgeon.tools.lora.checkpoint",
    "repair_checkpoint": "cogsurgeon.tools.lora.repair",
    "RepairResult": "cogsurgeon.tools.lora.repair",
    "verify_adapter": "cogsurgeon.tools.lora.verify",
    "AdapterVerifyReport": "cogsurgeon.tools.lora.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cogsurgeon.tools.lora' has no attribute {name!r}")
