"""Time the patches' attention plans against unpatched SDPA at the 5B shape on a GPU (attention only, no model).

    python bench/patch_attention_gpu.py            # B=2, 48 heads, T=226, 13 frames x 1350 tokens, bf16

Prints one row per plan: ms per call (median of CUDA-event timings), ratio to full SDPA, peak extra memory over
the q/k/v inputs, and the max error against full-precision chunked reference attention on a slice of queries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patches.attention import plan_attention, run_plan  # noqa: E402
from patches.layout import FrameLayout  # noqa: E402


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reference_rows(q, k, v, allowed, rows):
    """Exact attention for a few query rows, in fp32, from an explicit mask of those rows only."""
    scores = (q[:, :, rows].float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--text", type=int, default=226)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--frame-tokens", type=int, default=1350)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    layout = FrameLayout(args.text, args.frames, args.frame_tokens)
    length, device, dtype = layout.sequence_length, torch.device("cuda"), torch.bfloat16
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: B={args.batch} heads={args.heads} "
          f"L={length} (T={args.text}, {args.frames}x{args.frame_tokens}) bf16")
    shape = (args.batch, args.heads, length, 64)
    # (B, L, H, D) transposed, as the CogVideoX processors hand them to SDPA
    q, k, v = (torch.randn(args.batch, length, args.heads, 64, device=device, dtype=dtype).transpose(1, 2)
               for _ in range(3))
    assert q.shape == shape
    text_mask = torch.ones(args.batch, args.text, dtype=torch.bool, device=device)
    text_mask[0, 40:] = False  # prompts of 40 and 120 tokens, padded to 226
    text_mask[1, 120:] = False
    positions = torch.arange(length, device=device)
    frame = torch.where(positions < args.text, -1, (positions - args.text) // args.frame_tokens)
    keep = torch.cat([text_mask, torch.ones(args.batch, layout.video_tokens, dtype=torch.bool, device=device)], 1)

    cases = {
        "full SDPA (unpatched)": (None, None, lambda rows: torch.ones(1, 1, len(rows), length, dtype=torch.bool, device=device)),
        "causal-attention": ("causal", None, lambda rows: positions[None, None, :] <= rows[None, :, None]),
        "frame-causal-attention": ("frame-causal", None, lambda rows: frame[None, None, :] <= frame[rows][None, :, None]),
        "attention-mask (B,T)": (None, text_mask, lambda rows: keep[:, None, None, :].expand(-1, 1, len(rows), -1)),
        "frame-causal + mask": ("frame-causal", text_mask,
                                lambda rows: (frame[None, None, :] <= frame[rows][None, :, None]) & keep[:, None, None, :]),
        "causal + mask": ("causal", text_mask,
                          lambda rows: (positions[None, None, :] <= rows[None, :, None]) & keep[:, None, None, :]),
    }
    rows = torch.cat([torch.arange(0, 8), torch.arange(args.text - 4, args.text + 4), torch.arange(length - 8, length)]).to(device)
    baseline = None
    for label, (structure, mask, allowed_rows) in cases.items():
        plan = plan_attention(structure, layout, mask, batch=args.batch, heads=args.heads, device=device, dtype=dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        output = run_plan(plan, q, k, v)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - output.numel() * output.element_size()
        error = (output[:, :, rows].float() - reference_rows(q, k, v, allowed_rows(rows), rows)).abs().max().item()
        del output
        ms = timed(lambda: run_plan(plan, q, k, v), args.repeats)
        baseline = baseline or ms
        print(f"{label:<24} {ms:8.2f} ms  {ms / baseline:5.2f}x  extra {extra / 2**30:6.3f} GiB  max error {error:.2e}")


if __name__ == "__main__":
    main()
