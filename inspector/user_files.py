"""Reading files a user handed us, without hanging or crashing on hostile ones: only regular files are opened (a
FIFO, a device such as /dev/zero, a folder or a socket is refused before a byte is read), reads are capped, JSON
and YAML are parsed with their blow-ups turned into one-line errors (nesting, alias bombs, NaN where a number is
meant), and OS errors (symlink loops, permissions, names too long) become `UserFileError` naming the path. Files
written under a name the user chose are written atomically (`write_atomically`).

Foundation layer: imports nothing of cogsurgeon but `errors` and `interrupts`, and nothing heavy (yaml only when a YAML
file is read).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.interrupts import interruptible

DEFAULT_TEXT_LIMIT = 64 * 1024 * 1024  # configs, indexes, caches: far above any real one
_KIND_NAMES = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class UserFileError(CogsurgeonError):
    """A path the user gave (or one inside a folder they gave) that cannot be read as the file it should be."""


def describe_os_error(path: Path | str, exc: OSError) -> str:
    """`exc` as people read it: "{path}: symlink loop", "permission denied", ..."""
    reasons = {
        errno.ELOOP: "a symlink loop (or too many levels of symlinks)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENAMETOOLONG: "a name too long for the file system",
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "a read-only file system",
        errno.EISDIR: "a folder",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return f"{path}: {reason}"


def expand_user(path: str | Path) -> Path:
    """`Path(path).expanduser()`, with `~nosuchuser/...` as an error for people instead of a RuntimeError."""
    try:
        return Path(path).expanduser()
    except (RuntimeError, KeyError):
        raise UserFileError(f"{path}: cannot expand '~' (no such user, or no home folder)") from None


def file_kind(path: Path) -> str | None:
    """None for a regular file (symlinks followed); otherwise what it is, for a message. OSError is raised."""
    return _kind(os.stat(path).st_mode)


def _kind(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else _KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")


def is_regular_file(path: Path) -> bool:
    """Like `Path.is_file()`, but never raises (loops, permissions, long names all give False)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_folder(path: Path) -> bool:
    """Like `Path.is_dir()`, but never raises."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading in binary mode if, and only if, it is a regular file.

    The open itself is non-blocking, so a FIFO with no writer cannot hang it; the type is checked on the open file
    (no race with a swap between check and open), then blocking reads are restored.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UserFileError(f"cannot read {describe_os_error(path, exc)}") from None
    except ValueError as exc:  # an embedded NUL
        raise UserFileError(f"cannot read {path!r}: {exc}") from None
    try:
        kind = _kind(os.fstat(descriptor).st_mode)
        if kind is not None:
            raise UserFileError(f"{path} is {kind}, not a regular file: cogsurgeon reads only regular files")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_bytes(path: Path, limit: int = DEFAULT_TEXT_LIMIT) -> bytes:
    """The content of a regular file, refused when it is larger than `limit` bytes."""
    try:
        with open_regular(path) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UserFileError(f"cannot read {describe_os_error(path, exc)}") from None
    if len(data) > limit:
        raise UserFileError(f"{path} is larger than {limit:,} bytes: not a file of the kind expected here")
    return data


def read_text(path: Path, limit: int = DEFAULT_TEXT_LIMIT) -> str:
    """A UTF-8 text file (a BOM is accepted and dropped), as `read_bytes` reads it."""
    try:
        return read_bytes(path, limit).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes, *, allow_nan: bool = False,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """`json.loads` whose every failure is a `ValueError`: nesting deeper than Python's stack included, and (unless
    `allow_nan`) the non-standard NaN/Infinity that Python accepts and every other JSON reader refuses."""
    try:
        return json.loads(text, parse_constant=None if allow_nan else _refuse_constant,
                          object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None


def read_json(path: Path, limit: int = DEFAULT_TEXT_LIMIT, *, allow_nan: bool = False) -> Any:
    """A JSON file, with every failure (unreadable, not JSON, too deep, too large) as one `UserFileError`."""
    text = read_text(path, limit)
    try:
        return loads_json(text, allow_nan=allow_nan)
    except ValueError as exc:
        raise UserFileError(f"{path} is not valid JSON: {exc}") from None


def loads_yaml(text: str) -> Any:
    """`yaml.safe_load` that refuses aliases: an alias bomb ("billion laughs") cannot expand, and no trainer
    config needs them."""
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "YAML aliases (*name) are not accepted here", event.start_mark
                )
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ValueError(" ".join(str(exc).split())) from None


def read_yaml(path: Path, limit: int = DEFAULT_TEXT_LIMIT) -> Any:
    """A YAML file read with `loads_yaml`; every failure is one `UserFileError`."""
    text = read_text(path, limit)
    try:
        return loads_yaml(text)
    except ValueError as exc:
        raise UserFileError(f"{path} is not readable YAML: {exc}") from None


def list_folder(path: Path) -> list[Path]:
    """The entries of a folder, sorted; an unreadable folder is a `UserFileError`."""
    try:
        return sorted(path.iterdir())
    except OSError as exc:
        raise UserFileError(f"cannot list {describe_os_error(path, exc)}") from None


def _mode_of_a_plain_write(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it back races other threads' files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: the file appears whole or not at
    all, and a failure meanwhile (a full disk, Ctrl-C) removes the temporary file. The file gets the permissions a
    plain write would leave: those of the file it replaces, else 0o666 less the umask (mkstemp's own are 0o600)."""
    with interruptible():  # Ctrl-C meanwhile removes the temporary file
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                os.fchmod(handle.fileno(), _mode_of_a_plain_write(path))
            os.replace(temporary, path)
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            if exc.filename == temporary or exc.filename2 == str(path):  # the rename: name the user's path
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


__all__ = [
    "UserFileError", "describe_os_error", "expand_user", "file_kind", "is_folder", "is_regular_file", "list_folder",
    "loads_json", "open_regular", "read_bytes", "read_json", "read_text", "read_yaml", "write_atomically",
]
