"""GPU cost of the attention x-ray: a whole CogVideoX forward unrecorded vs recording groups "frames" on every layer,
same model, same inputs, same run. Random bf16 weights at the published sizes (built on meta, `to_empty` on the GPU,
normal noise), inputs shaped as the pipelines shape them (`pipeline_inputs`, B=2: one video with guidance).

    PYTHONPATH=. python bench/attention_xray_gpu.py                 # both cases, each in its own process
    PYTHONPATH=. python bench/attention_xray_gpu.py --cases 5b --repeats 5
    PYTHONPATH=. python bench/attention_xray_gpu.py --tiny          # the same code on the tiny model (CPU): a dry run

Cases:
- "5b": CogVideoX-5B, 49×480×720, 42 layers × 48 heads, L = 17,776. Goals (issue 26): recorded forward time <= 1.5×
  the unrecorded one, peak memory <= 0.25 GiB above the unrecorded peak.
- "1.5": CogVideoX1.5-5B, 81×768×1360, L = 45,106: that it runs at all (an L×L map would take 195 GB per layer).

For each: the median forward time (CUDA events) over `--repeats` after one warm-up of each kind, unrecorded and
recorded alternating; the peak of `torch.cuda.max_memory_allocated()` over one forward of each kind (reset before
it); whether the recorded outputs are bit-identical to the unrecorded ones; and from the recording, how far each
layer's rows are from summing to 1 (bf16 kernels). JSON to $OUT/attention_xray_gpu.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "5b": dict(spec="cogvideox-5b", size=(49, 480, 720), batch=2, goal_time=1.5, goal_extra_gib=0.25),
    "1.5": dict(spec="cogvideox1.5-5b", size=(81, 768, 1360), batch=2, repeats=1),
    "tiny": dict(spec="tiny", size=(9, 64, 64), batch=2, goal_time=None, goal_extra_gib=None),
}
GIB = 2**30


def _import_cogsurgeon() -> None:
    try:
        import cogsurgeon.inspector  # noqa: F401
    except ImportError:  # a machine without the install: this checkout's folders under the cogsurgeon name
        import types

        sys.modules["cogsurgeon"] = types.ModuleType("cogsurgeon")
        sys.modules["cogsurgeon"].__path__ = [str(ROOT)]


def _build(spec: str, device: str):
    import torch

    from cogsurgeon.inspector.loading import build_on_meta, build_tiny
    from cogsurgeon.inspector.model_specs import published_config

    if spec == "tiny":
        return build_tiny("tiny").to(device).eval()
    model = build_on_meta(published_config(spec), "bfloat16")
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
    return model.eval()


class Clock:
    """Forward time in ms: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, function) -> tuple[float, object]:
        import torch

        if not self.cuda:
            started = time.perf_counter()
            result = function()
            return (time.perf_counter() - started) * 1000, result
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), result


def run_case(name: str, repeats: int, chunk_mib: int | None) -> dict:
    _import_cogsurgeon()
    import torch

    from cogsurgeon.inspector import record_attention
    from cogsurgeon.inspector.attention_xray import DEFAULT_CHUNK_BYTES
    from cogsurgeon.inspector.geometry import pipeline_inputs

    case = CASES[name]
    cuda = torch.cuda.is_available() and name != "tiny"
    device = "cuda" if cuda else "cpu"
    repeats = case.get("repeats", repeats)
    chunk_bytes = chunk_mib * 2**20 if chunk_mib else DEFAULT_CHUNK_BYTES
    started = time.perf_counter()
    model = _build(case["spec"], device)
    dtype = next(model.parameters()).dtype
    inputs = pipeline_inputs(model.config, case["size"], case["batch"], dtype=dtype, device=device, seed=0)
    clock = Clock(cuda)
    build_seconds = time.perf_counter() - started

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def recorded():
        with record_attention(model, "frames", chunk_bytes=chunk_bytes) as recording:
            output = forward()
        return output, recording

    def peak_of(function) -> tuple[int, object]:
        if not cuda:
            return 0, function()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), result

    reference = forward()  # warm-up of each kind: kernels chosen, cuBLAS workspace made
    recorded()
    plain_peak, _ = peak_of(forward)
    recorded_peak, (output, recording) = peak_of(recorded)
    bit_identical = bool(torch.equal(output, reference))
    del output
    plain_ms, recorded_ms = [], []
    for _ in range(repeats):  # alternating, so that clocks and heat affect both alike
        plain_ms.append(clock(forward)[0])
        recorded_ms.append(clock(recorded)[0])
    mass = recording.all_mass()  # (steps, layers, batch, heads, groups, groups)
    row_error = (mass.sum(-1) - 1).abs().amax(dim=(0, 2, 3, 4))  # per layer
    first = recording.summary(0, 1)
    result = dict(
        case=name, spec=case["spec"], size=list(case["size"]), batch=case["batch"], device=str(device),
        gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__,
        layers=len(recording.layers), heads=recording.heads, groups=recording.groups,
        sequence_length=recording.layout["text_tokens"] + recording.layout["frames"]
        * recording.layout["grid_height"] * recording.layout["grid_width"],
        chunk_bytes=chunk_bytes, repeats=repeats,
        unrecorded_ms=statistics.median(plain_ms), recorded_ms=statistics.median(recorded_ms),
        unrecorded_ms_all=plain_ms, recorded_ms_all=recorded_ms,
        unrecorded_peak_bytes=plain_peak, recorded_peak_bytes=recorded_peak,
        outputs_bit_identical=bit_identical,
        max_row_sum_error=float(row_error.max()), row_sum_error_per_layer=[float(v) for v in row_error],
        layer0_conditioned=first[0], build_seconds=round(build_seconds, 1),
    )
    result["time_ratio"] = round(result["recorded_ms"] / result["unrecorded_ms"], 4)
    result["extra_peak_gib"] = round((recorded_peak - plain_peak) / GIB, 4)
    if case.get("goal_time"):
        result["meets_time_goal"] = result["time_ratio"] <= case["goal_time"]
        result["meets_memory_goal"] = result["extra_peak_gib"] <= case["goal_extra_gib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="5b,1.5", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards of each kind (5b)")
    parser.add_argument("--chunk-mib", type=int, help="the recorder's chunk budget (default: its own)")
    parser.add_argument("--tiny", action="store_true", help="a dry run of the same code on the tiny model, CPU")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (the parent's child)
    args = parser.parse_args()
    if args.case:
        try:
            result = run_case(args.case, args.repeats, args.chunk_mib)
        except Exception as exc:  # an OOM or a failure is a result: report it
            result = dict(case=args.case, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        print(json.dumps(result), flush=True)
        return
    names = ["tiny"] if args.tiny else args.cases.split(",")
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
    results = []
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in names:  # each case in its own process: a fresh allocator and peak
        command = [sys.executable, __file__, "--case", name, "--repeats", str(args.repeats)]
        if args.chunk_mib:
            command += ["--chunk-mib", str(args.chunk_mib)]
        child = subprocess.run(command, capture_output=True, text=True, env=environment)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else dict(case=name, error=child.stderr.strip()[-800:])
        results.append(result)
        print(json.dumps(result), flush=True)
    out_folder = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_folder.mkdir(parents=True, exist_ok=True)
    out_path = out_folder / ("attention_xray_tiny.json" if args.tiny else "attention_xray_gpu.json")
    out_path.write_text(json.dumps(results, indent=2))
    print(f"\n{'case':6} {'L':>7} {'unrecorded ms':>14} {'recorded ms':>12} {'ratio':>7} {'extra peak GiB':>15} "
          f"{'bit-identical':>14}")
    for result in results:
        if "error" in result:
            print(f"{result['case']:6} error: {result['error']}")
            continue
        print(f"{result['case']:6} {result['sequence_length']:7,} {result['unrecorded_ms']:14.1f} "
              f"{result['recorded_ms']:12.1f} {result['time_ratio']:7.3f} {result['extra_peak_gib']:15.3f} "
              f"{str(result['outputs_bit_identical']):>14}")
    print(f"written: {out_path}")


if __name__ == "__main__":
    main()
