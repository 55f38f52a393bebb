"""`plan` for training as the trainers run it: the CUDA autocast emulation against closed-form sizes (a Linear +
LayerNorm chain, fp32 adapters' cast cache), the op lists against the installed torch's autocast_mode.h, the trainer
presets against their cited defaults, the JSON's assumed settings, and bad flags on the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cogsurgeon.inspector.plan import (
    AUTOCAST_FP32_OPS,
    AUTOCAST_FP32_SET_OPT_DTYPE_OPS,
    AUTOCAST_LOWER_PRECISION_OPS,
    AUTOCAST_PROMOTE_OPS,
    TRAINER_PRESETS,
    CudaAutocast,
    MemoryAccounting,
    PlanError,
    allocator_bytes,
    autocast_policy,
    cuda_autocast_state,
    plan_memory,
)

META = torch.device("meta")


def _header_ops(macro: str) -> set[str]:
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    text = header.read_text()
    body = text[text.index(f"#define {macro}(_)"):]
    body = body[:body.index("\n\n")]
    return set(re.findall(r"_\((\w+)", body))


@pytest.mark.skipif(not (Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h").exists(),
                    reason="this torch wheel ships no C++ headers")
def test_op_lists_are_the_installed_torchs():
    assert _header_ops("AT_FORALL_LOWER_PRECISION_FP") <= AUTOCAST_LOWER_PRECISION_OPS
    assert _header_ops("AT_FORALL_FP32") == AUTOCAST_FP32_OPS
    assert _header_ops("AT_FORALL_FP32_SET_OPT_DTYPE") == AUTOCAST_FP32_SET_OPT_DTYPE_OPS
    assert _header_ops("AT_FORALL_PROMOTE") == AUTOCAST_PROMOTE_OPS


def test_policy_by_python_name():
    assert autocast_policy("linear") == "lower" and autocast_policy("__matmul__") == "lower"
    assert autocast_policy("layer_norm") == "fp32" and autocast_policy("__pow__") == "fp32"
    assert autocast_policy("softmax") == "fp32_set_opt_dtype"
    assert autocast_policy("gelu") is None and autocast_policy("pow_") is None


def test_linear_then_layer_norm_saves_the_casts():
    # x (rows, dim) fp32 without grad -> Linear(dim, dim) fp32 weight that trains -> LayerNorm without affine, under
    # bf16 autocast. The linear runs on a bf16 copy of x (saved for the weight's grad) and a bf16 copy of the weight
    # (cached while autocast is on, not saved: x needs no grad); layer_norm runs in fp32 on a fp32 copy of the bf16
    # output (saved, with mean and rstd); its output is fp32. After the forward: x16, y32, out32, mean, rstd.
    rows, dim = 64, 256
    with torch.device(META):
        linear = nn.Linear(dim, dim, bias=False)
        norm = nn.LayerNorm(dim, elementwise_affine=False)
    accounting, autocast = MemoryAccounting(), CudaAutocast()
    accounting.adopt(linear)
    with accounting.active(linear), autocast.active():
        x = torch.empty(rows, dim, device=META)
        before = accounting.ledger.current
        with cuda_autocast_state(torch.bfloat16):
            out = norm(linear(x))
            cached_weight = allocator_bytes(dim * dim * 2)
            assert len(autocast.cache) == 1
        after = accounting.ledger.current
    assert out.dtype == torch.float32
    saved = allocator_bytes(rows * dim * 2) + 2 * allocator_bytes(rows * dim * 4) + 2 * allocator_bytes(rows * 4)
    assert after - before == saved
    assert autocast.cache == {}  # cleared when the outermost autocast exits, as torch.clear_autocast_cache does
    assert accounting.ledger.peak - before >= saved + cached_weight


def test_without_autocast_nothing_is_cast():
    rows, dim = 64, 256
    with torch.device(META):
        linear = nn.Linear(dim, dim, bias=False)
    accounting, autocast = MemoryAccounting(), CudaAutocast()
    accounting.adopt(linear)
    with accounting.active(linear), autocast.active():
        x = torch.empty(rows, dim, device=META)
        before = accounting.ledger.current
        y = linear(x)
    assert y.dtype == torch.float32 and accounting.ledger.current - before == allocator_bytes(rows * dim * 4)


@pytest.mark.parametrize("name, expected", [
    # name: (dtype, mixed precision, LoRA dtype, rank, alpha, optimizer, checkpointing), from each preset's source
    ("cogvideo-finetune", ("float32", "bf16", "fp32", 128, 64, "adamw", True)),
    ("diffusers-scripts", ("float16", "fp16", "fp32", 64, 64, "adam", False)),
    ("cogvideox-factory", ("bfloat16", "bf16", "auto", 128, 128, "adamw", True)),
    ("finetrainers", ("bfloat16", "no", "fp32", 64, 64, "adam", False)),
    ("cogkit", ("bfloat16", "no", "bf16", 128, 64, "adamw", True)),
    ("videox-fun", ("bfloat16", "bf16", "auto", 64, 32, "adamw", True)),
])
def test_presets_hold_the_trainers_defaults(name, expected):
    preset = TRAINER_PRESETS[name]
    assert (preset.dtype, preset.mixed_precision, preset.lora_dtype, preset.rank, preset.alpha, preset.optimizer,
            preset.checkpointing) == expected
    assert re.search(r"\.(py|sh|md|yaml):\d+", preset.source), "a preset cites file:line"


def test_plan_json_says_what_was_assumed():
    plan = plan_memory("tiny", frames=9, height=64, width=64, batch=1, trainer="finetrainers")
    settings = plan.to_json()["settings"]
    assert (settings["trainer"], settings["mixed_precision"], settings["lora_dtype"], settings["optimizer"],
            settings["train"]) == ("finetrainers", "no", "fp32", "adam", "lora:64")
    default = plan_memory("tiny", frames=9, height=64, width=64, batch=1, train="lora:4").to_json()["settings"]
    assert default["mixed_precision"] == "bf16" and default["lora_dtype"] == "auto"


def test_a_preset_with_full_finetuning_runs_as_its_sft_launch_and_drops_its_adapters():
    """Issue 25 item 3: CogVideo's SFT launch is DeepSpeed ZeRO-2 over 8 GPUs in bf16 (no autocast); without
    DeepSpeed (zero=0, its DDP script) the fp32 weights under bf16 autocast of its LoRA set-up."""
    settings = plan_memory("tiny", frames=9, height=64, width=64, batch=1, trainer="cogvideo-finetune",
                           train="full").settings
    assert (settings.train.kind, settings.dtype, settings.mixed_precision, settings.lora_dtype) == (
        "full", "bfloat16", "no", "auto")
    assert (settings.zero.stage, settings.zero.gpus) == (2, 8)
    settings = plan_memory("tiny", frames=9, height=64, width=64, batch=1, trainer="cogvideo-finetune",
                           train="full", zero=0).settings
    assert (settings.dtype, settings.mixed_precision, settings.zero) == ("float32", "bf16", None)


def test_fp32_adapters_cost_more_than_bf16():
    common = dict(frames=9, height=64, width=64, batch=1, train="lora:64", dtype="bfloat16", mixed_precision="bf16")
    bf16 = plan_memory("tiny", lora_dtype="bf16", **common)
    fp32 = plan_memory("tiny", lora_dtype="fp32", **common)
    assert fp32.peak.resident_bytes > bf16.peak.resident_bytes


@pytest.mark.parametrize("kwargs", [dict(trainer="nope"), dict(lora_dtype="fp32"), dict(mixed_precision="bf16"),
                                    dict(train="full", lora_dtype="fp32"), dict(train="lora:4", lora_dtype="int8")])
def test_bad_settings_are_plan_errors(kwargs):
    with pytest.raises(PlanError):
        plan_memory("tiny", frames=9, height=64, width=64, batch=1, **kwargs)


@pytest.mark.parametrize("args", [["--trainer", "nope"], ["--lora-dtype", "fp32"],
                                  ["--train", "full", "--lora-dtype", "fp32"],
                                  ["--train", "lora:4", "--mixed-precision", "fp8"]])
def test_cli_bad_flags_exit_2_with_one_line(args):
    from conftest import run_cli

    result = run_cli("plan", "tiny", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_checkpoint_recomputation_runs_under_the_forwards_autocast():
    # torch.utils.checkpoint captures the autocast state at the forward and re-enters it to recompute; the plan's
    # autocast must be that state, or a checkpointed step would recompute in fp32 and book the wrong copies. Each
    # cast cache lives until its outermost autocast exits: the forward's, then each recomputation's.
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    from cogsurgeon.inspector.plan import _backward_keeping_modes

    rows, dim = 8, 32
    with torch.device(META):
        linear = nn.Linear(dim, dim)
    linear.requires_grad_(False)
    seen = []
    linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    accounting, autocast = MemoryAccounting(), CudaAutocast()
    with accounting.active(linear), autocast.active():
        x = torch.empty(rows, dim, device=META, requires_grad=True)
        # early stop would end the recomputation inside the linear, before its forward hook reports
        with cuda_autocast_state(torch.bfloat16), set_checkpoint_early_stop(False):
            y = checkpoint(linear, x, use_reentrant=False)
        loss = y.float().sum()
        _backward_keeping_modes(loss)
    assert seen == [torch.bfloat16, torch.bfloat16]  # forward, then the recomputation in backward
    assert x.grad is not None and x.grad.dtype == torch.float32
