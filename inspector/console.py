"""The `cogsurgeon` console script: imports nothing but `sys` at first, so that Ctrl-C during start-up (importing
click and the commands takes a quarter of a second) ends the command as Ctrl-C does later: one line, exit 130, no
KeyboardInterrupt traceback from whichever module was being imported.

From its first import on, Ctrl-C ends the process at once with that line (`inspector/interrupts.py` says why a
KeyboardInterrupt raised inside third-party code is not safe); commands raise it only where they clean up.

What no program can catch: a SIGINT before CPython has installed its handler ends the process by the signal (no
output; a shell reports 130), and one during CPython's own start-up (`site` and the `.pth` files, before the
console script's first line) is reported by CPython itself as a failed start.
"""

import sys


def main(argv: "list[str] | None" = None) -> None:
    """Run the CLI and exit the process with its status."""
    try:
        from cogsurgeon.inspector.interrupts import install_exit_at_once

        install_exit_at_once()  # from here on Ctrl-C ends the process at once, except where a command cleans up
        from cogsurgeon.inspector.cli import main as run_cli  # heavy: click, every command's module

        status = run_cli(argv)
    except KeyboardInterrupt:
        interrupted()
    sys.exit(status)


def interrupted() -> None:
    """Leave as the CLI does after Ctrl-C: one line on stderr, exit 130; a second Ctrl-C while leaving is ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr.write("cogsurgeon: aborted\n")  # interrupts.ABORTED_LINE, written out: this module imports only sys
    sys.exit(130)


__all__ = [
    "main",
]
