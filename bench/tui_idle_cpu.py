"""Benchmark: the CPU the TUI takes while its model loads, with Textual's `LoadingIndicator` (16 frames a second)
against cogsurgeon's `SlowLoadingIndicator` (redrawn once a second), in a real terminal (tmux, 160×48).

    python bench/tui_idle_cpu.py [--rounds 3] [--seconds 6]

Why it matters: the model loads in a thread of the TUI's own interpreter, so every cycle the interface spends
while loading is taken from the import of torch and diffusers (one GIL), and the first tree waits for that import.
Each run opens the TUI with the load held (the load function sleeps instead of importing) and reads the process's
CPU time (`getrusage`) over `--seconds` of it; runs alternate between the two indicators, and the result is the
median share of one core for each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SESSION = "cogsurgeon-idle-cpu"


def run_held_tui(indicator: str, seconds: float, report: Path) -> None:
    """Child mode, inside tmux: the TUI with its load held; writes the process's share of a core to `report`."""
    import resource

    sys.path.insert(0, str(REPO))
    from cogsurgeon.inspector import cli
    from cogsurgeon.inspector.tui import screens

    def held_load(spec: str) -> None:
        time.sleep(1.0)  # let the screen settle after start-up
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        time.sleep(seconds)
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        report.write_text(f"{used / elapsed}\n")
        os._exit(0)

    screens.open_model = held_load
    if indicator == "textual":
        from textual.widgets import LoadingIndicator

        screens.MainScreen.get_loading_widget = lambda self: LoadingIndicator()
    cli.main(["tiny"])


def measure(indicator: str, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "share"
        command = (f"{sys.executable} {Path(__file__).resolve()} --child {indicator} --seconds {seconds} "
                   f"--report {report}")
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", SESSION, "-x", "160", "-y", "48", "-c", str(REPO),
                        command], check=True)
        try:
            deadline = time.perf_counter() + seconds + 60
            while not report.exists() or not report.read_text().strip():
                if time.perf_counter() > deadline:
                    raise RuntimeError("the held TUI wrote no report")
                time.sleep(0.2)
            return float(report.read_text())
        finally:
            subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--child", choices=["slow", "textual"], help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_held_tui(args.child, args.seconds, args.report)
        return
    shares: dict[str, list[float]] = {"textual": [], "slow": []}
    for round_number in range(1, args.rounds + 1):
        for indicator in shares:
            shares[indicator].append(measure(indicator, args.seconds))
        print(f"round {round_number}: Textual's LoadingIndicator {shares['textual'][-1]:.1%} of a core, "
              f"SlowLoadingIndicator {shares['slow'][-1]:.1%}", flush=True)
    textual, slow = statistics.median(shares["textual"]), statistics.median(shares["slow"])
    print(f"median over {args.rounds} rounds of {args.seconds:g} s with the load held: Textual's LoadingIndicator "
          f"{textual:.1%} of a core, SlowLoadingIndicator {slow:.1%}; ratio {slow / textual:.2f}")


if __name__ == "__main__":
    main()
