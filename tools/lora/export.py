"""What a repair writes, by consumer (`repair --to peft,diffusers,comfyui`): the PEFT adapter (adapter_config.json +
adapter_model.safetensors), the diffusers file with `lora_adapter_metadata`, and a kohya-style file for ComfyUI
(`lora_unet__…lora_down/up.weight` + a per-module `.alpha`, which kijai's CogVideoXWrapper merges at alpha/rank,
lora_utils.py:369-423 there). `--bake-scale` folds alpha/r into lora_B for consumers that ignore alpha (then scale 1.0
is the trained strength). Torch-free: tensor bytes are copied, or scaled with numpy when baking.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpoint, LoraCheckpointError, LoraReport, LoraTensor, tensor_bytes
from cogsurgeon.tools.lora.keys import kohya_key, module_value, peft_key
from cogsurgeon.tools.lora.safetensors_io import OutputTensor

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHTS_NAME = "comfyui_lora.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
DIFFUSERS_KEY_PREFIX = "transformer."
CONSUMERS = ("peft", "diffusers", "comfyui")
DEFAULT_CONSUMERS = ("peft", "diffusers")


@dataclass(frozen=True)
class OutputFile:
    """One file of the repaired folder: tensors to stream (or text), and its metadata."""

    name: str
    tensors: tuple[OutputTensor, ...] = ()
    metadata: dict[str, str] | None = None
    text: str | None = None  # a JSON file instead of safetensors


def parse_consumers(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """`--to peft,diffusers,comfyui` -> ("peft", "diffusers", "comfyui"), in that order; unknown names refused."""
    if value is None:
        return DEFAULT_CONSUMERS
    names = [part.strip() for part in (value.split(",") if isinstance(value, str) else value) if part.strip()]
    unknown = [name for name in names if name not in CONSUMERS]
    if unknown or not names:
        raise LoraCheckpointError(f"to={value!r}: expected a comma-separated list of {', '.join(CONSUMERS)}")
    return tuple(name for name in CONSUMERS if name in names)


def module_scales(report: LoraReport) -> dict[str, tuple[int, float]]:
    """Each module's (rank, lora_alpha), with the rank_pattern and alpha_pattern applied."""
    assert report.rank is not None and report.alpha is not None
    return {
        module: (int(module_value(report.rank_pattern, module, report.rank)),
                 float(module_value(report.alpha_pattern, module, report.alpha)))
        for module in report.modules
    }


def lora_config(report: LoraReport, *, baked: bool = False) -> dict[str, Any]:
    """The LoraConfig of the repaired adapter. target_modules are full module names, so that the adapter goes
    exactly where it was trained and nowhere else; ranks and alpha per module follow PEFT's patterns. Baked:
    lora_alpha = r everywhere (scale 1.0), alpha/r being inside lora_B."""
    alpha, alpha_pattern = (report.rank, report.rank_pattern) if baked else (report.alpha, report.alpha_pattern)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": report.rank,
        "lora_alpha": alpha,
        "rank_pattern": dict(report.rank_pattern),
        "alpha_pattern": dict(alpha_pattern),
        "target_modules": list(report.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": report.use_dora,
        "lora_bias": report.lora_bias,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def diffusers_metadata(config: dict[str, Any]) -> dict[str, str]:
    """Safetensors metadata as diffusers >= 0.34 writes it: the LoraConfig under `transformer.`-prefixed keys."""
    loadable = {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "inference_mode", "task_type")}
    packed = {f"{DIFFUSERS_KEY_PREFIX}{key}": value for key, value in loadable.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def scaled_bytes(data: bytes | memoryview, dtype: str, factor: float, what: str = "the weight") -> bytes:
    """`data` (a tensor's bytes) times `factor`, in its own dtype; float16/bfloat16 computed in float32 and rounded to
    nearest-even, as torch does. A product that overflows the dtype, or that rounds to all zeros from values that
    were not, is a `LoraCheckpointError` naming `what`: the file would load and silently be wrong."""
    import numpy

    if dtype == "F32":
        source = numpy.frombuffer(data, "<f4")
        with numpy.errstate(over="ignore"):
            scaled = (source * numpy.float32(factor)).astype("<f4")
        return _checked(source, scaled, dtype, factor, what).tobytes()
    if dtype == "F64":
        source = numpy.frombuffer(data, "<f8")
        with numpy.errstate(over="ignore"):
            scaled = (source * factor).astype("<f8")
        return _checked(source, scaled, dtype, factor, what).tobytes()
    if dtype == "F16":
        source = numpy.frombuffer(data, "<f2")
        with numpy.errstate(over="ignore"):
            scaled = (source.astype(numpy.float32) * numpy.float32(factor)).astype("<f2")
        return _checked(source, scaled, dtype, factor, what).tobytes()
    if dtype == "BF16":
        source = (numpy.frombuffer(data, "<u2").astype(numpy.uint32) << 16).view(numpy.float32)
        with numpy.errstate(over="ignore"):
            bits = (source * numpy.float32(factor)).astype(numpy.float32).view(numpy.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        _checked(source, (rounded.astype(numpy.uint32) << 16).view(numpy.float32), dtype, factor, what)
        return rounded.tobytes()
    raise LoraCheckpointError(f"cannot bake the scale into {dtype} weights")


def _checked(source: Any, scaled: Any, dtype: str, factor: float, what: str) -> Any:
    """`scaled` (numpy), unless scaling the finite `source` by `factor` overflowed or rounded every value to zero."""
    import numpy

    finite = numpy.isfinite(source)
    if not numpy.isfinite(scaled[finite]).all():
        raise LoraCheckpointError(
            f"{what} times alpha / r = {factor:g} overflows {dtype}: the baked weights would be inf; check lora_alpha, "
            "or repair without baking the scale"
        )
    if scaled.size and not scaled.any() and source.any():
        raise LoraCheckpointError(
            f"{what} times alpha / r = {factor:g} rounds to all zeros in {dtype}: the baked adapter would do nothing; "
            "check lora_alpha, or repair without baking the scale"
        )
    return scaled


def _tensor(checkpoint: LoraCheckpoint, tensor: LoraTensor, name: str, factor: float | None) -> OutputTensor:
    """`tensor` written under `name`: its bytes copied, or (baking, lora_B and its bias) read and scaled by `factor`."""
    if factor is None or tensor.part not in ("B", "bias"):
        return OutputTensor(name, tensor.dtype, tensor.shape, tensor.nbytes, tensor.source_start, tensor.payload)
    return OutputTensor(name, tensor.dtype, tensor.shape, tensor.nbytes,
                        payload=lambda: scaled_bytes(tensor_bytes(tensor, checkpoint.source_file), tensor.dtype, factor,
                                                     f"lora_B of {tensor.module}"))


def output_files(checkpoint: LoraCheckpoint, consumers: tuple[str, ...], *,
                 bake_scale: bool = False) -> list[OutputFile]:
    """The files of the repaired folder for these consumers (see module docstring)."""
    report = checkpoint.report
    scales = module_scales(report)
    factors = {module: alpha / rank for module, (rank, alpha) in scales.items()} if bake_scale else {}
    config = lora_config(report, baked=bake_scale)

    def renamed(prefix: str) -> tuple[OutputTensor, ...]:
        return tuple(_tensor(checkpoint, t, peft_key(prefix, t.module, t.part), factors.get(t.module))
                     for t in checkpoint.tensors)

    files: list[OutputFile] = []
    if "peft" in consumers:
        files.append(OutputFile(PEFT_WEIGHTS_NAME, renamed(PEFT_KEY_PREFIX), {"format": "pt"}))
        files.append(OutputFile(PEFT_CONFIG_NAME, text=json.dumps(config, indent=2) + "\n"))
    if "diffusers" in consumers:
        files.append(OutputFile(DIFFUSERS_WEIGHTS_NAME, renamed(DIFFUSERS_KEY_PREFIX), diffusers_metadata(config)))
    if "comfyui" in consumers:
        if report.use_dora or report.lora_bias:
            raise LoraCheckpointError(
                f"comfyui in to=: {report.file} is a {'DoRA' if report.use_dora else 'lora_bias'} LoRA, which the "
                "kohya-style file (lora_down/lora_up/.alpha, merged as W + α/r·up·down) cannot hold: leave comfyui "
                "out of to="
            )
        tensors: list[OutputTensor] = []
        for module in report.modules:
            for tensor in (t for t in checkpoint.tensors if t.module == module):
                tensors.append(_tensor(checkpoint, tensor, kohya_key(module, tensor.part), factors.get(module)))
            rank, alpha = scales[module]
            value = struct.pack("<f", float(rank) if bake_scale else alpha)
            tensors.append(OutputTensor(kohya_key(module, "alpha"), "F32", (), 4, payload=lambda value=value: value))
        metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(report.rank),
                    "ss_network_alpha": str(report.rank if bake_scale else report.alpha),
                    "cogsurgeon_baked_scale": "true" if bake_scale else "false"}
        files.append(OutputFile(COMFYUI_WEIGHTS_NAME, tuple(tensors), metadata))
    return files


__all__ = [
    "DIFFUSERS_KEY_PREFIX", "DIFFUSERS_WEIGHTS_NAME", "PEFT_CONFIG_NAME", "PEFT_KEY_PREFIX", "PEFT_WEIGHTS_NAME",
    "diffusers_metadata", "lora_config", "module_scales", "output_files", "parse_consumers", "scaled_bytes",
]
