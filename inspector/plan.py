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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.geometry import TORCH_MAX_BYTES
from cogsurgeon.inspector.trace import module_stack

if TYPE_CHECKING:
    import torch
    from torch import nn

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (`kMinBlockSize` in CUDACachingAllocator);
# `torch.cuda.max_memory_allocated()` counts those blocks.
ALLOCATOR_BLOCK_BYTES = 512

CATEGORIES = ("weights", "inputs", "activations", "attention", "gradients", "optimizer", "vae", "workspace")

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
    """A plan request that cannot be met (bad `--train`, `--gpu-memory`, size)."""


# ---------------------------------------------------------------------------------------------------------------
# Pure arithmetic


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator books for a request: 0 for an empty tensor, else whole 512-byte blocks."""
    return round_up(max(nbytes, 0), ALLOCATOR_BLOCK_BYTES)


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
        raise PlanError(f"training mode {text[:40]!r}: expected lora:RANK (a positive rank of at most 18 digits, e.g. "
                        "lora:128) or full")
    rank = int(match.group(1))
    return TrainMode("lora", rank, int(match.group(2)) if match.group(2) else rank)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory_size(text: str) -> int:
    """`80GiB`, `80GB`, `80G` (binary, as nvidia-smi and torch report), `81920MiB`, `141e9` → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"GPU memory {text[:40]!r}: expected a size such as 80GiB, 80GB, 24G or 81920MiB")
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

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "train": self.train.label() if self.train else None, "patches": list(self.patches)}


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
                else:
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
# The transformer: inference, a training step


def add_lora(model: nn.Module, mode: TrainMode) -> None:
    """LoRA adapters as CogVideo's and diffusers' trainers add them (PEFT, attention projections), created on the
    model's device (meta: no memory); only the adapters train."""
    import torch
    from peft import LoraConfig

    device = next(model.parameters()).device
    model.requires_grad_(False)
    with torch.device(device):
        model.add_adapter(LoraConfig(r=mode.rank, lora_alpha=mode.alpha or mode.rank, init_lora_weights=True,
                                     target_modules=list(LORA_TARGET_MODULES)))
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)


def prepare_training(model: nn.Module, mode: TrainMode, checkpointing: bool) -> list[torch.nn.Parameter]:
    """Set a model up for training as the trainers do; returns the parameters the optimizer steps."""
    if mode.kind == "lora":
        add_lora(model, mode)
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def make_optimizer(parameters: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as on CUDA: `foreach` (PyTorch's default there), moments in the parameters' dtype."""
    import torch

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
                     blas_workspace_bytes: int = CUBLAS_WORKSPACE_BYTES["sm90"]) -> PhasePeak:
    """The peak of one transformer forward (inference, no grad) or one steady-state training step on `model`,
    which must be on the meta device and may be changed (adapters, checkpointing): pass a fresh one.
    `blas_workspace_bytes`: cuBLAS' workspace per thread that runs matmuls (see CUBLAS_WORKSPACE_BYTES)."""
    import torch

    from cogsurgeon.inspector.geometry import pipeline_inputs

    accounting = MemoryAccounting()
    trainable = prepare_training(model, train, checkpointing) if train is not None else []
    optimizer = make_optimizer(trainable) if train is not None else None
    accounting.adopt(model, "weights")
    for _thread in range(1 if train is None else 2):  # the forward's thread, and autograd's for backward
        accounting.ledger.reserve(blas_workspace_bytes, "workspace")
    hooks = [parameter.register_post_accumulate_grad_hook(lambda param: accounting.track(param.grad, "gradients"))
             for parameter in trainable]
    try:
        with accounting.active(model):
            with accounting.within("inputs"):
                inputs = pipeline_inputs(model.config, (frames, height, width), batch, dtype=model.dtype,
                                         device=torch.device("meta"))
            if optimizer is None:
                accounting.ledger.reset_peak()
                with torch.no_grad():
                    model(**inputs, return_dict=False)
                return accounting.result("transformer forward")
            # Steady state, as a run's second step: AdamW's moments exist, no gradients are held.
            with accounting.within("optimizer", "optimizer state"):
                for parameter in trainable:
                    parameter.grad = torch.empty_like(parameter)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with accounting.within("inputs"):
                target = training_target(inputs, model.config)
            accounting.ledger.reset_peak()
            training_step(model, inputs, target, optimizer, phase=accounting.within)
            return accounting.result(f"transformer training step ({train.label()})")
    finally:
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------------------------------------------------------
# The VAE decode


def vae_config(spec: str) -> dict[str, Any]:
    """The published `AutoencoderKLCogVideoX` config shipped for a published model (inspector/configs/vae)."""
    import json
    from importlib import resources

    from cogsurgeon.inspector.model_specs import PUBLISHED_SPECS

    if spec not in PUBLISHED_SPECS:
        raise PlanError(f"no VAE config for {spec!r}: --vae plans the published models ({', '.join(PUBLISHED_SPECS)})")
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
    phases = [plan_transformer(model, frames=settings.frames, height=settings.height, width=settings.width,
                               batch=settings.batch, train=settings.train, checkpointing=settings.checkpointing)]
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
        candidates.append(("--train lora:128", replace(settings, train=TrainMode("lora", 128, 64))))
    if settings.batch > 1:
        candidates.append((f"--batch {settings.batch // 2}", replace(settings, batch=settings.batch // 2)))
    return candidates


def plan_memory(spec: str | None = None, *, frames: int | None = None, height: int | None = None,
                width: int | None = None, batch: int = 2,
                dtype: str | None = None, train: TrainMode | str | None = None, checkpointing: bool = False,
                patches: Sequence[str] = (), vae: bool = False, tiling: bool = False,
                gpu_memory: int | str | None = None) -> MemoryPlan:
    """Plan the peak GPU memory of a run of MODEL `spec` at a video size.

    `frames`, `height` and `width` are the video's (frames 4k+1, as the pipelines take them); each left None is the
    model's default size (49x480x720 for CogVideoX, 9x64x64 for the tiny models), as `trace` and `cogsurgeon plan`
    take it. `dtype` None is the dtype the model loads in (bfloat16 for the published models, float32 tiny).
    `batch` is the transformer's batch (2: one video with classifier-free guidance); `train` is None (inference),
    `"lora:RANK"` or `"full"`; `vae` adds the decode of the run's latents with the transformer still resident.
    With `gpu_memory`, says whether it fits and, if not, which single switch would make it fit.
    """
    from pathlib import Path

    from cogsurgeon.inspector.geometry import default_video_size, latent_geometry
    from cogsurgeon.inspector.loading import _torch_dtype, find_transformer_folder, read_config
    from cogsurgeon.inspector.model_specs import builtin_config, builtin_dtype, resolve_spec
    from cogsurgeon.inspector.trace import size_notes

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
        raise PlanError("--tiling is a VAE switch: add --vae")
    if vae and train is not None:
        raise PlanError("--vae plans the decode after inference; a training step takes encoded latents: drop --vae "
                        "or --train")
    if vae and resolved.kind != "published":
        raise PlanError(f"--vae needs a published model (its VAE config ships with cogsurgeon), not {resolved.spec!r}")
    settings = PlanSettings(
        model=resolved.spec, frames=frames, height=height, width=width, batch=batch, dtype=dtype_name,
        train=parse_train(train) if isinstance(train, str) else train, checkpointing=checkpointing,
        patches=tuple(patches), vae=vae, tiling=tiling,
    )
    if settings.train is not None and settings.train.kind == "lora":
        tokens = int(config.get("max_text_seq_length", 226)) + geometry.token_frames * geometry.tokens_per_frame
        check_lora_rank(settings.train.rank, config, batch * tokens)
    if settings.checkpointing and settings.train is None:
        raise PlanError("--checkpointing saves memory only in training: add --train lora:RANK or --train full")
    card = parse_memory_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if card is not None:
        check_card_bytes(card, repr(card))
    phases = _plan_phases(resolved.spec, config, settings)
    plan = MemoryPlan(settings, phases, card, notes=size_notes(config, geometry) + _notes(settings))
    suggestions = []
    if card is not None and not plan.fits:
        for switch, alternative in candidate_switches(settings):
            peak = max(phase.peak_bytes for phase in _plan_phases(resolved.spec, config, alternative))
            suggestions.append(Suggestion(switch, peak, peak <= card))
    return replace(plan, suggestions=tuple(suggestions))


def _notes(settings: PlanSettings) -> tuple[str, ...]:
    notes = ["counts what PyTorch's allocator hands out (torch.cuda.max_memory_allocated); the CUDA context and "
             "the allocator's cached-but-free blocks come on top (nvidia-smi shows more)"]
    if settings.vae:
        notes.append("the text encoder is not counted: pipelines that keep it on the GPU need its weights too")
    return tuple(notes)
