"""LoRA checkpoint tools: inspect what a trainer left behind, repair it into an adapter folder that PEFT and diffusers
load offline at the trained scale, and verify that folder against a base model.

`inspect_checkpoint` and `repair_checkpoint` are format operations and import neither torch nor diffusers;
`verify_adapter` (tools.lora.verify) loads models and is imported only when asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

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
