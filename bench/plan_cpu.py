"""CPU time of `plan` against `trace` on the same model and size (issue 14: plan within 1.5× of trace).

    python bench/plan_cpu.py [--model cogvideox-5b-i2v] [--rounds 3]

Both run in this process after one untimed warm-up each (imports, first-call caches), alternating, each round on
a freshly built meta model; the median of the rounds is reported, wall clock and process CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cogvideox-5b-i2v")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from cogsurgeon.inspector.loading import load_transformer
    from cogsurgeon.inspector.plan import plan_memory
    from cogsurgeon.inspector.trace import trace_shapes

    size = dict(frames=args.frames, height=args.height, width=args.width, batch=args.batch)

    def run_trace() -> None:
        trace_shapes(load_transformer(args.model), **size)

    def run_plan() -> None:
        plan_memory(args.model, **size)

    run_trace()
    run_plan()
    results: dict[str, list[tuple[float, float]]] = {"trace": [], "plan": []}
    for _ in range(args.rounds):
        results["trace"].append(timed(run_trace))
        results["plan"].append(timed(run_plan))
    medians = {name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
               for name, runs in results.items()}
    print(f"{args.model} at {args.frames}x{args.height}x{args.width}, batch {args.batch}, {args.rounds} rounds")
    for name, (wall, cpu) in medians.items():
        print(f"{name:6} median wall {wall:6.2f} s   cpu {cpu:6.2f} s   rounds (wall): "
              + ", ".join(f"{w:.2f}" for w, _ in results[name]))
    print(f"plan / trace: wall {medians['plan'][0] / medians['trace'][0]:.2f}x, "
          f"cpu {medians['plan'][1] / medians['trace'][1]:.2f}x")


if __name__ == "__main__":
    main()
