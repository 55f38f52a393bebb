"""The layering in pyproject.toml's `[tool.importlinter]`, checked by `lint-imports`: the app (inspector/cli/,
inspector/tui/) over the libraries (inspector's inventory/trace/doctor, patches, tools.lora) over the foundation.

The second test proves the check can fail: it copies the source folders as a `cogsurgeon` package into a temporary
folder, writes one wrong arrow into the copy, and runs the same contracts on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "app -> libraries -> foundation KEPT" in result.stdout


# (file in the copy, the line written into it, the contract that must break)
WRONG_ARROWS = [
    ("patches/registry.py", "from cogsurgeon.inspector.cli import output", "app -> libraries -> foundation"),
    ("inspector/loading.py", "from cogsurgeon import patches", "app -> libraries -> foundation"),
    ("tools/lora/repair.py", "from cogsurgeon.patches import registry", "app -> libraries -> foundation"),
    ("inspector/trace.py", "from cogsurgeon.inspector.tui import app", "app -> libraries -> foundation"),
    ("inspector/inventory.py", "import rich", "only the app imports Textual, click or rich"),
    ("patches/errors.py", "import textual", "only the app imports Textual, click or rich"),
    ("tools/lora/keys.py", "import torch", "LoRA inspect and repair are format operations"),
]


@pytest.mark.parametrize(("path", "line", "contract"), WRONG_ARROWS, ids=[arrow[0] for arrow in WRONG_ARROWS])
def test_a_wrong_arrow_breaks_a_contract(tmp_path, path, line, contract):
    package = tmp_path / "cogsurgeon"
    for folder in ("inspector", "patches", "tools"):
        shutil.copytree(REPO_ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # `cogsurgeon` stays a namespace package, as installed; on PYTHONPATH its copy comes before the editable install
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = package / path
    target.write_text(target.read_text() + f"\n{line}\n")

    result = lint_imports(tmp_path, env={"PYTHONPATH": str(tmp_path)})

    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout[result.stdout.index("Broken contracts"):]
    assert contract in broken
    assert f"cogsurgeon.{path.removesuffix('.py').replace('/', '.')}" in broken
