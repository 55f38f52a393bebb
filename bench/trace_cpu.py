"""CPU time of `cogsurgeon trace` beyond the imports: building the published model on meta plus the traced forward.

    python bench/trace_cpu.py            # prints JSON; bench/results/trace_cpu.json holds a run with its command

Process CPU time (`time.process_time`), so other load on the machine does not inflate it; each case runs in a
fresh process so that no case warms another's caches.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

CASES = (
    ("cogvideox-5b-i2v", 49, 480, 720),
    ("cogvideox1.5-5b", 81, 768, 1360),
)

CHILD = r"""
import json, sys, time
start = time.process_time()
import torch, diffusers
import cogsurgeon.inspector.loading, cogsurgeon.inspector.trace
from cogsurgeon.inspector.loading import transformer_class
transformer_class()
imported = time.process_time()
from cogsurgeon.inspector.loading import load_transformer
from cogsurgeon.inspector.trace import trace_shapes
spec, frames, height, width = sys.argv[1], *map(int, sys.argv[2:5])
model = load_transformer(spec)
built = time.process_time()
result = trace_shapes(model, frames=frames, height=height, width=width, batch=2)
traced = time.process_time()
print(json.dumps({
    "model": spec, "size": f"{frames}x{height}x{width}", "batch": 2,
    "attention_calls": len(result.attention), "query": list(result.attention[0].query),
    "imports_cpu_s": round(imported - start, 2), "build_cpu_s": round(built - imported, 2),
    "trace_cpu_s": round(traced - built, 2), "beyond_imports_cpu_s": round(traced - imported, 2),
    "torch": torch.__version__, "diffusers": diffusers.__version__,
}))
"""


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    rows = []
    for spec, frames, height, width in CASES:
        completed = subprocess.run(
            [sys.executable, "-c", CHILD, spec, str(frames), str(height), str(width)],
            cwd=root, capture_output=True, text=True, check=True,
            env={"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print(json.dumps({"command": "python bench/trace_cpu.py > bench/results/trace_cpu.json",
                      "machine": f"{platform.processor() or platform.machine()}, CPU only", "results": rows},
                     indent=1))


if __name__ == "__main__":
    main()
