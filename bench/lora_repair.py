"""Benchmark `cogsurgeon lora repair` on a CogVideoX-5B-sized LoRA (42 blocks x to_q/to_k/to_v/to_out.0, rank 128,
bf16, ~264 MB), written into a temporary folder as the CogVideo finetune trainer lays it out.

Measures, in the same run: the time to copy the checkpoint's bytes once per output weight file (the floor: two
plain copies), the repair's time and its peak RSS in a fresh subprocess (VmHWM from /proc; `getrusage` maxrss would
include the parent's peak, which Linux carries across exec), and the
whole CLI command's wall time. Targets: repair <= 1.5x the copies, peak RSS < 300 MiB.

    python bench/lora_repair.py [--repeats 7] [--dir /some/fast/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cogsurgeon.tools.lora.safetensors_io import OutputTensor, encode_header  # noqa: E402

HIDDEN = 3072  # 48 heads x 64
RANK = 128
LAYERS = 42
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BF16_BYTES = 2


def write_checkpoint(folder: Path) -> Path:
    """`checkpoint-N/pytorch_lora_weights.safetensors` with random bf16 bytes, plus accelerate's state files."""
    folder.mkdir(parents=True)
    tensors = []
    offset = 0
    for layer in range(LAYERS):
        for target in TARGETS:
            for part, shape in (("A", (RANK, HIDDEN)), ("B", (HIDDEN, RANK))):
                nbytes = shape[0] * shape[1] * BF16_BYTES
                name = f"transformer.transformer_blocks.{layer}.attn1.{target}.lora_{part}.weight"
                tensors.append(OutputTensor(name, "BF16", shape, nbytes, source_start=offset))
                offset += nbytes
    path = folder / "pytorch_lora_weights.safetensors"
    with path.open("wb") as handle:
        handle.write(encode_header(tensors, {"format": "pt"}))
        for tensor in tensors:
            handle.write(os.urandom(tensor.nbytes))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (folder / name).write_bytes(b"accelerate state")
    return path


REPAIR_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from cogsurgeon.tools.lora import repair_checkpoint
started = time.perf_counter()
result = repair_checkpoint({ckpt!r}, {out!r}, alpha=64)
elapsed = time.perf_counter() - started
# VmHWM: the peak RSS of this process image. ru_maxrss is not used: Linux carries the parent's peak across exec.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": elapsed, "peak_rss_kib": peak_kib,
                  "bytes": result.bytes_written, "torch_imported": "torch" in sys.modules}}))
"""


def time_copies(source: Path, work: Path) -> float:
    """Copy the checkpoint once per output weight file (the repair writes two), as `cp` would."""
    targets = [work / "copy-peft.safetensors", work / "copy-diffusers.safetensors"]
    os.sync()  # each measurement starts with no dirty pages of the previous one to write back
    started = time.perf_counter()
    for target in targets:
        shutil.copyfile(source, target)
    elapsed = time.perf_counter() - started
    for target in targets:
        target.unlink()
    return elapsed


def time_repair(checkpoint: Path, out: Path) -> dict:
    os.sync()
    completed = subprocess.run(
        [sys.executable, "-c", REPAIR_CHILD.format(repo=str(REPO_ROOT), ckpt=str(checkpoint), out=str(out))],
        capture_output=True, text=True, check=True,
    )
    measured = json.loads(completed.stdout)
    shutil.rmtree(out)
    return measured


def time_cli(checkpoint: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cogsurgeon.inspector", "lora", "repair", str(checkpoint), "--out", str(out),
                    "--alpha", "64"], cwd=REPO_ROOT, capture_output=True, check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary checkpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as temp:
        work = Path(temp)
        source = write_checkpoint(work / "run" / "checkpoint-1000")
        size = source.stat().st_size
        with source.open("rb") as handle:
            tensor_bytes = size - 8 - int.from_bytes(handle.read(8), "little")
        time_copies(source, work)  # warm the page cache for both sides alike
        copies, repairs, rss, cli = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so that drift in the machine hits both alike
            copies.append(time_copies(source, work))
            measured = time_repair(source.parent, work / "adapter")
            assert not measured["torch_imported"] and measured["bytes"] == 2 * tensor_bytes
            repairs.append(measured["seconds"])
            rss.append(measured["peak_rss_kib"] / 1024)
        cli.append(time_cli(source.parent, work / "adapter"))
        copy_s, repair_s = statistics.median(copies), statistics.median(repairs)
        print(json.dumps({
            "checkpoint_bytes": size,
            "repeats": args.repeats,
            "copy_twice_s_median": round(copy_s, 4),
            "repair_s_median": round(repair_s, 4),
            "ratio_repair_to_copies": round(repair_s / copy_s, 3),
            "peak_rss_mib_max": round(max(rss), 1),
            "cli_wall_s": round(cli[0], 3),
            "copies_s": [round(x, 4) for x in copies],
            "repairs_s": [round(x, 4) for x in repairs],
            "targets_met": repair_s <= 1.5 * copy_s and max(rss) < 300,
        }, indent=2))


if __name__ == "__main__":
    main()
