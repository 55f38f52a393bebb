"""The `cogsurgeon` command line: one group whose bare form (`cogsurgeon [MODEL]`) opens the TUI.

Every command offers `--json`. Exit codes: 0 ok; 1 a check ran and failed; 2 bad input or usage, reported as one
line on stderr. Heavy imports (torch, diffusers, textual) happen inside the commands that need them.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Any, TextIO

import click

from cogsurgeon.inspector.cli.attention import attention
from cogsurgeon.inspector.cli.doctor import doctor
from cogsurgeon.inspector.cli.lora import lora
from cogsurgeon.inspector.cli.modules import modules
from cogsurgeon.inspector.cli.output import ERASE_LINE, in_cli_terms
from cogsurgeon.inspector.cli.patch import patch, run
from cogsurgeon.inspector.cli.plan import plan
from cogsurgeon.inspector.cli.trace import trace
from cogsurgeon.inspector.errors import CogsurgeonError, Interrupted, ModelSpecError
from cogsurgeon.inspector.interrupts import ABORTED_LINE, ABORTED_STATUS
from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, resolve_spec
from cogsurgeon.inspector.offline import enter_offline_mode
from cogsurgeon.inspector.user_files import describe_os_error


class CogsurgeonGroup(click.Group):
    """A group whose first argument, when it is not a command, is the MODEL of the TUI: `cogsurgeon tiny`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and not args[0].startswith("-")):
            if args:
                _refuse_a_mistyped_command(ctx, args[0], list(self.commands))
            args = ["tui", *args]
        return super().parse_args(ctx, args)


def _refuse_a_mistyped_command(ctx: click.Context, word: str, commands: list[str]) -> None:
    """`cogsurgeon plann`: a word that names no model but is close to a command is a mistyped command, not a
    MODEL for the TUI."""
    near = difflib.get_close_matches(word, commands, n=1, cutoff=0.75)
    if not near:
        return
    try:
        resolve_spec(word)
    except ModelSpecError:
        raise click.UsageError(f"no such command or model '{word}'; did you mean `{near[0]}`?", ctx) from None


@click.group(cls=CogsurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cogsurgeon", prog_name="cogsurgeon")
def cli() -> None:
    """Inspect, patch and repair the CogVideoX video-diffusion transformer.

    Nothing is ever downloaded. `cogsurgeon COMMAND --help` explains each command, with examples.

    \b
    Examples:
      cogsurgeon [MODEL]                 browse MODEL in the terminal UI
      cogsurgeon modules [MODEL]         every module: class, source file and line, params, processor
      cogsurgeon modules --filter attn1  only the rows whose name, class or file contains attn1
    """


@cli.command(short_help="Open the terminal UI on MODEL (`cogsurgeon MODEL` does the same).")
@click.argument("model", required=False)
def tui(model: str | None) -> None:
    """Open the terminal UI on MODEL (`cogsurgeon MODEL` does the same).

    MODEL: see `cogsurgeon modules --help`.

    \b
    Examples:
      cogsurgeon
      cogsurgeon tiny
      cogsurgeon ./my-finetune
    """
    from cogsurgeon.inspector.tui.app import run_app

    run_app(model or DEFAULT_SPEC)


for _command in (modules, trace, patch, run, lora, plan, doctor, attention):
    cli.add_command(_command)


def _one_line(text: str) -> str:
    """One printable line: whitespace folded, lone surrogates (undecodable file names) escaped."""
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def _flush_stdout() -> None:
    """Flush stdout now, where a failure (a full device, a closed pipe) can still be reported; after a failure fd 1
    points at /dev/null, so that the interpreter's own flush at exit has nothing left to fail on."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise


class _LineTrackingStream:
    """A text stream that remembers whether what was last written ended its line: a progress line being redrawn
    does not, and an error printed after it must start a line of its own (one erased, `ERASE_LINE`, left an empty
    line to write on)."""

    def __init__(self, stream: TextIO) -> None:
        self.wrapped = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        written = self.wrapped.write(text)
        if text:
            self.at_line_start = text.endswith(("\n", ERASE_LINE))
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _fail(stderr: _LineTrackingStream, message: str, status: int) -> int:
    if not stderr.at_line_start:
        stderr.write("\n")
    click.echo(message, err=True)
    return status


def _exit_status(exc: SystemExit) -> int:
    """The status a `sys.exit(code)` inside a command stands for, as the interpreter would turn it into one."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    click.echo(str(exc.code), err=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run `cogsurgeon ARGV...` (the process's arguments when None) and return its exit status: errors meant for
    people become one line on stderr and 2. The console script exits with it; the tests call it in-process.

    The process-wide state it changes is put back on return: `sys.stderr` and the warning filters. The Hub's offline
    variables stay set (`enter_offline_mode`), as the process should not reach the network afterwards either."""
    enter_offline_mode()
    stderr = _LineTrackingStream(sys.stderr)
    sys.stderr = stderr  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            # torch.load's notes on the pickle protocol of a checkpoint are for torch's developers, not our users.
            warnings.filterwarnings("ignore", module=r"torch\.(serialization|_weights_only_unpickler)")
            return _run(argv, stderr)
    finally:
        if sys.stderr is stderr:
            sys.stderr = stderr.wrapped  # type: ignore[assignment]


def _run(argv: list[str] | None, stderr: _LineTrackingStream) -> int:
    try:
        result = cli.main(args=argv, prog_name="cogsurgeon", standalone_mode=False)
        _flush_stdout()
    except SystemExit as exc:  # a command's own `sys.exit(1)` (a check ran and failed)
        return _exit_status(exc)
    except CogsurgeonError as exc:
        return _fail(stderr, f"cogsurgeon: error: {_one_line(in_cli_terms(str(exc)))}", 2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "cogsurgeon"
        return _fail(stderr, f"{command}: error: {_one_line(exc.format_message())} (see '{command} --help')", 2)
    except click.ClickException as exc:
        return _fail(stderr, f"cogsurgeon: error: {_one_line(exc.format_message())}",
                     exc.exit_code if exc.exit_code != 1 else 2)
    except click.Abort:
        return _fail(stderr, ABORTED_LINE, ABORTED_STATUS)
    except Interrupted as exc:
        return _fail(stderr, f"cogsurgeon: {_one_line(exc)}", 128 + exc.signum)
    except BrokenPipeError:
        sys.stderr.close()  # the reader (head, less) left; not an error of ours
        return 0
    except OSError as exc:  # the machine, not the input: a full disk or device, a file we may not read
        return _fail(stderr, f"cogsurgeon: error: "
                             f"{_one_line(describe_os_error(exc.filename or 'standard output', exc))}", 2)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "cli", "main",
]
