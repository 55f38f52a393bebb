"""The patch state the TUI shows and changes: which patches exist, which are on a model, their verify verdicts.

A thin layer over the `patches` API (DESIGN: `available`, `apply`, `revert`, `applied`, `verify.verify_patch`)
so that the Textual screens hold no patch logic and this part is tested without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cogsurgeon import patches


@dataclass(frozen=True)
class PatchRow:
    """What the patches panel shows for one patch."""

    name: str
    summary: str
    applied: bool
    verdict: str = ""


def describe_verdict(result: Any) -> str:
    """A `VerifyResult` as one short line: `passed, max error 3.1e-07, revert bit-exact`."""
    revert = "revert bit-exact" if result.revert_bit_exact else "revert NOT bit-exact"
    return f"{'passed' if result.passed else 'FAILED'}, max error {result.max_error:.2g}, {revert}"


@dataclass
class PatchBench:
    """The registered patches and the verdicts of the verifications run this session."""

    verdicts: dict[str, str] = field(default_factory=dict)

    def rows(self, model: Any | None) -> list[PatchRow]:
        """One row per registered patch, marked applied when it is on `model`."""
        applied = set(patches.applied(model)) if model is not None else set()
        return [
            PatchRow(info.name, info.summary, info.name in applied, self.verdicts.get(info.name, ""))
            for info in patches.available()
        ]

    def toggle(self, model: Any, name: str, apply: bool | None = None) -> str:
        """Apply `name` to `model`, or revert it when it is on (`apply` forces one direction); says what it did."""
        is_on = name in patches.applied(model)
        if apply is None:
            apply = not is_on
        if apply and not is_on:
            patches.apply(model, name)
            return f"applied {name}"
        if not apply and is_on:
            patches.revert(model, name)
            return f"reverted {name}"
        return f"{name} is already {'on' if is_on else 'off'}"

    def verify(self, name: str) -> Any:
        """Run the patch's tiny-model reference check (slow: call it from a worker)."""
        from cogsurgeon.patches.verify import verify_patch

        return verify_patch(name)

    def record_verdict(self, name: str, result: Any) -> None:
        self.verdicts[name] = describe_verdict(result)
