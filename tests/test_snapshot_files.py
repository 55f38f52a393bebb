"""Every stored TUI snapshot belongs to a test that still exists.

syrupy fails a run that leaves a snapshot unused, but not under pytest-xdist (the README's `-n auto`), where each
worker sees only part of the suite; this check keeps stale snapshots out either way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SNAPSHOTS = Path(__file__).resolve().parent / "__snapshots__"


def _test_functions(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def test_every_snapshot_names_a_test_of_its_module():
    stale = []
    for snapshot in SNAPSHOTS.glob("*/*.svg"):
        module = SNAPSHOTS.parent / f"{snapshot.parent.name}.py"
        test_name = re.sub(r"\[.*\]$", "", snapshot.stem)
        if not module.exists() or test_name not in _test_functions(module):
            stale.append(str(snapshot.relative_to(SNAPSHOTS.parent)))
    assert list(SNAPSHOTS.glob("*/*.svg")), "no snapshots found: the layout of tests/__snapshots__ changed"
    assert stale == [], f"snapshots no test takes any more (delete them, or run `pytest --snapshot-update`): {stale}"
