"""`cogsurgeon lora verify`: load a repaired adapter folder onto a base transformer twice — with PEFT
(`PeftModel.from_pretrained`) and with diffusers (`load_lora_adapter`, what `load_lora_weights` calls) — offline,
and check that every module got its weights at the expected scale and that both loads compute the same output.

diffusers >= 0.34 reads lora_alpha from the file's `lora_adapter_metadata`; older releases ignore metadata and load
at alpha = rank, so there the alpha is passed as `network_alphas` (the kohya-style per-module alphas they accept).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.tools.lora.repair import (
    DIFFUSERS_KEY_PREFIX,
    DIFFUSERS_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
)

if TYPE_CHECKING:
    import torch

DIFFUSERS_ADAPTER_NAME = "cogsurgeon_verify"
OUTPUT_ATOL = 1e-5
OUTPUT_RTOL = 1e-4
SCALE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ModuleCheck:
    """One LoRA module as each loader left it. A scale of None: that loader did not put a LoRA layer there."""

    module: str
    expected_scale: float | None  # None: the adapter files do not hold this module
    peft_scale: float | None
    diffusers_scale: float | None
    peft_weights_loaded: bool
    diffusers_weights_loaded: bool


@dataclass(frozen=True)
class AdapterVerifyReport:
    adapter_dir: str
    base: str
    diffusers_version: str
    diffusers_alpha_via: str  # "metadata" (diffusers >= 0.34) or "network_alphas"
    modules: tuple[ModuleCheck, ...]
    matched: tuple[str, ...]
    missing: tuple[str, ...]  # in the adapter files, not loaded by at least one loader
    unexpected: tuple[str, ...]  # a LoRA layer was created there but the files hold no weights for it
    max_abs_diff: float | None  # PEFT output vs diffusers output
    lora_effect: float | None  # PEFT output vs the base's: 0 means the adapter changes nothing
    outputs_match: bool | None  # None: a load failed, nothing to compare
    scales_match: bool
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("modules", "matched", "missing", "unexpected", "failures"):
            data[key] = list(data[key])
        data["passed"] = self.passed
        return data

    def summary_lines(self) -> list[str]:
        scales = sorted({round(check.expected_scale, 6) for check in self.modules if check.expected_scale is not None})
        if self.scales_match:
            scale_line = f"{', '.join(f'{s:g}' for s in scales) or '-'} (lora_alpha / r, as loaded by PEFT and diffusers)"
        else:
            scale_line = "MISMATCH (see below)"
        if self.max_abs_diff is None or self.lora_effect is None:
            output_line = "not compared (a load failed)"
        else:
            output_line = (f"PEFT vs diffusers max |diff| {self.max_abs_diff:.3g}; the LoRA changes the output by up to "
                           f"{self.lora_effect:.3g}")
        lines = [
            f"adapter       {self.adapter_dir}",
            f"base          {self.base} (diffusers {self.diffusers_version}, alpha via {self.diffusers_alpha_via})",
            f"modules       {len(self.matched)} matched, {len(self.missing)} missing, {len(self.unexpected)} unexpected",
            f"scales        {scale_line}",
            f"outputs       {output_line}",
        ]
        if self.failures:
            lines.append(f"FAILED        {len(self.failures)} problem(s)")
            lines.extend(f"  - {failure}" for failure in self.failures[:20])
            if len(self.failures) > 20:
                lines.append(f"  ... and {len(self.failures) - 20} more (--json lists all)")
        else:
            lines.append("passed        both loads match the adapter and each other")
        return lines


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A rank_pattern / alpha_pattern lookup as PEFT does it: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def expected_scales(config: dict[str, Any], modules: list[str]) -> dict[str, float]:
    rank, alpha = config["r"], config["lora_alpha"]
    scales = {}
    for module in modules:
        module_rank = pattern_value(config.get("rank_pattern") or {}, module, rank)
        module_alpha = pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scales[module] = module_alpha / module_rank
    return scales


def read_adapter_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CogsurgeonError(f"{folder} is not a folder: verify takes the folder `cogsurgeon lora repair` wrote")
    missing = [name for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise CogsurgeonError(
            f"{folder} lacks {', '.join(missing)}: it is not an adapter folder; run `cogsurgeon lora repair CKPT --out DIR` first"
        )
    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
        int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CogsurgeonError(f"{folder / PEFT_CONFIG_NAME} is not a LoRA adapter config: {exc}") from None
    return config


def _lora_layers(model: torch.nn.Module, adapter_name: str, strip: str = "") -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name.removeprefix(strip)] = module
    return layers


def _weights_by_module(path: Path, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        match = re.match(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$", key.removeprefix(prefix))
        if match:
            by_module.setdefault(match["module"], {})[match["part"]] = tensor
    return by_module


def _holds_weights(layer: Any, adapter_name: str, weights: dict[str, torch.Tensor] | None) -> bool:
    import torch

    if not weights or set(weights) != {"A", "B"}:
        return False
    loaded_a = layer.lora_A[adapter_name].weight
    loaded_b = layer.lora_B[adapter_name].weight
    return (
        loaded_a.shape == weights["A"].shape
        and loaded_b.shape == weights["B"].shape
        and torch.equal(loaded_a.detach().cpu().to(weights["A"].dtype), weights["A"])
        and torch.equal(loaded_b.detach().cpu().to(weights["B"].dtype), weights["B"])
    )


def forward_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """A small, seeded input the transformer accepts: the sample size where learned positions require it, else a
    couple of patches, so that a real 5B model runs too."""
    import torch

    config = model.config
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    patch_t = config.get("patch_size_t") or 1
    if config.use_learned_positional_embeddings:
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        height, width = config.sample_height, config.sample_width
    else:
        frames, height, width = patch_t, 2 * config.patch_size, 2 * config.patch_size
    frames = -(-frames // patch_t) * patch_t

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(parameter.device, parameter.dtype)

    inputs: dict[str, Any] = {
        "hidden_states": noise(1, frames, config.in_channels, height, width),
        "encoder_hidden_states": noise(1, config.max_text_seq_length, config.text_embed_dim),
        "timestep": torch.tensor([500], device=parameter.device),
        "return_dict": False,
    }
    if config.get("ofs_embed_dim"):
        inputs["ofs"] = torch.tensor([2.0], device=parameter.device, dtype=parameter.dtype)
    return inputs


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(**inputs)[0].float()


def diffusers_reads_metadata() -> bool:
    from diffusers import __version__
    from packaging.version import Version

    return Version(__version__).release >= (0, 34)


def load_with_peft(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """The adapter on `base` through PEFT's own loader (base_model.model. keys, adapter_config.json)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)


def load_with_diffusers(base: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = DIFFUSERS_ADAPTER_NAME) -> str:
    """The adapter on `base` through diffusers' LoRA loader, at the trained scale on every diffusers release:
    >= 0.34 takes lora_alpha from the file's metadata, older ones get it as network_alphas. Returns which."""
    folder = Path(adapter_dir)
    if diffusers_reads_metadata():
        base.load_lora_adapter(str(folder), weight_name=DIFFUSERS_WEIGHTS_NAME, prefix="transformer",
                               adapter_name=adapter_name)
        return "metadata"
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    modules = list(_weights_by_module(folder / DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_KEY_PREFIX))
    network_alphas = {
        f"{DIFFUSERS_KEY_PREFIX}{module}.alpha": float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        for module in modules
    }
    base.load_lora_adapter(str(folder), weight_name=DIFFUSERS_WEIGHTS_NAME, prefix="transformer",
                           adapter_name=adapter_name, network_alphas=network_alphas)
    # With mixed ranks, diffusers < 0.34 replaces every alpha by the module's rank (`_maybe_adjust_config`), so
    # network_alphas cannot carry the scale there; PEFT's public `set_scale` puts it back on those modules.
    expected = expected_scales(config, modules)
    corrected = 0
    for module, layer in _lora_layers(base, adapter_name).items():
        if module in expected and abs(layer.scaling[adapter_name] - expected[module]) > SCALE_TOLERANCE:
            layer.set_scale(adapter_name, expected[module] * layer.r[adapter_name] / layer.lora_alpha[adapter_name])
            corrected += 1
    return f"network_alphas, set_scale on {corrected} mixed-rank modules" if corrected else "network_alphas"


def verify_adapter(
    adapter_dir: str | Path, base_spec: str, *, progress: Callable[[str], None] | None = None
) -> AdapterVerifyReport:
    """Load the adapter folder onto `base_spec` with PEFT and with diffusers and compare (see module docstring).
    `progress(message)` is told each slow stage, once the inputs are known to be good."""
    say = progress or (lambda message: None)
    from cogsurgeon.inspector.model_specs import resolve_spec
    from cogsurgeon.inspector.offline import enter_offline_mode

    folder = Path(adapter_dir).expanduser()
    config = read_adapter_folder(folder)  # the inputs first: a wrong folder or MODEL costs no torch import
    if resolve_spec(base_spec).kind == "published":
        raise CogsurgeonError(
            f"{base_spec} loads on the meta device (no weights): verify runs the model, so --base must be tiny, "
            "tiny-i2v, tiny-1.5, a local model folder or a cached hub id"
        )
    enter_offline_mode()  # before huggingface_hub is imported below; a no-op when the CLI already did it
    import diffusers

    from cogsurgeon.inspector.loading import load_transformer

    base = load_transformer(base_spec)
    say(f"loaded {base_spec}; loading the adapter with PEFT and with diffusers ...")
    peft_weights = _weights_by_module(folder / PEFT_WEIGHTS_NAME, PEFT_KEY_PREFIX)
    diffusers_weights = _weights_by_module(folder / DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_KEY_PREFIX)
    expected = expected_scales(config, sorted(set(peft_weights) | set(diffusers_weights)))
    failures: list[str] = []
    if set(peft_weights) != set(diffusers_weights):
        failures.append(f"{PEFT_WEIGHTS_NAME} and {DIFFUSERS_WEIGHTS_NAME} hold different modules")

    inputs = forward_inputs(base)
    base_output = _run(base, inputs)

    peft_layers: dict[str, Any] = {}
    peft_output = None
    try:
        peft_model = load_with_peft(copy.deepcopy(base), folder)
        peft_layers = _lora_layers(peft_model, "default", strip="base_model.model.")
        peft_output = _run(peft_model, inputs)
    except Exception as exc:  # the adapter is the input under test: a failed load is a finding, not a crash
        failures.append(f"PEFT could not load the adapter: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    diffusers_layers: dict[str, Any] = {}
    diffusers_output = None
    alpha_via = "metadata" if diffusers_reads_metadata() else "network_alphas"
    try:
        diffusers_model = copy.deepcopy(base)
        alpha_via = load_with_diffusers(diffusers_model, folder)
        diffusers_layers = _lora_layers(diffusers_model, DIFFUSERS_ADAPTER_NAME)
        diffusers_output = _run(diffusers_model, inputs)
    except Exception as exc:
        failures.append(f"diffusers could not load the adapter: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    checks: list[ModuleCheck] = []
    for module in sorted(set(expected) | set(peft_layers) | set(diffusers_layers)):
        peft_layer, diffusers_layer = peft_layers.get(module), diffusers_layers.get(module)
        check = ModuleCheck(
            module=module,
            expected_scale=expected.get(module),
            peft_scale=float(peft_layer.scaling["default"]) if peft_layer is not None else None,
            diffusers_scale=float(diffusers_layer.scaling[DIFFUSERS_ADAPTER_NAME]) if diffusers_layer is not None else None,
            peft_weights_loaded=peft_layer is not None and _holds_weights(peft_layer, "default", peft_weights.get(module)),
            diffusers_weights_loaded=diffusers_layer is not None
            and _holds_weights(diffusers_layer, DIFFUSERS_ADAPTER_NAME, diffusers_weights.get(module)),
        )
        checks.append(check)
    matched, missing, unexpected = [], [], []
    scales_match = True
    for check in checks:
        if check.expected_scale is None:
            unexpected.append(check.module)
            failures.append(f"{check.module}: a LoRA layer was created but the adapter holds no weights for it")
            continue
        loaded = check.peft_weights_loaded and check.diffusers_weights_loaded
        (matched if loaded else missing).append(check.module)
        for loader, ok in (("PEFT", check.peft_weights_loaded), ("diffusers", check.diffusers_weights_loaded)):
            if not ok and not (loader == "PEFT" and peft_output is None) and not (loader == "diffusers" and diffusers_output is None):
                failures.append(f"{check.module}: {loader} did not load its weights (no matching key; left at init)")
        for loader, scale in (("PEFT", check.peft_scale), ("diffusers", check.diffusers_scale)):
            if scale is not None and abs(scale - check.expected_scale) > SCALE_TOLERANCE * max(1.0, check.expected_scale):
                scales_match = False
                failures.append(f"{check.module}: {loader} scale {scale:g}, expected {check.expected_scale:g} (lora_alpha / r)")

    max_abs_diff = lora_effect = outputs_match = None
    if peft_output is not None and diffusers_output is not None:
        import torch

        max_abs_diff = float((peft_output - diffusers_output).abs().max())
        lora_effect = float((peft_output - base_output).abs().max())
        outputs_match = torch.allclose(peft_output, diffusers_output, atol=OUTPUT_ATOL, rtol=OUTPUT_RTOL)
        if not outputs_match:
            failures.append(f"outputs differ: PEFT vs diffusers max |diff| {max_abs_diff:.3g}")
        nonzero_b = any(bool(w["B"].any()) for w in peft_weights.values() if "B" in w)
        if lora_effect == 0.0 and nonzero_b:
            failures.append("the adapter changes nothing: the loaded model computes exactly what the base does")
    return AdapterVerifyReport(
        adapter_dir=str(folder),
        base=base_spec,
        diffusers_version=diffusers.__version__,
        diffusers_alpha_via=alpha_via,
        modules=tuple(checks),
        matched=tuple(matched),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        max_abs_diff=max_abs_diff,
        lora_effect=lora_effect,
        outputs_match=outputs_match,
        scales_match=scales_match,
        failures=tuple(failures),
    )
