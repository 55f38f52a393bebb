"""Benchmark: how long after the bare imports `cogsurgeon` shows its tree, in a real terminal (tmux, 160×48).

    python bench/tui_first_paint.py [--rounds 8] [--spec cogvideox-5b-i2v] [--out bench/results/tui_first_paint.json]

Each round, on this machine and one after the other:
- cold: the TUI with an empty inventory cache (a first start: the tree waits until torch and diffusers are imported
  and the model is built on meta) — seconds from launching the process until the tree's root row is on screen
  (the pane is polled every 50 ms);
- warm: the same with the cache the cold start just wrote (every later start);
- bare imports, right after the cold start: a fresh interpreter importing torch and the CogVideoX class as
  `inspector.loading` imports it; then the same plus `textual.app`, the imports the TUI cannot paint without.

This machine's speed drifts by ±30 % within minutes, so the figures are paired: each round's cold start minus
the bare imports measured right after it, and the median of those differences is the result. Goal: tree within
1 s after the bare imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SESSION = "cogsurgeon-first-paint"
ROOT_ROW = "CogVideoXTransformer3DModel"
BARE = "import torch; from inspector.loading import transformer_class; transformer_class()"
BARE_WITH_TEXTUAL = "import textual.app; " + BARE


def seconds_to_tree(spec: str, cache: str) -> float:
    """Launch the TUI in a detached tmux session and time until its tree's root row is on screen."""
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    command = f"COGSURGEON_CACHE_DIR={cache} {sys.executable} -m cogsurgeon.inspector {spec}; sleep 60"
    start = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", SESSION, "-x", "160", "-y", "48", "-c", str(REPO), command],
                   check=True)
    try:
        while True:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", SESSION], capture_output=True, text=True)
            if ROOT_ROW in screen.stdout:
                return time.perf_counter() - start
            if time.perf_counter() - start > 120:
                raise RuntimeError(f"no tree after 120 s; the screen:\n{screen.stdout}")
            time.sleep(0.05)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def seconds_to_import(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--spec", default="cogvideox-5b-i2v")
    parser.add_argument("--out", type=Path, help="also write the samples and medians as JSON here")
    args = parser.parse_args()
    rows = []
    for round_number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as cache:
            cold = seconds_to_tree(args.spec, cache)
            bare = seconds_to_import(BARE)
            bare_textual = seconds_to_import(BARE_WITH_TEXTUAL)
            warm = seconds_to_tree(args.spec, cache)
        row = {"cold": cold, "warm": warm, "bare": bare, "bare_with_textual": bare_textual}
        rows.append(row)
        print(f"round {round_number}: cold {cold:.2f} s, bare imports {bare:.2f} s ({cold - bare:+.2f}), "
              f"with textual {bare_textual:.2f} s ({cold - bare_textual:+.2f}); warm {warm:.2f} s", flush=True)

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    cold_after_bare = statistics.median(row["cold"] - row["bare"] for row in rows)
    cold_after_bare_textual = statistics.median(row["cold"] - row["bare_with_textual"] for row in rows)
    summary = {
        "spec": args.spec,
        "rounds": args.rounds,
        "median_seconds": {key: median(key) for key in rows[0]},
        "median_cold_minus_bare": cold_after_bare,
        "median_cold_minus_bare_with_textual": cold_after_bare_textual,
        "median_warm_minus_bare": statistics.median(row["warm"] - row["bare"] for row in rows),
        "samples": rows,
    }
    print(f"medians over {args.rounds} rounds: cold start {median('cold'):.2f} s, warm start {median('warm'):.2f} s, "
          f"bare imports {median('bare'):.2f} s ({median('bare_with_textual'):.2f} s with textual)")
    print(f"cold start after the bare imports, median of the rounds' differences: {cold_after_bare:+.2f} s "
          f"({cold_after_bare_textual:+.2f} s after the bare imports with textual); "
          f"warm start: {summary['median_warm_minus_bare']:+.2f} s")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
