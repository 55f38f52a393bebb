"""The `cogsurgeon` command line: one group whose bare form (`cogsurgeon [MODEL]`) opens the TUI.

Every command offers `--json`. Exit codes: 0 ok; 1 a check ran and failed; 2 bad input or usage, reported as one
line on stderr. Heavy imports (torch, diffusers, textual) happen inside the commands that need them.
"""

from __future__ import annotations

import os
import sys

import click

from cogsurgeon.inspector.errors import CogsurgeonError, Interrupted
from cogsurgeon.inspector.model_specs import DEFAULT_SPEC, known_specs
from cogsurgeon.inspector.offline import enter_offline_mode
from cogsurgeon.inspector.user_files import describe_os_error
from cogsurgeon.inspector.cli.output import print_json

MODEL_HELP = (
    f"MODEL is one of {', '.join(known_specs())} (published configs load on the meta device, no download; "
    "tiny ones are runnable), a local diffusers model folder, or a hub id already in the local Hugging Face "
    f"cache. Default: {DEFAULT_SPEC}."
)


class CogsurgeonGroup(click.Group):
    """A group whose first argument, when it is not a command, is the MODEL of the TUI: `cogsurgeon tiny`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and not args[0].startswith("-")):
            args = ["tui", *args]
        return super().parse_args(ctx, args)


@click.group(cls=CogsurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cogsurgeon", prog_name="cogsurgeon")
def cli() -> None:
    """Inspect, patch and repair the CogVideoX video-diffusion transformer.

    \b
    cogsurgeon [MODEL]                 browse MODEL in the terminal UI
    cogsurgeon modules [MODEL]         every module: class, source file and line, params, processor
    cogsurgeon modules --filter attn1  only the rows whose name, class or file contains attn1

    Nothing is ever downloaded.
    """


@cli.command()
@click.argument("model", required=False)
def tui(model: str | None) -> None:
    """Open the terminal UI on MODEL.

    MODEL: see `cogsurgeon modules --help`.
    """
    from cogsurgeon.inspector.tui.app import run_app

    run_app(model or DEFAULT_SPEC)


@cli.command()
@click.argument("model", required=False)
@click.option("--filter", "filter_text", metavar="TEXT", help="Keep rows whose name, class or file contains TEXT.")
@click.option("--dtype", metavar="DTYPE", help="Load in this dtype (float32, bfloat16, float16) instead of as saved.")
@click.option("--all", "show_all", is_flag=True, help="List repeated blocks one by one instead of folded.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per module (never folded).")
@click.option(
    "--no-cache", is_flag=True, help="Rebuild a published model's inventory instead of reading the inventory cache."
)
def modules(
    model: str | None, filter_text: str | None, dtype: str | None, show_all: bool, as_json: bool, no_cache: bool
) -> None:
    """List every named module of MODEL.

    Each row: name, class, the file and line where the class is defined, parameters (the module's subtree),
    dtype, device, and the attention processor for attention modules.

    \b
    """
    from cogsurgeon.inspector.inventory import filter_inventory, inventory_for_spec

    infos = inventory_for_spec(model, dtype, use_cache=not no_cache)
    if as_json:
        print_json([info.to_json() for info in filter_inventory(infos, filter_text)])
        return
    from cogsurgeon.inspector.cli.render import modules_table

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped into a file or less: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(modules_table(infos, filter_text, fold=not show_all))


modules.help = (modules.help or "") + MODEL_HELP


from cogsurgeon.inspector.cli.doctor import doctor  # noqa: E402  (the group above comes first)
from cogsurgeon.inspector.cli.lora import lora  # noqa: E402
from cogsurgeon.inspector.cli.patch import patch, run  # noqa: E402
from cogsurgeon.inspector.cli.plan import plan  # noqa: E402
from cogsurgeon.inspector.cli.trace import trace  # noqa: E402

for _command in (patch, run, lora, trace, plan, doctor):
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: runs the group and turns errors meant for people into one line and exit 2."""
    enter_offline_mode()
    try:
        result = cli.main(args=argv, prog_name="cogsurgeon", standalone_mode=False)
        _flush_stdout()
    except CogsurgeonError as exc:
        click.echo(f"cogsurgeon: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "cogsurgeon"
        click.echo(f"{command}: error: {_one_line(exc.format_message())} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"cogsurgeon: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except click.Abort:
        click.echo("cogsurgeon: aborted", err=True)
        sys.exit(130)
    except Interrupted as exc:
        click.echo(f"cogsurgeon: {_one_line(exc)}", err=True)
        sys.exit(128 + exc.signum)
    except BrokenPipeError:
        sys.stderr.close()  # the reader (head, less) left; not an error of ours
        sys.exit(0)
    except OSError as exc:  # the machine, not the input: a full disk or device, a file we may not read
        click.echo(f"cogsurgeon: error: {_one_line(describe_os_error(exc.filename or 'standard output', exc))}", err=True)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
