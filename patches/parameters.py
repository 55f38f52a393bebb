"""Patch parameters: what a patch declares (`PatchParameter`), how given options are checked against it, and the
`NAME:key=value,key=value` spec of the command line. Pure Python, torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cogsurgeon.patches.errors import PatchParameterError, PatchSpecError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class PatchParameter:
    """One parameter a patch takes: `patches.apply(model, NAME, key=value)`, `--patch NAME:key=value` on the command
    line. `type` is a type or a tuple of types (`int`, `float`, `bool`, `str`); None is accepted when the default is
    None or `type(None)` is among them; an int is accepted where a float is (a bool never counts as a number)."""

    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str

    @property
    def types(self) -> tuple[type, ...]:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return types + ((type(None),) if self.default is None and type(None) not in types else ())

    @property
    def type_name(self) -> str:
        return " | ".join("None" if t is type(None) else t.__name__ for t in self.types)

    def accepts(self, value: Any) -> bool:
        types = self.types
        if isinstance(value, bool):
            return bool in types
        if isinstance(value, int) and float in types:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return isinstance(value, types)


def check_options(patch_name: str, parameters: Sequence[PatchParameter], options: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared parameter's value: the given options checked by name and type, defaults for the rest, in the
    declared order. Raises `PatchParameterError` naming the first parameter at fault."""
    declared = {parameter.name: parameter for parameter in parameters}
    for key in options:
        if key not in declared:
            takes = f"its parameters: {', '.join(declared)}" if declared else "it takes no parameters"
            raise PatchParameterError(patch_name, key, f"{patch_name} has no parameter {key!r} ({takes})")
    resolved = {}
    for name, parameter in declared.items():
        value = options.get(name, parameter.default)
        if not parameter.accepts(value):
            raise PatchParameterError(
                patch_name, name, f"{patch_name}: {name} must be {parameter.type_name}, got {value!r}"
            )
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:  # what torch can hold
            raise PatchParameterError(patch_name, name, f"{patch_name}: {name} must fit in 64 bits, got {value}")
        resolved[name] = value
    return resolved


def parse_value(text: str) -> Any:
    """A command-line value: an int, a float, None (`none`), a bool (`true`/`false`), else the string itself."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for number in (int, float):
        try:
            value = number(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break  # "nan" and "inf" stay strings: no parameter takes them as numbers
        return value
    return text


def parse_patch_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME:key=value,key=value` -> (name, options), values parsed by `parse_value`.

    >>> parse_patch_spec("block-causal-attention:chunk=3,window=none")
    ('block-causal-attention', {'chunk': 3, 'window': None})
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise PatchSpecError(f"patch spec {spec!r} has no patch name: write NAME or NAME:key=value,key=value")
    options: dict[str, Any] = {}
    if not rest.strip():
        if _:
            raise PatchSpecError(f"patch spec {spec!r} has nothing after ':': write {name}:key=value,key=value")
        return name, options
    for item in rest.split(","):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key or not key.isidentifier():
            raise PatchSpecError(f"patch spec {spec!r}: {item.strip()!r} is not key=value (write {name}:key=value,...)")
        if key in options:
            raise PatchSpecError(f"patch spec {spec!r} gives {key} twice")
        options[key] = parse_value(value.strip())
    return name, options


def format_value(value: Any) -> str:
    """A value as a spec spells it, `parse_value`'s inverse: `none`, `true`/`false`, numbers and strings as they are."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_patch_spec(name: str, options: Mapping[str, Any]) -> str:
    """The spec `parse_patch_spec` reads back: `NAME` or `NAME:key=value,...`."""
    if not options:
        return name
    return f"{name}:{','.join(f'{key}={format_value(value)}' for key, value in options.items())}"


__all__ = [
    "INT64_MAX", "PatchParameter", "check_options", "format_patch_spec", "format_value", "parse_patch_spec",
    "parse_value",
]
