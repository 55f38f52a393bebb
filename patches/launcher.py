"""`cogsurgeon run`: launch an unchanged program so that every CogVideoX transformer it, or any Python process it
starts, builds is patched.

The mechanism is a generated `sitecustomize` (a copy of `patches/run_startup.py`) in a temporary folder put first on
PYTHONPATH, with COGSURGEON_RUN_PATCHES listing the patch specs (`NAME` or `NAME:key=value,...`, a JSON list). The
program gets the user's own environment (`cogsurgeon.inspector.offline.user_environment()`: cogsurgeon's process is
offline, theirs keeps their settings). Processes started with `python -E`/`-I`, or with an environment that drops
PYTHONPATH, are not reached. With `--ulysses N` (COGSURGEON_RUN_ULYSSES) the program runs under torchrun on N ranks
and each model built also runs context-parallel (`cogsurgeon.parallel`, the process group initialised for it).
Terminating signals are passed on to the program and the temporary folder is removed
however the program ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.interrupts import interruptible
from cogsurgeon.inspector.offline import user_environment
from cogsurgeon.patches.errors import PatchSpecError
from cogsurgeon.patches.parameters import parse_patch_spec
from cogsurgeon.patches.registry import check_composition, resolve_options

PATCHES_VARIABLE = "COGSURGEON_RUN_PATCHES"
RECORD_VARIABLE = "COGSURGEON_RUN_RECORD"  # {"path", "groups"}: record the attention of every model built
RECORDED_MARKER = "recorded-"  # the startup code leaves `recorded-PID-N` (holding the file's path) per recording
ULYSSES_VARIABLE = "COGSURGEON_RUN_ULYSSES"  # the Ulysses degree every model built runs context-parallel at
ROOT_VARIABLE = "COGSURGEON_RUN_ROOT"
STARTUP_SOURCE = Path(__file__).with_name("run_startup.py")
BUILT_MARKER = "built-"  # the startup code leaves `built-PID-N` in its own folder for each model it patches
COGSURGEON_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(CogsurgeonError):
    """The program could not be started."""


def check_patch_names(patch_specs: Sequence[str], *, required: bool = True) -> list[str]:
    """Every spec (`NAME` or `NAME:key=value,...`) parsed, its name known, its options valid, and the set
    composable: one spec per patch, the first given. Repeats of one patch with the same options (defaults filled in)
    collapse, so the program applies it once; one name with two sets of options is refused. Messages name
    run_patched's keyword arguments (`patch_names=`), which the CLI says as its flags."""
    if not patch_specs and required:
        raise CogsurgeonError("name at least one patch (patch_names=), or record the attention (record=) or run "
                              "context-parallel (ulysses=)")
    chosen: dict[str, tuple[str, dict]] = {}  # name -> its first spec, its options
    for spec in patch_specs:
        name, options = parse_patch_spec(spec)
        options = resolve_options(name, options)
        if chosen.setdefault(name, (spec, options))[1] != options:
            raise PatchSpecError(f"patch_names= names {name} twice with different options; give it once")
    check_composition(list(chosen))
    return [spec for spec, _ in chosen.values()]


@dataclass(frozen=True)
class RecordRequest:
    """`run --record-attention FILE --record-groups SPEC`: record the attention of every model the program builds."""

    path: Path
    groups: str = "frames"


def child_environment(
    patch_names: Sequence[str], startup_folder: Path, record: RecordRequest | None = None, ulysses: int | None = None
) -> dict[str, str]:
    """The user's environment plus the startup folder first on PYTHONPATH, the patches to apply, what to record and
    the Ulysses degree (if any)."""
    environment = user_environment()
    if record is not None:
        environment[RECORD_VARIABLE] = json.dumps({"path": str(record.path), "groups": record.groups})
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(startup_folder), existing]))
    environment[PATCHES_VARIABLE] = json.dumps(list(patch_names))
    environment[ROOT_VARIABLE] = str(COGSURGEON_ROOT)
    if ulysses:
        environment[ULYSSES_VARIABLE] = str(ulysses)
    return environment


def launched_by_torchrun(command: Sequence[str]) -> bool:
    """The command is already torchrun (`torchrun ...` or `python -m torch.distributed.run ...`)."""
    return Path(command[0]).name == "torchrun" or "torch.distributed.run" in command[:3]


def ulysses_command(command: Sequence[str], ulysses: int) -> list[str]:
    """`command` as each of `ulysses` ranks on this machine runs it: under torchrun (`--standalone --nproc-per-node
    N --no-python`), unless it is torchrun already (then its own --nproc-per-node must match)."""
    if launched_by_torchrun(command):
        return list(command)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ulysses),
            "--no-python", *command]


# Terminating signals `run` passes on to the program, as a shell does to its foreground job. SIGINT is not among
# them: Ctrl-C reaches the program from the terminal (same process group), so `run` only ignores it meanwhile, with
# a handler that does nothing rather than SIG_IGN: an ignored signal stays ignored across exec, so the program would
# start with Ctrl-C ignored (and Python would install no KeyboardInterrupt handler in it).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class RunOutcome:
    """How the program ended: its exit status (128 + N when signal N ended it) and how many CogVideoX transformers
    it (or its Python children) built, each of which got the patches."""

    exit_status: int
    models_built: int
    recordings: tuple[str, ...] = ()  # the attention recordings written (run --record-attention)


def run_patched(command: Sequence[str], patch_names: Sequence[str], record: RecordRequest | None = None,
                ulysses: int | None = None) -> RunOutcome:
    """Run `command` with the patches on (its attention recorded with `record`; with `ulysses`, context-parallel over
    that many ranks under torchrun) and wait for it, forwarding terminating signals; the startup folder is removed
    however the wait ends. Its errors name its keyword arguments (`ulysses=1`), which the CLI says as its flags."""
    if not command:
        raise CogsurgeonError("no command to run: give command= (the program and its arguments)")
    if ulysses is not None and ulysses < 2:
        raise CogsurgeonError(f"ulysses={ulysses}: expected 2 or more (the ranks to split the sequence over)")
    if record is not None and ulysses:
        raise CogsurgeonError("record= and ulysses= cannot be combined: each rank sees one shard of the sequence "
                              "where the recorder reads q and k; record the run on one process")
    names = check_patch_names(patch_names, required=record is None and not ulysses)
    if ulysses:
        command = ulysses_command(command, ulysses)
    with interruptible(), _forwarded_signals() as forward_to:  # the startup folder is removed however it ends
        startup_folder = Path(tempfile.mkdtemp(prefix="cogsurgeon-run-"))
        try:
            shutil.copyfile(STARTUP_SOURCE, startup_folder / "sitecustomize.py")
            environment = child_environment(names, startup_folder, record, ulysses)
            try:
                process = subprocess.Popen(list(command), env=environment)
            except OSError as exc:
                raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
            forward_to(process)
            status = _exit_status(process.wait())
            recordings = tuple(sorted(marker.read_text() for marker in startup_folder.glob(f"{RECORDED_MARKER}*")))
            return RunOutcome(status, len(list(startup_folder.glob(f"{BUILT_MARKER}*"))), recordings)
        finally:
            shutil.rmtree(startup_folder, ignore_errors=True)


@contextmanager
def _forwarded_signals() -> Iterator[Callable[[subprocess.Popen], None]]:
    """While the program runs: SIGINT ignored (by a handler, so the program starts with its default),
    FORWARDED_SIGNALS passed on to it (one arriving before it started is passed on as it starts). Off the main thread,
    where handlers cannot be set, nothing is changed."""
    process: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if process:
            process[0].send_signal(signum)
        else:
            pending.append(signum)

    def forward_to(started: subprocess.Popen) -> None:
        process.append(started)
        for signum in pending:
            started.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():
        yield forward_to
        return
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    # Where SIGINT was already ignored (a background job of a script, nohup), the program inherits that, as without run.
    previous[signal.SIGINT] = signal.signal(
        signal.SIGINT, signal.SIG_IGN if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else _ignore
    )
    try:
        yield forward_to
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _ignore(signum: int, frame: object) -> None:
    """SIGINT while the program runs: the program got it too; `run` waits for it to end."""


def _exit_status(returncode: int) -> int:
    """A shell's exit status: a program killed by signal N gives 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


__all__ = [
    "RecordRequest", "check_patch_names", "run_patched",
]
