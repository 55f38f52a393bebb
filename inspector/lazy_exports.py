"""Lazy package exports (PEP 562), written once: a package names what it exports and the module each name lives in;
a name imports its module on first use, and `dir()`, `help()` and tab completion list every export.

Light on purpose (importlib alone, not even `typing`): the console script and the torch-free LoRA tools import it.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # not `typing`'s: see the module docstring
if TYPE_CHECKING:
    from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, object]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose globals are `namespace`, for the names in `exports`
    (name -> the module defining it). A resolved name is kept in `namespace`, so the import happens once.

        __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
    """

    def __getattr__(name: str) -> object:
        """An export, imported from its module on first use."""
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        """The package's names with its lazy exports, as `help()` and tab completion list them."""
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


__all__ = [
    "lazy_exports",
]
