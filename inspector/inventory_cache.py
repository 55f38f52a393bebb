"""A cache of the module inventories of the configs shipped with the package (published on meta, and tiny), so
`cogsurgeon modules` and the TUI's first paint need neither torch nor diffusers imported.

Building the inventory costs little; importing diffusers' model code costs ~2 s more than `import torch,
diffusers.models`, because diffusers' hooks import peft, which imports transformers. A published config's
inventory depends only on the config (a tiny model's random weights are not in it), the dtype, and the installed torch
and diffusers, so it is cached under those keys, and each entry is checked on read against the size and mtime of every
source file it points to: an
edit to diffusers in site-packages (what the original fork did) invalidates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, get_args, get_type_hints

from cogsurgeon.inspector.inventory import ModuleInfo
from cogsurgeon.inspector.model_specs import builtin_config, builtin_dtype
from cogsurgeon.inspector.user_files import UserFileError, loads_json, read_bytes, write_atomically

CACHE_FORMAT = 1
ENTRY_BYTES_LIMIT = 32 * 1024 * 1024  # a 5B inventory is ~300 KB; a cache file pointing at /dev/zero is refused
# the types of every ModuleInfo field, as its annotations say (a row of any other shape means the entry is rebuilt)
_ROW_TYPES = {name: get_args(hint) or (hint,) for name, hint in get_type_hints(ModuleInfo).items()}
_REQUIRED_FIELDS = frozenset(f.name for f in dataclasses.fields(ModuleInfo) if f.default is dataclasses.MISSING)


def cache_folder() -> Path:
    """`$COGSURGEON_CACHE_DIR`, else `$XDG_CACHE_HOME/cogsurgeon`, else `~/.cache/cogsurgeon`."""
    if os.environ.get("COGSURGEON_CACHE_DIR"):
        return Path(os.environ["COGSURGEON_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cogsurgeon"


def _installed(distribution: str) -> str:
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        version = "absent"
    spec = find_spec(distribution)
    return f"{version}@{spec.origin if spec else '-'}"


def cache_key(spec: str, dtype: str | None) -> str:
    """Everything a shipped spec's inventory depends on, hashed: config, dtype, torch, diffusers, cogsurgeon."""
    parts = {
        "format": CACHE_FORMAT,
        "config": builtin_config(spec),
        "dtype": dtype or builtin_dtype(spec),
        "torch": _installed("torch"),
        "diffusers": _installed("diffusers"),
        "inventory_source": _file_stamp(Path(__file__).with_name("inventory.py")),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _file_stamp(path: Path) -> list[int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _entry_path(spec: str, dtype: str | None) -> Path:
    return cache_folder() / f"inventory-{spec}-{cache_key(spec, dtype)}.json"


def load_cached_inventory(spec: str, dtype: str | None = None) -> list[ModuleInfo] | None:
    """The cached inventory of a shipped (published or tiny) spec, or None if absent, unreadable, malformed or stale:
    the caller rebuilds it. Only a regular file is read, at most `ENTRY_BYTES_LIMIT` bytes."""
    try:
        entry = loads_json(read_bytes(_entry_path(spec, dtype), ENTRY_BYTES_LIMIT))
    except (UserFileError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    stamps, rows = entry.get("source_stamps"), entry.get("modules")
    if not isinstance(stamps, dict) or not isinstance(rows, list):
        return None
    if any(not isinstance(file, str) or _file_stamp(Path(file)) != stamp for file, stamp in stamps.items()):
        return None
    infos = [_module_info(row) for row in rows]
    return None if any(info is None for info in infos) else infos  # type: ignore[return-value]


def _module_info(row: Any) -> ModuleInfo | None:
    """A cache row as a ModuleInfo, or None when its fields or their types are not ModuleInfo's."""
    if not isinstance(row, dict) or not _REQUIRED_FIELDS <= set(row) or not set(row) <= set(_ROW_TYPES):
        return None
    for field, value in row.items():
        if not isinstance(value, _ROW_TYPES[field]) or isinstance(value, bool):
            return None
    return ModuleInfo(**row)


def store_inventory(spec: str, dtype: str | None, infos: list[ModuleInfo]) -> None:
    """Write the entry atomically; a cache that cannot be written (read-only home, a folder in the entry's place)
    is silently skipped, and leaves no temporary file behind."""
    files = sorted({info.file for info in infos if info.file})
    entry = {
        "source_stamps": {file: _file_stamp(Path(file)) for file in files},
        "modules": [info.__dict__ for info in infos],
    }
    path = _entry_path(spec, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(entry).encode())
    except OSError:
        return


__all__ = [
    "load_cached_inventory", "store_inventory",
]
