"""Every figure of a fixed set of plans, as one JSON file, and the CPU time they took: run it on two checkouts
and compare the files with `cmp` to show that a change to the planner's speed kept every byte it reports.

    python bench/plan_snapshot.py plans-after.json
    PYTHONPATH=/path/to/a/folder/holding/an/older/cogsurgeon python bench/plan_snapshot.py plans-before.json
    cmp plans-before.json plans-after.json && echo identical

The set: 5B-I2V inference at 49×480×720 B=2, 5B LoRA r128 with and without checkpointing, the 2B as the diffusers
scripts train it, a 2B full finetune in fp32 under bf16 autocast, 1.5-5B LoRA at 81×768×1360, two tiny runs
(full; fp16 with fp32 adapters under fp16 autocast), and the VAE decodes (5B tiled and whole, 1.5-5B tiled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

CONFIGURATIONS = [
    dict(model="cogvideox-5b-i2v", frames=49, height=480, width=720, batch=2),
    dict(model="cogvideox-5b", train="lora:128", batch=1, checkpointing=True),
    dict(model="cogvideox-5b", train="lora:64", batch=1),
    dict(model="cogvideox-2b", trainer="diffusers-scripts", batch=1),
    dict(model="cogvideox-2b", train="full", batch=1, checkpointing=True, mixed_precision="bf16", dtype="float32"),
    dict(model="cogvideox1.5-5b", frames=81, height=768, width=1360, batch=1, train="lora:128", checkpointing=True),
    dict(model="tiny", train="full"),
    dict(model="tiny", train="lora:4", mixed_precision="fp16", dtype="float16", lora_dtype="fp32"),
    dict(model="cogvideox-5b", vae=True, tiling=True),
    dict(model="cogvideox-5b", vae=True),
    dict(model="cogvideox1.5-5b", vae=True, tiling=True, frames=81, height=768, width=1360),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSON file to write")
    args = parser.parse_args()
    from cogsurgeon.inspector.plan import plan_memory

    plans = []
    started = time.process_time()
    for configuration in CONFIGURATIONS:
        settings = dict(configuration)
        plan = plan_memory(settings.pop("model"), **settings)
        plans.append(plan.to_dict() if hasattr(plan, "to_dict") else asdict(plan))
    print(f"{len(plans)} plans in {time.process_time() - started:.2f} s of CPU", file=sys.stderr)
    with open(args.out, "w") as handle:
        json.dump(plans, handle, sort_keys=True, default=str)


if __name__ == "__main__":
    main()
