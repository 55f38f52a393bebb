"""Pre-flight on the GPU machine: versions, and the raw kernel strategies the patches choose between at the 5B
shape (B=2, 48 heads, T=226, 13 frames x 1350 tokens, head dim 64, bf16). Not a benchmark of the patch code
(`bench/attention_gpu.py` is); it checks the ground the patches stand on.

    python bench/gpu_preflight.py
"""

import json
import statistics

import torch
import torch.nn.functional as F


def median_ms(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    B, H, D, T, frames, per_frame = 2, 48, 64, 226, 13, 1350
    L = T + frames * per_frame
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "L": L}

    def full():
        return F.scaled_dot_product_attention(q, k, v)

    def causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def frame_prefix():
        out = torch.empty_like(q)
        out[:, :, :T] = F.scaled_dot_product_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T])
        for f in range(frames):
            s, e = T + f * per_frame, T + (f + 1) * per_frame
            out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e])
        return out

    keep = torch.ones(L, dtype=torch.bool, device="cuda")
    keep[30:T] = False

    def drop_keys():
        return F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep])

    key_mask = keep.view(1, 1, 1, L).expand(B, 1, 1, L)

    def key_mask_sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    base = median_ms(full)
    results["full_ms"] = round(base, 2)
    for name, fn in [("causal", causal), ("frame_prefix", frame_prefix), ("drop_keys", drop_keys),
                     ("key_mask_sdpa", key_mask_sdpa)]:
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(fn)
        results[name] = {"ms": round(ms, 2), "ratio": round(ms / base, 3)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        frame_of = torch.cat([torch.full((T,), -1, device="cuda"),
                              torch.arange(frames, device="cuda").repeat_interleave(per_frame)])

        def mask_mod(b, h, qi, ki):
            return frame_of[ki] <= frame_of[qi]

        block_mask = create_block_mask(mask_mod, None, None, L, L, device="cuda")
        compiled = torch.compile(flex_attention)
        ms = median_ms(lambda: compiled(q, k, v, block_mask=block_mask))
        results["flex_frame_causal"] = {"ms": round(ms, 2), "ratio": round(ms / base, 3)}
    except Exception as exc:  # report, the pre-flight goes on
        results["flex_frame_causal"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
