"""`cogsurgeon lora verify`: load a repaired adapter folder onto a base transformer twice — with PEFT
(`PeftModel.from_pretrained`) and with diffusers (`load_lora_adapter`, what `load_lora_weights` calls) — offline,
and check each against a reference written from the raw tensors: the base with `x·Aᵀ·Bᵀ·α/r` added to every LoRA
module's output by plain forward hooks (no PEFT or diffusers code in that path), α/r as the adapter declares them. The
effective scale each loader applied is measured from its LoRA layers' inputs and outputs, so a loader at another
strength fails even when both loaders agree with each other.

diffusers >= 0.34 reads lora_alpha from the file's `lora_adapter_metadata`; older releases ignore metadata and load
at alpha = rank, so there the alpha is passed as `network_alphas` (the kohya-style per-module alphas they accept).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.safetensors_header import read_header
from cogsurgeon.inspector.user_files import expand_user, is_folder, is_regular_file, read_json
from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, LoraTensor, lora_digest, read_checkpoint, tensor_bytes
from cogsurgeon.tools.lora.export import (
    DIFFUSERS_KEY_PREFIX,
    DIFFUSERS_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
    module_scales,
)
from cogsurgeon.tools.lora.keys import module_value, parse_lora_key
from cogsurgeon.tools.lora.publish import REPAIR

if TYPE_CHECKING:
    import torch

DIFFUSERS_ADAPTER_NAME = "cogsurgeon_verify"
OUTPUT_ATOL = 1e-5
OUTPUT_RTOL = 1e-4
SCALE_TOLERANCE = 1e-6
EFFECTIVE_SCALE_TOLERANCE = 1e-3  # measured through a float32 forward, so not exact


@dataclass(frozen=True)
class ModuleCheck:
    """One LoRA module as each loader left it. A scale of None: that loader did not put a LoRA layer there."""

    module: str
    expected_scale: float | None  # None: the adapter files do not hold this module
    peft_scale: float | None
    diffusers_scale: float | None
    peft_weights_loaded: bool
    diffusers_weights_loaded: bool
    peft_effective_scale: float | None = None  # measured: (layer output - base output) / (x·Aᵀ·Bᵀ)
    diffusers_effective_scale: float | None = None


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
    reference_diff: dict[str, float] | None = None  # each loader's output vs the raw-tensor reference, max |diff|
    effective_scale: dict[str, float | None] | None = None  # per loader: the scale it applied (median over modules)
    source_check: dict[str, Any] | None = None  # the adapter against the checkpoint its repair manifest records

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
            listed = ", ".join(f"{s:g}" for s in scales) or "-"
            scale_line = f"{listed} (lora_alpha / r, as loaded by PEFT and diffusers)"
        else:
            scale_line = "MISMATCH (see below)"
        if self.max_abs_diff is None or self.lora_effect is None:
            output_line = "not compared (a load failed)"
        else:
            output_line = (f"PEFT vs diffusers max |diff| {self.max_abs_diff:.3g}; the LoRA changes the output by "
                           f"up to {self.lora_effect:.3g}")
        applied = ", ".join(f"{loader} {value:g}" if value is not None else f"{loader} -"
                            for loader, value in (self.effective_scale or {}).items())
        reference = ", ".join(f"{loader} {value:.3g}" for loader, value in (self.reference_diff or {}).items())
        source = self.source_check or {}
        if source.get("compared"):
            source_line = (f"α/r·B·A of every module vs {source['file']} (the repair's source): max relative diff "
                           f"{source['max_rel_diff']:.3g}")
        else:
            source_line = source.get("status", "not checked")
        lines = [
            f"adapter       {self.adapter_dir}",
            f"base          {self.base} (diffusers {self.diffusers_version}, alpha via {self.diffusers_alpha_via})",
            f"modules       {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected",
            f"scales        {scale_line}",
            f"applied       {applied or '-'} (measured from each loader's LoRA layers)",
            f"reference     max |diff| vs x·Aᵀ·Bᵀ·α/r from the raw tensors: {reference or 'not compared'}",
            f"source        {source_line}",
            f"outputs       {output_line}",
        ]
        if self.failures:
            lines.append(f"FAILED        {len(self.failures)} problem(s)")
            lines.extend(f"  - {failure}" for failure in self.failures[:20])
            if len(self.failures) > 20:
                lines.append(f"  ... and {len(self.failures) - 20} more (the JSON report lists all)")
        else:
            lines.append("passed        both loads match the adapter and each other")
        return lines


def expected_scales(config: dict[str, Any], modules: list[str]) -> dict[str, float]:
    rank, alpha = config["r"], config["lora_alpha"]
    scales = {}
    for module in modules:
        module_rank = module_value(config.get("rank_pattern") or {}, module, rank)
        module_alpha = module_value(config.get("alpha_pattern") or {}, module, alpha)
        scales[module] = module_alpha / module_rank
    return scales


def read_adapter_folder(folder: Path) -> dict[str, Any]:
    if not folder.exists() and not folder.is_symlink():
        raise CogsurgeonError(f"adapter folder {folder} does not exist: verify takes the folder `cogsurgeon lora "
                              "repair` wrote")
    if not is_folder(folder):
        raise CogsurgeonError(f"{folder} is not a folder: verify takes the folder `cogsurgeon lora repair` wrote")
    missing = [name for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME)
               if not is_regular_file(folder / name)]
    if missing:
        raise CogsurgeonError(
            f"{folder} lacks {', '.join(missing)}: it is not an adapter folder; repair its checkpoint first "
            "(repair_checkpoint, or `cogsurgeon lora repair`)"
        )
    try:
        config = read_json(folder / PEFT_CONFIG_NAME)  # regular file, size capped, nesting and NaN refused
        int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CogsurgeonError(f"{folder / PEFT_CONFIG_NAME} is not a LoRA adapter config: {exc}") from None
    return config


def _lora_layers(model: torch.nn.Module, adapter_name: str, strip: str = "") -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(strip): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


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
    loaded = {"A": layer.lora_A[adapter_name].weight, "B": layer.lora_B[adapter_name].weight}
    return all(loaded[part].shape == weights[part].shape
               and torch.equal(loaded[part].detach().cpu().to(weights[part].dtype), weights[part]) for part in "AB")


def forward_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """A small, seeded input the transformer accepts, built as the pipelines build it: the sample size where learned
    positions require it, else one temporal patch of 2x2 spatial patches, so that a real 5B model runs too."""
    from cogsurgeon.inspector.geometry import VAE_SPATIAL_FACTOR, default_video_size, pipeline_inputs, video_frame_count

    config = model.config
    parameter = next(model.parameters())
    if config.use_learned_positional_embeddings:
        size = default_video_size(config)
    else:
        side = 2 * config.patch_size * VAE_SPATIAL_FACTOR
        size = video_frame_count(config.get("patch_size_t") or 1, config.temporal_compression_ratio), side, side
    return pipeline_inputs(config, size, 1, dtype=parameter.dtype, device=parameter.device, seed=0)


def reference_output(base: torch.nn.Module, inputs: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                     scales: dict[str, float]) -> torch.Tensor:
    """The base's output with `x·Aᵀ·Bᵀ·scale` added to each LoRA module's output: forward hooks on the plain
    nn.Linear layers, the A and B tensors as stored in the file. No PEFT or diffusers LoRA code runs."""
    handles = []
    modules = dict(base.named_modules())

    def add_lora(a: torch.Tensor, b: torch.Tensor, scale: float):
        def hook(module, args, output):
            x = args[0]
            return output + (x @ a.to(x.dtype).T @ b.to(x.dtype).T) * scale
        return hook

    try:
        for name, pair in weights.items():
            if name in modules and set(pair) == {"A", "B"} and name in scales:
                handles.append(modules[name].register_forward_hook(add_lora(pair["A"], pair["B"], scales[name])))
        return _run(base, inputs)
    finally:
        for handle in handles:
            handle.remove()


def measure_scales(model: torch.nn.Module, inputs: dict[str, Any], layers: dict[str, Any],
                   weights: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Run `model` and measure, for each LoRA layer, the scale it applied: the least-squares ratio of (its output
    minus its base layer's output) to x·Aᵀ·Bᵀ computed from the file's tensors."""
    import torch

    measured: dict[str, float] = {}
    handles = []

    def observe(name: str, layer: Any, pair: dict[str, torch.Tensor]):
        def hook(module, args, output):
            x = args[0]
            with torch.no_grad():
                unit = (x.float() @ pair["A"].float().T @ pair["B"].float().T)
                delta = output.float() - layer.base_layer(x).float()
                norm = float((unit * unit).sum())
                measured[name] = float((delta * unit).sum()) / norm if norm > 0 else float("nan")
        return hook

    try:
        for name, layer in layers.items():
            pair = weights.get(name)
            if pair and set(pair) == {"A", "B"}:
                handles.append(layer.register_forward_hook(observe(name, layer, pair)))
        output = _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return output, measured


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v == v)
    return values[len(values) // 2] if values else None


def adapter_shapes(folder: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module, A|B, shape) of the adapter's PEFT weights, from the safetensors header alone."""
    shapes = []
    for entry in read_header(folder / PEFT_WEIGHTS_NAME).tensors:
        parsed = parse_lora_key(entry.name)
        if parsed is not None and parsed.part in ("A", "B"):
            shapes.append((parsed.module, parsed.part, entry.shape))
    return shapes


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(**inputs)[0].float()


def diffusers_reads_metadata() -> bool:
    from diffusers import __version__
    from packaging.version import Version

    return Version(__version__).release >= (0, 34)


def load_with_diffusers(base: torch.nn.Module, adapter_dir: str | Path,
                        adapter_name: str = DIFFUSERS_ADAPTER_NAME) -> str:
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
        f"{DIFFUSERS_KEY_PREFIX}{module}.alpha":
            float(module_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
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


SOURCE_RTOL = {"exact": 1e-6, "half": 1e-2}  # bf16/fp16 weights baked with --bake-scale are rounded once


def _float_tensor(tensor: LoraTensor, source_file: Path | None) -> torch.Tensor:
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    data = bytearray(tensor_bytes(tensor, source_file))
    return torch.frombuffer(data, dtype=dtypes[tensor.dtype]).reshape(tensor.shape).double()


def source_check(folder: Path, config: dict[str, Any],
                 adapter_weights: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, Any], list[str]]:
    """The adapter against the checkpoint it was repaired from, as its `cogsurgeon-repair.json` records it: the
    source is read again (alpha settled by the same request), and each module's α/r·B·A is compared with the
    adapter's, through a seeded random probe (B·(A·X), never the full product). This catches what checking the
    adapter against its own config cannot: a per-module alpha the repair dropped or a lora_alpha it replaced."""
    import torch

    manifest_path = folder / REPAIR.manifest_name
    try:
        manifest = read_json(manifest_path) if is_regular_file(manifest_path) else None
    except CogsurgeonError as exc:
        return {"compared": False, "status": f"not checked: {exc}"}, []
    source = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get("file"), str):
        return {"compared": False, "status": f"not checked: no {REPAIR.manifest_name} naming the source checkpoint "
                "(the adapter is checked against its own config only)"}, []
    file = Path(source["file"])
    request = source.get("request") if isinstance(source.get("request"), dict) else {}
    try:
        checkpoint = read_checkpoint(file, alpha=request.get("alpha"), trainer=request.get("trainer"),
                                     override_stored_alpha=bool(request.get("override_stored_alpha")))
        unchanged = lora_digest(checkpoint) == source.get("lora_sha256")
    except (LoraCheckpointError, OSError) as exc:
        return {"compared": False, "file": str(file), "status": f"not checked: the source {file} cannot be read "
                f"now ({' '.join(str(exc).split())[:200]})"}, []
    if not unchanged:
        return {"compared": False, "file": str(file), "status": f"not checked: the LoRA tensors of {file} changed "
                "since the repair"}, []
    source_scales = module_scales(checkpoint.report)
    adapter_scales = expected_scales(config, sorted(adapter_weights))
    pairs: dict[str, dict[str, LoraTensor]] = {}
    for tensor in checkpoint.tensors:
        pairs.setdefault(tensor.module, {})[tensor.part] = tensor
    failures = [f"{module}: the adapter holds it, the source checkpoint {file} does not"
                for module in sorted(set(adapter_weights) - set(pairs))]
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for module, pair in sorted(pairs.items()):
        adapter = adapter_weights.get(module)
        if adapter is None or set(adapter) != {"A", "B"}:
            failures.append(f"{module}: in the source checkpoint {file}, missing from the adapter")
            continue
        rank, alpha = source_scales[module]
        a, b = _float_tensor(pair["A"], checkpoint.source_file), _float_tensor(pair["B"], checkpoint.source_file)
        probe = torch.randn(a.shape[1], 8, generator=generator, dtype=torch.float64)
        wanted = b @ (a @ probe) * (alpha / rank)
        written = adapter["B"].double() @ (adapter["A"].double() @ probe) * adapter_scales[module]
        size = float(wanted.norm())
        off = float((written - wanted).norm()) / size if size > 0 else float((written - wanted).norm())
        worst = max(worst, off)
        half = {pair["B"].dtype, str(adapter["B"].dtype)} & {"F16", "BF16", "torch.float16", "torch.bfloat16"}
        if not off <= SOURCE_RTOL["half" if half else "exact"]:
            failures.append(f"{module}: the adapter's α/r·B·A is {off:.3g} (relative) off the source checkpoint's: "
                            f"scale {adapter_scales[module]:g} written, {alpha / rank:g} in {file.name} "
                            f"(lora_alpha {alpha:g} at rank {rank}, {checkpoint.report.alpha_detail})")
    return {"compared": True, "file": str(file), "status": "compared", "max_rel_diff": worst}, failures


def verify_adapter(
    adapter_dir: str | Path, base_spec: str, *, progress: Callable[[str], None] | None = None
) -> AdapterVerifyReport:
    """Load the adapter folder onto `base_spec` with PEFT and with diffusers and compare (see module docstring).
    `progress(message)` is told each slow stage, once the inputs are known to be good."""
    say = progress or (lambda message: None)
    folder = expand_user(adapter_dir)
    config = read_adapter_folder(folder)  # the inputs first: a wrong folder or MODEL costs no torch import
    base = _load_base(folder, base_spec, progress)
    import diffusers

    say(f"loaded {base_spec}; loading the adapter with PEFT and with diffusers ...")
    peft = LoaderRun("PEFT", "default", _weights_by_module(folder / PEFT_WEIGHTS_NAME, PEFT_KEY_PREFIX))
    diffusers_run = LoaderRun("diffusers", DIFFUSERS_ADAPTER_NAME,
                              _weights_by_module(folder / DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_KEY_PREFIX))
    expected = expected_scales(config, sorted(set(peft.weights) | set(diffusers_run.weights)))
    failures: list[str] = []
    if set(peft.weights) != set(diffusers_run.weights):
        failures.append(f"{PEFT_WEIGHTS_NAME} and {DIFFUSERS_WEIGHTS_NAME} hold different modules")

    inputs = forward_inputs(base)
    base_output = _run(base, inputs)
    failures.extend(_run_peft_loader(peft, base, folder, inputs))
    alpha_via, diffusers_failures = _run_diffusers_loader(diffusers_run, base, folder, inputs)
    failures.extend(diffusers_failures)

    plain = not (config.get("use_dora") or config.get("lora_bias"))
    if not plain:  # DoRA or a lora_B bias: the delta is not x·Aᵀ·Bᵀ·α/r, so neither a measured scale nor the reference
        peft.measured.clear()  # applies; the loaders are still compared with each other and with the source
        diffusers_run.measured.clear()
    checks = module_checks(expected, peft, diffusers_run)
    modules = judge_modules(checks, peft_loaded=peft.output is not None,
                            diffusers_loaded=diffusers_run.output is not None)
    failures.extend(modules.failures)
    reference = reference_output(base, inputs, peft.weights, expected) if plain else None
    reference_diff, reference_failures = compare_with_reference(reference, (peft, diffusers_run))
    failures.extend(reference_failures)
    source, source_failures = source_check(folder, config, peft.weights)
    failures.extend(source_failures)
    outputs = compare_outputs(peft, diffusers_run, base_output)
    failures.extend(outputs.failures)
    return AdapterVerifyReport(
        adapter_dir=str(folder),
        base=base_spec,
        diffusers_version=diffusers.__version__,
        diffusers_alpha_via=alpha_via,
        modules=tuple(checks),
        matched=modules.matched,
        missing=modules.missing,
        unexpected=modules.unexpected,
        max_abs_diff=outputs.max_abs_diff,
        lora_effect=outputs.lora_effect,
        outputs_match=outputs.outputs_match,
        scales_match=modules.scales_match,
        failures=tuple(failures),
        reference_diff=reference_diff,
        effective_scale=effective_scales(checks),
        source_check=source,
    )


def _load_base(folder: Path, base_spec: str, progress: Callable[[str], None] | None = None) -> torch.nn.Module:
    """The base transformer, offline, once it is known to run (not a meta-device config) and to fit the adapter's
    shapes; `progress` is told the import and the load."""
    from cogsurgeon.inspector.model_specs import resolve_spec
    from cogsurgeon.inspector.offline import enter_offline_mode

    if resolve_spec(base_spec).kind == "published":
        raise CogsurgeonError(
            f"{base_spec} loads on the meta device (no weights): verify runs the model, so base_spec= must be tiny, "
            "tiny-i2v, tiny-1.5, a local model folder or a cached hub id"
        )
    enter_offline_mode()  # before huggingface_hub is imported below; a no-op when the CLI already did it
    from cogsurgeon.inspector.loading import load_transformer
    from cogsurgeon.tools.lora.compat import check_fits

    base = load_transformer(base_spec, progress=progress)
    misfit = check_fits(dict(base.config), adapter_shapes(folder), base_spec)
    if misfit is not None:
        raise CogsurgeonError(misfit)
    return base


@dataclass
class LoaderRun:
    """One loader's adapter on a copy of the base: the file's tensors it should hold (by module), and once loaded
    its LoRA layers, its output and the scale each layer applied (all empty or None when the load failed)."""

    loader: str  # "PEFT" | "diffusers", as messages name it
    adapter_name: str
    weights: dict[str, dict[str, torch.Tensor]]
    layers: dict[str, Any] = field(default_factory=dict)
    output: torch.Tensor | None = None
    measured: dict[str, float] = field(default_factory=dict)

    def scale(self, module: str) -> float | None:
        layer = self.layers.get(module)
        return float(layer.scaling[self.adapter_name]) if layer is not None else None

    def holds_weights(self, module: str) -> bool:
        layer = self.layers.get(module)
        return layer is not None and _holds_weights(layer, self.adapter_name, self.weights.get(module))


def _load_failure(loader: str, exc: Exception) -> str:
    return f"{loader} could not load the adapter: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _run_peft_loader(run: LoaderRun, base: torch.nn.Module, folder: Path, inputs: dict[str, Any]) -> list[str]:
    """PEFT's own loader (base_model.model. keys, adapter_config.json) on a copy of `base`, run and measured into
    `run`. Returns the failure, if any."""
    try:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), is_trainable=False)
        run.layers = _lora_layers(peft_model, run.adapter_name, strip="base_model.model.")
        run.output, run.measured = measure_scales(peft_model, inputs, run.layers, run.weights)
    except Exception as exc:  # the adapter is the input under test: a failed load is a finding, not a crash
        return [_load_failure(run.loader, exc)]
    return []


def _run_diffusers_loader(run: LoaderRun, base: torch.nn.Module, folder: Path,
                         inputs: dict[str, Any]) -> tuple[str, list[str]]:
    """diffusers' loader on a copy of `base`, run and measured into `run`. Returns how the alpha reached it and the
    failure, if any."""
    alpha_via = "metadata" if diffusers_reads_metadata() else "network_alphas"
    try:
        diffusers_model = copy.deepcopy(base)
        alpha_via = load_with_diffusers(diffusers_model, folder, run.adapter_name)
        run.layers = _lora_layers(diffusers_model, run.adapter_name)
        run.output, run.measured = measure_scales(diffusers_model, inputs, run.layers, run.weights)
    except Exception as exc:  # as for PEFT: a finding
        return alpha_via, [_load_failure(run.loader, exc)]
    return alpha_via, []


def module_checks(expected: dict[str, float], peft: LoaderRun, diffusers: LoaderRun) -> list[ModuleCheck]:
    """Each module the files hold or a loader made a LoRA layer for, as each loader left it."""
    return [
        ModuleCheck(
            module=module,
            expected_scale=expected.get(module),
            peft_scale=peft.scale(module),
            diffusers_scale=diffusers.scale(module),
            peft_weights_loaded=peft.holds_weights(module),
            diffusers_weights_loaded=diffusers.holds_weights(module),
            peft_effective_scale=peft.measured.get(module),
            diffusers_effective_scale=diffusers.measured.get(module),
        )
        for module in sorted(set(expected) | set(peft.layers) | set(diffusers.layers))
    ]


@dataclass(frozen=True)
class ModuleFindings:
    """The modules sorted by what the loaders did with them, whether every scale is the adapter's, and the failures."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    scales_match: bool
    failures: tuple[str, ...]


def judge_modules(checks: list[ModuleCheck], *, peft_loaded: bool, diffusers_loaded: bool) -> ModuleFindings:
    """Pure: each module's weights loaded by both loaders, at lora_alpha / r declared and applied. A loader whose
    load failed is reported once, by its load, not again for every module."""
    matched, missing, unexpected, failures = [], [], [], []
    scales_match = True
    loaded_by = {"PEFT": peft_loaded, "diffusers": diffusers_loaded}
    for check in checks:
        if check.expected_scale is None:
            unexpected.append(check.module)
            failures.append(f"{check.module}: a LoRA layer was created but the adapter holds no weights for it")
            continue
        loaded = check.peft_weights_loaded and check.diffusers_weights_loaded
        (matched if loaded else missing).append(check.module)
        for loader, ok in (("PEFT", check.peft_weights_loaded), ("diffusers", check.diffusers_weights_loaded)):
            if not ok and loaded_by[loader]:
                failures.append(f"{check.module}: {loader} did not load its weights (no matching key; left at init)")
        for loader, scale in (("PEFT", check.peft_scale), ("diffusers", check.diffusers_scale)):
            allowed = SCALE_TOLERANCE * max(1.0, check.expected_scale)
            if scale is not None and abs(scale - check.expected_scale) > allowed:
                scales_match = False
                failures.append(f"{check.module}: {loader} scale {scale:g}, expected {check.expected_scale:g} "
                                "(lora_alpha / r)")
        for loader, applied in (("PEFT", check.peft_effective_scale), ("diffusers", check.diffusers_effective_scale)):
            allowed = EFFECTIVE_SCALE_TOLERANCE * max(1.0, check.expected_scale)
            if applied is not None and not abs(applied - check.expected_scale) <= allowed:
                scales_match = False
                failures.append(f"{check.module}: {loader} applied scale {applied:.6g} to x·Aᵀ·Bᵀ, the adapter's "
                                f"lora_alpha / r is {check.expected_scale:g}")
    return ModuleFindings(tuple(matched), tuple(missing), tuple(unexpected), scales_match, tuple(failures))


def compare_with_reference(reference: torch.Tensor | None,
                           runs: tuple[LoaderRun, ...]) -> tuple[dict[str, float], list[str]]:
    """Each loaded model's output against the raw-tensor reference (None: not comparable, DoRA or a lora_B bias):
    max |diff| per loader, and a failure for each that runs the LoRA at another strength."""
    import torch

    reference_diff: dict[str, float] = {}
    failures = []
    for run in runs:
        if run.output is None or reference is None:
            continue
        reference_diff[run.loader] = float((run.output - reference).abs().max())
        if not torch.allclose(run.output, reference, atol=OUTPUT_ATOL, rtol=OUTPUT_RTOL):
            failures.append(f"{run.loader}'s output differs from the reference (x·Aᵀ·Bᵀ·α/r from the raw tensors) by "
                            f"{reference_diff[run.loader]:.3g}: it runs the LoRA at another strength")
    return reference_diff, failures


@dataclass(frozen=True)
class OutputFindings:
    """PEFT's output against diffusers' and against the base's (None where a load failed)."""

    max_abs_diff: float | None = None
    lora_effect: float | None = None
    outputs_match: bool | None = None
    failures: tuple[str, ...] = ()


def compare_outputs(peft: LoaderRun, diffusers: LoaderRun, base_output: torch.Tensor) -> OutputFindings:
    """The two loaders must compute the same, and (unless every lora_B is zero) something other than the base."""
    import torch

    if peft.output is None or diffusers.output is None:
        return OutputFindings()
    failures = []
    max_abs_diff = float((peft.output - diffusers.output).abs().max())
    lora_effect = float((peft.output - base_output).abs().max())
    outputs_match = torch.allclose(peft.output, diffusers.output, atol=OUTPUT_ATOL, rtol=OUTPUT_RTOL)
    if not outputs_match:
        failures.append(f"outputs differ: PEFT vs diffusers max |diff| {max_abs_diff:.3g}")
    nonzero_b = any(bool(w["B"].any()) for w in peft.weights.values() if "B" in w)
    if lora_effect == 0.0 and nonzero_b:
        failures.append("the adapter changes nothing: the loaded model computes exactly what the base does")
    return OutputFindings(max_abs_diff, lora_effect, outputs_match, tuple(failures))


def effective_scales(checks: list[ModuleCheck]) -> dict[str, float | None]:
    """Per loader, the scale it applied: the median of the scales measured on its modules."""
    peft = [c.peft_effective_scale for c in checks if c.peft_effective_scale is not None]
    diffusers = [c.diffusers_effective_scale for c in checks if c.diffusers_effective_scale is not None]
    return {"PEFT": _median(peft), "diffusers": _median(diffusers)}


__all__ = [
    "AdapterVerifyReport", "ModuleCheck", "diffusers_reads_metadata", "forward_inputs", "judge_modules",
    "load_with_diffusers", "verify_adapter",
]
