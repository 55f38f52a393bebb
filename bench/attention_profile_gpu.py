"""Where the patched attention's time goes on the GPU: CUDA kernel time per kernel kind (the fused attention kernel,
copies), per call, for full SDPA and the causal-video patterns at the 5B shape, with each call's wall time.

    python bench/attention_profile_gpu.py      # on a CUDA machine; one JSON line per case

On the lent H200 (torch 2.11.0+cu130), on the tree of be48d44, 2026-12-01 (`bench/results/attention_profile_gpu.jsonl`):
full SDPA 18.04 ms of kernel; frame-causal 10.36 ms of attention kernels + 0.19 ms of copies; chunk 1 window 4 sink 1
6.40 + 0.52 (the prefix copied before each window, and outputs); window-attention window 3 6.89 + 0.30.
bench/RESULTS.md reads them.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

try:
    import cogsurgeon.patches  # noqa: F401
except ImportError:  # a machine without the install: this checkout's folders under the cogsurgeon name
    sys.modules["cogsurgeon"] = types.ModuleType("cogsurgeon")
    sys.modules["cogsurgeon"].__path__ = [str(Path(__file__).resolve().parents[1])]

from cogsurgeon.inspector.geometry import FrameLayout  # noqa: E402
from cogsurgeon.patches.attention import BlockCausal, WindowAttention, plan_attention, run_plan  # noqa: E402
from attention_gpu import median_ms  # noqa: E402  (this folder: the bench's own timing)

BATCH, HEADS, HEAD_DIM = 2, 48, 64
CASES = [("full SDPA", None), ("frame-causal", "frame-causal"), ("chunk 1 window 4 sink 1", BlockCausal(1, 4, 1)),
         ("window-attention window 3", WindowAttention(3))]


def main() -> None:
    layout = FrameLayout(226, 13, 1350)
    length = layout.sequence_length  # q/k/v laid out as CogVideoX's processor hands them over (bench/attention_gpu.py)
    q, k = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(BATCH, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    for name, pattern in CASES:
        if pattern is None:
            def call():
                return F.scaled_dot_product_attention(q, k, v)
        else:
            plan = plan_attention(pattern, layout, None, batch=BATCH, heads=HEADS, device=q.device, dtype=q.dtype)
            own_k, own_v = k.clone(), v.clone()

            def call(plan=plan, own_k=own_k, own_v=own_v):
                return run_plan(plan, q, own_k, own_v, keys_writable=True)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        kernels = {event.key[:60]: [round(event.device_time_total / 10 / 1000, 3), event.count // 10]
                   for event in profiled.key_averages() if event.device_time_total > 0}
        print(json.dumps({"case": name, "wall_ms": round(median_ms(call, 20, warmup=0), 3),
                          "kernel_ms_per_call_and_count": kernels}), flush=True)


if __name__ == "__main__":
    main()
