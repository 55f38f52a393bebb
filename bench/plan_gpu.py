"""GPU check of `cogsurgeon plan`: each case's peak measured as `torch.cuda.max_memory_allocated()` after
`torch.cuda.reset_peak_memory_stats()`, beside the plan's prediction made in the same run (on meta, on the CPU),
with the ratio. Random weights at the published sizes: each model is built on meta, moved with
`to_empty(device="cuda")` and filled with normal noise; inputs are random tensors of the shapes `plan` uses.

    python bench/plan_gpu.py                     # every case, each in its own process (a fresh allocator)
    python bench/plan_gpu.py --cases vae,vae-tiled --out results.jsonl
    python bench/plan_gpu.py --predict-only results.jsonl   # no GPU: today's plans against those measurements

What is measured is what the plan predicts: the peak from the moment the model (and, for training, AdamW's
state after a first step) and the inputs are on the GPU, through one forward, one training step or one decode.
A warm-up run at the same size comes first, so the cuBLAS workspace exists at the reset, as in any real run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {
    "5b-i2v-inference": dict(spec="cogvideox-5b-i2v", frames=49, height=480, width=720, batch=2),
    "1.5-5b-inference": dict(spec="cogvideox1.5-5b", frames=81, height=768, width=1360, batch=2),
    "5b-lora128-checkpointing": dict(spec="cogvideox-5b", frames=49, height=480, width=720, batch=1,
                                     train="lora:128:64", checkpointing=True),
    "5b-lora128": dict(spec="cogvideox-5b", frames=49, height=480, width=720, batch=1, train="lora:128:64"),
    # Training as the trainers run it: accelerate's `prepare()` (autocast around the forward, outputs cast to fp32),
    # LoRA parameters in `lora_dtype` (the fp16 scripts' `cast_training_params(..., torch.float32)`), the loss in
    # fp32, `accelerator.backward`, gradient clipping, AdamW. Measured with the real accelerate.
    "5b-i2v-lora128-bf16-autocast-checkpointing": dict(
        spec="cogvideox-5b-i2v", frames=49, height=480, width=720, batch=1, train="lora:128:64", checkpointing=True,
        dtype="bfloat16", mixed_precision="bf16", lora_dtype="bf16", accelerate=True),
    "5b-i2v-lora128-bf16-autocast": dict(
        spec="cogvideox-5b-i2v", frames=49, height=480, width=720, batch=1, train="lora:128:64",
        dtype="bfloat16", mixed_precision="bf16", lora_dtype="bf16", accelerate=True),
    "1.5-5b-lora128-bf16-autocast-checkpointing": dict(
        spec="cogvideox1.5-5b", frames=81, height=768, width=1360, batch=1, train="lora:128:64", checkpointing=True,
        dtype="bfloat16", mixed_precision="bf16", lora_dtype="bf16", accelerate=True),
    "2b-lora128-fp16-fp32lora-autocast-checkpointing": dict(
        spec="cogvideox-2b", frames=49, height=480, width=720, batch=1, train="lora:128:64", checkpointing=True,
        dtype="float16", mixed_precision="fp16", lora_dtype="fp32", accelerate=True),
    "2b-lora128-fp16-fp32lora-autocast": dict(
        spec="cogvideox-2b", frames=49, height=480, width=720, batch=1, train="lora:128:64",
        dtype="float16", mixed_precision="fp16", lora_dtype="fp32", accelerate=True),
    "5b-lora64-bf16-fp32lora-autocast-checkpointing-b2": dict(
        spec="cogvideox-5b", frames=49, height=480, width=720, batch=2, train="lora:64:32", checkpointing=True,
        dtype="bfloat16", mixed_precision="bf16", lora_dtype="fp32", accelerate=True),
    "2b-full-fp32-bf16-autocast-checkpointing": dict(
        spec="cogvideox-2b", frames=49, height=480, width=720, batch=1, train="full", checkpointing=True,
        dtype="float32", mixed_precision="bf16", accelerate=True),
    "vae": dict(vae="cogvideox-5b", latents=(1, 16, 13, 60, 90), tiling=False),
    "vae-tiled": dict(vae="cogvideox-5b", latents=(1, 16, 13, 60, 90), tiling=True),
}
DTYPE = "bfloat16"


def _trainer_cases() -> dict:
    """One case per `plan --trainer` preset at 49×480×720, B=1, as that trainer sets LoRA up: the 5B, or the 2B for
    a fp16 preset (the diffusers README's command; CogVideoX-5B is not trained in fp16)."""
    from cogsurgeon.inspector.plan import TRAINER_PRESETS

    def spec(preset) -> str:
        return "cogvideox-2b" if preset.dtype == "float16" else "cogvideox-5b"

    # finetrainers does not checkpoint and its fp32 adapters make PEFT run them on fp32 copies of the inputs, which
    # autograd keeps: 143.0 GiB planned at 49 frames, more than the H200 holds; 25 frames plan 83.4 GiB.
    frames = {"finetrainers": 25}

    return {f"trainer-{preset.name}-{spec(preset).removeprefix('cogvideox-')}": dict(
        spec=spec(preset), frames=frames.get(preset.name, 49), height=480, width=720, batch=1,
        train=f"lora:{preset.rank}:{preset.alpha}",
        checkpointing=preset.checkpointing, dtype=preset.dtype, mixed_precision=preset.mixed_precision,
        lora_dtype=preset.lora_dtype, lora_targets=preset.targets, optimizer=preset.optimizer, accelerate=True,
    ) for preset in TRAINER_PRESETS.values()}


CASES.update(_trainer_cases())


def _fill_random(module) -> None:
    import torch

    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)


def _sdpa_backend(batch: int, heads: int, length: int, head_dim: int) -> str:
    """The kernel PyTorch picks on this GPU for CogVideoX's attention shape (no mask, bf16)."""
    import torch
    from torch.nn.attention import SDPBackend

    query = torch.empty(batch, heads, length, head_dim, dtype=torch.bfloat16, device="cuda")
    choice = torch._fused_sdp_choice(query, query, query)
    del query
    torch.cuda.empty_cache()
    return SDPBackend(choice).name


def run_transformer_case(case: dict) -> dict:
    import torch

    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.inspector.model_specs import published_config
    from cogsurgeon.inspector.plan import (
        make_optimizer,
        parse_train,
        plan_transformer,
        prepare_training,
        training_step,
        training_target,
    )
    from cogsurgeon.inspector.geometry import latent_geometry, pipeline_inputs

    config = published_config(case["spec"])
    size = dict(frames=case["frames"], height=case["height"], width=case["width"])
    train = parse_train(case.get("train"))
    checkpointing = case.get("checkpointing", False)

    started = time.perf_counter()
    predicted = plan_transformer(build_on_meta(config, DTYPE), batch=case["batch"], train=train,
                                 checkpointing=checkpointing, **size)
    plan_seconds = time.perf_counter() - started

    geometry = latent_geometry(config, **size)
    length = geometry.layout(int(config["max_text_seq_length"])).sequence_length
    backend = _sdpa_backend(case["batch"], int(config["num_attention_heads"]), length,
                            int(config["attention_head_dim"]))

    model = build_on_meta(config, DTYPE)
    if train:
        prepare_training(model, train, checkpointing)
    model.to_empty(device="cuda")
    # After to_empty: a meta parameter cannot take CUDA data in place, so the module holds new Parameter objects.
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    _fill_random(model)
    torch.cuda.synchronize()
    weights_allocated = torch.cuda.memory_allocated()
    inputs = pipeline_inputs(config, (size["frames"], size["height"], size["width"]), case["batch"],
                             dtype=getattr(torch, DTYPE), device="cuda", seed=0)
    if train is None:
        model.eval()
        with torch.no_grad():
            model(**inputs, return_dict=False)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            output = model(**inputs, return_dict=False)
            torch.cuda.synchronize()
        del output
    else:
        optimizer = make_optimizer(trainable)
        target = torch.randn_like(training_target(inputs, config), device="cuda")
        training_step(model, inputs, target, optimizer)  # step 1: AdamW's state appears
        torch.cuda.synchronize()
        stepped = sum(1 for parameter in trainable if parameter in optimizer.state)
        held_grads = sum(1 for parameter in model.parameters() if parameter.grad is not None)
        if stepped != len(trainable) or held_grads:
            raise RuntimeError(f"optimizer state for {stepped} of {len(trainable)} trained parameters, "
                               f"{held_grads} gradients held after zero_grad")
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        training_step(model, inputs, target, optimizer)
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    parameter_bytes = sum(tensor.untyped_storage().nbytes() for tensor in (*model.parameters(), *model.buffers()))
    state_bytes = sum(value.untyped_storage().nbytes() for state in (optimizer.state.values() if train else ())
                      for value in state.values() if value.is_cuda)
    return dict(predicted=predicted.peak_bytes, measured=measured, predicted_resident=predicted.resident_bytes,
                measured_resident=resident, weights_allocated=weights_allocated, parameter_bytes=parameter_bytes,
                optimizer_state_bytes=state_bytes,
                predicted_peak_at=predicted.peak_at, sdpa_backend=backend,
                plan_seconds=round(plan_seconds, 1), breakdown=predicted.breakdown)


def run_vae_case(case: dict) -> dict:
    import torch

    from cogsurgeon.inspector.plan import build_vae_on_meta, plan_vae_decode, vae_config

    config = vae_config(case["vae"])
    started = time.perf_counter()
    predicted = plan_vae_decode(build_vae_on_meta(config, DTYPE), tuple(case["latents"]), tiling=case["tiling"])
    plan_seconds = time.perf_counter() - started

    vae = build_vae_on_meta(config, DTYPE)
    vae.to_empty(device="cuda")
    _fill_random(vae)
    if case["tiling"]:
        vae.enable_tiling()
    latents = torch.randn(tuple(case["latents"]), dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        vae.decode(latents[:, :, :3], return_dict=False)  # warm-up (cuDNN handles, cuBLAS workspace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        decoded = vae.decode(latents, return_dict=False)[0]
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    return dict(predicted=predicted.peak_bytes, measured=measured, predicted_resident=predicted.resident_bytes,
                measured_resident=resident, predicted_peak_at=predicted.peak_at, output=list(decoded.shape),
                plan_seconds=round(plan_seconds, 1), breakdown=predicted.breakdown)


def predict_accelerate_case(case: dict):
    """The plan of an accelerate case (on meta, on the CPU): what `run_accelerate_case` sets beside its measurement,
    and what `--predict-only` compares with measurements made before. The plan is asked with `mixed_precision`,
    `lora_dtype` and the other settings where `plan_transformer` takes them (where it does not yet: the ratio is
    what `plan` said before it knew them)."""
    import inspect

    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.inspector.model_specs import published_config
    from cogsurgeon.inspector.plan import parse_train, plan_transformer

    wanted = dict(mixed_precision=case["mixed_precision"], lora_dtype=case.get("lora_dtype"),
                  lora_targets=case.get("lora_targets"), optimizer=case.get("optimizer"))
    accepted = inspect.signature(plan_transformer).parameters
    plan_options = {key: value for key, value in wanted.items() if key in accepted and value is not None}
    predicted = plan_transformer(build_on_meta(published_config(case["spec"]), case["dtype"]), batch=case["batch"],
                                 train=parse_train(case["train"]), checkpointing=case.get("checkpointing", False),
                                 frames=case["frames"], height=case["height"], width=case["width"], **plan_options)
    return predicted, plan_options


def run_accelerate_case(case: dict) -> dict:
    """A training step under the real accelerate, beside the plan for the same settings: the very
    `accelerate_training_step` the planner runs, here with the real Accelerator."""
    import torch
    from accelerate import Accelerator

    from cogsurgeon.inspector.geometry import pipeline_inputs
    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.inspector.model_specs import published_config
    from cogsurgeon.inspector.plan import (
        LORA_DTYPES,
        LORA_TARGET_MODULES,
        accelerate_training_step,
        make_optimizer,
        parse_train,
        prepare_training,
        training_input_dtype,
        training_target,
    )

    config = published_config(case["spec"])
    size = dict(frames=case["frames"], height=case["height"], width=case["width"])
    train = parse_train(case["train"])
    checkpointing = case.get("checkpointing", False)
    dtype = case["dtype"]

    started = time.perf_counter()
    predicted, plan_options = predict_accelerate_case(case)
    plan_seconds = time.perf_counter() - started

    model = build_on_meta(config, dtype)
    prepare_training(model, train, checkpointing, target_modules=case.get("lora_targets") or LORA_TARGET_MODULES)
    model.to_empty(device="cuda")
    _fill_random(model)
    if train.kind == "lora" and LORA_DTYPES.get(case.get("lora_dtype") or "auto"):
        lora_dtype = getattr(torch, LORA_DTYPES[case["lora_dtype"]])
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:  # diffusers' cast_training_params
                parameter.data = parameter.data.to(lora_dtype)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer, optimizer_note = make_bench_optimizer(case.get("optimizer") or "adamw", trainable)
    accelerator = Accelerator(mixed_precision=case["mixed_precision"])
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.cuda.synchronize()
    input_dtype = training_input_dtype(getattr(torch, dtype), case["mixed_precision"])
    inputs = pipeline_inputs(config, (size["frames"], size["height"], size["width"]), case["batch"],
                             dtype=input_dtype, device="cuda", seed=0)
    target = torch.randn_like(training_target(inputs, config), device="cuda")
    step = dict(max_grad_norm=case.get("max_grad_norm", 1.0))
    accelerate_training_step(model, inputs, target, optimizer, accelerator, trainable, **step)  # step 1: state
    torch.cuda.synchronize()
    # Under fp16 the GradScaler skips a step whose gradients overflow: then the state would appear in the measured
    # step, which the plan does not assume. Reported, so that such a row is read as what it is.
    stepped = sum(1 for parameter in trainable if parameter in optimizer.state)
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    accelerate_training_step(model, inputs, target, optimizer, accelerator, trainable, **step)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    return dict(predicted=predicted.peak_bytes, measured=measured, predicted_resident=predicted.resident_bytes,
                measured_resident=resident, plan_options=plan_options, predicted_peak_at=predicted.peak_at,
                trainable_dtypes=sorted({str(p.dtype) for p in trainable}), input_dtype=str(input_dtype),
                optimizer=optimizer_note, state_after_step_1=f"{stepped} of {len(trainable)} trained parameters",
                plan_seconds=round(plan_seconds, 1), breakdown=predicted.breakdown)


def make_bench_optimizer(name: str, parameters: list):
    """The preset's optimizer on the GPU: torch's AdamW/Adam (foreach), or bitsandbytes' 8-bit AdamW when it is
    importable there (else AdamW, said in the result: the case then measures AdamW, not the preset's optimizer)."""
    from cogsurgeon.inspector.plan import make_optimizer

    if name == "adam":
        return make_optimizer(parameters, "adam"), "torch.optim.Adam (foreach, weight decay 1e-4)"
    if name == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError:
            return make_optimizer(parameters), "bitsandbytes not importable: torch.optim.AdamW instead"
        return bitsandbytes.optim.AdamW8bit(parameters, lr=1e-4), f"bitsandbytes {bitsandbytes.__version__} AdamW8bit"
    return make_optimizer(parameters), "torch.optim.AdamW (foreach)"


def run_case(name: str) -> dict:
    case = CASES[name]
    started = time.perf_counter()
    try:
        runner = run_vae_case if "vae" in case else run_accelerate_case if case.get("accelerate") else run_transformer_case
        result = runner(case)
    except Exception as exc:  # an OOM or a failure is a result here: report it and go on with the other cases
        result = dict(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    result.update(case=name, seconds=round(time.perf_counter() - started, 1))
    if "measured" in result:
        result["ratio"] = round(result["predicted"] / result["measured"], 4)
    return result


def predict_only(measured_file: str, names: list[str] | None) -> None:
    """Plan each accelerate case measured in `measured_file` on this machine (CPU) and compare."""
    with open(measured_file) as handle:
        measured = {row["case"]: row for row in map(json.loads, filter(str.strip, handle)) if "measured" in row}
    print(f"{'case':52} {'predicted':>15} {'measured':>15} {'ratio':>7}  resident ratio")
    for name, case in CASES.items():
        if not case.get("accelerate") or (names and name not in names):
            continue
        predicted, _ = predict_accelerate_case(case)
        if name not in measured:
            print(f"{name:52} {predicted.peak_bytes:15,} {'(not measured)':>15}  ({predicted.peak_at})", flush=True)
            continue
        row = measured[name]
        ratio = predicted.peak_bytes / row["measured"]
        print(f"{name:52} {predicted.peak_bytes:15,} {row['measured']:15,} {ratio:7.4f}"
              f"  {predicted.resident_bytes / row['measured_resident']:.4f}  ({predicted.peak_at})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (the parent's child)
    parser.add_argument("--out", help="also write one JSON line per case here")
    parser.add_argument("--predict-only", metavar="MEASURED_JSONL",
                        help="no GPU: plan the accelerate cases measured in this file (a --out of an earlier run) "
                             "and print predicted / measured for each")
    args = parser.parse_args()
    if args.predict_only:
        predict_only(args.predict_only, args.cases.split(",") if args.cases != ",".join(CASES) else None)
        return
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return

    import torch

    import diffusers
    import peft

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"diffusers {diffusers.__version__}, peft {peft.__version__}", flush=True)
    results = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
        child = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                               env=dict(os.environ))
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else dict(case=name, error=child.stderr.strip()[-500:])
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")
    gib = 2**30
    print(f"\n{'case':28} {'predicted GiB':>14} {'measured GiB':>13} {'ratio':>7}")
    for result in results:
        if "ratio" in result:
            print(f"{result['case']:28} {result['predicted'] / gib:14.3f} {result['measured'] / gib:13.3f} "
                  f"{result['ratio']:7.4f}")
        else:
            print(f"{result['case']:28} {result.get('error', '')}")


if __name__ == "__main__":
    main()
