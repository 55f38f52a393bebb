"""Ulysses context parallelism at the real shapes, on the meta device (no GPU needed; runs as well on one):

1. the attention plan one rank makes under `cogsurgeon.parallel` (captured from a forward of rank 0 of N, via
   `parallel.rank_view.one_rank`) against the one-GPU plan: its work fraction (query-key pairs attended / L²) and
   the heads it runs, for causal, frame-causal, block-causal chunk 3, and chunk 1 window 4 sink 1;
2. `plan --ulysses N`: the peak memory of one GPU of N (inference, batch 2, bf16).

At the 5B shape (49×480×720: 226 + 17,550 tokens, 48 heads) and the 1.5 shape (81×768×1360: 226 + 44,880 tokens),
degrees 1, 2, 4, 8. Writes JSON to $OUT/parallel_plan.json or bench/results/parallel_plan.json.

    PYTHONPATH=. python bench/parallel_plan.py          # or with cogsurgeon installed
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from cogsurgeon import patches
from cogsurgeon.inspector.geometry import pipeline_inputs
from cogsurgeon.inspector.loading import build_on_meta
from cogsurgeon.inspector.model_specs import builtin_config
from cogsurgeon.inspector.plan import plan_memory
from cogsurgeon.parallel.rank_view import one_rank_of
from cogsurgeon.patches.attention import KeptKeyPlan, SegmentPlan
from cogsurgeon.patches.processor import attention_state

SHAPES = {"5b": ("cogvideox-5b", (49, 480, 720)), "1.5": ("cogvideox1.5-5b", (81, 768, 1360))}
PATTERNS = {
    "causal": [("causal-attention", {})],
    "frame-causal": [("frame-causal-attention", {})],
    "block-causal chunk 3": [("block-causal-attention", {"chunk": 3})],
    "chunk 1 window 4 sink 1": [("block-causal-attention", {"chunk": 1, "window": 4, "sink": 1})],
}
DEGREES = (1, 2, 4, 8)


def segment_pairs(segment) -> int:
    """Query-key pairs one segment attends (a lower-right causal segment: its triangle)."""
    if segment.causal:
        return segment.length * segment.key_end - segment.length * (segment.length - 1) // 2
    return segment.length * segment.key_count


def captured_plan(spec: str, size: tuple[int, int, int], patch_list, degree: int) -> tuple[float, int, int]:
    """(work fraction, heads, sequence length) of the plan rank 0 of `degree` makes (one block is enough: every
    layer of a forward shares the plan)."""
    model = build_on_meta({**builtin_config(spec), "num_layers": 1}, "bfloat16")
    for name, options in patch_list:
        patches.apply(model, name, **options)
    heads: list[int] = []
    inputs = pipeline_inputs(model.config, size, 2, dtype=torch.bfloat16, device=torch.device("meta"))
    original_plan = attention_state(model).plan

    def recording_plan(mask, text_tokens, video_tokens, query):
        heads.append(query.shape[1])
        return original_plan(mask, text_tokens, video_tokens, query)

    attention_state(model).plan = recording_plan
    with torch.no_grad(), one_rank_of(model, degree):
        model(**inputs, return_dict=False)
    plan = attention_state(model)._plan
    segments = plan.segments if isinstance(plan, SegmentPlan) else plan.groups[0].segments
    assert not isinstance(plan, KeptKeyPlan) or len(plan.groups) == 1
    length = segments[-1].query_end
    return sum(segment_pairs(s) for s in segments) / length**2, heads[0], length


def main() -> None:
    out = Path(os.environ.get("OUT") or Path(__file__).with_name("results"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch": torch.__version__, "work_fraction": [], "peak_per_gpu": []}
    for shape, (spec, size) in SHAPES.items():
        for pattern, patch_list in PATTERNS.items():
            for degree in DEGREES:
                fraction, heads, length = captured_plan(spec, size, patch_list, degree)
                results["work_fraction"].append({"shape": shape, "pattern": pattern, "ulysses": degree,
                                                 "work_fraction": fraction, "heads_per_rank": heads,
                                                 "sequence": length})
                print(f"{shape} {pattern:>24} ulysses {degree}: work fraction {fraction:.4f}, {heads} heads, "
                      f"L={length}", file=sys.stderr, flush=True)
        for degree in DEGREES:
            started = time.perf_counter()
            plan = plan_memory(spec, frames=size[0], height=size[1], width=size[2], batch=2, ulysses=degree)
            breakdown = plan.to_json()["breakdown"]
            results["peak_per_gpu"].append({"shape": shape, "model": spec, "ulysses": degree,
                                            "peak_bytes": plan.peak_bytes, "breakdown": breakdown,
                                            "peak_at": plan.peak.peak_at})
            print(f"{shape} plan --ulysses {degree}: {plan.peak_bytes / 2**30:.2f} GiB per GPU "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    (out / "parallel_plan.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
