"""The memory planner: the ledger and size arithmetic, the accounting on meta against closed-form answers (a Linear
chain, an attention call, a checkpointed chain), the transformer and VAE plans on tiny models, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cogsurgeon.inspector.plan import (
    MemoryAccounting,
    MemoryLedger,
    PlanError,
    TrainMode,
    allocator_bytes,
    attention_backend,
    candidate_switches,
    flash_backward_workspace_bytes,
    parse_memory_size,
    parse_train,
    parse_video_size,
    plan_memory,
    plan_vae_decode,
)

META = torch.device("meta")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_allocator_rounds_to_512_byte_blocks():
    assert [allocator_bytes(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]


def test_parse_train_and_memory():
    assert parse_train(None) is None
    assert parse_train("full") == TrainMode("full")
    assert parse_train("lora:128") == TrainMode("lora", 128, 128)
    assert parse_train("LoRA:128:64") == TrainMode("lora", 128, 64)
    for bad in ("lora", "lora:0", "lora:x", "qlora:4", ""):
        with pytest.raises(PlanError):
            parse_train(bad)
    assert parse_memory_size("80GiB") == 80 * 2**30
    assert parse_memory_size("80G") == 80 * 2**30
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("1.5 MiB") == 3 * 2**19
    for bad in ("", "80XB", "-1G", "GiB"):
        with pytest.raises(PlanError):
            parse_memory_size(bad)


def test_parse_video_size():
    assert parse_video_size("49x480x720") == (49, 480, 720)
    assert parse_video_size(" 81 × 768 × 1360 ") == (81, 768, 1360)
    for bad in ("49x480", "0x480x720", "ax480x720", ""):
        with pytest.raises(PlanError):
            parse_video_size(bad)


def test_ledger_peak_breakdown_and_transient():
    ledger = MemoryLedger(where=lambda: "here")
    ledger.allocate(1, 1024, "weights")
    ledger.allocate(2, 512, "activations")
    ledger.allocate(2, 512, "activations")  # a second view of the same storage books nothing
    assert ledger.current == 1536
    ledger.free(2)
    with ledger.transient(4096, "attention"):
        assert ledger.current == 1024 + 4096
    assert ledger.current == 1024 and ledger.peak == 1024 + 4096
    assert ledger.peak_breakdown["attention"] == 4096 and ledger.peak_at == "here"
    ledger.reset_peak()
    assert ledger.peak == 1024
    ledger.allocate(3, 512, "activations")
    ledger.recategorize(3, "gradients")
    assert ledger.totals["gradients"] == 512 and ledger.totals["activations"] == 0


def test_attention_backend_is_the_gpus():
    assert attention_backend("bfloat16", False, 64) == "flash"
    assert attention_backend("bfloat16", True, 64) == "efficient"
    assert attention_backend("float32", False, 64) == "efficient"
    # CogVideoX-5B training at B=1: 48 heads, 17,776 tokens, head dim 64 — 3.4 MB + 218 MB of fp32 workspace.
    assert flash_backward_workspace_bytes(1, 48, 17776, 64) == 48 * 17792 * 4 + 17792 * 48 * 64 * 4


def test_candidate_switches():
    from cogsurgeon.inspector.plan import PlanSettings

    full = PlanSettings("cogvideox-5b", 49, 480, 720, 2, "bfloat16", train=TrainMode("full"))
    switches = [switch for switch, _ in candidate_switches(full)]
    assert switches == ["--checkpointing", "--train lora:128", "--batch 1"]
    assert candidate_switches(full)[0][1].checkpointing is True
    decode = PlanSettings("cogvideox-5b", 49, 480, 720, 2, "bfloat16", vae=True)
    assert [switch for switch, _ in candidate_switches(decode)] == ["--tiling", "--batch 1"]
    inference = PlanSettings("cogvideox-5b", 49, 480, 720, 1, "bfloat16")
    assert candidate_switches(inference) == []


def test_switch_combinations_apply_every_switch_of_a_group():
    from cogsurgeon.inspector.plan import PlanSettings, switch_combinations

    full = PlanSettings("cogvideox-5b", 49, 480, 720, 4, "bfloat16", train=TrainMode("full"))
    singles = candidate_switches(full)
    pairs = dict(switch_combinations(full, singles, 2))
    assert list(pairs) == ["--checkpointing --train lora:128", "--checkpointing --batch 2", "--train lora:128 --batch 2"]
    both = pairs["--checkpointing --batch 2"]
    assert (both.checkpointing, both.batch, both.train) == (True, 2, TrainMode("full"))
    (name, everything), = switch_combinations(full, singles, 3)
    assert name == "--checkpointing --train lora:128 --batch 2"
    assert (everything.checkpointing, everything.batch, everything.train.kind) == (True, 2, "lora")


# ---------------------------------------------------------------------------------------------------------------
# Closed-form accounting on meta


def _activation_bytes(*shape: int, element: int = 4) -> int:
    count = element
    for size in shape:
        count *= size
    return allocator_bytes(count)


def test_linear_chain_inference_peak_is_weights_plus_three_activations():
    # 4 Linear(256, 256) without bias, fp32; input (8, 256). The caller keeps the input; while layer i runs its
    # input and output are live: at layer 2, x0 + x1 + x2.
    dim, rows, layers = 256, 8, 4
    with torch.device(META):
        chain = nn.Sequential(*(nn.Linear(dim, dim, bias=False) for _ in range(layers)))
    accounting = MemoryAccounting()
    accounting.adopt(chain)
    with accounting.active(chain), torch.no_grad():
        x0 = torch.empty(rows, dim, device=META)
        chain(x0)
    weights = layers * dim * dim * 4
    peak = accounting.result("run")
    assert peak.peak_bytes == weights + 3 * _activation_bytes(rows, dim)
    assert peak.breakdown["weights"] == weights
    assert peak.peak_at in {"1", "2", "3"}  # inside a layer after the first


def test_attention_call_counts_the_flash_kernel_not_scores():
    batch, heads, length, head_dim = 2, 4, 1000, 64
    accounting = MemoryAccounting()
    with accounting.active(), torch.no_grad():
        q, k, v = (torch.empty(batch, heads, length, head_dim, device=META, dtype=torch.bfloat16) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
    qkv = _activation_bytes(batch, heads, length, head_dim, element=2)
    lse = _activation_bytes(batch, heads, length, element=4)
    assert out.shape == (batch, heads, length, head_dim)
    # Inputs, output and the kernel's log-sum-exp; no (batch, heads, L, L) score matrix (64 MB here).
    assert accounting.ledger.peak == 4 * qkv + lse
    assert accounting.ledger.peak_breakdown["attention"] == qkv + lse


def test_attention_with_a_bool_mask_counts_the_mask_and_its_additive_copy():
    batch, heads, length, head_dim = 1, 2, 512, 64
    accounting = MemoryAccounting()
    with accounting.active(), torch.no_grad():
        q, k, v = (torch.empty(batch, heads, length, head_dim, device=META, dtype=torch.bfloat16) for _ in range(3))
        mask = torch.empty(1, 1, length, length, device=META, dtype=torch.bool)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qkv = _activation_bytes(batch, heads, length, head_dim, element=2)
    bool_mask = _activation_bytes(length, length, element=1)
    additive = _activation_bytes(length, length, element=2)
    # SDPA turns a bool mask into an additive one in the query's dtype, `where(mask.logical_not(), -inf, 0)`:
    # the peak is while that runs (the inverted bool mask, the result, the 0-d zero and the 0-d -inf `where` makes
    # of the scalar on the mask's device), above the kernel's own output and log-sum-exp that follow.
    during_conversion = 3 * qkv + 2 * bool_mask + additive + 2 * allocator_bytes(2)
    during_kernel = 3 * qkv + bool_mask + additive + qkv + _activation_bytes(batch, heads, length, element=4)
    assert during_conversion > during_kernel
    assert accounting.ledger.peak == during_conversion


def _two_tanh_block(linear: nn.Linear):
    def block(x):
        return torch.tanh(torch.tanh(linear(x)))

    return block


@pytest.mark.parametrize("checkpointed", [False, True])
def test_checkpointing_keeps_only_block_inputs(checkpointed):
    # n blocks tanh(tanh(W x)) with frozen W and an input that needs grad. Without checkpointing each block saves
    # both tanh outputs (2n activations); with each block checkpointed only its input is kept (the first block's is
    # x0 itself) and the last output dies once the scalar loss is taken: live after forward is x0 + (n-1).
    from torch.utils.checkpoint import checkpoint

    dim, rows, blocks = 128, 16, 5
    with torch.device(META):
        linears = [nn.Linear(dim, dim, bias=False).requires_grad_(False) for _ in range(blocks)]
    accounting = MemoryAccounting()
    for linear in linears:
        accounting.adopt(linear)
    weights = blocks * dim * dim * 4
    activation = _activation_bytes(rows, dim)
    with accounting.active(*linears):
        x = x0 = torch.empty(rows, dim, device=META, requires_grad=True)
        for linear in linears:
            block = _two_tanh_block(linear)
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        loss = x.sum()
        del x
        after_forward = accounting.ledger.current
    scalar = allocator_bytes(4)
    if checkpointed:
        assert after_forward == weights + blocks * activation + scalar  # x0 and the inputs of blocks 2..n
    else:
        assert after_forward == weights + (1 + 2 * blocks) * activation + scalar
    del loss, x0


def test_tiny_transformer_plans(tiny_model):
    inference = plan_memory("tiny", frames=9, height=64, width=64, batch=2)
    lora = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="lora:4")
    checkpointed = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="lora:4", checkpointing=True)
    # the tiny models load in float32 (as `trace` and `load_transformer` give them), so plan them in float32 too
    weights = sum(allocator_bytes(p.numel() * 4) for p in tiny_model.parameters())
    buffers = sum(allocator_bytes(b.numel() * 4) for b in tiny_model.buffers())
    assert inference.to_json()["breakdown"]["weights"] == weights + buffers
    assert inference.peak_bytes > weights + buffers
    assert lora.to_json()["breakdown"]["optimizer"] > 0  # AdamW moments of the adapters
    assert checkpointed.peak_bytes < lora.peak_bytes
    assert "backward" in checkpointed.to_json()["peak_at"]
    assert "recomputing" in checkpointed.to_json()["peak_at"]
    assert tiny_model.transformer_blocks[0].attn1.to_q.weight.device.type == "cpu"  # the caller's model untouched


def test_fits_and_suggestions():
    plan = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="lora:4", gpu_memory=10_000)
    document = plan.to_json()
    assert document["fits"] is False
    # neither alone nor both together fit 10 kB: both are tried, and said to be too large
    assert [s["switch"] for s in document["suggestions"]] == ["--checkpointing", "--batch 1", "--checkpointing --batch 1"]
    assert not any(s["fits"] for s in document["suggestions"])
    roomy = plan_memory("tiny", frames=9, height=64, width=64, batch=2, gpu_memory="1GiB")
    assert roomy.fits is True and roomy.suggestions == ()


@pytest.mark.slow
def test_a_combination_that_fits_is_suggested_when_no_single_switch_does():
    """Checkpointing alone and batch 1 alone are too large for this card; the two together fit (issue 22)."""
    singles = {switch: plan_memory("tiny", frames=9, height=64, width=64, train="lora:4", **options).peak_bytes
               for switch, options in (("--checkpointing", {"checkpointing": True, "batch": 2}),
                                       ("--batch 1", {"batch": 1}))}
    both = plan_memory("tiny", frames=9, height=64, width=64, batch=1, train="lora:4", checkpointing=True).peak_bytes
    card = (both + min(singles.values())) // 2
    assert both <= card < min(singles.values())
    plan = plan_memory("tiny", frames=9, height=64, width=64, batch=2, train="lora:4", gpu_memory=card)
    assert [(s.switch, s.peak_bytes, s.fits) for s in plan.suggestions] == [
        ("--checkpointing", singles["--checkpointing"], False), ("--batch 1", singles["--batch 1"], False),
        ("--checkpointing --batch 1", both, True)]


@pytest.mark.slow  # two VAE decodes planned op by op: about 5 s
def test_vae_decode_tiling_lowers_the_peak():
    from diffusers import AutoencoderKLCogVideoX

    config = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, latent_channels=4, layers_per_block=1,
                  sample_height=64, sample_width=64)
    with torch.device(META):
        vae = AutoencoderKLCogVideoX(**config).to(torch.bfloat16)
    whole = plan_vae_decode(vae, (1, 4, 5, 16, 16))
    tiled = plan_vae_decode(vae, (1, 4, 5, 16, 16), tiling=True)
    vae_weights = sum(allocator_bytes(p.numel() * 2) for p in vae.parameters())
    output = _activation_bytes(1, 3, 17, 128, 128, element=2)  # 5 latent frames → 17 frames, 8× spatially
    assert whole.peak_bytes > vae_weights + output
    assert tiled.peak_bytes < whole.peak_bytes
    assert whole.breakdown["vae"] == whole.peak_bytes


def test_published_vae_configs_ship():
    from cogsurgeon.inspector.model_specs import PUBLISHED_SPECS
    from cogsurgeon.inspector.plan import vae_config

    for spec in PUBLISHED_SPECS:
        config = vae_config(spec)
        assert config["_class_name"] == "AutoencoderKLCogVideoX"
        assert config["latent_channels"] == 16 and config["block_out_channels"] == [128, 256, 256, 512]
        assert config["invert_scale_latents"] is spec.startswith("cogvideox1.5")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_json(cli):
    result = cli("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", "--train", "lora:4",
                 "--gpu-memory", "1GiB", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["breakdown"]) >= {"weights", "activations", "attention", "gradients", "optimizer", "vae"}
    assert document["fits"] is True and document["suggestions"] == []
    assert document["peak_bytes"] == sum(document["breakdown"].values())
    assert document["peak_at"] and document["peak_phase"] == "transformer training step (lora:4)"


@pytest.mark.parametrize("args, message", [
    (("--height", "65"), "not a multiple of 16"),
    (("--train", "lora:x"), "--train 'lora:x': expected lora:RANK"),
    (("--gpu-memory", "lots"), "--gpu-memory 'lots': expected a size"),
    (("--batch", "0"), "batch"),
    (("--checkpointing",), "training"),
    (("--tiling",), "--vae"),
    (("--vae",), "published"),
    (("--vae", "--train", "lora:4"), "--vae"),
    (("--dtype", "int8"), "dtype"),
])
def test_cli_bad_input_is_one_line_exit_2(cli, args, message):
    result = cli("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


# Issue 24 item 7: plan_memory's errors name its keyword arguments; the CLI names its flags for the same mistakes.
PYTHON_AND_CLI_MESSAGES = [
    (dict(gpu_memory="lots"), "gpu_memory='lots': expected a size",
     ["--gpu-memory", "lots"], "--gpu-memory 'lots': expected a size"),
    (dict(train="lora:x"), "train='lora:x': expected lora:RANK",
     ["--train", "lora:x"], "--train 'lora:x': expected lora:RANK"),
    (dict(train="lora:4", mixed_precision="fp8"), "mixed_precision='fp8': expected one of no, fp16, bf16",
     ["--train", "lora:4", "--mixed-precision", "fp8"], "--mixed-precision 'fp8': expected one of no, fp16, bf16"),
    (dict(train="lora:4", lora_dtype="int8"), "lora_dtype='int8': expected one of",
     ["--train", "lora:4", "--lora-dtype", "int8"], "--lora-dtype 'int8': expected one of"),
    (dict(trainer="nope"), "trainer='nope': unknown trainer",
     ["--trainer", "nope"], "--trainer 'nope': unknown trainer"),
    (dict(mixed_precision="bf16"),
     "mixed_precision= and lora_dtype= are training settings: plan a training step (train=)",
     ["--mixed-precision", "bf16"],
     "--mixed-precision and --lora-dtype are training settings: plan a training step (--train)"),
    (dict(train="full", lora_dtype="fp32"), "lora_dtype= sets the LoRA adapters' dtype; train='full' has none",
     ["--train", "full", "--lora-dtype", "fp32"], "--lora-dtype sets the LoRA adapters' dtype; --train 'full' has none"),
    (dict(tiling=True), "tiling=True is a VAE switch: add vae=True",
     ["--tiling"], "--tiling is a VAE switch: add --vae"),
    (dict(vae=True, train="lora:4"), "encoded latents: drop vae=True or train=",
     ["--vae", "--train", "lora:4"], "encoded latents: drop --vae or --train"),
    (dict(vae=True), "vae=True needs a published model",
     ["--vae"], "--vae needs a published model"),
    (dict(checkpointing=True), "checkpointing=True saves memory only in training: plan a training step (train=)",
     ["--checkpointing"], "--checkpointing saves memory only in training: plan a training step (--train)"),
]


@pytest.mark.parametrize("kwargs, python_message, args, cli_message", PYTHON_AND_CLI_MESSAGES,
                         ids=[" ".join(case[2]) for case in PYTHON_AND_CLI_MESSAGES])
def test_errors_name_the_keyword_in_python_and_the_flag_on_the_command_line(cli, kwargs, python_message, args,
                                                                            cli_message):
    with pytest.raises(PlanError) as raised:
        plan_memory("tiny", frames=9, height=64, width=64, **kwargs)
    assert python_message in str(raised.value) and "--" not in str(raised.value), raised.value

    result = cli("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", *args)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("cogsurgeon: error: ") and cli_message in line, line


def test_a_vae_config_for_a_model_without_one_names_the_keyword():
    from cogsurgeon.inspector.plan import vae_config

    with pytest.raises(PlanError, match=r"vae=True plans the published models") as raised:
        vae_config("tiny")
    assert "--" not in str(raised.value)


def test_a_front_end_renames_only_the_parameters_it_knows():
    from cogsurgeon.inspector.errors import renamed_parameters

    flags = {"gpu_memory": "--gpu-memory", "vae": "--vae", "lora_dtype": "--lora-dtype"}
    assert renamed_parameters("gpu_memory='lots': expected", flags) == "--gpu-memory 'lots': expected"
    assert renamed_parameters("drop vae=True or lora_dtype=", flags) == "drop --vae or --lora-dtype"
    assert renamed_parameters("lora_dtype= and train= are", flags) == "--lora-dtype and train= are"
    assert renamed_parameters("lora_alpha=4, cfg.vae=1", flags) == "lora_alpha=4, cfg.vae=1"
    assert renamed_parameters("/runs/gpu_memory=1/x is not a folder", flags) == "/runs/gpu_memory=1/x is not a folder"
    assert renamed_parameters("(vae=True)", flags) == "(--vae)"
