"""Shared fixtures: the CLI as a real subprocess from this checkout, and tiny real CogVideoX transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The inventory cache of this test session lives in a temporary folder, never in the user's ~/.cache.
os.environ["COGSURGEON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cogsurgeon-test-cache-")


def cli_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: the installed cogsurgeon (nothing of the checkout on the path, so a
    bare `import inspector` fails as it does for users), no colour codes, wide output."""
    environment = dict(os.environ)
    environment["NO_COLOR"] = "1"
    environment["COLUMNS"] = "200"
    environment.update(extra or {})
    return environment


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run `cogsurgeon ARGS...` (as `python -m cogsurgeon.inspector`) and return the CompletedProcess, text mode."""
    return subprocess.run(
        [sys.executable, "-m", "cogsurgeon.inspector", *args],
        capture_output=True,
        text=True,
        env=cli_environment(env),
        cwd=cwd or REPO_ROOT,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_model():
    from cogsurgeon.inspector import load_transformer

    return load_transformer("tiny")
