"""Memory planner: the peak GPU memory of a CogVideoX run (inference, a training step, the VAE decode), found by
running it on the meta device and keeping the books the CUDA caching allocator keeps, before anything is run.

Nothing here is a formula over parameter counts. The run is the real diffusers code on meta tensors, under a
dispatch mode that sees every tensor the GPU would allocate, holds its storage's bytes (rounded up to the
allocator's 512-byte blocks) while the storage lives, and drops them when Python frees it, exactly when eager CUDA
would. Attention is counted by the kernel the GPU would run (flash, or memory-efficient with a mask), not by
the math fallback meta would otherwise take. The ledger itself (`MemoryLedger`) and the size arithmetic are pure;
the torch edges are `plan_transformer`, `plan_vae_decode` and `plan_memory`.
"""

from __future__ import annotations

import re
import weakref
from itertools import combinations
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.deepspeed_zero import ZeroConfig, ZeroStates, zero_states
from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.geometry import TORCH_MAX_BYTES
from cogsurgeon.inspector.trace import format_bytes, module_stack

if TYPE_CHECKING:
    import torch
    from torch import nn

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (`kMinBlockSize` in CUDACachingAllocator);
# `torch.cuda.max_memory_allocated()` counts those blocks.
ALLOCATOR_BLOCK_BYTES = 512

CATEGORIES = ("weights", "inputs", "activations", "attention", "gradients", "optimizer", "vae", "workspace",
              "master_weights", "gradient_buckets")  # the last two: DeepSpeed ZeRO's (plan_memory(zero=...))

# PyTorch gives each (cuBLAS handle, stream) a workspace from the caching allocator on its first matmul and keeps
# it: 4096 KiB × 8 = 32 MiB on sm90 (H100/H200), 4096 KiB × 2 + 16 KiB × 8 on other GPUs (`parseChosenWorkspaceSize`
# in aten/src/ATen/cuda/CublasHandlePool.cpp; `CUBLAS_WORKSPACE_CONFIG` changes it). Handles are per thread, and
# autograd runs CUDA backward on its own device thread: a training step holds two.
CUBLAS_WORKSPACE_BYTES = {"sm90": 4096 * 8 * 1024, "other": 4096 * 1024 * 2 + 16 * 1024 * 8}

# What CogVideo's and diffusers' LoRA trainers target, and their default alpha (the trainers' own defaults).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

# The flash kernel's backward keeps fp32 workspaces it allocates itself (flash_api.cpp `mha_bwd`): `softmax_d`
# (batch, heads, L rounded to 128) and `dq_accum` (batch, L rounded to 128, heads, head_dim rounded to 32).
FLASH_SEQ_ROUND, FLASH_HEAD_DIM_ROUND = 128, 32


class PlanError(CogsurgeonError):
    """A plan request that cannot be met (a bad `train`, `gpu_memory`, size). Its message names `plan_memory`'s
    keyword arguments (`gpu_memory='lots'`, `vae=True`); the CLI and the TUI say them as their flags and controls."""


# ---------------------------------------------------------------------------------------------------------------
# Pure arithmetic


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator books for a request: 0 for an empty tensor, else whole 512-byte blocks."""
    return round_up(max(nbytes, 0), ALLOCATOR_BLOCK_BYTES)


def norm_on_meta(func: Any, args: tuple, kwargs: dict) -> Any:
    """`aten.native_layer_norm`, its backward and `aten.native_group_norm` on meta tensors, made directly: torch's
    meta kernels for them are its Python references (about 1 ms a call: a quarter of a 5B LoRA plan's time, a third
    of a tiled VAE decode's). The same results as those kernels, shape, dtype and strides
    (tests/test_plan_meta_norms.py): layer norm's output contiguous in the input's dtype, its mean and rstd in
    float32 (float64 for a float64 input) with the normalized dimensions kept as 1; the backward's gradients each as
    its input, where the output mask asks for it; group norm's output in the input's memory format and dtype, its
    mean and rstd (N, groups) in the input's dtype. Returns None where it does not apply (a tensor not on meta, a
    call with keywords): the caller then runs the kernel."""
    import torch

    if kwargs or not all(arg.is_meta for arg in args if isinstance(arg, torch.Tensor)):
        return None
    if func is torch.ops.aten.native_group_norm.default:
        source, _, _, batch, _, _, groups, _ = args
        from torch._prims_common import suggest_memory_format

        return (torch.empty(source.shape, dtype=source.dtype, device="meta",
                            memory_format=suggest_memory_format(source)),
                torch.empty((batch, groups), dtype=source.dtype, device="meta"),
                torch.empty((batch, groups), dtype=source.dtype, device="meta"))
    if func is torch.ops.aten.native_layer_norm.default:
        source, normalized_shape = args[0], args[1]
        statistics = (*source.shape[: source.dim() - len(normalized_shape)], *([1] * len(normalized_shape)))
        accumulate = torch.float64 if source.dtype == torch.float64 else torch.float32
        return (torch.empty(source.shape, dtype=source.dtype, device="meta"),
                torch.empty(statistics, dtype=accumulate, device="meta"),
                torch.empty(statistics, dtype=accumulate, device="meta"))
    grad_output, source, _, _, _, weight, bias, output_mask = args
    return (torch.empty(source.shape, dtype=source.dtype, device="meta") if output_mask[0] else None,
            torch.empty(weight.shape, dtype=weight.dtype, device="meta")
            if output_mask[1] and weight is not None else None,
            torch.empty(bias.shape, dtype=bias.dtype, device="meta") if output_mask[2] and bias is not None else None)


_FOREACH_UPDATES: dict[Any, bool] = {}  # aten overload -> whether it is an in-place _foreach_ update


def is_meta_foreach_update(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `func` is an in-place `_foreach_*_` update (it returns nothing and allocates nothing) of meta tensors
    only: the optimizer's moment and parameter updates, which torch's meta kernels check tensor by tensor in Python
    (about a second of a 5B full finetune's plan) and which change nothing a plan counts. A CPU tensor among the
    arguments (Adam's step counts) means no: those updates are real."""
    import torch
    from torch.utils._pytree import tree_leaves

    update = _FOREACH_UPDATES.get(func)
    if update is None:
        name = func.overloadpacket.__name__
        update = _FOREACH_UPDATES[func] = (name.startswith("_foreach_") and name.endswith("_")
                                           and not func._schema.returns)
    if not update:
        return False
    tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    return bool(tensors) and all(tensor.is_meta for tensor in tensors)


def flash_backward_workspace_bytes(batch: int, heads: int, query_length: int, head_dim: int) -> int:
    """The fp32 workspaces the flash-attention backward allocates beside its gradients (see FLASH_SEQ_ROUND)."""
    rows = round_up(query_length, FLASH_SEQ_ROUND)
    softmax_d = allocator_bytes(batch * heads * rows * 4)
    dq_accum = allocator_bytes(batch * rows * heads * round_up(head_dim, FLASH_HEAD_DIM_ROUND) * 4)
    return softmax_d + dq_accum


@dataclass(frozen=True)
class TrainMode:
    """What a training step trains: `lora` adapters of `rank` on the attention projections, or `full`."""

    kind: str  # "lora" | "full"
    rank: int | None = None
    alpha: int | None = None

    def label(self) -> str:
        return f"lora:{self.rank}" if self.kind == "lora" else "full"


def parse_train(text: str | None) -> TrainMode | None:
    """`lora:RANK`, `lora:RANK:ALPHA` or `full` → TrainMode; None → inference; anything else a PlanError."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == "full":
        return TrainMode("full")
    # at most 18 digits: int() of thousands refuses, and a rank past int64 is no tensor torch can make
    match = re.fullmatch(r"lora:(\d{1,18})(?::(\d{1,18}))?", value)
    if not match or int(match.group(1)) < 1:
        raise PlanError(f"train={text[:40]!r}: expected lora:RANK (a positive rank of at most 18 digits, e.g. "
                        "lora:128) or full")
    rank = int(match.group(1))
    return TrainMode("lora", rank, int(match.group(2)) if match.group(2) else rank)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory_size(text: str) -> int:
    """`80GiB`, `80GB`, `80G` (binary, as nvidia-smi and torch report), `81920MiB`, `141e9` → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"gpu_memory={text[:40]!r}: expected a size such as 80GiB, 80GB, 24G or 81920MiB")
    size = float(match.group(1)) * _UNITS[match.group(2)]
    check_card_bytes(size, repr(text[:40]))  # 1e400 is inf; 0.0000001 is 0 bytes
    return int(size)


def check_card_bytes(size: float, given: str) -> None:
    """A card's memory between 1 byte and what torch.cuda reports memory in (int64 bytes)."""
    if not 1 <= size <= TORCH_MAX_BYTES:
        raise PlanError(f"a card's memory of {given} is {size:g} bytes: give one between 1 byte and 2**63 - 1 bytes "
                        "(8 EiB), e.g. 80GiB")


def check_lora_rank(rank: int, config: dict[str, Any], rows: int) -> None:
    """Refuse a LoRA rank whose tensors torch cannot size (int64 bytes, on the meta device too): the adapter weights
    (rank x the attention width) and what they compute ((batch x tokens) x rank), in float32 at most."""
    width = int(config.get("num_attention_heads", 30)) * int(config.get("attention_head_dim", 64))
    if rank * max(width, rows) * 4 > TORCH_MAX_BYTES:
        raise PlanError(
            f"LoRA rank {rank:,} makes tensors of {rank:,} x {max(width, rows):,} elements, more than torch can size; "
            f"ranks above the attention width ({width:,}) add memory but no capacity: plan a smaller rank or full"
        )


def parse_video_size(text: str) -> tuple[int, int, int]:
    """`49x480x720` (or with ×) → (frames, height, width)."""
    parts = re.split(r"\s*[x×,]\s*", str(text).strip().lower())
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise PlanError(f"video size {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 49x480x720")
    frames, height, width = (int(part) for part in parts)
    return frames, height, width


def attention_backend(dtype_name: str, has_mask: bool, head_dim: int) -> str:
    """The SDPA kernel whose allocations the plan books: flash for fp16/bf16 without a mask (head dim ≤ 256), else
    memory-efficient attention (which takes a mask and fp32). Neither materialises L×L scores. torch 2.11 on an
    H200 runs cuDNN attention for CogVideoX's unmasked bf16 shapes instead of flash: the same visible tensors
    (output, log-sum-exp) and a backward workspace of the same size (bench/RESULTS.md, within 0.13 %)."""
    if not has_mask and dtype_name in ("float16", "bfloat16") and head_dim <= 256:
        return "flash"
    return "efficient"


class MemoryLedger:
    """Live allocator bytes by category, with the peak, what was live at the peak, and where the run was then.

    Pure bookkeeping: `allocate(key, bytes, category)` / `free(key)`; `where` is asked for a label only when a new
    peak is reached.
    """

    def __init__(self, where: Callable[[], str] = lambda: "") -> None:
        self.live: dict[int, tuple[int, str]] = {}
        self.totals: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = dict(self.totals)
        self.peak_at = ""
        self.resident = 0  # live bytes at the last reset_peak
        self.where = where

    def allocate(self, key: int, nbytes: int, category: str) -> None:
        if key in self.live:
            return
        self.live[key] = (nbytes, category)
        self.totals[category] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self._mark_peak()

    def free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def recategorize(self, key: int, category: str) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            self.live[key] = (entry[0], category)

    def reserve(self, nbytes: int, category: str) -> int:
        """Book memory that is no tensor of the run (a library's workspace); returns its key for `free`."""
        key = -1 - len(self.live)
        while key in self.live:
            key -= 1
        self.allocate(key, nbytes, category)
        return key

    @contextmanager
    def transient(self, nbytes: int, category: str) -> Iterator[None]:
        """A workspace a kernel allocates and frees inside itself (invisible as a tensor)."""
        key = self.reserve(nbytes, category)
        try:
            yield
        finally:
            self.free(key)

    def reset_peak(self) -> None:
        """As `torch.cuda.reset_peak_memory_stats()`: the peak restarts from what is live now."""
        self.resident = self.current
        self._mark_peak()

    def _mark_peak(self) -> None:
        self.peak = self.current
        self.peak_breakdown = dict(self.totals)
        self.peak_at = self.where()


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PhasePeak:
    """The peak of one phase of a run (the transformer's forward or training step, or the VAE decode)."""

    phase: str
    peak_bytes: int
    breakdown: dict[str, int]
    peak_at: str
    resident_bytes: int = 0  # live when the phase starts (weights, inputs, optimizer state): memory_allocated() then

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Suggestion:
    """A switch that changes the peak, and whether the run then fits the card."""

    switch: str
    peak_bytes: int
    fits: bool | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanSettings:
    """What was planned: a video size, a batch, a dtype, a mode, and the switches."""

    model: str
    frames: int
    height: int
    width: int
    batch: int
    dtype: str
    train: TrainMode | None = None
    checkpointing: bool = False
    patches: tuple[str, ...] = ()
    vae: bool = False
    tiling: bool = False
    mixed_precision: str | None = None  # accelerate's no|fp16|bf16 (training); None: the bare step, no autocast
    lora_dtype: str = "auto"
    trainer: str | None = None
    lora_targets: tuple[str, ...] | str = LORA_TARGET_MODULES
    optimizer: str = "adamw"
    ulysses: int = 1  # Ulysses context parallelism: the peak is per GPU, of `ulysses` (cogsurgeon.parallel)
    zero: ZeroConfig | None = None  # DeepSpeed ZeRO over zero.gpus GPUs: the peak is one GPU's (deepspeed_zero)

    def to_json(self) -> dict[str, Any]:
        targets = self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets)
        return {**asdict(self), "train": self.train.label() if self.train else None, "patches": list(self.patches),
                "lora_targets": targets, "zero": self.zero.to_json() if self.zero else None}


@dataclass(frozen=True)
class MemoryPlan:
    """The peak over a run's phases, its breakdown at that moment, and whether (and how) it fits a card."""

    settings: PlanSettings
    phases: tuple[PhasePeak, ...]
    gpu_memory: int | None = None
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases, key=lambda phase: phase.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.peak_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak_bytes <= self.gpu_memory

    def to_json(self) -> dict[str, Any]:
        peak = self.peak
        return {
            "peak_bytes": peak.peak_bytes,
            "breakdown": dict(peak.breakdown),
            "peak_at": peak.peak_at,  # the module running (or the backward node) when the peak was reached
            "peak_phase": peak.phase,
            "fits": self.fits,
            "gpu_memory": self.gpu_memory,
            "suggestions": [suggestion.to_json() for suggestion in self.suggestions],
            "phases": [phase.to_json() for phase in self.phases],
            "settings": self.settings.to_json(),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------------
# The torch edge: a ledger fed by dispatch, attention by the GPU's kernel, module attribution


class MemoryAccounting:
    """Feeds a MemoryLedger from a meta run: a TorchDispatchMode for every op's outputs, a TorchFunctionMode that
    sends `scaled_dot_product_attention` to the kernel the GPU would use, and forward hooks naming the module that
    runs. Only meta tensors are counted (CPU-side scalars such as AdamW's step stay on the CPU on a GPU run too)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.phase = "forward"
        self.category = "activations"
        self.ledger = MemoryLedger(self._where)
        self._refs: dict[int, weakref.ref] = {}

    def _where(self) -> str:
        import torch

        module = self.stack[-1] if self.stack else ""
        if self.phase == "backward":
            if module:
                return f"backward (recomputing {module})"
            node = torch._C._current_autograd_node()
            return f"backward ({node.name()})" if node is not None else "backward"
        if self.phase != "forward":
            return self.phase
        return module or "(root)"

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Book a meta tensor's storage (once, however many views) until it dies; `category` re-books a known one."""
        if tensor.device.type != "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.ledger.live:
            if category is not None:
                self.ledger.recategorize(key, category)
            return
        ledger = self.ledger
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: (ledger.free(key), self._refs.pop(key, None)))
        ledger.allocate(key, allocator_bytes(storage.nbytes()), category or self.category)

    def share(self, tensor: torch.Tensor, category: str = "weights") -> None:
        """Count a tensor as living inside memory booked elsewhere (a parameter in DeepSpeed's flat buffer): its
        storage is known, at 0 bytes, so that views of it (a weight's `.t()`) are not booked again."""
        key = tensor.untyped_storage()._cdata
        if key not in self.ledger.live:
            self.ledger.allocate(key, 0, category)

    def adopt(self, module: nn.Module, category: str = "weights") -> None:
        """Count a module's parameters and buffers as resident before the run starts (the model is on the GPU)."""
        for tensor in (*module.parameters(), *module.buffers()):
            self.track(tensor, category)

    def result(self, phase: str) -> PhasePeak:
        ledger = self.ledger
        return PhasePeak(phase, ledger.peak, dict(ledger.peak_breakdown), ledger.peak_at, ledger.resident)

    @contextmanager
    def within(self, category: str | None = None, phase: str | None = None) -> Iterator[None]:
        previous = self.category, self.phase
        self.category = category or self.category
        self.phase = phase or self.phase
        try:
            yield
        finally:
            self.category, self.phase = previous

    @contextmanager
    def active(self, *modules: nn.Module) -> Iterator[None]:
        with module_stack(modules, self.stack), self._function_mode(), self._dispatch_mode():
            yield

    def _dispatch_mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        accounting = self
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
        attention_ops = {flash_backward, torch.ops.aten._scaled_dot_product_efficient_attention_backward.default}
        # On CUDA these kernels return their RNG seed and offset as CPU tensors (no dropout): only the output and
        # the log-sum-exp are on the GPU.
        attention_forwards = {torch.ops.aten._scaled_dot_product_flash_attention.default,
                              torch.ops.aten._scaled_dot_product_efficient_attention.default}
        norm_ops = {torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_layer_norm_backward.default,
                    torch.ops.aten.native_group_norm.default}

        class Tracking(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                category = "attention" if func in attention_ops else None
                if func is flash_backward:
                    query = args[1]
                    batch, heads, length, head_dim = query.shape
                    with accounting.ledger.transient(
                        flash_backward_workspace_bytes(batch, heads, length, head_dim), "attention"
                    ):
                        output = func(*args, **kwargs)
                elif is_meta_foreach_update(func, args, kwargs):
                    return None
                else:
                    output = norm_on_meta(func, args, kwargs) if func in norm_ops else None
                    if output is None:
                        output = func(*args, **kwargs)
                on_gpu = output[:2] if func in attention_forwards else output
                with accounting.within(category):
                    for leaf in tree_leaves(on_gpu):
                        if isinstance(leaf, torch.Tensor):
                            accounting.track(leaf)
                return output

        return Tracking()

    def _function_mode(self):
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        accounting = self

        class GpuAttention(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is not F.scaled_dot_product_attention:
                    return func(*args, **kwargs)
                with accounting.within("attention"):
                    return _sdpa_as_on_gpu(*args, **kwargs)

        return GpuAttention()


def _sdpa_as_on_gpu(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """`scaled_dot_product_attention` through the aten kernel the GPU dispatcher picks (`attention_backend`), so
    that the tensors allocated (and saved for backward) are the kernel's: output and log-sum-exp, no L×L scores.
    A bool mask is turned into an additive one in the query's dtype first, as SDPA does on CUDA."""
    import torch

    dtype_name = str(query.dtype).removeprefix("torch.")
    backend = attention_backend(dtype_name, attn_mask is not None, query.shape[-1])
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # As SDPA's `convert_boolean_attn_mask` does it on the GPU.
        attn_mask = torch.where(attn_mask.logical_not(), float("-inf"),
                                torch.scalar_tensor(0.0, dtype=query.dtype, device=attn_mask.device))
    if attn_mask is not None:
        # The memory-efficient kernel needs the bias' last dimension aligned to 16 (sdp_utils `preprocess_mask`).
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        last = attn_mask.shape[-1]
        if last % 16:
            attn_mask = torch.nn.functional.pad(attn_mask, (0, 16 - last % 16))[..., :last]
    needs_grad = query.requires_grad or key.requires_grad or value.requires_grad
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad and torch.is_grad_enabled(), dropout_p, is_causal, scale=scale
    )[0]


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision as accelerate runs it: torch's CUDA autocast, emulated at the torch-function level on meta

# accelerate's `mixed_precision` names → the autocast dtype; `--lora-dtype` names → the adapters' dtype.
MIXED_PRECISION = {"no": None, "fp16": "float16", "bf16": "bfloat16"}
LORA_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# torch's CUDA autocast policy, op by op: the AT_FORALL_* lists of aten/src/ATen/autocast_mode.h (torch 2.4-2.13
# agree on every op CogVideoX runs; tests/test_plan_mixed_precision.py compares these with the installed header).
AUTOCAST_LOWER_PRECISION_OPS = frozenset((
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution",
    "cudnn_convolution_transpose",
))
AUTOCAST_FP32_OPS = frozenset((
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
))
AUTOCAST_FP32_SET_OPT_DTYPE_OPS = frozenset((
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum",
))
AUTOCAST_PROMOTE_OPS = frozenset((
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
))
# Python spellings of those ops (operators, reflected operators)
_OPERATOR_OPS = {"__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow"}


def autocast_policy(name: str) -> str | None:
    """The CUDA autocast policy of a torch function by name: `lower`, `fp32`, `fp32_set_opt_dtype`, `promote`, or
    None (runs in its inputs' dtypes). In-place variants are not autocast (torch registers out-of-place ops only)."""
    name = _OPERATOR_OPS.get(name, name)
    if name in AUTOCAST_LOWER_PRECISION_OPS:
        return "lower"
    if name in AUTOCAST_FP32_OPS:
        return "fp32"
    if name in AUTOCAST_FP32_SET_OPT_DTYPE_OPS:
        return "fp32_set_opt_dtype"
    if name in AUTOCAST_PROMOTE_OPS:
        return "promote"
    return None


def _autocast_eligible(value: Any) -> bool:
    """`is_autocast_eligible` for CUDA: a floating tensor on the GPU (meta stands for it here), not float64."""
    import torch

    return (isinstance(value, torch.Tensor) and value.device.type == "meta" and value.is_floating_point()
            and value.dtype != torch.float64)


class CudaAutocast:
    """torch's CUDA autocast on meta tensors, which carry no autocast dispatch key (and fake CUDA tensors cannot run
    autograd on a CPU-only torch): a TorchFunctionMode that casts each op's arguments by `autocast_policy`, above
    autograd as the C++ autocast is, so that autograd records the casts and saves the cast tensors as on the GPU.

    The autocast state is carried by torch's own CPU autocast flags (`torch.autocast("cpu", dtype=...)`): then
    torch.utils.checkpoint captures it at the forward and re-enters it for the recomputation, and the outermost
    exit clears the cast cache, as on CUDA. No CPU tensor of a plan is counted, so CPU autocast itself changes
    nothing that is booked. The cast cache is torch's (`cached_cast`): fp32 → lower-precision casts of leaf tensors
    that require grad (fp32 adapters, fp32 weights being trained), kept until the outermost autocast exits.
    """

    def __init__(self) -> None:
        self.cache: dict[int, Any] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        import torch

        real_clear = torch.clear_autocast_cache

        def clear_autocast_cache() -> None:  # torch.autocast.__exit__ calls it when the outermost autocast exits
            self.cache.clear()
            real_clear()

        torch.clear_autocast_cache = clear_autocast_cache
        try:
            with self._mode():
                yield
        finally:
            torch.clear_autocast_cache = real_clear
            self.cache.clear()

    def cast(self, value: Any, dtype: torch.dtype) -> Any:
        import torch

        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(item, dtype) for item in value)
        if not _autocast_eligible(value) or value.dtype == dtype:
            return value
        cacheable = (dtype != torch.float32 and value.dtype == torch.float32 and value.requires_grad
                     and value.is_leaf and not value._is_view() and torch.is_autocast_cache_enabled())
        if not cacheable:
            return value.to(dtype)
        if id(value) not in self.cache:
            self.cache[id(value)] = (value, value.to(dtype))
        return self.cache[id(value)][1]

    def _mode(self):
        import torch
        from torch.overrides import TorchFunctionMode

        autocast = self

        class Autocast(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not torch.is_autocast_enabled("cpu"):
                    return func(*args, **kwargs)
                policy = autocast_policy(getattr(func, "__name__", ""))
                if policy is None:
                    return func(*args, **kwargs)
                if policy == "fp32_set_opt_dtype":
                    first = args[0] if args else None
                    if _autocast_eligible(first) and kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                    return func(*args, **kwargs)
                if policy == "lower":
                    dtype = torch.get_autocast_dtype("cpu")
                elif policy == "fp32":
                    dtype = torch.float32
                else:  # promote: the widest floating dtype among the eligible arguments
                    floats = [value.dtype for value in (*args, *kwargs.values()) if _autocast_eligible(value)]
                    dtype = torch.float32 if torch.float32 in floats else floats[0] if floats else None
                    if dtype is None:
                        return func(*args, **kwargs)
                args = tuple(autocast.cast(value, dtype) for value in args)
                kwargs = {key: autocast.cast(value, dtype) for key, value in kwargs.items()}
                return func(*args, **kwargs)

        return Autocast()


@contextmanager
def cuda_autocast_state(dtype: torch.dtype | None) -> Iterator[None]:
    """Enter (or, with None, leave off) the planned run's CUDA autocast, as `torch.autocast("cuda", dtype)` would:
    the state that `CudaAutocast` reads (see there why the CPU flags carry it)."""
    import torch

    if dtype is None:
        yield
        return
    with torch.autocast("cpu", dtype=dtype):
        if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != dtype:
            # older torch releases refuse fp16 on the CPU's autocast (a warning, then autocast off)
            raise PlanError(f"this torch {torch.__version__} cannot carry a {dtype} autocast state for the plan: "
                            "plan mixed_precision= with torch 2.4 or newer")
        yield


def prepare_forward_as_accelerate(model: nn.Module, mixed_precision: str) -> None:
    """What `Accelerator.prepare(model)` does to the forward under fp16/bf16 on one GPU: autocast around it, the
    outputs converted to fp32 after it (accelerate's own `convert_outputs_to_fp32`)."""
    import functools

    import torch
    from accelerate.utils import convert_outputs_to_fp32

    if MIXED_PRECISION[mixed_precision] is None:
        return
    dtype = getattr(torch, MIXED_PRECISION[mixed_precision])
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with cuda_autocast_state(dtype):
            return forward(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(autocast_forward)


class PlannedAccelerator:
    """The parts of accelerate's `Accelerator` a training step calls, for a meta run: `backward` (the loss scaled by
    the GradScaler under fp16: a fp32 scalar) and `clip_grad_norm_` (gradients unscaled in place first, then
    torch's clip_grad_norm_). On the GPU the bench passes the real Accelerator to the same step."""

    def __init__(self, mixed_precision: str) -> None:
        self.scaled = mixed_precision == "fp16"

    def backward(self, loss: torch.Tensor) -> None:
        import torch

        if self.scaled:
            loss = loss * torch.full((), 65536.0, device=loss.device)
        _backward_keeping_modes(loss)

    def clip_grad_norm_(self, parameters: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        import torch

        parameters = list(parameters)
        if self.scaled:  # GradScaler.unscale_: in place, by a fp32 scalar
            inverse = torch.full((), 1 / 65536.0, device="meta")
            with torch.no_grad():
                for parameter in parameters:
                    if parameter.grad is not None:
                        parameter.grad.mul_(inverse)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def accelerate_training_step(model: nn.Module, inputs: Mapping[str, Any], target: torch.Tensor,
                             optimizer: torch.optim.Optimizer, accelerator: Any,
                             trainable: Sequence[torch.nn.Parameter], *,
                             phase: Callable[..., Any] | None = None, max_grad_norm: float = 1.0) -> None:
    """One step as the diffusers/CogVideo trainers take it under accelerate: the prepared (autocast) forward, the
    loss in fp32 (their `torch.mean((pred - target) ** 2 ...)`), `accelerator.backward`, gradient clipping, the
    optimizer step, gradients set to None. The planner runs it with a `PlannedAccelerator`, the GPU bench with the
    real Accelerator."""
    import torch

    phase = phase or (lambda category=None, name=None: nullcontext())
    prediction = model(**inputs, return_dict=False)[0]
    loss = torch.mean(((prediction.float() - target.float()) ** 2).reshape(prediction.shape[0], -1), dim=1).mean()
    del prediction
    with phase(None, "backward"):
        accelerator.backward(loss)
    del loss
    with phase("optimizer", "optimizer step"):
        if max_grad_norm:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def training_input_dtype(dtype: torch.dtype, mixed_precision: str | None) -> torch.dtype:
    """The latents' dtype in a training step: the weights' dtype, except that fp32 weights under mixed precision
    take latents in the VAE's (autocast) dtype, as the trainers encode them."""
    import torch

    lower = MIXED_PRECISION.get(mixed_precision or "no")
    if dtype == torch.float32 and lower is not None:
        return getattr(torch, lower)
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# Trainer presets: each trainer's LoRA set-up as its code runs it (file:line in the trainer's repository)


@dataclass(frozen=True)
class FullFinetune:
    """How one trainer runs a full finetune (SFT) of the transformer: without DeepSpeed, the weights' dtype and
    accelerate's autocast; with it, the ZeRO config its launch uses by default (`zero`, None: no DeepSpeed) and its
    configs for other stages, DeepSpeed's training dtype (the engine casts the model to it, and accelerate adds no
    autocast under DeepSpeed); the optimizer, gradient checkpointing, and where its code says so."""

    dtype: str
    mixed_precision: str
    optimizer: str
    checkpointing: bool
    source: str
    zero: ZeroConfig | None = None
    other_stages: tuple[ZeroConfig, ...] = ()
    deepspeed_dtype: str = "bfloat16"

    def zero_config(self, stage: int) -> ZeroConfig:
        """The trainer's config for a ZeRO stage, or DeepSpeed's defaults for a stage it ships none for."""
        for config in (self.zero, *self.other_stages):
            if config is not None and config.stage == stage:
                return config
        return ZeroConfig(stage)


@dataclass(frozen=True)
class TrainerPreset:
    """How one trainer sets a LoRA run up: weights' dtype, accelerate's mixed precision (`no`: no autocast), the
    adapters' dtype, targets, default rank/alpha, optimizer, gradient checkpointing, and where its code says so;
    `full`, its full finetune (None, with `no_full` saying why, for a trainer that has none)."""

    name: str
    dtype: str
    mixed_precision: str
    lora_dtype: str
    rank: int
    alpha: int
    targets: tuple[str, ...] | str
    optimizer: str  # "adamw" | "adam" (torch, foreach: the same two moments per trained parameter)
    checkpointing: bool
    source: str
    full: FullFinetune | None = None
    no_full: str = ""

    def train_mode(self) -> TrainMode:
        return TrainMode("lora", self.rank, self.alpha)


FFN_AND_ATTENTION = r"(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0|ff.net.0.proj|ff.net.2)"

TRAINER_PRESETS: dict[str, TrainerPreset] = {preset.name: preset for preset in (
    TrainerPreset(
        "cogvideo-finetune", "float32", "bf16", "fp32", 128, 64, LORA_TARGET_MODULES, "adamw", True,
        "THUDM/CogVideo finetune/ (e519ece): transformer from_pretrained without torch_dtype, so fp32 "
        "(models/cogvideox_t2v/lora_trainer.py:38-40; bf16 only after a validation, trainer.py:654); "
        "--mixed_precision bf16 (train_ddp_t2v.sh:36); LoRA cast to fp32 (trainer.py:266); rank 128, alpha 64, "
        "to_q/to_k/to_v/to_out.0, adamw, gradient_checkpointing True, max_grad_norm 1.0 (schemas/args.py:53-77)",
        full=FullFinetune(
            "float32", "bf16", "adamw", True,
            "THUDM/CogVideo finetune/ (e519ece): train_zero_t2v.sh:11 --training_type sft (the SFT trainer is the "
            "LoRA one, models/cogvideox_t2v/sft_trainer.py:5-6, all of the transformer trained, trainer.py:240-241) "
            "launched with accelerate_config.yaml: DeepSpeed (:10) over 8 GPUs (:4) with configs/zero2.yaml (:8): "
            "bf16 (zero2.yaml:2-4), AdamW torch_adam (:5-13), stage 2, allgather_bucket_size 2e8, overlap_comm, "
            "reduce_bucket_size 5e8, contiguous_gradients (:23-31); configs/zero3.yaml for stage 3 (reduce 5e8, "
            "prefetch 5e8, persistence 1e5, sub_group 1e9, max_live 1e9, :23-36); the fp32 transformer "
            "(lora_trainer.py:38-40, trainer.py:266) is cast to bf16 by DeepSpeed (engine.py:1755-1762); "
            "gradient_checkpointing True (schemas/args.py:69). Without DeepSpeed (train_ddp_t2v.sh): fp32 weights "
            "under bf16 autocast (:36)",
            zero=ZeroConfig(2, gpus=8, reduce_bucket_size=500_000_000, allgather_bucket_size=200_000_000,
                            overlap_comm=True, contiguous_gradients=True),
            other_stages=(ZeroConfig(3, gpus=8, reduce_bucket_size=500_000_000, overlap_comm=True,
                                     contiguous_gradients=True, prefetch_bucket_size=500_000_000,
                                     param_persistence_threshold=100_000, max_live_parameters=1_000_000_000,
                                     sub_group_size=1_000_000_000),))),
    TrainerPreset(
        "diffusers-scripts", "float16", "fp16", "fp32", 64, 64, LORA_TARGET_MODULES, "adam", False,
        "huggingface/diffusers examples/cogvideo (58eb52c): README.md:147-176 runs train_cogvideox_lora.py on "
        "CogVideoX-2b with --rank 64 --lora_alpha 64 --mixed_precision fp16 --optimizer Adam, batch 1, without "
        "--gradient_checkpointing (train_cogvideox_lora.py:290, off unless given); the 2B loads in fp16 "
        "(:1056-1060) and moves in the mixed-precision dtype (:1083-1109), LoRA upcast to fp32 under fp16 "
        "(:1196-1198), targets to_k/to_q/to_v/to_out.0 (:1120), max_grad_norm 1.0 (:371)",
        no_full="its examples/cogvideo has LoRA scripts only (train_cogvideox_lora.py, "
                "train_cogvideox_image_to_video_lora.py)"),
    TrainerPreset(
        "cogvideox-factory", "bfloat16", "bf16", "auto", 128, 128, LORA_TARGET_MODULES, "adamw", True,
        "a-r-r-o-w/cogvideox-factory training/: weight_dtype from --mixed_precision "
        "(cogvideox/cogvideox_text_to_video_lora.py:336-353), LoRA upcast to fp32 only under fp16 (:453-455), "
        "targets to_k/to_q/to_v/to_out.0 (:373); train_text_to_video_lora.sh:53-62: --rank 128 --lora_alpha 128 "
        "--mixed_precision bf16 --gradient_checkpointing, OPTIMIZERS adamw first (:13)",
        full=FullFinetune(
            "bfloat16", "bf16", "adamw", True,
            "a-r-r-o-w/cogvideox-factory (223add1) training/train_text_to_video_sft.sh: one GPU without DeepSpeed "
            "(:17, accelerate_configs/uncompiled_1.yaml:3,11), CogVideoX-5b (:34), --mixed_precision bf16 (:48), "
            "--gradient_checkpointing (:55), adamw (:13); cogvideox/cogvideox_text_to_video_sft.py: the 5B loads in "
            "bf16 (:291-295), all of it trained (:316) and moved in bf16 (:351), upcast to fp32 only under fp16 "
            "(:419-421), torch.optim.AdamW (cogvideox/utils.py:83-89)")),
    TrainerPreset(
        "finetrainers", "bfloat16", "no", "fp32", 64, 64, FFN_AND_ATTENTION, "adam", False,
        "a-r-r-o-w/finetrainers (f476c37): --transformer_dtype bf16 (finetrainers/args.py:741), no autocast "
        "anywhere in finetrainers/trainer, LoRA cast to fp32 without data sharding "
        "(trainer/sft_trainer/trainer.py:130-136), rank 64, alpha 64 (trainer/sft_trainer/config.py:24-30), "
        "targets attention and feed-forward (docs/args.md:330), --optimizer adam (args.py:815-818), "
        "--gradient_checkpointing off unless given (args.py:800)",
        full=FullFinetune(
            "bfloat16", "no", "adam", False,
            "a-r-r-o-w/finetrainers (f476c37): --training_type full-finetune (args.py:793) keeps the bf16 "
            "transformer (args.py:741; only LoRA is upcast, trainer/sft_trainer/trainer.py:130-136), no autocast, "
            "--optimizer adam (args.py:815-818), no data sharding by default (--dp_shards 1, args.py:717: its FSDP "
            "is not DeepSpeed and is not planned)")),
    TrainerPreset(
        "cogkit", "bfloat16", "no", "bf16", 128, 64, LORA_TARGET_MODULES, "adamw", True,
        "THUDM/CogKit: weights loaded in the mixed_precision dtype, bf16 in quickstart/scripts/t2v/config.yaml "
        "(diffusion/models/cogvideo/cogvideox_t2v/lora_trainer.py:57), DDP without autocast, LoRA cast to that "
        "dtype (finetune/base/base_trainer.py:178), r=128, lora_alpha=64 on to_q/to_k/to_v/to_out.0 "
        "(utils/lora.py:33-38), torch.optim.AdamW (base_trainer.py:244), gradient_checkpointing True "
        "(base/base_args.py:72)",
        full=FullFinetune(
            "bfloat16", "no", "adamw", True,
            "THUDM/CogKit (1633285): training_type sft trains the whole transformer (base_trainer.py:164-166), cast "
            "to the mixed_precision dtype, bf16 (quickstart/scripts/t2v/config.yaml:50; base_trainer.py:178), "
            "strategy DDP by default (config.yaml:25: its FSDP strategies are not DeepSpeed and are not planned), "
            "torch.optim.AdamW (base_trainer.py:244), gradient_checkpointing True (base/base_args.py:72)")),
    TrainerPreset(
        "videox-fun", "bfloat16", "bf16", "auto", 64, 32, "all-linear", "adamw", True,
        "aigc-apps/VideoX-Fun scripts/cogvideox_fun: accelerate --mixed_precision bf16, --gradient_checkpointing, "
        "--rank 64 --network_alpha 32 (train_lora.sh:9-37), weights and LoRA network in bf16 "
        "(train_lora.py:800-805, 837, 872), AdamW unless --use_8bit_adam (:984); its own LoRANetwork on every "
        "Linear of the transformer (videox_fun/utils/lora_utils.py:161-215), planned as PEFT on all-linear",
        full=FullFinetune(
            "float32", "bf16", "adamw", True,
            "aigc-apps/VideoX-Fun (804a425) scripts/cogvideox_fun: README_TRAIN.md:169-186 launches train.py with "
            "DeepSpeed ZeRO-2, config/zero_stage2_config.json: bf16 (:2-4), stage 2, overlap_comm, "
            "contiguous_gradients, sub_group_size 1e9, reduce_bucket_size 5e8 (:9-15); the GPU count is the "
            "launch's (plan it with gpus=); the transformer loads in fp32 (train.py:845-847), every parameter "
            "trained (--trainable_modules '.', train.sh:39; train.py:886-891), torch.optim.AdamW (train.py:1008), "
            "--gradient_checkpointing (train.sh:29); DeepSpeed casts it to bf16 (engine.py:1755-1762). Without "
            "DeepSpeed (README_TRAIN.md:351, train.sh:9): fp32 weights under bf16 autocast",
            zero=ZeroConfig(2, gpus=1, reduce_bucket_size=500_000_000, overlap_comm=True, contiguous_gradients=True,
                            sub_group_size=1_000_000_000))),
)}

# `plan --train` without --trainer: bf16 autocast (accelerate's --mixed_precision bf16) over the weights' dtype
# (bf16 for the published 5B models), adapters left in that dtype: what cogvideox-factory and VideoX-Fun run, and
# the autocast CogVideo finetune runs (its scripts' bf16); the diffusers README runs fp16 on the 2B, finetrainers
# and CogKit train without autocast — their presets say so.
DEFAULT_MIXED_PRECISION = "bf16"


def check_precision_choice(mixed_precision: str | None, lora_dtype: str | None) -> None:
    """`mixed_precision` and `lora_dtype` among accelerate's and PEFT's names (PlanError otherwise)."""
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise PlanError(f"mixed_precision={mixed_precision[:20]!r}: expected one of {', '.join(MIXED_PRECISION)}")
    if lora_dtype is not None and lora_dtype not in LORA_DTYPES:
        raise PlanError(f"lora_dtype={lora_dtype[:20]!r}: expected one of {', '.join(LORA_DTYPES)}")


def trainer_preset(name: str) -> TrainerPreset:
    preset = TRAINER_PRESETS.get(name)
    if preset is None:
        raise PlanError(f"trainer={name[:40]!r}: unknown trainer; known: {', '.join(TRAINER_PRESETS)}")
    return preset


# ---------------------------------------------------------------------------------------------------------------
# The transformer: inference, a training step


def add_lora(model: nn.Module, mode: TrainMode, lora_dtype: str = "auto",
             target_modules: Sequence[str] | str = LORA_TARGET_MODULES) -> None:
    """LoRA adapters as CogVideo's and diffusers' trainers add them (PEFT, attention projections by default),
    created on the model's device (meta: no memory); only the adapters train. `lora_dtype` `auto` leaves them in
    the base layers' dtype (what PEFT creates); `fp32` is diffusers' `cast_training_params(..., torch.float32)`."""
    import torch
    from peft import LoraConfig

    device = next(model.parameters()).device
    model.requires_grad_(False)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    with torch.device(device):
        model.add_adapter(LoraConfig(r=mode.rank, lora_alpha=mode.alpha or mode.rank, init_lora_weights=True,
                                     target_modules=targets))
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if LORA_DTYPES[lora_dtype] is not None:
        dtype = getattr(torch, LORA_DTYPES[lora_dtype])
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)


def prepare_training(model: nn.Module, mode: TrainMode, checkpointing: bool, lora_dtype: str = "auto",
                     target_modules: Sequence[str] | str = LORA_TARGET_MODULES) -> list[torch.nn.Parameter]:
    """Set a model up for training as the trainers do; returns the parameters the optimizer steps."""
    if mode.kind == "lora":
        add_lora(model, mode, lora_dtype, target_modules)
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def make_optimizer(parameters: Sequence[torch.nn.Parameter], name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or Adam, with the trainers' weight decay of 1e-4, which Adam adds to a copy of the gradients) as on
    CUDA: `foreach` (PyTorch's default there), moments in the parameters' dtype."""
    import torch

    if name == "adam":
        return torch.optim.Adam(parameters, lr=1e-4, weight_decay=1e-4, foreach=True)
    return torch.optim.AdamW(parameters, lr=1e-4, foreach=True)


def training_step(model: nn.Module, inputs: Mapping[str, Any], target: torch.Tensor,
                  optimizer: torch.optim.Optimizer, *, phase: Callable[..., Any] | None = None) -> None:
    """One step as the trainers take it: forward, MSE against the target latents, backward, AdamW, grads freed.
    The planner runs this very function on meta and the GPU bench on CUDA; `phase(category, name)` (the planner's
    `MemoryAccounting.within`) labels the parts."""
    import torch.nn.functional as F

    phase = phase or (lambda category=None, name=None: nullcontext())
    prediction = model(**inputs, return_dict=False)[0]
    loss = F.mse_loss(prediction, target)
    del prediction
    with phase(None, "backward"):
        _backward_keeping_modes(loss)
    del loss
    with phase("optimizer", "optimizer step"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _backward_keeping_modes(loss: torch.Tensor) -> None:
    """`loss.backward()` straight into the autograd engine. `Tensor.backward` and `torch.autograd.backward` are torch
    functions: the attention mode would be switched off for all of backward while it handled them, and
    checkpointing's recomputation would then take SDPA's math path on meta (not the GPU's kernel)."""
    import torch
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def training_target(inputs: Mapping[str, Any], config: Mapping[str, Any]) -> torch.Tensor:
    """A target shaped as the transformer's output (the noise latents' channels, not the image latents')."""
    import torch

    hidden_states = inputs["hidden_states"]
    batch, frames, _, height, width = hidden_states.shape
    return torch.empty(batch, frames, config["out_channels"], height, width, dtype=hidden_states.dtype,
                       device=hidden_states.device)


def plan_transformer(model: nn.Module, *, frames: int, height: int, width: int, batch: int = 2,
                     train: TrainMode | None = None, checkpointing: bool = False,
                     mixed_precision: str | None = None, lora_dtype: str = "auto",
                     lora_targets: Sequence[str] | str = LORA_TARGET_MODULES, max_grad_norm: float = 1.0,
                     optimizer: str = "adamw", zero: ZeroConfig | None = None,
                     blas_workspace_bytes: int = CUBLAS_WORKSPACE_BYTES["sm90"]) -> PhasePeak:
    """The peak of one transformer forward (inference, no grad) or one steady-state training step on `model`,
    which must be on the meta device and may be changed (adapters, checkpointing): pass a fresh one.

    `mixed_precision` (accelerate's `no`, `fp16`, `bf16`) plans the step as the trainers take it under accelerate
    (`accelerate_training_step`: autocast around the forward, fp32 outputs and loss, clipping at `max_grad_norm`);
    None plans the bare `training_step` (no autocast, the loss in the model's dtype, no clipping). `lora_dtype`:
    see `add_lora`. `zero` plans a full finetune's step on one GPU of `zero.gpus` under DeepSpeed ZeRO
    (`ZeroEngine`), in the model's dtype without autocast. `blas_workspace_bytes`: cuBLAS' workspace per thread
    that runs matmuls (CUBLAS_WORKSPACE_BYTES)."""
    import torch

    from cogsurgeon.inspector.geometry import pipeline_inputs

    accounting = MemoryAccounting()
    autocast = CudaAutocast()
    trainable = (prepare_training(model, train, checkpointing, lora_dtype, lora_targets)
                 if train is not None else [])
    engine = ZeroEngine(model, trainable, zero, accounting, optimizer) if zero is not None and train else None
    optimizer = make_optimizer(trainable, optimizer) if train is not None and engine is None else None
    if engine is None:
        accounting.adopt(model, "weights")
    for _thread in range(1 if train is None else 2):  # the forward's thread, and autograd's for backward
        accounting.ledger.reserve(blas_workspace_bytes, "workspace")
    hooks = [parameter.register_post_accumulate_grad_hook(
        engine.take_gradient if engine else lambda param: accounting.track(param.grad, "gradients"))
        for parameter in trainable]
    if mixed_precision is not None and engine is None:
        prepare_forward_as_accelerate(model, mixed_precision)
    try:
        with accounting.active(model), autocast.active():
            with accounting.within("inputs"):
                input_dtype = training_input_dtype(model.dtype, mixed_precision) if train else model.dtype
                inputs = pipeline_inputs(model.config, (frames, height, width), batch, dtype=input_dtype,
                                         device=torch.device("meta"))
            if train is None:
                accounting.ledger.reset_peak()
                with torch.no_grad():
                    model(**inputs, return_dict=False)
                return accounting.result("transformer forward")
            # Steady state, as a run's second step: the optimizer's state exists, no gradients are held.
            with accounting.within("optimizer", "optimizer state"):
                if engine is not None:
                    engine.create_states()
                else:
                    for parameter in trainable:
                        parameter.grad = torch.empty_like(parameter)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            with accounting.within("inputs"):
                target = training_target(inputs, model.config)
            accounting.ledger.reset_peak()
            if engine is not None:
                accelerate_training_step(model, inputs, target, engine.optimizer_wrapper, engine, trainable,
                                         phase=accounting.within, max_grad_norm=max_grad_norm)
            elif mixed_precision is None:
                training_step(model, inputs, target, optimizer, phase=accounting.within)
            else:
                accelerate_training_step(model, inputs, target, optimizer, PlannedAccelerator(mixed_precision),
                                         trainable, phase=accounting.within, max_grad_norm=max_grad_norm)
            label = train.label() + (f", ZeRO-{zero.stage} of {zero.gpus} GPU{'s' * (zero.gpus > 1)}" if engine
                                     else "")
            return accounting.result(f"transformer training step ({label})")
    finally:
        for hook in hooks:
            hook.remove()


class _SteppedByTheEngine:
    """accelerate's DeepSpeedOptimizerWrapper: `step` and `zero_grad` do nothing, the engine stepped in backward."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


class ZeroEngine:
    """DeepSpeed's engine and ZeRO optimizer as a meta run sees them, for `accelerate_training_step` in the place of
    accelerate's Accelerator (whose `backward` runs the engine's backward and step under DeepSpeed). The sizes are
    `deepspeed_zero.zero_states`; each is a meta tensor that lives where DeepSpeed's does:

    - before the step: the 16-bit weights (ZeRO-1/2: one padded flat buffer; ZeRO-3: the rank's partitions, the
      persistent parameters and the gathered working set), the fp32 master partition and the optimizer's moments on
      it (the real torch optimizer, stepped once), ZeRO-3's gradient partition and reduce bucket;
    - in backward: ZeRO-1/2's reduce buckets (setup_buckets, freed by the backward's epilogue), ZeRO-2's gradient
      partition; each gradient is copied into a bucket and dropped (ZeRO-2/3), or kept to the step (ZeRO-1);
    - the step (stage_1_and_2.py:2344-2384, stage3.py step): each group's 16-bit gradients flattened, turned fp32,
      the 16-bit ones freed, the optimizer stepped on the fp32 partition, its gradient dropped."""

    def __init__(self, model: nn.Module, trainable: Sequence[torch.nn.Parameter], config: ZeroConfig,
                 accounting: MemoryAccounting, optimizer: str) -> None:
        self.model, self.trainable, self.config, self.accounting = model, list(trainable), config, accounting
        self.optimizer_name = optimizer
        self.optimizer_wrapper = _SteppedByTheEngine()
        self.dtype = next(iter(self.trainable)).dtype
        trained = {id(parameter) for parameter in self.trainable}
        module_numels = [[p.numel() for p in module.parameters(recurse=False) if id(p) in trained]
                         for module in model.modules()]
        self.states: ZeroStates = zero_states(config, [p.numel() for p in self.trainable], module_numels)
        self.gradients: list[torch.Tensor] = []  # ZeRO-1: the 16-bit gradients held to the step
        self.masters: list[torch.Tensor] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.resident: list[torch.Tensor] = []
        frozen = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in trained]
        for tensor in frozen:
            accounting.track(tensor, "weights")
        for parameter in self.trainable:
            if config.stage == 3 and parameter.numel() <= config.param_persistence_threshold:
                accounting.track(parameter, "weights")  # persistent: whole on every GPU
            else:  # inside the flat buffer (ZeRO-1/2) or the gathered working set (ZeRO-3), booked as such
                accounting.share(parameter, "weights")

    def _tensor(self, numel: int, dtype: Any, category: str) -> torch.Tensor:
        import torch

        with self.accounting.within(category):
            return torch.empty(numel, dtype=dtype, device="meta")

    def create_states(self) -> None:
        """What lives from step to step: weights, master partition, optimizer state (ZeRO-3: its gradient buffers)."""
        import torch

        states = self.states
        keep = self.resident.append
        keep(self._tensor(states.weights, self.dtype, "weights"))
        if states.gathered:
            keep(self._tensor(states.gathered, self.dtype, "weights"))
        for numel in states.master_groups:
            master = torch.nn.Parameter(self._tensor(numel, torch.float32, "master_weights"))
            optimizer = make_optimizer([master], self.optimizer_name)
            with self.accounting.within("optimizer"):
                master.grad = torch.empty_like(master)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.masters.append(master)
            self.optimizers.append(optimizer)
        if self.config.stage == 3:
            keep(self._tensor(states.gradient_partition, self.dtype, "gradients"))
            keep(self._tensor(states.bucket_elements, self.dtype, "gradient_buckets"))

    def take_gradient(self, parameter: torch.nn.Parameter) -> None:
        """A gradient just accumulated: ZeRO-1 keeps it to the step; ZeRO-2/3 copy it into a bucket and drop it."""
        if self.config.stage == 1:
            self.accounting.track(parameter.grad, "gradients")
            self.gradients.append(parameter.grad)
        parameter.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        states = self.states
        buckets, held = None, []
        if self.config.stage in (1, 2) and states.bucket_elements:
            buckets = self._tensor(states.bucket_elements, self.dtype, "gradient_buckets")
        if self.config.stage == 2:  # the reduced gradients of this GPU's partition (copy_grads_in_partition)
            held.append(self._tensor(states.gradient_partition, self.dtype, "gradients"))
        _backward_keeping_modes(loss)
        del buckets  # released by the backward's epilogue (stage_1_and_2.py:919-960)
        with self.accounting.within("optimizer", "optimizer step"):
            self._step(held)

    def _step(self, held: list[Any]) -> None:
        import torch

        for master, optimizer in zip(self.masters, self.optimizers):
            flat = self._tensor(master.numel(), self.dtype, "gradients")  # the group's 16-bit gradients, flattened
            with self.accounting.within("gradients"):
                master.grad = flat.to(torch.float32)
            del flat
            held.clear()  # the 16-bit gradients are released once turned fp32 (stage_1_and_2.py:2361-2369)
            self.gradients.clear()
            optimizer.step()
            master.grad = None  # the 16-bit partition is then overwritten from the master, in place

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> None:
        """DeepSpeed clips inside its step, in place on the fp32 partition (`unscale_and_clip_grads`)."""


# ---------------------------------------------------------------------------------------------------------------
# The VAE decode


def vae_config(spec: str) -> dict[str, Any]:
    """The published `AutoencoderKLCogVideoX` config shipped for a published model (inspector/configs/vae)."""
    import json
    from importlib import resources

    from cogsurgeon.inspector.model_specs import PUBLISHED_SPECS

    if spec not in PUBLISHED_SPECS:
        raise PlanError(f"no VAE config for {spec!r}: vae=True plans the published models "
                        f"({', '.join(PUBLISHED_SPECS)})")
    folder = resources.files("cogsurgeon.inspector").joinpath("configs").joinpath("vae")
    return json.loads(folder.joinpath(f"{spec}.json").read_text())


def build_vae_on_meta(config: Mapping[str, Any], dtype: str | torch.dtype) -> nn.Module:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogsurgeon.inspector.loading import _default_dtype, _torch_dtype

    with torch.device("meta"), _default_dtype(_torch_dtype(dtype)):
        return AutoencoderKLCogVideoX.from_config(dict(config)).eval()


def plan_vae_decode(vae: nn.Module, latents_shape: tuple[int, ...], *, tiling: bool = False,
                    resident: Sequence[nn.Module] = ()) -> PhasePeak:
    """The peak of `vae.decode` of latents (batch, channels, frames, height, width) on the meta `vae`; frame-batched
    as diffusers decodes, tiled as `enable_tiling` tiles. `resident` modules (a transformer left on the GPU) count
    as weights."""
    import torch

    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    dtype = next(vae.parameters()).dtype
    accounting = MemoryAccounting()
    for module in resident:
        accounting.adopt(module, "weights")
    accounting.adopt(vae, "vae")
    with accounting.active(vae), accounting.within("vae"), torch.no_grad():
        latents = torch.empty(latents_shape, dtype=dtype, device="meta")
        accounting.ledger.reset_peak()
        vae.decode(latents, return_dict=False)
    return accounting.result("vae decode" + (" (tiled)" if tiling else ""))


def latents_shape(config: Mapping[str, Any], geometry: Any, batch: int) -> tuple[int, ...]:
    """The latents the pipeline decodes: one video per prompt (the guidance half dropped), padding frames dropped."""
    frames = geometry.latent_frames - geometry.padding_frames
    return (batch, int(config.get("out_channels", 16)), frames, geometry.latent_height, geometry.latent_width)


# ---------------------------------------------------------------------------------------------------------------
# The whole plan


def _plan_phases(spec: str | None, config: Mapping[str, Any], settings: PlanSettings) -> tuple[PhasePeak, ...]:
    from cogsurgeon import patches
    from cogsurgeon.inspector.geometry import latent_geometry
    from cogsurgeon.inspector.loading import build_on_meta
    from cogsurgeon.patches.parameters import parse_patch_spec

    model = build_on_meta(dict(config), settings.dtype)
    for spec in settings.patches:  # `NAME` or `NAME:key=value,...`, as `cogsurgeon run --patch` takes them
        name, options = parse_patch_spec(spec)
        patches.apply(model, name, **options)
    from cogsurgeon.parallel.rank_view import one_rank_of  # torch and diffusers: imported when planning

    with one_rank_of(model, settings.ulysses):
        phases = [plan_transformer(model, frames=settings.frames, height=settings.height, width=settings.width,
                                   batch=settings.batch, train=settings.train, checkpointing=settings.checkpointing,
                                   mixed_precision=settings.mixed_precision, lora_dtype=settings.lora_dtype,
                                   lora_targets=settings.lora_targets, optimizer=settings.optimizer,
                                   zero=settings.zero)]
    if settings.vae:
        geometry = latent_geometry(config, settings.frames, settings.height, settings.width)
        vae = build_vae_on_meta(vae_config(spec or ""), settings.dtype)
        # The transformer's batch doubles each video for classifier-free guidance; the pipeline decodes one per video.
        videos = max(settings.batch // 2, 1)
        phases.append(plan_vae_decode(vae, latents_shape(config, geometry, videos), tiling=settings.tiling,
                                      resident=(model,)))
    return tuple(phases)


def candidate_switches(settings: PlanSettings) -> list[tuple[str, PlanSettings]]:
    """The switches that lower the peak, each as the settings it leads to (pure)."""
    candidates = []
    if settings.train is not None and not settings.checkpointing:
        candidates.append(("--checkpointing", replace(settings, checkpointing=True)))
    if settings.vae and not settings.tiling:
        candidates.append(("--tiling", replace(settings, tiling=True)))
    if settings.train is not None and settings.train.kind == "full":
        lora = replace(settings, train=TrainMode("lora", 128, 64), zero=None)
        candidates.append(("--train lora:128" + (" --zero 0" if settings.zero else ""), lora))
    if settings.batch > 1:
        candidates.append((f"--batch {settings.batch // 2}", replace(settings, batch=settings.batch // 2)))
    return candidates


def switch_combinations(settings: PlanSettings, switches: list[tuple[str, PlanSettings]],
                        size: int) -> list[tuple[str, PlanSettings]]:
    """Every `size` of the single `switches` together (pure): their names joined ("--checkpointing --batch 1") and
    the settings each leads to, the changes of each from `settings` applied in turn."""
    combined = []
    for group in combinations(switches, size):
        alternative = settings
        for _, single in group:
            alternative = replace(alternative, **{field.name: getattr(single, field.name) for field in fields(single)
                                                  if getattr(single, field.name) != getattr(settings, field.name)})
        combined.append((" ".join(name for name, _ in group), alternative))
    return combined


def check_zero_choice(zero: int | None, gpus: int | None) -> None:
    """`zero` a ZeRO stage (0: no DeepSpeed) and `gpus` a positive count (PlanError otherwise)."""
    if zero is not None and (isinstance(zero, bool) or zero not in (0, 1, 2, 3)):
        raise PlanError(f"zero={zero!r}: expected a DeepSpeed ZeRO stage, 0 (no DeepSpeed), 1, 2 or 3")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        raise PlanError(f"gpus={gpus!r}: expected a positive number of GPUs")


def _full_finetune(preset: TrainerPreset) -> FullFinetune:
    if preset.full is None:
        raise PlanError(f"trainer={preset.name!r} has no full finetune: {preset.no_full}; plan train='lora:RANK' "
                        "with it, or train='full' with another trainer")
    return preset.full


def _zero_config(train: TrainMode | None, zero: int | None, gpus: int | None,
                 trainer_config: ZeroConfig | None) -> ZeroConfig | None:
    """The ZeRO config planned: the stage asked for (or the trainer's), over `gpus` (or the trainer's, or 1)."""
    stage = zero if zero is not None else trainer_config.stage if trainer_config else 0
    if stage == 0:
        if gpus is not None and gpus > 1:
            raise PlanError(f"gpus={gpus} counts the GPUs DeepSpeed ZeRO shards over: add zero=1, 2 or 3 (without "
                            "ZeRO each GPU holds the whole run, as one GPU does)")
        return None
    if train is None or train.kind != "full":
        raise PlanError(f"zero={stage} shards a full finetune's model states: add train='full'" if train is None else
                        f"zero={stage} is planned for train='full' (under LoRA ZeRO shards only the adapters' "
                        "states): drop zero= or plan train='full'")
    config = trainer_config if trainer_config is not None and trainer_config.stage == stage else ZeroConfig(stage)
    return replace(config, gpus=gpus or config.gpus)


def _deepspeed_dtype(dtype: str | None, mixed_precision: str | None, trainer_dtype: str | None) -> str | None:
    """DeepSpeed's training dtype: the engine casts the model to its bf16/fp16 (fp32 without) and accelerate adds
    no autocast under DeepSpeed, so `dtype` and `mixed_precision` name one thing; given both, they must agree."""
    from cogsurgeon.inspector.loading import _torch_dtype

    named = {"no": "float32", **{key: value for key, value in MIXED_PRECISION.items() if value}}
    from_precision = named.get(mixed_precision) if mixed_precision is not None else None
    if dtype is not None and from_precision is not None:
        if str(_torch_dtype(dtype)).removeprefix("torch.") != from_precision:
            raise PlanError(f"dtype={dtype!r} and mixed_precision={mixed_precision!r} disagree: under zero= DeepSpeed "
                            "trains in one dtype (bf16 or fp16 casts the weights, no autocast): give one")
    return dtype or from_precision or trainer_dtype


def _full_finetune_settings(full: FullFinetune, dtype: str | None, mixed_precision: str | None, zero: int | None,
                            gpus: int | None) -> tuple[str | None, str | None, ZeroConfig | None]:
    """A trainer's full finetune with the flags given beside it: (dtype, mixed precision, ZeRO config)."""
    config = _zero_config(TrainMode("full"), zero, gpus,
                          full.zero_config(zero) if zero else full.zero)
    if config is None:
        return dtype or full.dtype, mixed_precision or full.mixed_precision, None
    return _deepspeed_dtype(dtype, mixed_precision, full.deepspeed_dtype), "no", config


def plan_memory(spec: str | None = None, *, frames: int | None = None, height: int | None = None,
                width: int | None = None, batch: int = 2,
                dtype: str | None = None, train: TrainMode | str | None = None, checkpointing: bool = False,
                patches: Sequence[str] = (), vae: bool = False, tiling: bool = False,
                gpu_memory: int | str | None = None, mixed_precision: str | None = None,
                lora_dtype: str | None = None, trainer: str | None = None, ulysses: int = 1,
                zero: int | None = None, gpus: int | None = None,
                progress: Callable[[str], None] | None = None) -> MemoryPlan:
    """Plan the peak GPU memory of a run of MODEL `spec` at a video size.

    `frames`, `height` and `width` are the video's (frames 4k+1, as the pipelines take them); each left None is the
    model's default size (49x480x720 for CogVideoX, 9x64x64 for the tiny models), as `trace` and `cogsurgeon plan`
    take it. `dtype` None is the dtype the model loads in (bfloat16 for the published models, float32 tiny).
    `batch` is the transformer's batch (2: one video with classifier-free guidance); `train` is None (inference),
    `"lora:RANK"` or `"full"`; `vae` adds the decode of the run's latents with the transformer still resident.
    With `gpu_memory`, says whether it fits and, if not, which single switch would make it fit.

    Training is planned as the trainers run it under accelerate: `mixed_precision` (`no`, `fp16`, `bf16`; default
    bf16, DEFAULT_MIXED_PRECISION), `lora_dtype` (`auto`: the base layers' dtype, `fp32`, `bf16`, `fp16`), or a
    `trainer` preset (TRAINER_PRESETS: its dtype, mixed precision, adapters, rank/alpha, optimizer and
    checkpointing; `train`, `dtype`, `mixed_precision`, `lora_dtype` given beside it override it).
    With `ulysses` N > 1 the run is context-parallel over N GPUs and the peak is one GPU's (each holds the weights).
    `zero` 1, 2 or 3 plans `train='full'` under DeepSpeed ZeRO sharded over `gpus` GPUs (default 1, or the
    trainer's): one GPU's peak, its model states sized as DeepSpeed's code sizes them (`deepspeed_zero`), the
    activations from the meta run; the weights in DeepSpeed's training dtype (`dtype`, or `mixed_precision`'s
    bf16/fp16, or the trainer's), no autocast. `zero=0` plans without DeepSpeed (a trainer's own launch otherwise).
    `progress(message)` is told which configuration is being planned (with `gpu_memory`, several may be: n of N).
    """
    from pathlib import Path

    from cogsurgeon.inspector.geometry import default_video_size, latent_geometry
    from cogsurgeon.inspector.loading import _torch_dtype, find_transformer_folder, import_diffusers, read_config
    from cogsurgeon.inspector.model_specs import builtin_config, builtin_dtype, resolve_spec
    from cogsurgeon.inspector.trace import size_notes

    check_precision_choice(mixed_precision, lora_dtype)
    preset = trainer_preset(trainer) if trainer is not None else None
    train = parse_train(train) if isinstance(train, str) else train
    if train is None and preset is None and (mixed_precision is not None or lora_dtype is not None):
        raise PlanError("mixed_precision= and lora_dtype= are training settings: plan a training step (train=)")
    if train is not None and train.kind == "full" and lora_dtype not in (None, "auto"):
        raise PlanError("lora_dtype= sets the LoRA adapters' dtype; train='full' has none: drop one")
    check_zero_choice(zero, gpus)
    optimizer = preset.optimizer if preset is not None else "adamw"
    if preset is not None:
        train = train or preset.train_mode()
        if train.kind == "full":
            full = _full_finetune(preset)
            dtype, mixed_precision, zero_config = _full_finetune_settings(full, dtype, mixed_precision, zero, gpus)
            checkpointing = checkpointing or full.checkpointing
            optimizer = full.optimizer
        else:
            dtype = dtype or preset.dtype
            checkpointing = checkpointing or preset.checkpointing
            mixed_precision = mixed_precision or preset.mixed_precision
            lora_dtype = lora_dtype or preset.lora_dtype
            zero_config = _zero_config(train, zero, gpus, None)
    else:
        zero_config = _zero_config(train, zero, gpus, None)
        if zero_config is not None:
            dtype, mixed_precision = _deepspeed_dtype(dtype, mixed_precision, None), "no"
    if zero_config is not None and ulysses > 1:
        raise PlanError("ulysses= and zero= together are not planned (context parallelism beside ZeRO's sharding): "
                        "drop one")
    resolved = resolve_spec(spec)
    builtin = resolved.kind in ("published", "tiny")
    if builtin:
        config = builtin_config(resolved.spec)
    else:
        config = read_config(find_transformer_folder(Path(resolved.spec)) / "config.json")
    frames, height, width = (given or default
                             for given, default in zip((frames, height, width), default_video_size(config)))
    geometry = latent_geometry(config, frames, height, width, batch)
    default_dtype = builtin_dtype(resolved.spec) if builtin else "bfloat16"
    dtype_name = str(_torch_dtype(dtype or default_dtype)).removeprefix("torch.")
    if tiling and not vae:
        raise PlanError("tiling=True is a VAE switch: add vae=True")
    if vae and train is not None:
        raise PlanError("vae=True plans the decode after inference; a training step takes encoded latents: drop "
                        "vae=True or train=")
    if vae and resolved.kind != "published":
        raise PlanError(f"vae=True needs a published model (its VAE config ships with cogsurgeon), not "
                        f"{resolved.spec!r}")
    settings = PlanSettings(
        model=resolved.spec, frames=frames, height=height, width=width, batch=batch, dtype=dtype_name,
        train=train, checkpointing=checkpointing, patches=tuple(patches), vae=vae, tiling=tiling,
        mixed_precision=(mixed_precision or DEFAULT_MIXED_PRECISION) if train is not None else None,
        lora_dtype=lora_dtype or "auto", trainer=trainer,
        lora_targets=preset.targets if preset is not None else LORA_TARGET_MODULES,
        optimizer=optimizer, ulysses=ulysses, zero=zero_config,
    )
    if ulysses > 1:
        from cogsurgeon.parallel import check_degree_for_heads

        try:
            check_degree_for_heads(int(config["num_attention_heads"]), ulysses)
        except CogsurgeonError as exc:
            raise PlanError(str(exc)) from None
    if settings.train is not None and settings.train.kind == "lora":
        tokens = int(config.get("max_text_seq_length", 226)) + geometry.token_frames * geometry.tokens_per_frame
        check_lora_rank(settings.train.rank, config, batch * tokens)
    if settings.checkpointing and settings.train is None:
        raise PlanError("checkpointing=True saves memory only in training: plan a training step (train=)")
    card = parse_memory_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if card is not None:
        check_card_bytes(card, repr(card))
    say = progress or (lambda message: None)
    import_diffusers(progress)
    say(f"planning {_run_label(settings)}…")
    phases = _plan_phases(resolved.spec, config, settings)
    plan = MemoryPlan(settings, phases, card, notes=size_notes(config, geometry) + _notes(settings))
    suggestions = []
    if card is not None and not plan.fits:
        # each switch alone; while none fits, every two together, then three...: the fewest switches that fit (and,
        # when even all of them do not, that too)
        singles = candidate_switches(settings)
        for size in range(1, len(singles) + 1):
            tried = []
            alternatives = switch_combinations(settings, singles, size)
            for number, (switch, alternative) in enumerate(alternatives, start=1):
                say(f"{format_bytes(plan.peak_bytes)} does not fit {format_bytes(card)}; trying {number} of "
                    f"{len(alternatives)}: {switch}…")
                peak = max(phase.peak_bytes for phase in _plan_phases(resolved.spec, config, alternative))
                tried.append(Suggestion(switch, peak, peak <= card))
            suggestions += [s for s in tried if size == 1 or s.fits or size == len(singles)]
            if any(s.fits for s in tried):
                break
    return replace(plan, suggestions=tuple(suggestions))


def _run_label(settings: PlanSettings) -> str:
    """`a training step (lora:128) of cogvideox-5b at 49×480×720, batch 1, and the VAE decode`: what is planned."""
    mode = f"a training step ({settings.train.label()})" if settings.train is not None else "inference"
    if settings.zero is not None:
        mode += f" on one GPU of {settings.zero.gpus} under ZeRO-{settings.zero.stage}"
    return (f"{mode} of {settings.model} at {settings.frames}×{settings.height}×{settings.width}, batch "
            f"{settings.batch}" + (" and the VAE decode" if settings.vae else ""))


def _notes(settings: PlanSettings) -> tuple[str, ...]:
    notes = ["counts what PyTorch's allocator hands out (torch.cuda.max_memory_allocated); the CUDA context and "
             "the allocator's cached-but-free blocks come on top (nvidia-smi shows more)"]
    if settings.vae:
        notes.append("the text encoder is not counted: pipelines that keep it on the GPU need its weights too")
    zero = settings.zero
    if settings.train is not None and zero is not None:
        assumed = (f"training planned as DeepSpeed ZeRO-{zero.stage} runs it on one GPU of {zero.gpus}: the weights "
                   f"in {settings.dtype} (the engine's cast), no autocast, fp32 master weights and {settings.optimizer}"
                   f" state on the GPU's 1/{zero.gpus} partition, reduce_bucket_size {zero.reduce_bucket_size:,}, "
                   f"overlap_comm {str(zero.overlaps_communication).lower()}")
        notes.append(assumed + (f" ({settings.trainer}'s set-up)" if settings.trainer else ""))
        notes.append("ZeRO's model states are a model of DeepSpeed's code (0.19: stage_1_and_2.py, stage3.py, "
                     "partition_parameters.py), not a GPU measurement; the activations are the meta run's, as "
                     "without ZeRO")
        notes.append("not counted: CPU/NVMe offload, ZeRO-3's prefetch beyond its bucket, the communication "
                     "library's own buffers (NCCL), the VAE and text encoder a trainer keeps loaded"
                     + ("; ZeRO-1 is planned holding every 16-bit gradient to the step" if zero.stage == 1 else ""))
    elif settings.train is not None:
        assumed = (f"training planned as one GPU runs it under accelerate: mixed precision {settings.mixed_precision}, "
                   f"LoRA dtype {settings.lora_dtype}, {settings.optimizer}, the loss in fp32, clipping at 1.0")
        notes.append(assumed + (f" ({settings.trainer}'s set-up)" if settings.trainer else ""))
        notes.append("not counted: DDP's gradient buckets and FSDP sharding (one GPU's full copy is planned; "
                     "DeepSpeed ZeRO is zero=1, 2 or 3), the VAE and text encoder a trainer keeps loaded")
    return tuple(notes)


__all__ = [
    "AUTOCAST_FP32_OPS", "AUTOCAST_FP32_SET_OPT_DTYPE_OPS", "AUTOCAST_LOWER_PRECISION_OPS", "AUTOCAST_PROMOTE_OPS",
    "CudaAutocast", "DEFAULT_MIXED_PRECISION", "LORA_DTYPES", "LORA_TARGET_MODULES",
    "MIXED_PRECISION", "MemoryAccounting", "MemoryLedger", "PlanError", "PlanSettings", "TRAINER_PRESETS",
    "TrainMode", "accelerate_training_step", "allocator_bytes", "attention_backend", "autocast_policy",
    "build_vae_on_meta", "candidate_switches", "check_precision_choice", "check_zero_choice", "cuda_autocast_state",
    "flash_backward_workspace_bytes", "is_meta_foreach_update", "norm_on_meta", "make_optimizer",
    "parse_memory_size", "parse_train",
    "parse_video_size", "plan_memory", "plan_transformer", "plan_vae_decode", "prepare_training",
    "switch_combinations", "trainer_preset", "training_input_dtype", "training_step", "training_target",
    "vae_config",
]
