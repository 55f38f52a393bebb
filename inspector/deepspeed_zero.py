"""DeepSpeed ZeRO's model states on one GPU of N: what stages 1, 2 and 3 keep of the weights, the gradients and the
optimizer state, sized as DeepSpeed's own code sizes them (deepspeedai/DeepSpeed edaa722, 0.19.6; file:line below).

Pure arithmetic over parameter counts: the planner (`inspector.plan`) allocates these sizes as tensors of its meta
run, so that they live and die where DeepSpeed's do. It is a model of DeepSpeed's code, not a GPU measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

# `nccl_start_alignment_factor` (stage_1_and_2.py:347): ZeRO-1/2 pad the flat 16-bit weights to a multiple of
# 2 x the GPUs, so that every partition starts 4-byte aligned (:391-393).
NCCL_START_ALIGNMENT_FACTOR = 2


@dataclass(frozen=True)
class ZeroConfig:
    """A `zero_optimization` section: the stage, the GPUs it shards over (data-parallel world size), and the sizes
    that change memory, with DeepSpeed's defaults (runtime/zero/config.py)."""

    stage: int  # 1: optimizer state; 2: + gradients; 3: + parameters
    gpus: int = 1
    reduce_bucket_size: int = 500_000_000  # config.py:113, elements
    allgather_bucket_size: int = 500_000_000  # config.py:132; ZeRO-1/2 gather into the flat weights in place
    overlap_comm: bool | None = None  # config.py:138; None: on for stage 3 only (:383-385)
    contiguous_gradients: bool = True  # config.py:102
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size, config.py:215
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold, config.py:221
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters, config.py:238
    sub_group_size: int = 1_000_000_000  # config.py:175

    @property
    def overlaps_communication(self) -> bool:
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "overlap_comm": self.overlaps_communication}


@dataclass(frozen=True)
class ZeroStates:
    """Elements one GPU holds under a ZeRO stage (the first rank's share, the largest). Weights, gradients and
    buckets are in the training dtype (bf16/fp16: DeepSpeed casts the model), master weights and optimizer state
    in fp32."""

    weights: int  # resident 16-bit weights: the whole padded flat buffer (1/2), the rank's partitions (3)
    persistent: int  # ZeRO-3: parameters small enough to stay whole on every GPU
    gathered: int  # ZeRO-3: parameters gathered while their module runs, with the prefetched ones
    master_groups: tuple[int, ...]  # the rank's fp32 master weights, by the groups the optimizer steps one at a time
    gradient_partition: int  # the rank's reduced 16-bit gradients held to the step (ZeRO-2 in backward; ZeRO-3 always)
    every_gradient: bool  # ZeRO-1: each GPU holds all its 16-bit gradients until the step
    bucket_elements: int  # reduce buckets filled during backward (ZeRO-1/2) or kept (ZeRO-3)

    @property
    def partition(self) -> int:
        return sum(self.master_groups)

    def model_state_bytes(self, weight_bytes: int, adam_moments: int = 2) -> dict[str, int]:
        """Bytes at the optimizer step by what they are, as DeepSpeed's estimators count them (no buckets, no
        allocator rounding): 16-bit weights, fp32 master and optimizer moments, the 16-bit gradient partition, and
        the fp32 gradient of the group being stepped."""
        return {
            "weights": (self.weights + self.persistent + self.gathered) * weight_bytes,
            "master_weights": self.partition * 4,
            "optimizer": adam_moments * self.partition * 4,
            "gradients": self.gradient_partition * weight_bytes,
            "step_gradients": max(self.master_groups, default=0) * 4,
        }


def padded_flat_numel(total: int, gpus: int) -> int:
    """ZeRO-1/2's flat 16-bit weights: every trained parameter end to end, padded to 2 x GPUs elements
    (stage_1_and_2.py:391-393, flattened by `flatten_dense_tensors_aligned` :438-440)."""
    alignment = NCCL_START_ALIGNMENT_FACTOR * gpus
    return -(-total // alignment) * alignment


def parameter_partition_numel(numel: int, gpus: int) -> int:
    """ZeRO-3 partitions each parameter alone, padded to a multiple of the GPUs (partition_parameters.py:1662-1668,
    :1788-1789): ceil(numel / gpus) elements per GPU."""
    return -(-numel // gpus)


def zero3_sub_groups(partition_numels: Sequence[int], sub_group_size: int) -> tuple[int, ...]:
    """The sub-groups ZeRO-3 steps one at a time: partitions taken in order until one reaches `sub_group_size`
    (stage3.py:1160-1183; all in one group when they fit)."""
    if sum(partition_numels) <= sub_group_size:
        return (sum(partition_numels),)
    groups, current = [], 0
    for index, numel in enumerate(partition_numels):
        current += numel
        if current >= sub_group_size or index == len(partition_numels) - 1:
            groups.append(current)
            current = 0
    return tuple(groups)


def zero_states(config: ZeroConfig, parameter_numels: Sequence[int],
                module_numels: Sequence[Sequence[int]] = ()) -> ZeroStates:
    """What one GPU holds for the trained parameters `parameter_numels` (one parameter group, as the trainers pass
    them) under `config`. `module_numels`: each module's own parameters (ZeRO-3 gathers a module's at a time)."""
    gpus = config.gpus
    if config.stage in (1, 2):
        flat = padded_flat_numel(sum(parameter_numels), gpus)
        partition = flat // gpus  # equal partitions: the flat buffer divides by the GPUs (:1966-1984)
        buckets = 0
        if config.contiguous_gradients:  # setup_buckets: one bucket, two with overlap_comm (:2493-2516)
            buckets = config.reduce_bucket_size * (2 if config.overlaps_communication else 1)
        return ZeroStates(weights=flat, persistent=0, gathered=0, master_groups=(partition,),
                          gradient_partition=partition if config.stage == 2 else 0,
                          every_gradient=config.stage == 1, bucket_elements=buckets)
    if config.stage != 3:
        raise ValueError(f"ZeRO stage {config.stage}: expected 1, 2 or 3")
    partitions = [parameter_partition_numel(numel, gpus) for numel in parameter_numels]
    # mark_persistent_parameters (parameter_offload.py:311-323): parameters of at most the threshold stay gathered
    persistent = sum(numel for numel in parameter_numels if numel <= config.param_persistence_threshold)
    gathered_modules = [sum(numel for numel in numels if numel > config.param_persistence_threshold)
                        for numels in module_numels]
    # The module running is gathered whole; the prefetcher fetches ahead up to its bucket; the live total is capped
    # (and is never more than the parameters there are to gather).
    gathered = min(max(gathered_modules, default=0) + config.prefetch_bucket_size, config.max_live_parameters,
                   sum(parameter_numels) - persistent)
    return ZeroStates(weights=sum(partitions), persistent=persistent, gathered=gathered,
                      master_groups=zero3_sub_groups(partitions, config.sub_group_size),
                      gradient_partition=sum(partitions),  # grad_partitions_flat_buffer (stage3.py:742-744)
                      every_gradient=False,
                      bucket_elements=config.reduce_bucket_size if config.contiguous_gradients else 0)  # :731-735


__all__ = [
    "ZeroConfig", "ZeroStates", "padded_flat_numel", "parameter_partition_numel", "zero3_sub_groups", "zero_states",
]
