"""`cogsurgeon doctor`: finds the known CogVideoX pitfalls in the installed diffusers and peft by running small
experiments on them (a tiny real model, a real LoRA save and reload, a PEFT load with the network cut), never by
reading version numbers. Each finding says whether the pitfall is present and which cogsurgeon command avoids it.

Probes only touch throwaway tiny models and temporary folders; global state they change (the attention-backend
registry, logging verbosity) is put back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.interrupts import interruptible
from cogsurgeon.inspector.loading import build_tiny

Status = Literal["present", "absent", "error"]


@dataclass(frozen=True)
class Finding:
    """One probed pitfall. `status` is "error" only when the probe itself could not run (a bug to report); `fix`,
the cogsurgeon command (or the line of code) that fixes or avoids the pitfall without changing what the model
computes, is given only when it is present."""

    id: str
    status: Status
    detail: str
    fix: str | None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    id: str
    summary: str
    fix: str
    run: Callable[[], tuple[bool, str]]  # (present, one-line detail)


class _StopProbe(Exception):
    """Raised from an instrumented call once it has recorded what the probe needed."""


MASK_FIX = "cogsurgeon run --patch attention-mask -- python your_script.py"
# The CogVideoX processor calls F.scaled_dot_product_attention itself, so torch's own kernel choice reaches it and
# changes nothing but the kernel. (No cogsurgeon patch does this: the attention patches change what attends to what.)
BACKEND_FIX = ("choose the SDPA kernel around the call instead: with torch.nn.attention.sdpa_kernel("
               "SDPBackend.FLASH_ATTENTION): pipe(...)  (same outputs; backends outside torch's SDPA are not "
               "reachable)")


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings (experimental-backend notices, ignored kwargs) while probing."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _tiny_inputs(model, batch: int = 1) -> dict[str, Any]:
    """Seeded CPU inputs for a tiny model at its pipelines' default size."""
    from cogsurgeon.inspector.geometry import default_video_size, pipeline_inputs

    return pipeline_inputs(model.config, default_video_size(model.config), batch, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Probes: each returns (present, detail)


def probe_mask_pad_length() -> tuple[bool, str]:
    """Ask the Attention class CogVideoX uses to pad a length-3 mask to target length 5."""
    import torch

    attention = build_tiny("tiny").transformer_blocks[0].attn1
    batch, current_length, target_length = 1, 3, 5
    mask = torch.zeros(batch, 1, current_length)
    prepared = attention.prepare_attention_mask(mask, target_length, batch)
    padded_length = prepared.shape[-1]
    present = padded_length != target_length
    detail = (
        f"{type(attention).__name__}.prepare_attention_mask padded a length-{current_length} mask to "
        f"{padded_length} for target length {target_length}"
        + (" (padded by the target length instead of the missing length)"
           if padded_length == current_length + target_length else "")
    )
    return present, detail


def probe_fused_processor_text_length() -> tuple[bool, str]:
    """Run the fused processor with a mask and see which target length it asks `prepare_attention_mask` for."""
    import torch

    model = build_tiny("tiny")
    model.fuse_qkv_projections()
    attention = model.transformer_blocks[0].attn1
    processor = attention.processor
    text_length = model.config.max_text_seq_length
    video_length = 16
    width = attention.inner_dim if hasattr(attention, "inner_dim") else attention.to_out[0].in_features
    hidden_states = torch.randn(1, video_length, width)
    encoder_hidden_states = torch.randn(1, text_length, width)
    asked: list[int] = []

    def recording_prepare(mask, target_length, batch_size, *args, **kwargs):
        asked.append(int(target_length))
        raise _StopProbe

    attention.prepare_attention_mask = recording_prepare  # this throwaway module only
    try:
        processor(attention, hidden_states, encoder_hidden_states,
                  attention_mask=torch.ones(1, text_length + video_length, dtype=torch.bool))
    except _StopProbe:
        pass
    finally:
        del attention.prepare_attention_mask
    name = type(processor).__name__
    if not asked:
        return False, f"{name} does not call prepare_attention_mask with a mask"
    joint = text_length + video_length
    present = asked[0] == text_length
    return present, (
        f"{name} prepared a mask for {asked[0]} keys where the joint sequence has {joint} "
        f"({text_length} text + {video_length} video)"
    )


def probe_block_drops_attention_kwargs() -> tuple[bool, str]:
    """Run a tiny model with `attention_kwargs` and a processor that records what reaches it."""
    import torch

    model = build_tiny("tiny")
    token = object()
    received: list[Any] = []

    class RecordingProcessor:
        """Wraps the model's own processor; its signature names the probe kwarg so Attention passes it on."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, cogsurgeon_probe=None):
            received.append(cogsurgeon_probe)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                              image_rotary_emb=image_rotary_emb)

    for block in model.transformer_blocks:
        block.attn1.set_processor(RecordingProcessor(block.attn1.processor))
    with torch.no_grad():
        model(**_tiny_inputs(model), attention_kwargs={"cogsurgeon_probe": token})
    reached = sum(value is token for value in received)
    present = reached < len(received) or not received
    return present, (
        f"attention_kwargs reached the attention processor in {reached} of {len(received)} attention calls"
        + (" (CogVideoXBlock drops them)" if present else "")
    )


def probe_attention_backend_ignored() -> tuple[bool, str]:
    """Set the math-only SDPA backend on a tiny model and see whether its attention runs math-only.

    diffusers' native math backend runs SDPA inside `sdpa_kernel(MATH)`, which switches the flash and
    memory-efficient kernels off while it runs; whether they are off at the SDPA call is what is observed.
    A direct `dispatch_attention_fn` call is the control: it must see math-only, or the probe cannot tell.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    model = build_tiny("tiny")
    if not hasattr(model, "set_attention_backend"):
        return False, "this diffusers has no set_attention_backend; there is no backend setting to be ignored"

    math_only_at_call: list[bool] = []

    class SdpaKernelRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                math_only_at_call.append(
                    not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())
                )
            return func(*args, **(kwargs or {}))

    backend = "_native_math"
    with _restored_attention_backend():
        model.set_attention_backend(backend)
        with torch.no_grad(), SdpaKernelRecorder():
            model(**_tiny_inputs(model))
        model_calls = list(math_only_at_call)
        math_only_at_call.clear()
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = torch.randn(1, 4, 2, 8)
        with torch.no_grad(), SdpaKernelRecorder():
            dispatch_attention_fn(query, query, query)
        control = list(math_only_at_call)
    if control != [True]:
        raise RuntimeError(f"control call through dispatch_attention_fn did not run math-only ({control})")
    honoured = sum(model_calls)
    present = honoured < len(model_calls) or not model_calls
    processor = type(model.transformer_blocks[0].attn1.processor).__name__
    return present, (
        f"after set_attention_backend({backend!r}), {honoured} of {len(model_calls)} attention calls of "
        f"{processor} ran on that backend"
    )


def probe_not_context_parallel() -> tuple[bool, str]:
    """Whether diffusers can run CogVideoX context-parallel by itself: its engine (`hooks.context_parallel`), a
    `_cp_plan` on the transformer, and a processor `enable_parallelism` can hand its parallel config to (one with a
    `_parallel_config`, i.e. one that calls the dispatcher). Says which route `cogsurgeon.parallel` takes here."""
    import torch

    model = build_tiny("tiny")
    processor = model.transformer_blocks[0].attn1.processor
    try:
        import diffusers.hooks.context_parallel  # noqa: F401
    except ImportError:
        import diffusers

        return True, (f"diffusers {diffusers.__version__} has no context-parallel engine (0.36 brought it): "
                      "cogsurgeon.parallel needs diffusers>=0.36")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    missing = [what for what, absent in (
        ("a _cp_plan", getattr(model, "_cp_plan", None) is None),
        (f"a processor that calls the dispatcher ({type(processor).__name__} calls SDPA itself)",
         not hasattr(processor, "_parallel_config")),
    ) if absent]
    accelerators = torch.accelerator.device_count() if hasattr(torch, "accelerator") else 0
    degree = os.environ.get("COGSURGEON_RUN_ULYSSES")
    route = (f"{accelerators} accelerator(s): enable_parallelism with cogsurgeon's plan" if accelerators else
             "no accelerator: enable_parallelism's device lookup divides by the accelerator count on diffusers "
             ">= 0.42, so the engine's own apply_context_parallel with cogsurgeon's plan")
    backend = _AttentionBackendRegistry.get_active_backend()[0].value
    return bool(missing), (
        f"CogVideoXTransformer3DModel lacks {' and '.join(missing) or 'nothing'}; cogsurgeon.parallel routes "
        f"attention through dispatch_attention_fn (active backend {backend}) and enters the engine here with "
        f"{route}; degree {degree or 'not set in this process (cogsurgeon run --ulysses N sets it)'}"
    )


@contextmanager
def _restored_attention_backend() -> Iterator[None]:
    """`set_attention_backend` also changes diffusers' process-wide active backend; put it back."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:
        yield
        return
    previous = _AttentionBackendRegistry._active_backend
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def probe_lora_alpha_lost() -> tuple[bool, str]:
    """Save a tiny LoRA (r=4, alpha=2) the way the CogVideo trainer does, reload it through the pipeline's
    `load_lora_weights`, and compare the scaling PEFT applies."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    rank, lora_alpha = 4, 2
    trained = build_tiny("tiny")
    trained.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_layers = get_peft_model_state_dict(trained)
    reloaded = build_tiny("tiny")
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=reloaded, scheduler=None)
    # Interruptible only while the temporary folder exists (its removal must run): building the models above, Ctrl-C
    # ends the process at once, as everywhere outside such sections (inspector/interrupts.py says why).
    with interruptible(), tempfile.TemporaryDirectory(prefix="cogsurgeon-doctor-") as folder:
        # The trainer's save: the PEFT state dict through save_lora_weights, nothing else.
        CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=lora_layers)
        pipeline.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="probe")
    scaling = reloaded.transformer_blocks[0].attn1.to_q.scaling["probe"]
    trained_scaling = lora_alpha / rank
    present = abs(scaling - trained_scaling) > 1e-9
    return present, (
        f"a LoRA trained at r={rank}, lora_alpha={lora_alpha} (scale {trained_scaling:g}) and saved without "
        f"metadata reloads at scale {scaling:g}"
        + (f" (alpha taken as {scaling * rank:g})" if present else "")
    )


_PEFT_HUB_PROBE = r"""
import json, os, socket, sys, time
attempts = []
# huggingface_hub retries refused connections with back-off (about 23 s of sleeping); what is observed here is
# where the request goes and what error ends it, not how long the library waits before giving up.
time.sleep = lambda seconds: None
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2])[:80])
    raise OSError("network disabled by cogsurgeon doctor")
socket.socket.connect = lambda self, *a, **k: refuse(*a)
socket.socket.connect_ex = lambda self, *a, **k: refuse(*a)
socket.create_connection = refuse
socket.getaddrinfo = refuse
import torch
from peft import PeftModel
def qualified(exc):
    module = type(exc).__module__
    return type(exc).__name__ if module == "builtins" else module + "." + type(exc).__name__
results = {}
for label, path in (("absolute", sys.argv[1]), ("relative", sys.argv[2])):
    attempts.clear()
    try:
        PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(4, 4)), path)
        error, cause = None, None
    except Exception as exc:
        error = qualified(exc)
        inner = exc.__cause__ or exc.__context__
        cause = None if inner is None else qualified(inner)
    results[label] = {"error": error, "cause": cause, "connections": len(attempts)}
print(json.dumps(results))
"""


def probe_peft_local_path_hub() -> tuple[bool, str]:
    """In a child process with sockets refused and the Hub's offline switch unset, load a local LoRA folder
    that has no adapter_config.json through PEFT, by absolute and by relative path."""
    import torch
    from safetensors.torch import save_file

    from cogsurgeon.inspector.offline import HUB_OFFLINE_VARIABLES

    lora_weights = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}
    # The Hub's offline switch unset, and a private cache as a precaution: whatever the Hub client writes lands in
    # the temporary folder.
    unset = (*HUB_OFFLINE_VARIABLES, "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    environment = {key: value for key, value in os.environ.items() if key not in unset}
    with interruptible(), tempfile.TemporaryDirectory(prefix="cogsurgeon-doctor-") as root:  # while the folder exists
        folder = Path(root) / "lora-checkpoint"
        folder.mkdir()
        save_file(lora_weights, str(folder / "pytorch_lora_weights.safetensors"))
        environment["HF_HOME"] = str(Path(root) / "hf-home")
        completed = subprocess.run(
            [sys.executable, "-c", _PEFT_HUB_PROBE, str(folder), folder.name],
            cwd=root, env=environment, capture_output=True, text=True, timeout=300,
        )
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"PEFT probe process failed: {last_line}")
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    went_to_hub = {
        label: result["connections"] > 0 or _is_hub_error(result["cause"]) or _is_hub_error(result["error"])
        for label, result in results.items()
    }
    present = any(went_to_hub.values())
    parts = []
    for label, result in results.items():
        seen = result["error"] or "no error"
        if result["cause"]:
            seen += f" from {result['cause']}"
        parts.append(f"{label} path: {seen}, {result['connections']} connection attempt(s)")
    return present, "PeftModel.from_pretrained on a local folder without adapter_config.json: " + "; ".join(parts)


def _is_hub_error(qualified_name: str | None) -> bool:
    return bool(qualified_name) and qualified_name.split(".")[0] in {"huggingface_hub", "requests", "httpx", "urllib3"}


PROBES: tuple[Probe, ...] = (
    Probe("mask-pad-length", "prepare_attention_mask pads by the target length instead of the missing length",
          MASK_FIX, probe_mask_pad_length),
    Probe("fused-processor-text-length", "the fused CogVideoX processor prepares masks with the text length",
          MASK_FIX, probe_fused_processor_text_length),
    Probe("block-drops-attention-kwargs", "CogVideoXBlock does not pass attention_kwargs to attention",
          MASK_FIX, probe_block_drops_attention_kwargs),
    Probe("attention-backend-ignored", "set_attention_backend does not reach the CogVideoX processor",
          BACKEND_FIX, probe_attention_backend_ignored),
    Probe("cogvideox-not-context-parallel", "diffusers cannot run CogVideoX context-parallel (no plan, no dispatcher)",
          "cogsurgeon run --ulysses N --patch NAME -- python your_script.py  (or cogsurgeon.parallel.enable(pipe, "
          "ulysses=N))", probe_not_context_parallel),
    Probe("lora-alpha-lost", "a LoRA saved without metadata reloads at alpha = rank",
          "cogsurgeon lora repair CKPT --out DIR --alpha ALPHA  (writes the alpha into the adapter)",
          probe_lora_alpha_lost),
    Probe("peft-local-path-hub", "PEFT goes to the Hub for a local folder without adapter_config.json",
          "cogsurgeon lora repair CKPT --out DIR  (writes adapter_config.json), and set HF_HUB_OFFLINE=1",
          probe_peft_local_path_hub),
)

PROBE_IDS = tuple(probe.id for probe in PROBES)


def run_probe(probe: Probe) -> Finding:
    """One finding; a probe that raises gives status "error" with the exception in the detail."""
    try:
        with _quiet_diffusers():
            present, detail = probe.run()
    except Exception as exc:  # a probe that cannot run is reported, not a crash of the whole doctor
        message = " ".join(str(exc).split())[:300]
        return Finding(probe.id, "error", f"probe could not run: {type(exc).__name__}: {message}", None)
    return Finding(probe.id, "present" if present else "absent", detail, probe.fix if present else None)


def run_doctor(ids: tuple[str, ...] | None = None,
               progress: Callable[[Probe], None] | None = None) -> list[Finding]:
    """Run the probes (all, or those named in `ids`, in PROBES order) and return their findings."""
    if ids:
        unknown = sorted(set(ids) - set(PROBE_IDS))
        if unknown:
            raise CogsurgeonError(f"unknown check {', '.join(unknown)}: known checks are {', '.join(PROBE_IDS)}")
    findings = []
    for probe in PROBES:
        if ids and probe.id not in ids:
            continue
        if progress is not None:
            progress(probe)
        findings.append(run_probe(probe))
    return findings


__all__ = [
    "PROBES", "PROBE_IDS", "run_doctor", "run_probe",
]
