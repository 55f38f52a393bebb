"""The patch state the TUI shows and changes: which patches exist, which are on a model, their verify verdicts.

A thin layer over the `patches` API (`available`, `apply`, `revert`, `applied`, `verify.verify_patch`)
so that the Textual screens hold no patch logic and this part is tested without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from cogsurgeon import patches
from cogsurgeon.inspector.model_specs import TINY_SPECS
from cogsurgeon.patches.parameters import PatchParameter, format_patch_spec, format_value, parse_value


@dataclass(frozen=True)
class PatchRow:
    """What the patches panel shows for one patch: `options` are those in force when it is applied, else those it
    will be applied with (chosen in the panel, defaults for the rest)."""

    name: str
    summary: str
    applied: bool
    verdict: str = ""
    parameters: tuple[PatchParameter, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def options_text(self) -> str:
        """`chunk=1, window=none`, or '-' for a patch without parameters."""
        return ", ".join(f"{key}={format_value(value)}" for key, value in self.options.items()) or "-"


def describe_verdict(result: Any) -> str:
    """A `VerifyResult` as one short line: `passed, max error 3.1e-07, revert bit-exact`."""
    revert = "revert bit-exact" if result.revert_bit_exact else "revert NOT bit-exact"
    return f"{'passed' if result.passed else 'FAILED'}, max error {result.max_error:.2g}, {revert}"


def options_key(options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Options as a comparable value: what a verdict was computed for, against what a row shows now."""
    return tuple(sorted((key, format_value(value)) for key, value in options.items()))


@dataclass(frozen=True)
class Verdict:
    """A verification's state for one patch: `text` (running …, passed …, error) and the options it is for."""

    options: tuple[tuple[str, str], ...]
    text: str

    def shown(self) -> str:
        """The text with the options it was computed for: `passed for chunk=2, sink=1: max error …`."""
        if not self.options or not self.text.startswith(("passed", "FAILED")):
            return self.text
        verdict, _, rest = self.text.partition(", ")
        return f"{verdict} for {', '.join(f'{key}={value}' for key, value in self.options)}: {rest}"


@dataclass
class PatchBench:
    """The registered patches and the verdicts of the verifications run this session. A verdict belongs to the
    options it verified: a row whose options differ shows none."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)  # options set in the panel, per patch

    def rows(self, model: Any | None) -> list[PatchRow]:
        """One row per registered patch, marked applied (with the options in force) when it is on `model`."""
        in_force = patches.applied_options(model) if model is not None else {}
        rows = []
        for info in patches.available():
            chosen = self.chosen.get(info.name, {})
            options = in_force.get(info.name) or {
                parameter.name: chosen.get(parameter.name, parameter.default) for parameter in info.parameters
            }
            verdict = self.verdicts.get(info.name)
            shown = verdict.shown() if verdict is not None and verdict.options == options_key(options) else ""
            rows.append(PatchRow(info.name, info.summary, info.name in in_force, shown, info.parameters, dict(options)))
        return rows

    @staticmethod
    def check_options(name: str, texts: dict[str, str]) -> dict[str, Any]:
        """Patch `name`'s options from the panel's fields, resolved; raises `PatchParameterError` (naming the
        parameter) for a value the patch refuses. Changes nothing: the options dialog asks before it closes."""
        from cogsurgeon.patches.registry import resolve_options

        return resolve_options(name, {key: parse_value(text) for key, text in texts.items()})

    def set_options(self, model: Any | None, name: str, texts: dict[str, str]) -> str:
        """Choose patch `name`'s options from the panel's fields (`NAME:key=value` spelling: `none`, `true`, numbers);
        a patch that is on is re-applied with them. Raises `PatchParameterError` for a value the patch refuses, and
        then changes nothing."""
        from cogsurgeon.patches.registry import resolve_options

        options = {key: parse_value(text) for key, text in texts.items()}
        resolved = resolve_options(name, options)
        self.chosen[name] = options
        if model is not None and name in patches.applied(model):
            patches.revert(model, name)
            patches.apply(model, name, **options)
            return f"re-applied {format_patch_spec(name, resolved)}"
        return f"{format_patch_spec(name, resolved)} will be applied with these options"

    def toggle(self, model: Any, name: str, apply: bool | None = None) -> str:
        """Apply `name` to `model` (with the options chosen for it), or revert it when it is on (`apply` forces one
        direction); says what it did."""
        is_on = name in patches.applied(model)
        if apply is None:
            apply = not is_on
        if apply and not is_on:
            patches.apply(model, name, **self.chosen.get(name, {}))
            return f"applied {format_patch_spec(name, patches.applied_options(model)[name])}"
        if not apply and is_on:
            patches.revert(model, name)
            return f"reverted {name}"
        return f"{name} is already {'on' if is_on else 'off'}"

    def verify_scope(self) -> str:
        """What `verify` runs, in words: `tiny, tiny-i2v, tiny-1.5 with plain and fused processors`."""
        from cogsurgeon.patches.verify import PROCESSORS

        return f"{', '.join(TINY_SPECS)} with {' and '.join(PROCESSORS)} processors"

    def verify(self, name: str, options: dict[str, Any], progress: Callable[[str], None] | None = None) -> Any:
        """Run the patch's tiny-model reference check with exactly `options` (the row's: what the panel shows), as
        `patch verify NAME:k=v` does; slow: call it from a worker. `progress` is told each step as
        `running 2/6: tiny, fused processor`."""
        from cogsurgeon.patches.verify import PROCESSORS, verify_patch

        total = len(TINY_SPECS) * len(PROCESSORS)
        done = 0

        def step(message: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"running {done}/{total}: {message.removeprefix(f'{name}: ')}")

        return verify_patch(name, options=options, progress=step)

    def set_verdict(self, name: str, options: dict[str, Any], text: str) -> None:
        self.verdicts[name] = Verdict(options_key(options), text)

    def record_verdict(self, name: str, options: dict[str, Any], result: Any) -> Verdict:
        verdict = self.verdicts[name] = Verdict(options_key(options), describe_verdict(result))
        return verdict


__all__ = [
    "PatchBench", "PatchRow",
]
