"""Benchmark: keystroke-to-repaint latency of the TUI's module filter over the 1,067 modules of cogvideox-5b-i2v.

    python bench/tui_filter.py [--rounds 5] [--spec cogvideox-5b-i2v]

Headless Textual (Pilot, 160×48). Each sample is one key. Two figures per key:

- keystroke-to-repaint: from just before `pilot.press(key)` to the last screen update the key caused (the app's
  `_display` is wrapped to timestamp every compositor update it is handed); the filter's cursor does not blink,
  so no unrelated update lands in the window. This is the latency a user sees.
- the screen's filter handler alone (`MainScreen.show_tree`: narrow the rows, build and fold the tree, fill the
  tree's rows), the part that is cogsurgeon's code rather than Textual's layout and compositing.
- baseline, measured in the same run: the same keys typed into the model switcher's path field, an Input with
  nothing behind it; the ratio of the medians says what the tree's update adds to Textual's echo of a key.
- press+pause: until `pilot.press(key)` and `pilot.pause()` return. Pilot finds "done" by polling the process
  for idleness in 20 ms sleeps (three polls per key), so this has a floor of about 60 ms with no work at all; it is
  printed as an upper bound.

The words typed narrow the tree in different ways (a few modules, a folded class, a file, almost everything);
backspaces widen it again, the last one back to the whole tree. The screen keeps the trees of filter texts it has
built; the cache is emptied before each word is typed, so typing is always measured uncached and backspacing
measures what a user gets when deleting. Goal: median keystroke-to-repaint ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("attn1", "linear", "norm_q", "embeddings.py", "a")


async def measure(spec: str, rounds: int) -> dict[str, list[float]]:
    from cogsurgeon.inspector.tui.app import CogsurgeonApp
    from cogsurgeon.inspector.tui.widgets import ModuleTree

    from cogsurgeon.inspector.tui.screens import MainScreen

    app = CogsurgeonApp(spec)
    samples: dict[str, list[float]] = {
        "typing": [], "backspace": [], "press+pause": [], "show_tree": [], "input alone": []
    }
    show_tree = MainScreen.show_tree

    def timed_show_tree(screen, filter_text: str) -> None:
        start = time.perf_counter()
        show_tree(screen, filter_text)
        samples["show_tree"].append(time.perf_counter() - start)

    app.main_screen.show_tree = timed_show_tree.__get__(app.main_screen)
    updates: list[float] = []
    display = app._display

    def timestamped_display(screen, renderable) -> None:
        if renderable is not None:
            updates.append(time.perf_counter())
        display(screen, renderable)

    app._display = timestamped_display

    async def key_latency(key: str, filter_key: bool = True) -> float:
        seen = len(updates)
        start = time.perf_counter()
        await pilot.press(key)
        await pilot.pause()
        if filter_key:
            samples["press+pause"].append(time.perf_counter() - start)
        if len(updates) == seen:
            raise RuntimeError(f"key {key!r} caused no screen update")
        return updates[-1] - start

    async with app.run_test(size=(160, 48)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert len(app.screen.loaded.infos) > 1000 or spec != "cogvideox-5b-i2v"
        app.query_one("#filter").cursor_blink = False
        await pilot.press("slash")
        await pilot.pause()
        for _ in range(rounds):
            for word in WORDS:
                app.screen.narrowed.clear()  # typing a word is always new work; backspacing may reuse it
                for key in word:
                    samples["typing"].append(await key_latency(key))
                for _ in word:
                    samples["backspace"].append(await key_latency("backspace"))
                assert app.query_one("#filter").value == ""
        rows = len(app.query_one(ModuleTree).rows)
        assert rows > 1

        # baseline, same app and run: the same keys typed into the model switcher's path field, an Input with
        # nothing behind it (Textual's own cost of echoing a key on this screen)
        await pilot.press("escape", "m")
        await pilot.pause()
        path_input = app.screen.query_one("#model-path")
        path_input.cursor_blink = False
        path_input.focus()
        await pilot.pause()
        for _ in range(rounds):
            for word in WORDS:
                for key in word:
                    samples["input alone"].append(await key_latency(key, filter_key=False))
                for _ in word:
                    samples["input alone"].append(await key_latency("backspace", filter_key=False))
    return samples


def describe(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return (f"n={len(values)}  median {statistics.median(values) * 1000:.1f} ms  p90 {p90 * 1000:.1f} ms  "
            f"max {ordered[-1] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spec", default="cogvideox-5b-i2v")
    args = parser.parse_args()
    samples = asyncio.run(measure(args.spec, args.rounds))
    every = samples["typing"] + samples["backspace"]
    print(f"filter over {args.spec}, words {', '.join(WORDS)}, {args.rounds} rounds")
    print("keystroke-to-repaint:")
    print(f"  typing       {describe(samples['typing'])}")
    print(f"  backspace    {describe(samples['backspace'])}")
    print(f"  all keys     {describe(every)}")
    print(f"press+pause (upper bound, Pilot idle polling included): {describe(samples['press+pause'])}")
    print(f"of which the screen's filter handler (narrow, build, flatten the rows): {describe(samples['show_tree'])}")
    print(f"baseline, the same keys into an Input with nothing behind it: {describe(samples['input alone'])}")
    ratio = statistics.median(every) / statistics.median(samples["input alone"])
    print(f"filter keystroke-to-repaint / baseline (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
