"""GPU benchmark of the attention patches at full CogVideoX scale, against the unpatched processor in the same run.

    python bench/attention_gpu.py [--repeats 20] [--out results.json]

Three levels, each patched vs unpatched on the same inputs (bf16, B=2, 48 heads, head dim 64):
1. attention: the patch's attention plan (`patches.attention.run_plan`) vs `F.scaled_dot_product_attention` on the
   same q/k/v, at the 5B-I2V shape (L = 226 + 13 x 1350 = 17,776) and CogVideoX1.5's (L = 226 + 11 x 4080 = 45,106),
   q/k/v laid out as CogVideoX's processor hands them over (q and k contiguous after norm_q/norm_k, v a transposed
   view of to_v's output). Each call is timed queued behind GPU work (a sleep kernel long enough for Python to issue
   every launch), as inside a forward, where the projections before attention keep the GPU busy while Python issues
   it; beside it the same call timed from an idle GPU, and the host time to issue it.
   The goals of the GPU issue are ratios at this level. Beside each block/window pattern: its exact work fraction
   (allowed query-key pairs / L², from the definitions in `patches.reference`) and the causal-video issue's goal,
   ratio <= fraction + 0.05. Needs only torch and this checkout (no diffusers).
2. block: one whole CogVideoXBlock (random weights, 5B dimensions) inside a 1-layer CogVideoXTransformer3DModel,
   timed with CUDA events from forward hooks on the block, patches applied through `patches.apply`; peak memory
   of the whole forward, patched vs unpatched.
3. accuracy: at a cut-down shape (3 frames, L = 4,276) each patch's bf16 output vs explicit-mask attention in fp32
   (`patches.reference`), next to the unpatched bf16 SDPA's own error against fp32 full attention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import cogsurgeon.patches  # noqa: F401
except ImportError:  # a machine without the install (the lent GPU): this checkout's folders under the cogsurgeon name
    import types

    sys.modules["cogsurgeon"] = types.ModuleType("cogsurgeon")
    sys.modules["cogsurgeon"].__path__ = [str(ROOT)]

from cogsurgeon.inspector.geometry import FrameLayout, rotary_embedding  # noqa: E402
from cogsurgeon.patches import attention  # noqa: E402
from cogsurgeon.patches.attention import BlockCausal, WindowAttention, plan_attention, run_plan  # noqa: E402

BATCH, HEADS, HEAD_DIM, TEXT = 2, 48, 64, 226
SHAPES = {
    "5B (L=17,776)": FrameLayout(TEXT, 13, 1350),
    "1.5 (L=45,106)": FrameLayout(TEXT, 11, 4080),
}
REAL_TEXT_TOKENS = 30


def median_ms(function, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


QUEUE_SLEEP_CYCLES = 20_000_000  # about 10 ms of GPU clock: longer than any case's host issue time (printed beside)


def queued_ms(function) -> float:
    """GPU time of one call whose launches are already queued when the GPU reaches them: a sleep kernel first, the
    start event behind it, then the call is issued while the GPU sleeps."""
    torch.cuda.synchronize()
    torch.cuda._sleep(QUEUE_SLEEP_CYCLES)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def host_issue_ms(function, repeats: int = 10) -> float:
    """Host time to issue one call (from a synchronized GPU to the call's return), median."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        function()
        times.append((time.perf_counter() - began) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times)


def timed_pair(baseline, candidate, repeats: int) -> dict[str, float]:
    """Queued and from-idle medians of both, each timed in alternation with the other."""
    for _ in range(3):
        baseline()
        candidate()
    times: dict[str, list[float]] = {key: [] for key in ("base_queued", "queued", "base_idle", "idle")}
    for _ in range(repeats):
        times["base_queued"].append(queued_ms(baseline))
        times["queued"].append(queued_ms(candidate))
        times["base_idle"].append(median_ms(baseline, 1, warmup=0))
        times["idle"].append(median_ms(candidate, 1, warmup=0))
    return {key: statistics.median(values) for key, values in times.items()}


def peak_extra_bytes(function) -> int:
    """Peak bytes allocated while `function` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = function()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def text_padding_mask(device) -> torch.Tensor:
    mask = torch.zeros(BATCH, TEXT, dtype=torch.bool, device=device)
    mask[:, :REAL_TEXT_TOKENS] = True
    return mask


# The causal-video issue's cases: (case name, pattern).
PATTERN_CASES = [
    ("frame-causal-attention (block-causal chunk=1)", "frame-causal"),
    ("block-causal-attention chunk=3", BlockCausal(chunk=3)),
    ("block-causal-attention chunk=1 window=4 sink=1", BlockCausal(chunk=1, window=4, sink=1)),
    ("window-attention window=3", WindowAttention(window=3)),
]


def work_fraction(structure, layout: FrameLayout) -> float:
    """Allowed query-key pairs / L² under a rule, from its definition (`patches.reference`'s masks), counted on a
    layout of one token per frame and one text token, each weighted by the tokens it stands for (no (L, L) mask)."""
    from cogsurgeon.patches.reference import block_causal_mask, causal_mask, window_attention_mask

    length = layout.sequence_length
    if structure == "causal":
        return length * (length + 1) / 2 / length**2
    small = FrameLayout(1, layout.frames, 1)
    pattern = attention.as_pattern(structure)
    if isinstance(pattern, BlockCausal):
        mask = block_causal_mask(small, pattern.chunk, pattern.window, pattern.sink)
    elif isinstance(pattern, WindowAttention):
        mask = window_attention_mask(small, pattern.window, pattern.chunk, pattern.text_sees_video)
    else:
        mask = causal_mask(small).fill_(True)
    weights = torch.tensor([layout.text_tokens] + [layout.tokens_per_frame] * layout.frames, dtype=torch.float64)
    return float(weights @ mask.double() @ weights) / length**2


def attention_cases(layout: FrameLayout, device, stream_counts: list[int]):
    """(case name, structure, mask, streams) for each patch configuration the goals name; each pattern runs once per
    count in `stream_counts` (`patches.attention.HEAD_STREAMS`; the first is the default, the others compare)."""
    default = attention.HEAD_STREAMS
    length = layout.sequence_length
    full_mask = torch.ones(BATCH, 1, length, length, dtype=torch.bool, device=device)
    full_mask[:, :, :, REAL_TEXT_TOKENS:TEXT] = False  # the padding mask, written out as a full (B,1,L,L) mask
    return [
        ("causal-attention", "causal", None, default),
        *[(f"{case}, {streams} stream(s)", pattern, None, streams)
          for case, pattern in PATTERN_CASES for streams in stream_counts],
        ("attention-mask (B,T) text padding, 30/226 real", None, text_padding_mask(device), default),
        ("frame-causal + attention-mask (B,T) text padding", "frame-causal", text_padding_mask(device), default),
        ("attention-mask (B,1,L,L) bool", None, full_mask, default),
    ]


def attention_level(repeats: int, stream_counts: list[int]) -> list[dict]:
    rows = []
    for shape_name, layout in SHAPES.items():
        length = layout.sequence_length
        q, k = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(BATCH, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

        def unpatched():
            return F.scaled_dot_product_attention(q, k, v)

        unpatched_bytes = peak_extra_bytes(lambda: F.scaled_dot_product_attention(q, k, v))
        default_streams = attention.HEAD_STREAMS
        for case, structure, mask, streams in attention_cases(layout, "cuda", stream_counts):
            attention.HEAD_STREAMS = streams
            plan = plan_attention(
                structure, layout, mask, batch=BATCH, heads=HEADS, device=q.device, dtype=q.dtype
            )
            # The processor hands its own k/v temporaries over as writable (a key-dropping plan reorders them in
            # place, a window past a prefix gets the prefix copied before it); so does the bench, on copies made
            # outside the timed region.
            k_own, v_own = k.clone(), v.clone()

            def patched():
                return run_plan(plan, q, k_own, v_own, keys_writable=True)

            times = timed_pair(unpatched, patched, repeats)
            unpatched_ms, patched_ms = times["base_queued"], times["queued"]
            patched_bytes = peak_extra_bytes(patched)
            row = {
                "level": "attention",
                "shape": shape_name,
                "case": case,
                "unpatched_ms": round(unpatched_ms, 2),
                "patched_ms": round(patched_ms, 2),
                "ratio": round(patched_ms / unpatched_ms, 3),
                "ratio_from_idle": round(times["idle"] / times["base_idle"], 3),
                "host_issue_ms": round(host_issue_ms(patched), 2),
                "unpatched_peak_extra_gib": round(unpatched_bytes / 2**30, 3),
                "patched_peak_extra_gib": round(patched_bytes / 2**30, 3),
            }
            if structure is not None and mask is None:
                fraction = work_fraction(structure, layout)
                row["work_fraction"] = round(fraction, 3)
                row["goal_ratio_at_most_fraction_plus_0.05"] = round(fraction + 0.05, 3)
                row["goal_met"] = row["ratio"] <= fraction + 0.05
            if mask is not None and mask.dim() == 4:
                sdpa_mask_ms = statistics.median(
                    queued_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) for _ in range(repeats)
                )
                row["sdpa_given_mask_ms"] = round(sdpa_mask_ms, 2)
                row["ratio_to_sdpa_given_mask"] = round(patched_ms / sdpa_mask_ms, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            attention.HEAD_STREAMS = default_streams
            del plan, mask, k_own, v_own
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def one_block_transformer(config_overrides: dict):
    from diffusers import CogVideoXTransformer3DModel

    config = {
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 1,
        "use_rotary_positional_embeddings": True,
        "text_embed_dim": 4096,
        "time_embed_dim": 512,
        **config_overrides,
    }
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CogVideoXTransformer3DModel(**config)
    return model.to(torch.bfloat16).eval()


def block_level(repeats: int) -> list[dict]:
    from cogsurgeon import patches

    rows = []
    setups = {
        "5B (L=17,776)": ({}, (13, 16, 60, 90)),
        "1.5 (L=45,106)": ({"patch_size_t": 2, "patch_bias": False, "sample_frames": 81, "sample_height": 300,
                            "sample_width": 300}, (22, 16, 96, 170)),
    }
    for shape_name, (overrides, latent_shape) in setups.items():
        model = one_block_transformer(overrides)
        latent = torch.randn(BATCH, *latent_shape, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(BATCH, TEXT, 4096, device="cuda", dtype=torch.bfloat16)
        timestep = torch.tensor([500, 500], device="cuda")
        cos, sin = rotary_embedding(model.config, latent_shape[0], latent_shape[2], latent_shape[3], device="cuda")
        rotary_emb = (cos.to(torch.bfloat16), sin.to(torch.bfloat16))
        block = model.transformer_blocks[0]
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

        def start_hook(module, args):
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()

        def end_hook(module, args, output):
            events[-1][1].record()

        handles = [block.register_forward_pre_hook(start_hook), block.register_forward_hook(end_hook)]

        def forward(attention_kwargs=None, step=None):
            with torch.no_grad():
                return model(latent, text, timestep if step is None else step, image_rotary_emb=rotary_emb,
                             attention_kwargs=attention_kwargs, return_dict=False)[0]

        def block_ms(attention_kwargs=None, step=None) -> tuple[float, int]:
            events.clear()
            for _ in range(3 + repeats):
                forward(attention_kwargs, step)
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events[3:]]
            peak = peak_extra_bytes(lambda: forward(attention_kwargs, step))
            return statistics.median(times), peak

        base_ms, base_peak = block_ms()
        per_frame = torch.arange(latent_shape[0], device="cuda").repeat(BATCH, 1) * 40 + 300  # (B, F)
        if overrides.get("patch_size_t"):
            per_frame[:, 1::2] = per_frame[:, 0::2]  # the frames of one temporal patch share a timestep
        cases = [
            ("causal-attention", [("causal-attention", {})], None, None),
            ("frame-causal-attention", [("frame-causal-attention", {})], None, None),
            ("block-causal-attention chunk=3", [("block-causal-attention", {"chunk": 3})], None, None),
            ("block-causal-attention chunk=1 window=4 sink=1",
             [("block-causal-attention", {"chunk": 1, "window": 4, "sink": 1})], None, None),
            ("window-attention window=3", [("window-attention", {"window": 3})], None, None),
            ("block-causal chunk=1 + per-frame-timesteps, timestep (B, F)",
             [("block-causal-attention", {"chunk": 1}), ("per-frame-timesteps", {"text_timestep": 0})], None,
             per_frame),
            ("attention-mask (B,T) text padding, 30/226 real", [("attention-mask", {})],
             {"attention_mask": text_padding_mask("cuda")}, None),
        ]
        for case, names, attention_kwargs, step in cases:
            handles_applied = [patches.apply(model, name, **options) for name, options in names]
            patched_ms, patched_peak = block_ms(attention_kwargs, step)
            for handle in handles_applied:
                handle.revert()
            row = {
                "level": "block",
                "shape": shape_name,
                "case": case,
                "unpatched_ms": round(base_ms, 2),
                "patched_ms": round(patched_ms, 2),
                "ratio": round(patched_ms / base_ms, 3),
                "unpatched_peak_gib": round(base_peak / 2**30, 3),
                "patched_peak_gib": round(patched_peak / 2**30, 3),
                "peak_ratio": round(patched_peak / base_peak, 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        for handle in handles:
            handle.remove()
        del model, latent, text
        torch.cuda.empty_cache()
    return rows


def reference_rule(structure, layout: FrameLayout):
    """The `(L, L)` bool mask of a rule, from the definitions in `patches.reference` (None: no rule)."""
    from cogsurgeon.patches.reference import block_causal_mask, causal_mask, window_attention_mask

    pattern = attention.as_pattern(structure)
    if pattern is None:
        return None
    if pattern == "causal":
        return causal_mask(layout)
    if isinstance(pattern, BlockCausal):
        return block_causal_mask(layout, pattern.chunk, pattern.window, pattern.sink)
    return window_attention_mask(layout, pattern.window, pattern.chunk, pattern.text_sees_video)


ACCURACY_HEADS = 8  # accuracy does not depend on the head count; fewer heads keep the fp32 (L, L) reference small


def accuracy_level() -> list[dict]:
    from cogsurgeon.patches.reference import combine_masks, full_attention_mask, reference_attention

    layout = FrameLayout(TEXT, 6, 1350)  # 6 frames: windows slide past the sinks
    length = layout.sequence_length
    generator = torch.Generator(device="cuda").manual_seed(0)
    q32, k32, v32 = (
        torch.randn(BATCH, ACCURACY_HEADS, length, HEAD_DIM, device="cuda", generator=generator) for _ in range(3)
    )
    q, k, v = (t.to(torch.bfloat16) for t in (q32, k32, v32))
    rows = []
    cases = [
        ("causal-attention", "causal", None),
        *[(case, pattern, None) for case, pattern in PATTERN_CASES],
        ("attention-mask (B,T) text padding", None, text_padding_mask("cuda")),
        ("attention-mask + frame-causal", "frame-causal", text_padding_mask("cuda")),
        ("attention-mask + block-causal chunk=1 window=4 sink=1", BlockCausal(1, 4, 1), text_padding_mask("cuda")),
    ]
    for case, structure, mask in cases:
        plan = plan_attention(
            structure, layout, mask, batch=BATCH, heads=ACCURACY_HEADS, device=q.device, dtype=q.dtype
        )
        patched = run_plan(plan, q, k.clone(), v.clone(), keys_writable=True).float()
        rule = reference_rule(structure, layout)
        user = full_attention_mask(mask.cpu(), layout) if mask is not None else None
        explicit = combine_masks(rule, user).cuda()
        expected = reference_attention(q32, k32, v32, explicit)
        error = (patched - expected).abs().max().item()
        # bf16 tolerance: what SDPA itself gets wrong in bf16 when handed the same explicit mask
        sdpa_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=explicit).float()
        sdpa_error = (sdpa_bf16 - expected).abs().max().item()
        row = {
            "level": "accuracy",
            "case": case,
            "L": length,
            "max_abs_error_bf16_vs_fp32_reference": round(error, 5),
            "sdpa_with_explicit_mask_bf16_error": round(sdpa_error, 5),
            "within_bf16_tolerance": error <= 2 * sdpa_error + 1e-3,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del expected, sdpa_bf16, explicit, patched
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--levels", default="accuracy,attention,block")
    parser.add_argument("--streams", default="2,1",
                        help="stream counts the heads are split across (patches.attention.HEAD_STREAMS) to time the "
                             "patterns with at the attention level (first: the default)")
    args = parser.parse_args()
    environment = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python bench/attention_gpu.py " + " ".join(sys.argv[1:]),
    }
    try:
        import diffusers

        environment["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    print(json.dumps(environment), flush=True)
    levels = {"accuracy": accuracy_level, "attention": lambda: attention_level(args.repeats, [int(n) for n in args.streams.split(",")]),
              "block": lambda: block_level(args.repeats)}
    results = {"environment": environment}
    for level in args.levels.split(","):
        results[level] = levels[level]()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
