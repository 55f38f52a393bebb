"""Benchmark `cogsurgeon lora merge` at the CogVideoX-5B size: a bf16 base with random weights (the cogvideox-5b config,
5,570,283,072 parameters, ~11.1 GB, written as three shards like the published checkpoint) and a 5B-sized LoRA
(42 blocks x to_q/to_k/to_v/to_out.0, rank 128, bf16, lora_adapter_metadata), both written to disk first.

Measures, page cache warm (one untimed copy first), in ROUNDS rounds of copy-then-merge (the same-run baseline:
the machine's load moves between rounds, so each merge is compared with the copy just before it): the time to copy
the base's bytes once (`shutil.copyfile` per shard, `os.sync()` included: the floor), the merge's wall time
(`os.sync()` included) and its peak RSS in a fresh subprocess (VmHWM from /proc/self/status), the load average
before each round. Targets: merge <= 1.5x the copy (the median of the rounds' ratios), peak RSS <= 1.5x the
largest shard.

    python bench/lora_merge.py [--layers 42] [--rounds 3] [--dir /some/disk] [--keep | --reuse DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHARDS = 3
RANK = 128
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_base(folder: Path, layers: int) -> list[Path]:
    """The cogvideox-5b transformer's parameters (shapes from the published config on meta), random bf16, in SHARDS
    safetensors files of about equal size, with config.json and the index diffusers writes."""
    import torch

    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.model_specs import published_config
    from cogsurgeon.tools.lora.safetensors_io import OutputTensor, write_safetensors

    config = published_config("cogvideox-5b")
    config["num_layers"] = layers
    model = load_transformer("cogvideox-5b")
    named = [(name, tuple(p.shape)) for name, p in model.state_dict().items()
             if not name.startswith("transformer_blocks.") or int(name.split(".")[1]) < layers]
    total = sum(2 * _numel(shape) for _, shape in named)
    folder.mkdir(parents=True)
    # one 64 MiB block of random bf16 values, reused cyclically: the values do not change the timing, and drawing
    # 5.5 billion normals on a small machine took longer than the benchmark itself
    pool = (torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    offset = [0]

    def random_bytes(shape):
        def payload():
            count = _numel(shape)
            start = offset[0] % (pool.numel() - count) if count < pool.numel() else 0
            offset[0] += 7919
            values = pool[start:start + count] if count <= pool.numel() else pool.repeat(-(-count // pool.numel()))[:count]
            return memoryview(values.contiguous().view(torch.uint8).numpy())
        return payload

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in named:
        if size > total / SHARDS and len(shards) < SHARDS:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += 2 * _numel(shape)
    paths, weight_map = [], {}
    for index, entries in enumerate(shards, start=1):
        path = folder / f"diffusion_pytorch_model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = [OutputTensor(name, "BF16", shape, 2 * _numel(shape), payload=random_bytes(shape)) for name, shape in entries]
        write_safetensors(path, tensors, {"format": "pt"})
        paths.append(path)
        weight_map.update({name: path.name for name, _ in entries})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def write_lora(folder: Path, layers: int) -> Path:
    import torch

    from cogsurgeon.tools.lora.export import diffusers_metadata
    from cogsurgeon.tools.lora.safetensors_io import OutputTensor, write_safetensors

    generator = torch.Generator().manual_seed(1)

    def random_bytes(shape):
        def payload():
            return memoryview((torch.randn(shape, generator=generator) * 0.01).to(torch.bfloat16).reshape(-1)
                              .view(torch.uint8).numpy())
        return payload

    tensors = []
    for block in range(layers):
        for target in TARGETS:
            module = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors.append(OutputTensor(f"{module}.lora_A.weight", "BF16", (RANK, 3072), 2 * RANK * 3072,
                                        payload=random_bytes((RANK, 3072))))
            tensors.append(OutputTensor(f"{module}.lora_B.weight", "BF16", (3072, RANK), 2 * RANK * 3072,
                                        payload=random_bytes((3072, RANK))))
    folder.mkdir(parents=True)
    config = {"r": RANK, "lora_alpha": 64, "target_modules": list(TARGETS), "rank_pattern": {}, "alpha_pattern": {}}
    path = folder / "pytorch_lora_weights.safetensors"
    write_safetensors(path, tensors, diffusers_metadata(config))
    return folder


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


MERGE_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import torch, safetensors  # imported before the clock: interpreter and library start are not the merge
from cogsurgeon.tools.lora.merge import merge_loras, LoraSpec
start = time.perf_counter()
merge_loras({base!r}, [LoraSpec({lora!r}, 1.0)], {out!r})
import os; os.sync()
elapsed = time.perf_counter() - start
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(elapsed, int(hwm) * 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the written base and LoRA (for --reuse)")
    parser.add_argument("--reuse", type=Path, default=None, help="a folder a --keep run left: skip writing")
    args = parser.parse_args()
    work = args.reuse or Path(tempfile.mkdtemp(prefix="lora-merge-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        if args.reuse:
            shards, lora = sorted((work / "base").glob("*.safetensors")), work / "lora"
            shutil.rmtree(work / "merged", ignore_errors=True)
        else:
            shards = write_base(work / "base", args.layers)
            lora = write_lora(work / "lora", args.layers)
        print(f"wrote base ({sum(p.stat().st_size for p in shards) / 1e9:.2f} GB in {len(shards)} shards) and LoRA "
              f"in {time.perf_counter() - started:.1f} s", flush=True)

        def copy_once(target: Path) -> float:
            target.mkdir()
            os.sync()
            start = time.perf_counter()
            for shard in shards:
                shutil.copyfile(shard, target / shard.name)
            os.sync()
            elapsed = time.perf_counter() - start
            shutil.rmtree(target)
            return elapsed

        copy_once(work / "warm")  # page cache warm for both timed steps
        child = MERGE_CHILD.format(root=str(REPO_ROOT), base=str(work / "base"), lora=str(lora), out=str(work / "merged"))
        largest = max(p.stat().st_size for p in shards)
        rounds = []
        for number in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            copy_seconds = copy_once(work / "copy")
            os.sync()
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
            merge_wall = time.perf_counter() - start
            merge_seconds, peak_rss = result.stdout.split()
            shutil.rmtree(work / "merged")
            rounds.append({
                "round": number,
                "load_1min_before": round(load, 2),
                "copy_s": round(copy_seconds, 3),
                "merge_s": round(float(merge_seconds), 3),
                "merge_wall_incl_start_s": round(merge_wall, 3),
                "merge_over_copy": round(float(merge_seconds) / copy_seconds, 3),
                "peak_rss_bytes": int(peak_rss),
            })
            print(json.dumps(rounds[-1]), flush=True)
        ratios = sorted(r["merge_over_copy"] for r in rounds)
        report = {
            "layers": args.layers,
            "base_bytes": sum(p.stat().st_size for p in shards),
            "largest_shard_bytes": largest,
            "rounds": len(rounds),
            "merge_over_copy_median": ratios[len(ratios) // 2],
            "merge_over_copy_min_max": [ratios[0], ratios[-1]],
            "peak_rss_over_largest_shard_max": round(max(r["peak_rss_bytes"] for r in rounds) / largest, 3),
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work / "merged", ignore_errors=True)
        if not args.keep and not args.reuse:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
