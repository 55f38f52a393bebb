"""How the folder of a `lora repair` or a `lora merge` (an output; `OutputKind` says which) reaches `--out` without
ever losing a user's data: the files are written into a hidden staging folder beside it (`.NAME.partial-PID-XXXX`,
removed on any failure, SIGINT, SIGTERM or SIGHUP, and by the next run on that output when its process died — only if
it still holds the owner marker written into it at creation, so a user's folder of a similar name is never touched),
a manifest with a hash of every file is written last, and the folder is renamed into place atomically, under a lock
that one run per output holds:

- without --force, only if `--out` is still absent at the moment of the rename (renameat2 RENAME_NOREPLACE);
- with --force, only over an earlier output of the same kind that is unchanged (its manifest and every hash match),
  swapped in one step (RENAME_EXCHANGE) and checked again after the swap; anything else is swapped back and left as
  it was.

What files are written is decided elsewhere (tools/lora/repair.py, tools/lora/merge.py); this module decides how they
are published. A repair's manifest (`cogsurgeon-repair.json`) hashes with sha256; a merge's (`cogsurgeon-merge.json`)
with xxh3-128 (the required `xxhash` package): a merge writes gigabytes and sha256 would cost more CPU than the merge
itself; the hash detects changes, not a forger. A manifest is checked with the hash each entry names, so merge
manifests written with sha256 (before 2026-11-30) stay replaceable with --force.

Signals: while a folder is made, recorded, moved or removed, SIGINT/SIGTERM/SIGHUP are deferred (`_signals_held`): the
handler, which Python always runs on the main thread whichever thread the kernel picked, only records the signal, and
leaving the held section acts on it. (A thread's signal mask would not do: a process-directed signal goes to any
thread that does not block it, a BLAS thread for instance.) Clean-up runs held too, so a second SIGTERM cannot cut it
short; what it could not remove is named in the message.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cogsurgeon.inspector.errors import CogsurgeonError, Interrupted
from cogsurgeon.inspector.user_files import describe_os_error, expand_user

MANIFEST_FORMAT = 1
MANIFEST_HASHES = ("sha256", "xxh3_128")  # what a manifest entry may name; written: `OutputKind.hash_name`
LOCK_SUFFIX = ".cogsurgeon-lock"
_HASH_CHUNK = 8 * 1024 * 1024
_HELD_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                      if s)


@dataclass(frozen=True)
class OutputKind:
    """What a command publishes: its noun in messages, the `written_by` of its manifest, the manifest's name and
    the hash its manifest is written with."""

    noun: str
    written_by: str
    manifest_name: str
    hash_name: str


REPAIR = OutputKind("repair", "cogsurgeon lora repair", "cogsurgeon-repair.json", "sha256")
MERGE = OutputKind("merge", "cogsurgeon lora merge", "cogsurgeon-merge.json", "xxh3_128")


def new_hash(name: str) -> Any:
    """A hashlib-like object for a manifest's hash (one of `MANIFEST_HASHES`)."""
    return xxhash.xxh3_128() if name == "xxh3_128" else hashlib.new(name)


class OutputError(CogsurgeonError):
    """An `--out` that cannot be (or can no longer be) written without risking what is there."""


class PublicationInterrupted(Interrupted):
    """SIGTERM or SIGHUP arrived during a repair or a merge; the staging folder is removed before this propagates (if
    it could not be, `left_behind` names it and the message says so)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum, f"interrupted by {signal.Signals(signum).name}")
        self.left_behind: Path | None = None

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.left_behind is None:
            return f"interrupted by {name}; the partial output was removed"
        return (f"interrupted by {name}; the partial output {self.left_behind} could not be removed: the next run on "
                "this output removes it, or remove it yourself")


# ---------------------------------------------------------------- the output path


def output_path(out_dir: str | Path, inputs: tuple[Path, ...]) -> Path:
    """`--out` as an absolute path whose parent is resolved and whose last part is kept as given (a symlink at
    `--out` is never followed). Refused: a symlink (dangling or not), a path inside or around an input."""
    given = expand_user(out_dir)
    absolute = Path(os.path.abspath(given))
    if absolute.name in ("", ".", ".."):
        raise OutputError(f"out_dir={out_dir} names no folder: give the adapter folder to create")
    try:
        out = absolute.parent.resolve() / absolute.name
        is_link = out.is_symlink()
    except (OSError, RuntimeError) as exc:
        reason = describe_os_error(out_dir, exc) if isinstance(exc, OSError) else f"{out_dir}: a symlink loop"
        raise OutputError(f"cannot use out_dir={reason}") from None
    if is_link:
        target = os.readlink(out)
        state = _symlink_state(out)
        raise OutputError(
            f"out_dir={out} is a symlink to {target}, {state}: cogsurgeon does not write through symlinks; "
            "give the real folder"
        )
    for input_path in inputs:
        resolved_input = input_path.resolve()
        if out == resolved_input or out in resolved_input.parents:
            raise OutputError(f"out_dir={out} would replace the checkpoint itself ({resolved_input}): "
                              "choose another folder")
        if resolved_input.is_dir() and resolved_input in out.parents:
            raise OutputError(
                f"out_dir={out} lies inside the checkpoint folder {resolved_input}: the input is never written to; "
                "choose a folder outside it"
            )
    return out


def _symlink_state(link: Path) -> str:
    try:
        os.stat(link)
    except OSError as exc:
        return "a symlink loop" if exc.errno == errno.ELOOP else "which does not exist (a dangling symlink)"
    return "which exists"


# ---------------------------------------------------------------- the manifest


def file_digest(path: Path, hash_name: str) -> str:
    digest = new_hash(hash_name)
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(folder: Path, names: list[str], kind: OutputKind,
                 hashes: dict[str, str] | None = None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of `names` in `folder`; `hashes` gives digests (of `kind.hash_name`) already computed from the
    written bytes (a merge hashes each shard as it writes it), the others are read back here. `record`: what the
    command made the output from (a repair: its source checkpoint and the alpha it used), kept beside the files."""
    hashes = hashes or {}
    algorithm = kind.hash_name
    return {
        "written_by": kind.written_by,
        "format": MANIFEST_FORMAT,
        **(record or {}),
        "files": {name: {algorithm: hashes.get(name) or file_digest(folder / name, algorithm),
                         "bytes": (folder / name).stat().st_size}
                  for name in sorted(names)},
    }


def recorded_source(folder: str | Path) -> dict[str, Any] | None:
    """The source checkpoint a repair's manifest in `folder` records (its `source`: path, file, lora_alpha, …), or
    None when `folder` holds no readable repair manifest naming one. Reads one small file; changes nothing."""
    try:
        manifest = json.loads((Path(folder) / REPAIR.manifest_name).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    source = manifest.get("source") if isinstance(manifest, dict) else None
    return source if isinstance(source, dict) and isinstance(source.get("file"), str) else None


def records_another_source(folder: str | Path, checkpoint_file: str | Path) -> str | None:
    """The source file recorded by the repair manifest in `folder` when it is not `checkpoint_file` (the weights file
    a repair would now read): replacing that folder would put another checkpoint's adapter under its name."""
    source = recorded_source(folder)
    if source is None:
        return None
    recorded = Path(source["file"])
    return None if recorded == Path(checkpoint_file).absolute() else str(recorded)


@dataclass(frozen=True)
class EarlierOutput:
    """A folder at `--out` that is exactly what an earlier repair or merge published: its manifest, byte for byte."""

    manifest_bytes: bytes


def earlier_output_problem(folder: Path, kind: OutputKind) -> tuple[EarlierOutput | None, str | None]:
    """(the earlier output, None) when `folder` holds exactly the files its manifest (of this `kind`) lists, each
    with the listed size and hash; otherwise (None, why not)."""
    manifest_name, noun = kind.manifest_name, kind.noun
    manifest_path = folder / manifest_name
    try:
        if manifest_path.is_symlink() or not manifest_path.is_file():
            return None, f"it has no {manifest_name}, so it was not written by `{kind.written_by}`"
        manifest_bytes = manifest_path.read_bytes()
        manifest = json.loads(manifest_bytes)
        ours = isinstance(manifest, dict) and manifest.get("written_by") == kind.written_by
        files = manifest["files"] if ours else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            return None, f"its {manifest_name} is not a {noun} manifest"
        present = {entry.name for entry in folder.iterdir()} - {manifest_name}
        if present != set(files):
            extra = sorted(present - set(files))
            missing = sorted(set(files) - present)
            what = f"files the {noun} did not write ({', '.join(extra[:3])})" if extra else \
                f"files of the {noun} are missing ({', '.join(missing[:3])})"
            return None, f"it has changed since the {noun}: {what}"
        for name, entry in files.items():
            path = folder / name
            algorithm = next((name for name in MANIFEST_HASHES if name in entry), "sha256")
            if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.get("bytes") \
                    or file_digest(path, algorithm) != entry.get(algorithm):
                return None, f"it has changed since the {noun}: {name} differs from what was written"
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"it cannot be checked ({type(exc).__name__}: {exc})"
    return EarlierOutput(manifest_bytes), None


def _is_the_same_output(folder: Path, expected: EarlierOutput, kind: OutputKind) -> bool:
    found, _ = earlier_output_problem(folder, kind)
    return found is not None and found.manifest_bytes == expected.manifest_bytes


def refuse_existing_output(out: Path, force: bool, kind: OutputKind) -> None:
    """The cheap check before anything is written or locked: without --force `out` must be absent; with it, it
    must at least be a real folder. `check_output` does the full check under the lock."""
    if not os.path.lexists(out):
        return
    if not force:
        raise OutputError(f"{out} already exists: choose another out_dir=, or pass force=True to replace an earlier "
                          f"{kind.noun}")
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"{out} exists and is not a folder: remove it yourself, force=True replaces earlier "
                          f"{kind.noun}s only")


def check_output(out: Path, force: bool, kind: OutputKind) -> EarlierOutput | None:
    """What is at `out` now: nothing (None), or an earlier unchanged output of this `kind` that --force may
    replace. Anything else is an `OutputError` and is left alone."""
    refuse_existing_output(out, force, kind)
    if not os.path.lexists(out):
        return None
    earlier, why_not = earlier_output_problem(out, kind)
    if earlier is None:
        raise OutputError(
            f"{out} is not an earlier {kind.noun} that force=True may replace: {why_not}; nothing was changed, "
            "choose another out_dir= or remove it yourself"
        )
    return earlier


# ---------------------------------------------------------------- atomic renames


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc: Any = None


def _renameat2(source: Path, target: Path, flags: int) -> None:
    """Linux's renameat2; OSError(ENOSYS) where the C library lacks it, EINVAL where the file system does."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    function = getattr(_libc, "renameat2", None) if _libc else None
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    result = function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), ctypes.c_uint(flags))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_if_absent(source: Path, target: Path) -> None:
    """Rename `source` to `target` only if nothing is at `target`; FileExistsError otherwise."""
    try:
        _renameat2(source, target, _RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
    # Without renameat2: claim the name with an exclusive mkdir, then rename over that empty folder (a rename
    # only replaces an empty folder, so files someone puts there meanwhile make it fail instead of vanish).
    os.mkdir(target)
    try:
        os.rename(source, target)
    except OSError as exc:
        with suppress(OSError):
            os.rmdir(target)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        raise


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then the caller falls back)."""
    try:
        _renameat2(first, second, _RENAME_EXCHANGE)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False
        raise


class _DeferredSignals:
    """The state shared by the signal handler and the held sections of the main thread's publication."""

    depth = 0  # held sections open
    pending: int | None = None  # the first signal that arrived while one was open
    installed = False  # our handler is in place (publication on the main thread)


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else PublicationInterrupted(signum)


def _deferring_handler(signum: int, frame: Any) -> None:
    if _DeferredSignals.depth:
        if _DeferredSignals.pending is None:
            _DeferredSignals.pending = signum
        return
    _DeferredSignals.pending = None
    raise _exception_for(signum)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP for the few steps that make, record, move or remove folders: a signal that
    arrives meanwhile is acted on when the outermost held section is left. Effective where `publication` installed
    the handler (on the main thread); elsewhere (a TUI worker) the steps run as they are."""
    _DeferredSignals.depth += 1
    try:
        yield
    finally:
        _DeferredSignals.depth -= 1
        if _DeferredSignals.depth == 0 and _DeferredSignals.pending is not None:
            signum, _DeferredSignals.pending = _DeferredSignals.pending, None
            raise _exception_for(signum)


def _fsync_folder(folder: Path) -> None:
    """Make the rename into `folder` durable, where the file system allows it (best effort: it is already done)."""
    with suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------- staging, locking, publishing


_HIDDEN_WORK = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: under the lock, no run of this process is writing to this output
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


OWNER_MARKER = ".cogsurgeon-owner"


def _owner_text(folder_name: str) -> str:
    return f"made by cogsurgeon as {folder_name}; removed by it when the run that made it has ended\n"


def _write_owner_marker(folder: Path) -> None:
    """Mark `folder` as this tool's own work: a marker naming the folder itself, so that a copy under another name
    (or a user's folder named alike) proves nothing."""
    descriptor = os.open(folder / OWNER_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(_owner_text(folder.name))


def made_by_us(folder: Path) -> bool:
    """`folder` is a real folder (no symlink) holding the owner marker this tool wrote into it under this name."""
    marker = folder / OWNER_MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
            return False
        with marker.open("rb") as handle:
            return handle.read(4096) == _owner_text(folder.name).encode("utf-8", "surrogateescape")
    except OSError:
        return False


def remove_stale_work(out: Path) -> None:
    """Remove the `.NAME.partial-PID-*` / `.NAME.old-PID-*` folders of `out` left by processes that died (SIGKILL,
    a power cut) — only those that hold this tool's owner marker: a name alone proves nothing (a user's backup
    `.NAME.old-20241204-1` stays). Called with the output's lock held, so no live run on this output owns one."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _HIDDEN_WORK.match(entry.name)
        if match is None or match["name"] != out.name or _process_alive(int(match["pid"])) or not made_by_us(entry):
            continue
        with _signals_held():
            shutil.rmtree(entry, ignore_errors=True)


def _hidden_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _hidden_folder(out: Path, kind: str) -> Path:
    """A new folder `.NAME.KIND-PID-RANDOM` beside `out`, created with the usual permissions (umask), holding only
    the owner marker (`Publication.publish` removes it just before the folder is published)."""
    for _ in range(100):
        candidate = _hidden_name(out, kind)
        with suppress(FileExistsError):
            os.mkdir(candidate, 0o777)
            try:
                _write_owner_marker(candidate)
            except BaseException:
                shutil.rmtree(candidate, ignore_errors=True)
                raise
            return candidate
    raise OutputError(f"cannot create a staging folder beside {out}")


def _create_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first) so that a failed run can remove them."""
    missing = []
    current = folder
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    created = []
    for path in reversed(missing):
        with suppress(FileExistsError):
            os.mkdir(path, 0o777)
            created.append(path)
    if not folder.is_dir():
        raise OutputError(f"the parent of out_dir=, {folder}, is not a folder")
    return created


@contextmanager
def _terminating_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise (KeyboardInterrupt, `PublicationInterrupted`) so that the `finally` clauses
    clean up, and are deferred inside `_signals_held`; the previous handlers come back afterwards. Only the main
    thread can install handlers; elsewhere the process's own handlers stay."""
    if threading.current_thread() is not threading.main_thread() or _DeferredSignals.installed:
        yield
        return
    previous = {}
    _DeferredSignals.depth, _DeferredSignals.pending = 0, None
    try:
        for signum in _HELD_SIGNALS:
            previous[signum] = signal.signal(signum, _deferring_handler)
        _DeferredSignals.installed = True
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _DeferredSignals.installed = False
        _DeferredSignals.pending = None


def _folder_identity(stat_result: os.stat_result) -> tuple[int, int]:
    return stat_result.st_dev, stat_result.st_ino


def _remove_tree_at(parent: int, name: str) -> bool:
    """Remove the folder `name` of the open folder `parent` (a file descriptor, so a parent moved or swapped for a
    symlink meanwhile is still the right one); True when nothing is left of it."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, ignore_errors=True, dir_fd=parent)
    else:  # 3.10's rmtree takes no dir_fd; Linux's /proc path of the descriptor names the same folder
        shutil.rmtree(os.path.join(f"/proc/self/fd/{parent}", name), ignore_errors=True)
    try:
        os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


@dataclass
class Publication:
    """One output's way to `out`: `staging` is where its files go; `publish()` moves them into place. `parent` is
    `out`'s folder, held open so that a parent moved or replaced while the command runs is noticed, and cleaned."""

    out: Path
    staging: Path
    expected: EarlierOutput | None  # the earlier output --force replaces, as checked under the lock
    parent: int
    kind: OutputKind
    published: bool = False

    def publish(self, hashes: dict[str, str] | None = None, record: dict[str, Any] | None = None) -> list[str]:
        """Write the manifest (last), then move the staging folder to `out` atomically, re-checking `out`: absent
        (or, with --force, still the same earlier output). `hashes`: digests the writer already computed; `record`:
        what the output was made from (see `manifest_for`). Returns the names of the files published."""
        names = sorted(entry.name for entry in self.staging.iterdir() if entry.name != OWNER_MARKER)
        manifest = manifest_for(self.staging, names, self.kind, hashes, record)
        manifest_path = self.staging / self.kind.manifest_name
        with manifest_path.open("w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        for name in names:
            with (self.staging / name).open("rb") as handle:
                os.fsync(handle.fileno())
        with _signals_held():
            self._check_parent()
            os.unlink(self.staging / OWNER_MARKER)  # what is published holds only what the writer wrote
            if self.expected is None or not os.path.lexists(self.out):
                try:
                    rename_if_absent(self.staging, self.out)
                except FileExistsError:
                    raise OutputError(
                        f"{self.out} appeared while the {self.kind.noun} ran: it was left as it is and nothing was "
                        "written; choose another out_dir="
                    ) from None
            else:
                self._replace_earlier_output(self.expected)
            self.published = True
        _fsync_folder(self.out.parent)
        return [*names, self.kind.manifest_name]

    def _check_parent(self) -> None:
        try:
            same = _folder_identity(os.stat(self.out.parent)) == _folder_identity(os.fstat(self.parent))
        except OSError:
            same = False
        if not same or self.out.parent.is_symlink():
            raise OutputError(
                f"the folder of out_dir=, {self.out.parent}, was moved or replaced while the {self.kind.noun} ran: "
                "nothing was written there; run it again"
            )

    def _replace_earlier_output(self, expected: EarlierOutput) -> None:
        noun = self.kind.noun
        if exchange(self.staging, self.out):
            # the staging path now holds what was at out: a real folder that is still the earlier output
            if not self.staging.is_symlink() and _is_the_same_output(self.staging, expected, self.kind):
                _write_owner_marker(self.staging)  # it is ours to remove now, also by the next run
                return
            exchange(self.staging, self.out)  # put it back as it was
            raise OutputError(
                f"{self.out} changed while the {noun} ran: it was left as it is and nothing was written; "
                f"run the {noun} again"
            )
        # No atomic exchange here: move the earlier output aside, check it, then rename if absent.
        retired = _hidden_name(self.out, "old")
        os.rename(self.out, retired)
        if retired.is_symlink() or not _is_the_same_output(retired, expected, self.kind):
            rename_if_absent(retired, self.out)
            raise OutputError(f"{self.out} changed while the {noun} ran: it was left as it is and nothing was written")
        try:
            rename_if_absent(self.staging, self.out)
        except BaseException:
            rename_if_absent(retired, self.out)
            raise
        os.rename(retired, self.staging)  # so that the cleanup below removes the earlier output
        _write_owner_marker(self.staging)


def _note_left_behind(failure: BaseException | None, left_behind: Path | None) -> None:
    if isinstance(failure, PublicationInterrupted) and left_behind is not None:
        failure.left_behind = left_behind


@contextmanager
def publication(out: Path, *, force: bool, kind: OutputKind) -> Iterator[Publication]:
    """Hold the lock of `out`, clean what dead runs left, and give a staging folder to write into. On leaving, the
    staging folder (after `publish()`: the earlier output it replaced) is removed, whatever happened, with signals
    held so that a second one cannot cut the clean-up short; on failure the parent folders this run created are
    removed too."""
    from filelock import FileLock, Timeout

    with _terminating_signals_raise():
        created: list[Path] = []
        staging: Path | None = None
        parent: int | None = None
        succeeded = False
        lock_path = out.parent / f".{out.name}{LOCK_SUFFIX}"
        try:
            # Each thing made here is recorded before a signal can land (they are held until the `with` ends), so
            # the clean-up below knows of everything a SIGTERM right after its creation would otherwise leave.
            with _signals_held():
                created = _create_parents(out.parent)
                parent = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
            lock = FileLock(str(lock_path), timeout=0)
            held = False
            failure: BaseException | None = None
            try:
                with _signals_held():
                    try:
                        lock.acquire()
                    except Timeout:
                        raise OutputError(
                            f"another {kind.noun} holds {out} (lock {lock_path}): wait for it to finish, or choose "
                            "another out_dir="
                        ) from None
                    held = True
                expected = check_output(out, force, kind)
                remove_stale_work(out)
                with _signals_held():
                    staging = _hidden_folder(out, "partial")
                current = Publication(out, staging, expected, parent, kind)
                yield current
                succeeded = current.published
            except BaseException as exc:
                failure = exc
                raise
            finally:
                left_behind: Path | None = None
                try:
                    with _signals_held():
                        if staging is not None and not _remove_tree_at(parent, staging.name):
                            left_behind = staging
                        if held:  # no lock file is left beside the output; filelock re-checks one unlinked under it
                            with suppress(OSError):
                                os.unlink(lock_path.name, dir_fd=parent)
                            lock.release()
                except PublicationInterrupted as late:  # a signal that arrived during the clean-up, acted on now
                    _note_left_behind(late, left_behind)
                    raise
                _note_left_behind(failure, left_behind)
        except OSError as exc:
            raise OutputError(f"cannot write {describe_os_error(out, exc)}") from None
        finally:
            if parent is not None:
                os.close(parent)
            if not succeeded:
                for folder in reversed(created):
                    try:
                        os.rmdir(folder)
                    except OSError:
                        break


__all__ = [
    "MERGE", "OutputError", "REPAIR", "new_hash", "output_path", "publication", "records_another_source",
    "refuse_existing_output",
]
