"""Keep cogsurgeon off the network: the Hub is switched off for this process before huggingface_hub is imported,
and the user's own setting is remembered so that programs cogsurgeon launches (`cogsurgeon run`) see it unchanged.
"""

from __future__ import annotations

import os

HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_users_values: dict[str, str | None] = {}


def enter_offline_mode() -> None:
    """Set the Hub's offline variables for this process, remembering what the user had."""
    for variable in HUB_OFFLINE_VARIABLES:
        _users_values.setdefault(variable, os.environ.get(variable))
        os.environ[variable] = "1"


def user_environment() -> dict[str, str]:
    """The environment as the user gave it to cogsurgeon, for launching their programs."""
    environment = dict(os.environ)
    for variable, value in _users_values.items():
        if value is None:
            environment.pop(variable, None)
        else:
            environment[variable] = value
    return environment


def hub_download_command(repo_id: str) -> str:
    """The command that fetches `repo_id` with the installed huggingface_hub: `hf download` from 1.0 on (which
    removed `huggingface-cli`), `huggingface-cli download` before."""
    from importlib import metadata

    try:
        major = int(metadata.version("huggingface_hub").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        major = 1
    return f"{'hf' if major >= 1 else 'huggingface-cli'} download {repo_id}"


__all__ = [
    "HUB_OFFLINE_VARIABLES", "enter_offline_mode", "hub_download_command", "user_environment",
]
