"""Issue 25 item 3: `plan --train full` as the trainers run a full finetune, DeepSpeed ZeRO 1/2/3 per GPU.

ZeRO's model states are sized from DeepSpeed's code (inspector/deepspeed_zero.py): checked here in closed form on the
tiny model, against DeepSpeed's own memory estimators (replicated from its source, and called for real when
deepspeed is installed), and through the CLI. No GPU run: none of this is a measurement."""

from __future__ import annotations

import json
import re

import pytest
from torch import nn

from cogsurgeon.inspector.deepspeed_zero import (
    ZeroConfig,
    padded_flat_numel,
    parameter_partition_numel,
    zero3_sub_groups,
    zero_states,
)
from cogsurgeon.inspector.plan import TRAINER_PRESETS, PlanError, allocator_bytes, plan_memory

TINY = dict(frames=9, height=64, width=64, batch=1)
TINY_PARAMETERS = 42_224  # every parameter of the tiny transformer (a full finetune trains them all)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's estimators, as stage_1_and_2.py:3081-3101 and stage3.py:3744-3782 (edaa722) write them, no offload


def estimate_zero2_gpu_bytes(total_params: int, gpus: int) -> int:
    # "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"
    return int(2 * total_params + int(18 * total_params / gpus))


def estimate_zero3_gpu_bytes(total_params: int, largest_layer_params: int, gpus: int) -> int:
    return int(4 * largest_layer_params + int(18 * total_params / gpus))


def test_zero12_pads_the_flat_weights_to_twice_the_gpus_and_partitions_them_equally():
    assert padded_flat_numel(42_224, 4) == 42_224  # divisible by 8: no padding
    assert padded_flat_numel(42_224, 3) == 42_228  # to a multiple of 6
    states = zero_states(ZeroConfig(2, gpus=3), [42_000, 224])
    assert (states.weights, states.master_groups, states.gradient_partition) == (42_228, (14_076,), 14_076)
    assert not states.every_gradient and states.bucket_elements == 500_000_000  # one bucket: overlap_comm off
    stage1 = zero_states(ZeroConfig(1, gpus=3, overlap_comm=True), [42_000, 224])
    assert stage1.gradient_partition == 0 and stage1.every_gradient and stage1.bucket_elements == 1_000_000_000


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_zero2_model_states_are_deepspeeds_estimate(gpus):
    numels = [4096, 8192, 1024, 64]  # 13376: divisible by 2 x 8, so DeepSpeed pads nothing
    states = zero_states(ZeroConfig(2, gpus=gpus), numels)
    assert sum(states.model_state_bytes(2).values()) == estimate_zero2_gpu_bytes(sum(numels), gpus)
    # 12 bytes of fp32 master + Adam moments per parameter, 1/gpus of them on each GPU
    optimizer_side = states.model_state_bytes(2)
    assert optimizer_side["master_weights"] + optimizer_side["optimizer"] == 12 * sum(numels) // gpus


def test_zero3_model_states_are_deepspeeds_estimate_with_the_largest_layers_gradient():
    numels = [4096, 8192, 1024]  # each divisible by 4; nothing persistent, no prefetch
    config = ZeroConfig(3, gpus=4, param_persistence_threshold=0, prefetch_bucket_size=0)
    states = zero_states(config, numels, module_numels=[[4096], [8192], [1024]])
    assert (states.weights, states.gathered, states.persistent) == (3328, 8192, 0)
    # The estimator's 4 bytes of the largest layer are its gathered 16-bit weights (here) and its full 16-bit
    # gradient (made by autograd before ZeRO reduces it: the meta run books it as it is made). Its 18 bytes per
    # parameter and GPU are ZeRO-2's (16-bit and fp32 gradients, fp32 master, two moments): they leave out the
    # 16-bit weights' own partition that ZeRO-3 keeps (`ds_tensor`, partition_parameters.py:1788-1789), which is
    # 2 bytes per parameter and GPU more here.
    ours = sum(states.model_state_bytes(2).values()) + 2 * 8192
    assert ours == estimate_zero3_gpu_bytes(sum(numels), 8192, 4) + 2 * states.weights


def test_zero3_partitions_each_parameter_and_keeps_the_small_ones_whole():
    assert [parameter_partition_numel(numel, 4) for numel in (1, 4, 5, 100_001)] == [1, 1, 2, 25_001]
    states = zero_states(ZeroConfig(3, gpus=4), [100_001, 10, 7], module_numels=[[100_001], [10, 7]])
    assert states.weights == 25_001 + 3 + 2 and states.persistent == 17  # parameter_offload.py:311-323
    assert states.gathered == 100_001  # the largest module, the prefetch bucket capped at what there is to gather
    assert zero3_sub_groups([5, 5, 5], 6) == (10, 5) and zero3_sub_groups([5, 5], 100) == (10,)


def test_the_estimators_replicated_here_are_deepspeeds_own():
    """Calls DeepSpeed's estimators when deepspeed is installed (a CPU install: `pip install deepspeed`)."""
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128), nn.LayerNorm(128))
    total, largest = stage3.model_to_params(model)
    for gpus in (1, 4):
        assert stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total, gpus, cpu_offload=False)[1] == estimate_zero2_gpu_bytes(total, gpus)
        assert stage3.estimate_zero3_model_states_mem_needs(
            total, largest, gpus, cpu_offload=False)[1] == estimate_zero3_gpu_bytes(total, largest, gpus)


# ---------------------------------------------------------------------------------------------------------------
# The plan on the tiny model, in closed form


def test_zero2_plan_books_deepspeeds_states_on_one_gpu_of_three():
    plan = plan_memory("tiny", **TINY, train="full", zero=2, gpus=3, dtype="bfloat16")
    flat, partition = padded_flat_numel(TINY_PARAMETERS, 3), padded_flat_numel(TINY_PARAMETERS, 3) // 3
    assert (flat, partition) == (42_228, 14_076)
    at_peak = plan.peak.breakdown
    assert at_peak["weights"] == allocator_bytes(flat * 2)  # one flat bf16 buffer, padded
    assert at_peak["master_weights"] == allocator_bytes(partition * 4)
    assert at_peak["optimizer"] == 2 * allocator_bytes(partition * 4)  # AdamW's two fp32 moments
    assert at_peak["gradient_buckets"] == allocator_bytes(500_000_000 * 2)  # one reduce bucket, in backward
    assert at_peak["gradients"] >= allocator_bytes(partition * 2)
    assert plan.peak_bytes == sum(at_peak.values())
    assert plan.settings.mixed_precision == "no" and plan.settings.dtype == "bfloat16"
    assert any("not a GPU measurement" in note for note in plan.notes)


def test_zero2_step_holds_the_gradient_partition_its_flat_copy_and_their_fp32_at_once():
    """stage_1_and_2.py:2358-2369: the partition's 16-bit gradients are flattened and turned fp32 before they are
    released; with no reduce bucket the step is the peak. The parameters' own storages are the flat buffer's, so
    nothing of theirs is booked again (a weight's `.t()` view once counted as activations)."""
    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.inspector.model_specs import builtin_config
    from cogsurgeon.inspector.plan import TrainMode, plan_transformer

    model = build_on_meta(builtin_config("tiny"), "bfloat16")
    peak = plan_transformer(model, frames=9, height=64, width=64, batch=1, train=TrainMode("full"),
                            zero=ZeroConfig(2, gpus=1, reduce_bucket_size=0), blas_workspace_bytes=0)
    assert peak.peak_at == "optimizer step"
    partition = padded_flat_numel(TINY_PARAMETERS, 1)
    assert peak.breakdown["weights"] == allocator_bytes(partition * 2)
    assert peak.breakdown["gradients"] == 2 * allocator_bytes(partition * 2) + allocator_bytes(partition * 4)
    assert peak.breakdown["master_weights"] == allocator_bytes(partition * 4)
    assert peak.breakdown["activations"] <= 512  # the loss' scalar at most: no parameter counted twice


def test_more_gpus_shard_the_optimizer_state_further_and_zero3_shards_the_weights():
    two = plan_memory("tiny", **TINY, train="full", zero=2, gpus=2, dtype="bfloat16").peak.breakdown
    eight = plan_memory("tiny", **TINY, train="full", zero=2, gpus=8, dtype="bfloat16").peak.breakdown
    assert eight["optimizer"] < two["optimizer"] and eight["master_weights"] < two["master_weights"]
    assert eight["weights"] == two["weights"]  # ZeRO-2 keeps every 16-bit weight on every GPU
    # one GPU: the stages still hold (a full copy of everything, plus the fp32 master)
    one = plan_memory("tiny", **TINY, train="full", zero=1, gpus=1, dtype="bfloat16").peak.breakdown
    assert one["master_weights"] == allocator_bytes(TINY_PARAMETERS * 4)


# ---------------------------------------------------------------------------------------------------------------
# The trainers' full finetunes, as their code (file:line in each preset) runs them

FULL_FINETUNES = {
    # trainer: (dtype, mixed precision, ZeRO stage, GPUs, optimizer, checkpointing, reduce bucket, allgather bucket)
    "cogvideo-finetune": ("bfloat16", "no", 2, 8, "adamw", True, 500_000_000, 200_000_000),
    "videox-fun": ("bfloat16", "no", 2, 1, "adamw", True, 500_000_000, 500_000_000),
    "cogvideox-factory": ("bfloat16", "bf16", 0, 1, "adamw", True, None, None),
    "finetrainers": ("bfloat16", "no", 0, 1, "adam", False, None, None),
    "cogkit": ("bfloat16", "no", 0, 1, "adamw", True, None, None),
}


@pytest.mark.parametrize("trainer", FULL_FINETUNES)
def test_each_trainers_full_finetune_is_its_launchs(trainer):
    dtype, mixed, stage, gpus, optimizer, checkpointing, reduce_bucket, allgather_bucket = FULL_FINETUNES[trainer]
    settings = plan_memory("tiny", **TINY, trainer=trainer, train="full").settings
    assert (settings.dtype, settings.mixed_precision, settings.optimizer, settings.checkpointing) == (
        dtype, mixed, optimizer, checkpointing)
    zero = settings.zero
    assert (zero.stage, zero.gpus, zero.reduce_bucket_size, zero.allgather_bucket_size) == (
        stage, gpus, reduce_bucket, allgather_bucket) if stage else zero is None
    assert len(re.findall(r":\d+", TRAINER_PRESETS[trainer].full.source)) >= 5  # file:line, for each fact


def test_cogvideos_zero3_config_is_its_own_and_flags_beside_a_trainer_override_it():
    settings = plan_memory("tiny", **TINY, trainer="cogvideo-finetune", train="full", zero=3, gpus=4).settings
    assert (settings.zero.stage, settings.zero.gpus, settings.zero.prefetch_bucket_size) == (3, 4, 500_000_000)
    settings = plan_memory("tiny", **TINY, trainer="videox-fun", train="full", gpus=8, dtype="float16").settings
    assert (settings.zero.stage, settings.zero.gpus, settings.dtype) == (2, 8, "float16")


def test_a_trainer_without_a_full_finetune_refuses_in_one_line():
    assert TRAINER_PRESETS["diffusers-scripts"].full is None
    with pytest.raises(PlanError, match="trainer='diffusers-scripts' has no full finetune: its examples/cogvideo"):
        plan_memory("tiny", **TINY, trainer="diffusers-scripts", train="full")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: PlanError naming the keyword in Python, the flag on the command line, exit 2

BAD = [
    (dict(zero=2), "zero=2 shards a full finetune's model states: add train='full'",
     ["--zero", "2"], "--zero 2 shards a full finetune's model states: add --train 'full'"),
    (dict(zero=2, train="lora:4"), "zero=2 is planned for train='full'",
     ["--zero", "2", "--train", "lora:4"], "--zero 2 is planned for --train 'full'"),
    (dict(zero=5, train="full"), "zero=5: expected a DeepSpeed ZeRO stage, 0 (no DeepSpeed), 1, 2 or 3",
     ["--zero", "5", "--train", "full"], "--zero 5: expected a DeepSpeed ZeRO stage"),
    (dict(gpus=0, zero=2, train="full"), "gpus=0: expected a positive number of GPUs",
     ["--gpus", "0", "--zero", "2", "--train", "full"], "--gpus 0: expected a positive number of GPUs"),
    (dict(gpus=4, train="full"), "gpus=4 counts the GPUs DeepSpeed ZeRO shards over: add zero=1, 2 or 3",
     ["--gpus", "4", "--train", "full"], "--gpus 4 counts the GPUs DeepSpeed ZeRO shards over: add --zero 1, 2 or 3"),
    (dict(zero=2, train="full", dtype="float16", mixed_precision="bf16"),
     "dtype='float16' and mixed_precision='bf16' disagree",
     ["--zero", "2", "--train", "full", "--dtype", "float16", "--mixed-precision", "bf16"],
     "--dtype 'float16' and --mixed-precision 'bf16' disagree"),
    (dict(trainer="diffusers-scripts", train="full"), "trainer='diffusers-scripts' has no full finetune",
     ["--trainer", "diffusers-scripts", "--train", "full"], "--trainer 'diffusers-scripts' has no full finetune"),
]


@pytest.mark.parametrize("kwargs, python_message, args, cli_message", BAD, ids=[" ".join(case[2]) for case in BAD])
def test_bad_zero_input_names_the_keyword_in_python_and_the_flag_on_the_command_line(cli, kwargs, python_message,
                                                                                      args, cli_message):
    with pytest.raises(PlanError) as raised:
        plan_memory("tiny", **TINY, **kwargs)
    assert python_message in str(raised.value) and "--" not in str(raised.value), raised.value
    result = cli("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", *args)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("cogsurgeon: error: ") and cli_message in line, line


def test_zero_beside_ulysses_is_refused_on_the_command_line_in_one_line(cli):
    result = cli("plan", "cogvideox-5b", "--train", "full", "--zero", "2", "--ulysses", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "cogsurgeon: error: --zero and --ulysses together are not planned (context parallelism beside ZeRO's "
        "sharding): drop one"]
    with pytest.raises(PlanError, match=r"^ulysses= and zero= together are not planned"):
        plan_memory("tiny", **TINY, train="full", zero=2, ulysses=2)


def test_cli_json_says_what_was_assumed(cli):
    result = cli("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", "--batch", "1",
                 "--train", "full", "--zero", "3", "--gpus", "4", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    zero = document["settings"]["zero"]
    assert (zero["stage"], zero["gpus"], zero["overlap_comm"], zero["prefetch_bucket_size"]) == (3, 4, True,
                                                                                               50_000_000)
    assert document["breakdown"]["master_weights"] > 0 and document["breakdown"]["gradient_buckets"] > 0
    assert document["peak_bytes"] == sum(document["breakdown"].values())
    assert document["peak_phase"] == "transformer training step (full, ZeRO-3 of 4 GPUs)"
    assert any("model of DeepSpeed's code" in note for note in document["notes"])
