"""What every command prints through: JSON on stdout, and a rich console sized for a terminal or a file."""

from __future__ import annotations

import json
from typing import Any

import click


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))
