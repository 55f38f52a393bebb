"""GPU check of the log-sum-exp merge in `patches.attention` (a window past a prefix), in every dtype it runs in:
finite, and equal to the two key ranges concatenated (what runs under autograd), within the dtype's rounding.

    python bench/attention_merge_gpu.py        # on a CUDA machine; prints one line per dtype, exits 1 on a failure

Found by review: cuDNN's attention op returns NaN (rather than an error) for fp32 on an H200, so the merge takes
cuDNN for fp16/bf16 only. On the lent H200 (torch 2.11.0+cu130), this tree after aeb5ea8, 2026-12-01:

    torch.float16: finite True, max |merged - concatenated| 2.44e-04, ok
    torch.bfloat16: finite True, max |merged - concatenated| 9.77e-04, ok
    torch.float32: finite True, max |merged - concatenated| 1.27e-07, ok
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

try:
    import cogsurgeon.patches  # noqa: F401
except ImportError:  # a machine without the install: this checkout's folders under the cogsurgeon name
    sys.modules["cogsurgeon"] = types.ModuleType("cogsurgeon")
    sys.modules["cogsurgeon"].__path__ = [str(Path(__file__).resolve().parents[1])]

from cogsurgeon.inspector.geometry import FrameLayout  # noqa: E402
from cogsurgeon.patches.attention import BlockCausal, attend_segments, structure_segments  # noqa: E402


def main() -> int:
    layout = FrameLayout(text_tokens=226, frames=13, tokens_per_frame=450)
    segments = structure_segments(BlockCausal(chunk=1, window=4, sink=1), layout)
    failed = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        generator = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 4, layout.sequence_length, 64, generator=generator, device="cuda").to(dtype)
            for _ in range(3)
        )
        with torch.no_grad():
            merged = attend_segments(q, k, v, segments)
        concatenated = attend_segments(*(t.clone().requires_grad_() for t in (q, k, v)), segments).detach()
        error = (merged.float() - concatenated.float()).abs().max().item()
        ok = bool(torch.isfinite(merged).all()) and error <= 2e-2
        failed += not ok
        print(f"{dtype}: finite {bool(torch.isfinite(merged).all())}, max |merged - concatenated| {error:.2e}, "
              f"{'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
