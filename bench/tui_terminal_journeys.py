"""The TUI's workflows driven through a real terminal (tmux) by keystrokes only, at 80x24 and 160x48: browse to a
module's source; a patch with options, verified and reverted; LoRA inspect A -> repair -> inspect B (nothing of A
shown) -> repair -> verify; verify an existing adapter, then merge it into a base;
a memory plan with a patch and training. Every step waits for what it expects on the screen (it fails, printing the
screen, when that never comes) and saves the screen as text under bench/results/tui_terminal/SIZE/JOURNEY/NN-step.txt.
Last, ctrl+q on the loaded app, timed from the key to the process's exit (which must be 0).

    python bench/tui_terminal_journeys.py                 # both sizes; screens into bench/results/tui_terminal/
    python bench/tui_terminal_journeys.py --size 80x24

Run from the repository root with the interpreter that has cogsurgeon installed (the tests' helpers make the LoRA
checkpoints: torch, diffusers and peft on a tiny model). Prints one line per step and the ctrl+q times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tui_terminal"


class Terminal:
    """One tmux session running a command at a size; keys in, screens out."""

    def __init__(self, name: str, size: tuple[int, int], command: str, cwd: Path, saved: Path) -> None:
        self.name, self.saved, self.step = name, saved, 0
        self.exit_file = Path(tempfile.mktemp())
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]), "-c", str(cwd),
                        f"{command}; echo $? > {self.exit_file}; sleep 60"], check=True)
        saved.mkdir(parents=True, exist_ok=True)

    def keys(self, *keys: str) -> None:
        """Press keys by tmux's names (Enter, Tab, BTab, Down, C-u, Space, BSpace) or single characters."""
        for key in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True)
            # Textual hands a key to the widget focused when it is read; a Tab's focus change lands a moment later,
            # so on a busy machine the next key could reach the field just left: give it time
            time.sleep(1.0 if key in ("Tab", "BTab", "Escape", "Enter") else 0.3)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        time.sleep(0.3)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(self, *texts: str, absent: tuple[str, ...] = (), timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            squeezed = " ".join(shown.split())
            if all(" ".join(text.split()) in squeezed for text in texts) and not any(t in shown for t in absent):
                return shown
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: waited {timeout:.0f} s for {texts} (absent: {absent}); the screen:\n{shown}")
            time.sleep(0.1)

    def save(self, what: str, *texts: str, absent: tuple[str, ...] = (), timeout: float = 180) -> None:
        """Wait for `texts` (and none of `absent`), then keep the screen as NN-what.txt."""
        shown = self.wait_for(*texts, absent=absent, timeout=timeout)
        self.step += 1
        (self.saved / f"{self.step:02d}-{what}.txt").write_text(shown)
        print(f"  {self.step:02d} {what}: ok")

    def quit(self) -> float:
        """ctrl+q: seconds from the key to the process's exit (its exit code must be 0)."""
        start = time.monotonic()
        subprocess.run(["tmux", "send-keys", "-t", self.name, "C-q"], check=True)
        while not (self.exit_file.exists() and self.exit_file.read_text().strip()):
            if time.monotonic() - start > 30:
                raise SystemExit(f"{self.name}: no exit 30 s after ctrl+q")
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        code = self.exit_file.read_text().strip()
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
        if code != "0":
            raise SystemExit(f"{self.name}: exit code {code} after ctrl+q")
        return elapsed


def make_checkpoints(folder: Path) -> None:
    """As the journey tests make them: two CogVideo checkpoints of one output folder (steps 500 and 900, no
    lora_alpha stored), an adapter folder repaired earlier (`style`) and a tiny-i2v base on disk for the merge."""
    sys.path.insert(0, str(ROOT / "tests"))
    from lora_helpers import save_cogvideo_checkpoint, train

    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.tools.lora import repair_checkpoint

    save_cogvideo_checkpoint(train(rank=4, lora_alpha=2), folder / "out" / "checkpoint-500")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=4, seed=7), folder / "out" / "checkpoint-900")
    save_cogvideo_checkpoint(train(rank=4, lora_alpha=8, seed=3), folder / "trained")
    repair_checkpoint(folder / "trained", folder / "style", alpha=8)
    load_transformer("tiny-i2v").save_pretrained(str(folder / "base"))


def browse_and_patch(term: Terminal) -> None:
    term.save("tree", "CogVideoXTransformer3DModel", "transformer_blocks (0-1): 2 × CogVideoXBlock")
    term.keys("/")
    term.wait_for("/ Filter ^q Quit")  # the filter has the keys (on a busy machine the first ones can take seconds)
    term.type("attn1")
    term.wait_for("18 of 67 match")
    term.keys("Enter")
    term.save("filter-attn1", "transformer_blocks.0.attn1", "attention_processor.py:")
    term.keys("s")
    term.save("source", "CogVideoXAttnProcessor2_0.__call__", "def __call__(")
    term.keys("Escape", "p", "Down", "Down", "Down")  # block-causal-attention, the fourth patch
    term.keys("o")
    term.wait_for("chunk (int)")
    term.keys("C-u")
    term.type("2")
    term.keys("Tab", "C-u")
    term.type("2")
    term.keys("Tab", "C-u")
    term.type("1")
    term.keys("Enter")
    term.save("options-set", "chunk=2", "space apply/revert")
    term.keys("Space")
    term.save("applied", "applied", "[patched")
    term.keys("v")
    term.save("verified", "block-causal-attention: passed for", timeout=300)
    term.keys("Enter")
    term.save("whole-row", "passed for chunk=2, sink=1, window=2", "summary")
    term.keys("Escape", "Space")
    term.save("reverted", "reverted", absent=("[patched",))


def lora(term: Terminal) -> None:
    term.save("tree", "CogVideoXTransformer3DModel")
    term.keys("l")
    term.wait_for("1. Inspect a checkpoint")
    term.type("out")
    term.keys("Enter")
    term.save("lora-steps-asked", "holds 2 checkpoints (steps 500, 900)")
    term.keys("Enter", "Down", "Down", "Enter")  # the step list: (blank), latest, step 500
    term.save("lora-inspected-A", "inspected out (step 500)", "UNKNOWN: could be 64")
    term.keys("BTab", "Enter", "Down", "Enter")  # the trainer list: (blank), cogvideo-finetune
    term.save("lora-trainer", "out (step 500, trainer cogvideo-finetune)", "64 from trainer")
    term.keys("Tab", "Tab", "Tab", "End", "BSpace", "BSpace", "BSpace")
    term.type("2")
    term.keys("Tab", "Enter")  # the output folder's Enter repairs
    term.save("lora-repaired-A", "wrote out-step-500-adapter from out")  # its end can lie under a toast
    term.keys("BTab", "BTab", "BTab", "Enter", "Down", "Enter")  # the step list again: step 900
    term.save("lora-inspected-B", "inspected out (step 900", absent=("wrote ", "step 500, trainer"))
    term.keys("Tab", "Tab", "End", "BSpace", "BSpace", "BSpace")
    term.type("4")
    term.keys("Tab", "Enter")
    term.save("lora-repaired-B", "wrote out-step-900-adapter from out")
    for _ in range(7):  # Repair, peft, diffusers, comfyui, bake, replace, then the adapter folder
        term.keys("Tab")
    term.keys("Enter")
    term.save("lora-verified-B", "verify passed: out-step-900-adapter", timeout=300)
    term.keys("Escape")


def merge(term: Terminal) -> None:
    term.save("tree", "CogVideoXTransformer3DModel")
    term.keys("l")
    term.wait_for("1. Inspect a checkpoint")
    for _ in range(11):  # past inspect, trainer, override, repair's fields and boxes, to the adapter folder
        term.keys("Tab")
    term.type("style")  # an adapter folder already on disk, verified against the base the field offers
    term.keys("Enter")
    term.save("verified-existing", "verify passed", "adapter style", "base tiny-i2v", timeout=300)
    term.keys("Tab", "Tab", "Tab")  # base, Verify, then the merge's base folder
    term.type("base")
    term.keys("Tab")
    term.type("style:0.5")
    term.keys("Tab")
    term.type("merged")
    term.keys("Enter")
    # the result's line left of the toasts at 80 columns (a toast can stay drawn past its time: RESULTS-tui.md)
    term.save("merged", "wrote merged: base + style × 0.5, 8", "100%", timeout=300)
    term.keys("Escape")


def plan(term: Terminal) -> None:
    term.save("tree", "CogVideoXTransformer3DModel")
    term.keys("p", "Space")  # causal-attention applied
    term.wait_for("applied")
    term.keys("g")
    term.wait_for("Plan GPU memory for tiny")
    term.keys("Tab", "Tab", "Enter", "Down", "Enter")  # mode: training: LoRA
    term.keys("Tab", "C-u")
    term.type("4")
    term.keys("Tab", "Tab", "Tab", "Tab", "Tab")  # past dtype, trainer, autocast and LoRA dtype, to GPU memory
    term.type("40MiB")
    term.keys("Enter")
    # the restated plan and its peak, scrolled into view at 80x24 too
    term.save("plan", "planned", "tiny, 9x64x64, batch 2, float32,", "training lora:4 (bf16 autocast,", "peak",
              timeout=300)
    term.keys("Escape")


JOURNEYS = {"browse_and_patch": (browse_and_patch, "tiny"), "lora": (lora, "tiny-i2v"), "merge": (merge, "tiny-i2v"),
            "plan": (plan, "tiny")}


def run(size: tuple[int, int], python: str, journeys: list[str]) -> dict[str, float]:
    label = f"{size[0]}x{size[1]}"
    saved = RESULTS / label
    quit_seconds = {}
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        make_checkpoints(work_dir)
        for journey, spec in (JOURNEYS[name] for name in journeys):
            shutil.rmtree(saved / journey.__name__, ignore_errors=True)
            print(f"{label} {journey.__name__}")
            term = Terminal(f"cogsurgeon-{journey.__name__}-{label}", size,
                            f"{python} -m cogsurgeon.inspector {spec}", work_dir, saved / journey.__name__)
            journey(term)
            quit_seconds[journey.__name__] = term.quit()
            print(f"  ctrl+q -> exit 0 after {quit_seconds[journey.__name__]:.3f} s")
    return quit_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help="COLSxROWS (default: 80x24 and 160x48)")
    parser.add_argument("--journey", action="append", choices=sorted(JOURNEYS), help="default: all four")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [tuple(int(n) for n in text.split("x")) for text in (args.size or ["80x24", "160x48"])]
    # the app runs in the journeys' own folder: a relative interpreter path (PYTHON=.venv/bin/python) is made absolute
    python = os.path.abspath(shutil.which(args.python) or args.python)
    for size in sizes:
        run(size, python, args.journey or list(JOURNEYS))


if __name__ == "__main__":
    main()
