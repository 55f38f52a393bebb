"""Errors meant for people: each says what was wrong and what to do. The CLI prints them as one line, exit 2.

This module imports nothing heavy, so every part of cogsurgeon (the torch-free LoRA tools included) can use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# A keyword argument named in a message: `gpu_memory='lots'`, `vae=True`, or the bare `lora_dtype=`; a word that
# starts the message or follows a space or `(` (so `lora_alpha=64` and a path's `runs/step=500` are left alone).
_PARAMETER = re.compile(r"(?<![^\s(])([a-z][a-z0-9_]*)=(True\b)?")


def renamed_parameters(message: str, names: Mapping[str, str]) -> str:
    """A library message, which names the keyword arguments of the Python call (`gpu_memory='lots'`, `vae=True`,
    `lora_dtype=`), with each parameter in `names` called as a front end calls it: `names={"gpu_memory":
    "--gpu-memory", "vae": "--vae"}` gives `--gpu-memory 'lots'`, `--vae`, and leaves `lora_dtype=` as it is."""

    def rename(match: re.Match[str]) -> str:
        name = names.get(match[1])
        if name is None:
            return match[0]
        if match[2] or match.end() == len(message) or message[match.end()] in " ,;:)":
            return name  # a switch (`vae=True`) or the parameter itself (`lora_dtype= is ...`)
        return f"{name} "  # then its value

    return _PARAMETER.sub(rename, message)


def shown(value: object, limit: int = 40) -> str:
    """A value as quoted in a message, cut to `limit` characters (a 5000-digit number is not a message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 module`, `2 modules`, `1,024 modules`: a count and its noun in agreement, for messages and output."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


class CogsurgeonError(Exception):
    """Bad input or a request that cannot be met; never a bug. Its message is shown to the user as is."""


class ModelSpecError(CogsurgeonError):
    """A MODEL argument that names no published config, tiny model, local folder or cached hub id."""


class ModelLoadError(CogsurgeonError):
    """A model folder or cache entry that exists but cannot be loaded as a CogVideoX transformer."""


class Interrupted(BaseException):
    """A terminating signal (SIGTERM, SIGHUP) turned into an exception so that clean-up code runs, as SIGINT
    becomes KeyboardInterrupt; the CLI exits with 128 + the signal's number. A BaseException, so that
    `except Exception` does not swallow it."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        super().__init__(message)


__all__ = [
    "CogsurgeonError", "Interrupted", "ModelLoadError", "ModelSpecError", "counted", "renamed_parameters", "shown",
]
