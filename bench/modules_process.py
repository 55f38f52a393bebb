"""Benchmark: the whole `cogsurgeon modules MODEL --json` process (MODEL cogvideox-5b-i2v unless --model) against a
bare `python -c "import torch, diffusers.models"` process, interleaved in one run (this machine is noisy).

    python bench/modules_process.py [--runs 7] [--model tiny]

Prints the median wall time of each and their ratio (goal: at most 1.3x), for a warm inventory cache (the usual
case after the first run) and a cold one (`--no-cache`: diffusers' model code imported, the model built on meta).
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

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = [sys.executable, "-c", "import torch, diffusers.models"]


def wall_seconds(command: list[str], environment: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment, cwd=REPO_ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", default="cogvideox-5b-i2v", help="a shipped spec: published or tiny")
    args = parser.parse_args()
    command = [sys.executable, "-m", "cogsurgeon.inspector", "modules", args.model, "--json"]
    cold_command = [*command, "--no-cache"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with tempfile.TemporaryDirectory() as cache:
        environment["COGSURGEON_CACHE_DIR"] = cache
        for warmup in (BASELINE, cold_command, command):  # warm the page cache; the last run fills the cache
            wall_seconds(warmup, environment)
        times: dict[str, list[float]] = {"baseline": [], "cold": [], "warm": []}
        for _ in range(args.runs):
            times["baseline"].append(wall_seconds(BASELINE, environment))
            times["cold"].append(wall_seconds(cold_command, environment))
            times["warm"].append(wall_seconds(command, environment))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "baseline_median_s": round(medians["baseline"], 3),
        "modules_warm_cache_median_s": round(medians["warm"], 3),
        "modules_cold_median_s": round(medians["cold"], 3),
        "ratio_warm_cache": round(medians["warm"] / medians["baseline"], 3),
        "ratio_cold": round(medians["cold"] / medians["baseline"], 3),
        "runs": args.runs,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
