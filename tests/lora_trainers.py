"""LoRA checkpoints written by each CogVideoX trainer's own save code, on tiny T2V, I2V and 1.5 bases.

None of the trainers imports here without heavy dependencies (CogVideo finetune: pydantic settings, wandb, decord;
finetrainers: its own parallel stack; CogKit: its trainer package; VideoX-Fun: einops, its videox_fun package), so
each saver replicates the trainer's exact calls, with the file:line it replicates (trainer repositories at the commits
fetched on 2026-11-30: THUDM/CogVideo e519ece, a-r-r-o-w/finetrainers f476c37, THUDM/CogKit 1633285,
aigc-apps/VideoX-Fun 804a425). The library calls themselves are real: accelerate's `save_state` with the trainer's
save hook, diffusers' `save_lora_weights` / `write_lora_layers`, peft's `get_peft_model_state_dict`, torch DCP's
`dcp.save`, `torch.save` of SAT's checkpoint dict.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINES = {"tiny": "CogVideoXPipeline", "tiny-i2v": "CogVideoXImageToVideoPipeline", "tiny-1.5": "CogVideoXPipeline"}
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Trained:
    base: str
    model: Any  # the transformer with the adapter active, as the trainer holds it at save time
    output: Any  # its output on the verify inputs
    rank: int
    lora_alpha: float
    targets: list[str]


def run(model) -> Any:
    import torch

    from cogsurgeon.tools.lora.verify import forward_inputs

    with torch.no_grad():
        return model(**forward_inputs(model))[0]


def base_model(base: str):
    from cogsurgeon.inspector import load_transformer

    return load_transformer(base)


def train(base: str, rank: int, lora_alpha: float, targets: list[str] | None = None, *, inject: bool = False,
          seed: int = 1, rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
          **config: Any) -> Trained:
    """A "trained" adapter: the trainer's LoraConfig on the base (add_adapter, or peft's inject_adapter_in_model where
    the trainer uses that), every LoRA weight set to seeded random values so that B is non-zero. `config`: more
    LoraConfig settings (use_dora=True, lora_bias=True)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    targets = targets or ATTENTION
    model = base_model(base)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights=True, target_modules=targets,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, **config)
    if inject:
        model = inject_adapter_in_model(config, model)
    else:
        model.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return Trained(base, model, run(model), rank, lora_alpha, targets)


def all_linear_names(base: str) -> list[str]:
    import torch

    return [name for name, module in base_model(base).named_modules() if isinstance(module, torch.nn.Linear)]


def pipeline_class(base: str):
    import diffusers

    return getattr(diffusers, PIPELINES[base])


def _accelerate_save_state(trained: Trained, folder: Path, hook, **save_kwargs) -> None:
    """`accelerator.save_state(folder)` with a trainer's save hook registered, as the trainers run it (CPU here)."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(trained.model)
    optimizer = accelerator.prepare(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    del optimizer
    accelerator.register_save_state_pre_hook(hook)
    accelerator.save_state(str(folder), **save_kwargs)


def save_cogvideo_finetune(trained: Trained, output_dir: Path, step: int) -> Path:
    """CogVideo finetune/trainer.py:736-757 (save_model_hook: get_peft_model_state_dict, weights.pop(),
    pipeline_cls.save_lora_weights(output_dir, transformer_lora_layers=...)), run by accelerator.save_state
    (trainer.py:811) into output_dir/checkpoint-{step}."""
    from peft import get_peft_model_state_dict

    pipeline = pipeline_class(trained.base)

    def save_model_hook(models, weights, output_dir):
        transformer_lora_layers_to_save = None
        for model in models:
            transformer_lora_layers_to_save = get_peft_model_state_dict(model)
            if weights:
                weights.pop()
        pipeline.save_lora_weights(output_dir, transformer_lora_layers=transformer_lora_layers_to_save)

    folder = output_dir / f"checkpoint-{step}"
    _accelerate_save_state(trained, folder, save_model_hook, safe_serialization=True)
    return folder


def save_diffusers_final(trained: Trained, output_dir: Path) -> Path:
    """diffusers examples/cogvideo/train_cogvideox_lora.py at the end of training: transformer.to(dtype),
    get_peft_model_state_dict(transformer), CogVideoXPipeline.save_lora_weights(save_directory=output_dir,
    transformer_lora_layers=...) — cogvideox-factory's scripts end the same way."""
    from peft import get_peft_model_state_dict

    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline_class(trained.base).save_lora_weights(
        save_directory=str(output_dir), transformer_lora_layers=get_peft_model_state_dict(trained.model))
    return output_dir


def _finetrainers_lora_weights_hook(trained: Trained, output_dir: Path, step: int):
    """finetrainers' save_model_hook, sft_trainer/trainer.py:279-298: get_peft_model_state_dict, lora_config metadata,
    _save_lora_weights into output_dir/lora_weights/{step:06d}, models/cogvideox/base_specification.py:366-383
    (CogVideoXPipeline.save_lora_weights with safetensors_torch_save_function, utils/serialization.py:6-10, and
    scheduler.save_pretrained)."""
    from diffusers import CogVideoXDDIMScheduler
    from peft import get_peft_model_state_dict
    import safetensors.torch

    def safetensors_torch_save_function(weights, filename, metadata=None):
        metadata = {} if metadata is None else metadata
        metadata["format"] = "pt"
        safetensors.torch.save_file(weights, filename, metadata)

    def callback(state_dict):
        state_dict = get_peft_model_state_dict(trained.model, state_dict)
        metadata = {"r": trained.rank, "lora_alpha": trained.lora_alpha, "init_lora_weights": True,
                    "target_modules": trained.targets}
        metadata = {"lora_config": json.dumps(metadata, indent=4)}
        directory = output_dir / "lora_weights" / f"{step:06d}"
        pipeline_class(trained.base).save_lora_weights(
            str(directory), state_dict,
            save_function=functools.partial(safetensors_torch_save_function, metadata=metadata),
            safe_serialization=True)
        CogVideoXDDIMScheduler().save_pretrained(str(directory / "scheduler"))

    return callback


def save_finetrainers(trained: Trained, output_dir: Path, step: int) -> Path:
    """finetrainers with its accelerate backend: the lora_weights hook above, run from parallel/accelerate.py:278-288,
    whose hook does not pop the weights, so accelerate also writes finetrainers_step_{step}/model.safetensors with the
    whole model, and states.pt."""
    import torch

    callback = _finetrainers_lora_weights_hook(trained, output_dir, step)

    def save_model_hook(models, weights, output_dir_):
        assert len(models) == 1
        callback(weights[0])
        torch.save({"step": step}, Path(output_dir_) / "states.pt")

    _accelerate_save_state(trained, output_dir / f"finetrainers_step_{step}", save_model_hook, safe_serialization=True)
    return output_dir


def save_finetrainers_ptd(trained: Trained, output_dir: Path, step: int, *, lora_weights: bool = True) -> Path:
    """finetrainers with its PTD backend: PTDCheckpointer.save (parallel/ptd.py:332-352) runs
    torch.distributed.checkpoint.save(states, checkpoint_id=output_dir/finetrainers_step_{step}) over
    {"train_state": TrainState (state.py:16-38), "model": ModelWrapper (ptd.py:282-287: get_model_state_dict, the
    whole PEFT-injected model), "optimizer": OptimizerWrapper (optimizer.py:47-52: get_optimizer_state_dict,
    flattened), "dataloader", "lr_scheduler" (optimizer.py:80-84)} (sft_trainer/trainer.py:309-319), then calls the
    lora_weights hook with the gathered model state. The dataloader (a torchdata StatefulDataLoader there) is a small
    Stateful here. Without `lora_weights`, the lora_weights/ folder is left out (a run whose copy lost it)."""
    import functools as _functools
    import io

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    class TrainState(Stateful):
        def state_dict(self):
            losses = io.BytesIO()
            torch.save([0.5], losses)
            return {"step": torch.tensor(step, dtype=torch.int32), "observed_data_samples": torch.tensor(step),
                    "global_avg_losses": losses}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    class ModelWrapper(Stateful):
        def __init__(self, model):
            self.model = [model]

        def state_dict(self):
            return {k: v for sd in map(get_model_state_dict, self.model) for k, v in sd.items()}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    class OptimizerWrapper(Stateful):
        def __init__(self, model):
            self.model_parts = [model]
            self.optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4)]

        def state_dict(self):
            func = _functools.partial(get_optimizer_state_dict,
                                      options=StateDictOptions(flatten_optimizer_state_dict=True))
            return {k: v for sd in map(func, self.model_parts, self.optimizers) for k, v in sd.items()}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    class DataLoaderState(Stateful):
        def state_dict(self):
            return {"samples_yielded": torch.tensor(step)}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    optimizers = OptimizerWrapper(trained.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizers.optimizers[0], lambda _: 1.0)
    states = {"train_state": TrainState(), "model": ModelWrapper(trained.model), "optimizer": optimizers,
              "dataloader": DataLoaderState(), "lr_scheduler": scheduler}
    dcp.save(states, checkpoint_id=str(output_dir / f"finetrainers_step_{step}"), no_dist=True)
    if lora_weights:
        _finetrainers_lora_weights_hook(trained, output_dir, step)(
            {k: v.detach().cpu() for k, v in trained.model.state_dict().items()})
    return output_dir


COGKIT_RANK, COGKIT_ALPHA = 128, 64  # CogKit src/cogkit/utils/lora.py:33-38, hard-coded


def train_cogkit(base: str, seed: int = 5) -> Trained:
    """CogKit injects its hard-coded config with peft's inject_adapter_in_model (utils/lora.py:56-57)."""
    return train(base, COGKIT_RANK, COGKIT_ALPHA, inject=True, seed=seed)


def save_cogkit_low_vram(trained: Trained, output_dir: Path, step: int) -> Path:
    """CogKit low_vram: base_trainer.py:428-443 -> save_lora (utils/lora.py:78-92): get_peft_model_state_dict,
    save_file(..., checkpoint-{step}/adapter_model.safetensors, metadata={"format": "pt"})."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file(get_peft_model_state_dict(trained.model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def save_cogkit_dcp(trained: Trained, output_dir: Path, step: int) -> Path:
    """CogKit default: base_trainer.py:435-439, dcp.save({"app": AppState(model, optimizer, lora=True)}, checkpoint_id),
    AppState.state_dict as in finetune/utils/ckpt.py:52-63 (get_state_dict, then the LoRA part only)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    class AppState(Stateful):
        def __init__(self, model, optimizer=None, lora: bool = False):
            self.model, self.optimizer, self.lora = model, optimizer, lora

        def state_dict(self):
            model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
            if self.lora:
                model_state_dict = get_peft_model_state_dict(self.model)
            return {"model": model_state_dict, "optim": optimizer_state_dict}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    optimizer = torch.optim.AdamW([p for p in trained.model.parameters() if p.requires_grad], lr=1e-4)
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    dcp.save({"app": AppState(trained.model, optimizer, lora=True)}, checkpoint_id=str(folder), no_dist=True)
    return folder


SAT_NAMES = {"to_q": ("query_key_value", 0), "to_k": ("query_key_value", 1), "to_v": ("query_key_value", 2),
             "to_out.0": ("dense", 0)}


def sat_state(trained: Trained) -> dict[str, Any]:
    """The SAT model's LoRA matrices (sat/ LoraMixin names), from the trained adapter."""
    from peft import get_peft_model_state_dict

    state: dict[str, Any] = {}
    for key, value in get_peft_model_state_dict(trained.model).items():
        block, rest = key.removeprefix("transformer_blocks.").split(".attn1.")
        target, part = rest.split(".lora_")
        linear, partition = SAT_NAMES[target]
        state[f"model.diffusion_model.transformer.layers.{block}.attention.{linear}.matrix_{part[0]}.{partition}"] = value
    return state


def save_sat(trained: Trained, save_dir: Path, iteration: int, *, config_alpha: float | None = None) -> Path:
    """SwissArmyTransformer's save_checkpoint as SAT's train_video.py runs it: {save}/{iteration}/
    mp_rank_00_model_states.pt holding {"iteration", "module"} and, with rng saving on (the default), python, numpy,
    torch rng states; `latest`; training_config.yaml (train_video.py:188-192)."""
    import random

    import numpy
    import torch
    import yaml

    state = sat_state(trained)
    state["model.diffusion_model.transformer.layers.0.attention.dense.weight"] = torch.zeros(8, 8)  # SAT saves it all
    checkpoint = {"iteration": iteration, "module": state, "random_rng_state": random.getstate(),
                  "np_rng_state": numpy.random.get_state(), "torch_rng_state": torch.get_rng_state()}
    folder = save_dir / str(iteration)
    folder.mkdir(parents=True)
    torch.save(checkpoint, folder / "mp_rank_00_model_states.pt")
    (save_dir / "latest").write_text(str(iteration))
    config = {"model": {"lora_config": {"target": "sat.model.finetune.lora2.LoraMixin", "params": {"r": trained.rank}}}}
    if config_alpha is not None:
        config["model"]["lora_config"]["params"]["lora_alpha"] = config_alpha
    (save_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    return save_dir


def save_sat_export(trained: Trained, output_dir: Path) -> Path:
    """CogVideo tools/export_sat_lora_weight.py:19-62: SAT keys renamed (LORA_KEYS_RENAME, layers ->
    transformer_blocks, "model.diffusion_model." removed), then LoraBaseMixin.write_lora_layers(state_dict,
    save_directory, is_main_process=True, weight_name=None, save_function=None, safe_serialization=True)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    rename = {"attention.query_key_value.matrix_A.0": "attn1.to_q.lora_A.weight",
              "attention.query_key_value.matrix_A.1": "attn1.to_k.lora_A.weight",
              "attention.query_key_value.matrix_A.2": "attn1.to_v.lora_A.weight",
              "attention.query_key_value.matrix_B.0": "attn1.to_q.lora_B.weight",
              "attention.query_key_value.matrix_B.1": "attn1.to_k.lora_B.weight",
              "attention.query_key_value.matrix_B.2": "attn1.to_v.lora_B.weight",
              "attention.dense.matrix_A.0": "attn1.to_out.0.lora_A.weight",
              "attention.dense.matrix_B.0": "attn1.to_out.0.lora_B.weight"}
    lora_state_dict = {}
    for key, value in sat_state(trained).items():
        new_key = key[len("model.diffusion_model."):]
        for special_key, lora_key in rename.items():
            if new_key.endswith(special_key):
                new_key = new_key.replace(special_key, lora_key).replace("layers", "transformer_blocks")
                lora_state_dict[new_key] = value
    output_dir.mkdir(parents=True)
    LoraBaseMixin.write_lora_layers(state_dict=lora_state_dict, save_directory=str(output_dir), is_main_process=True,
                                    weight_name=None, save_function=None, safe_serialization=True)
    return output_dir


def peft_to_kohya(state_dict: dict[str, Any]) -> dict[str, Any]:
    """VideoX-Fun utils/lora_utils.py:390-407 convert_peft_lora_to_kohya_lora: lora_unet__ + the key with lora_A/B as
    lora_down/up and every "." but the last as "_" (no .alpha is written)."""
    converted = {}
    for key, value in state_dict.items():
        name, _, part = key.rpartition(".lora_")
        down_up = {"A.weight": "lora_down", "B.weight": "lora_up"}[part]
        converted[f"lora_unet__{name.replace('.', '_')}.{down_up}.weight"] = value
    return converted


def save_videox_fun_peft(trained: Trained, output_dir: Path, step: int) -> Path:
    """VideoX-Fun scripts/cogvideox_fun/train_lora.py:1774-1781 with --use_peft_lora: get_peft_model_state_dict,
    save_model (train_lora.py:1404-1410: save_file(..., metadata={"format": "pt"})) to checkpoint-{step}.safetensors
    and the converted kohya dict to checkpoint-{step}-compatible_with_comfyui.safetensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    network_state_dict = get_peft_model_state_dict(trained.model)
    save_file(network_state_dict, str(output_dir / f"checkpoint-{step}.safetensors"), metadata={"format": "pt"})
    save_file(peft_to_kohya(network_state_dict), str(output_dir / f"checkpoint-{step}-compatible_with_comfyui.safetensors"),
              metadata={"format": "pt"})
    return output_dir


def save_videox_fun_network(trained: Trained, output_dir: Path, step: int, text_encoder=None) -> Path:
    """VideoX-Fun without --use_peft_lora: LoRANetwork (utils/lora_utils.py:170-270) over every Linear of the
    transformer, names `lora_unet` + "." + "" + "." + child name with "." -> "_", each LoRAModule holding
    lora_down, lora_up and an `alpha` buffer (lora_utils.py:60-70); save_weights (lora_utils.py:335-358) casts to the
    weight dtype and writes sshs_* hashes as metadata; train_lora.py:1784-1785 names it checkpoint-{step}.safetensors.
    The trained model here is PEFT over the same Linear layers, which computes the same x + up(down(x)) * alpha/r.
    With `text_encoder` (a T5EncoderModel; train_lora.py:873 applies the network to it with --train_text_encoder),
    its LoRA is saved beside: `lora_te` + "." + module + "." + child for every Linear inside the
    TEXT_ENCODER_TARGET_REPLACE_MODULE classes (lora_utils.py:170-172, 229, 261), seeded random values."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state_dict: dict[str, Any] = {}
    for key, value in get_peft_model_state_dict(trained.model).items():
        name, _, part = key.rpartition(".lora_")
        lora_name = f"lora_unet..{name}".replace(".", "_")
        state_dict[f"{lora_name}.{ {'A.weight': 'lora_down', 'B.weight': 'lora_up'}[part] }.weight"] = value
        state_dict[f"{lora_name}.alpha"] = torch.tensor(float(trained.lora_alpha))
    if text_encoder is not None:
        generator = torch.Generator().manual_seed(3)
        targets = ["T5LayerSelfAttention", "T5LayerFF", "BertEncoder", "T5SelfAttention", "T5CrossAttention"]
        for name, module in text_encoder.named_modules():
            if module.__class__.__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                if child.__class__.__name__ == "Linear":
                    lora_name = f"lora_te.{name}.{child_name}".replace(".", "_")
                    state_dict[f"{lora_name}.lora_down.weight"] = torch.randn(trained.rank, child.in_features,
                                                                              generator=generator)
                    state_dict[f"{lora_name}.lora_up.weight"] = torch.randn(child.out_features, trained.rank,
                                                                            generator=generator)
                    state_dict[f"{lora_name}.alpha"] = torch.tensor(float(trained.lora_alpha))
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state_dict.values())).hexdigest()
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in state_dict.items()},
              str(output_dir / f"checkpoint-{step}.safetensors"),
              {"sshs_model_hash": digest, "sshs_legacy_hash": digest[:8]})
    return output_dir


def kijai_merge(transformer, lora_path: Path, multiplier: float = 1.0):
    """ComfyUI-CogVideoXWrapper lora_utils.py:369-423 (merge_lora): per layer, weight += multiplier * alpha * up @ down
    with alpha = .alpha / up.shape[1], or 1.0 without .alpha. The layer is found from the key as its greedy underscore
    walk finds it; here through the kohya grammar of tools/lora/keys.py."""
    import torch
    from safetensors.torch import load_file

    from cogsurgeon.tools.lora.keys import kohya_module

    updates: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(lora_path)).items():
        layer, elem = key.split(".", 1)
        updates.setdefault(layer, {})[elem] = value
    modules = dict(transformer.named_modules())
    for layer, elems in updates.items():
        current = modules[kohya_module(layer.split("lora_unet_")[-1])]
        weight_up = elems["lora_up.weight"].to(torch.float32)
        weight_down = elems["lora_down.weight"].to(torch.float32)
        alpha = elems["alpha"].item() / weight_up.shape[1] if "alpha" in elems else 1.0
        current.weight.data += multiplier * alpha * torch.mm(weight_up, weight_down)
    return transformer


REPRODUCE_ATOL = 1e-5


def assert_reproduces(base: str, out: Path, expected: Any) -> None:
    """The repaired folder `out` through PEFT (`PeftModel.from_pretrained`), diffusers (`load_lora_adapter`, as verify
    loads it) and, where it holds comfyui_lora.safetensors, kijai's ComfyUI merge gives `expected` (the trained
    model's output) within 1e-5 in fp32; and the LoRA changes the output, so that a wrong scale would show."""
    import torch
    from peft import PeftModel

    from cogsurgeon.tools.lora.verify import load_with_diffusers

    assert (expected - run(base_model(base))).abs().max() > 1e-3
    torch.testing.assert_close(run(PeftModel.from_pretrained(base_model(base), str(out))), expected,
                               atol=REPRODUCE_ATOL, rtol=0)
    model = base_model(base)
    load_with_diffusers(model, out)
    torch.testing.assert_close(run(model), expected, atol=REPRODUCE_ATOL, rtol=0)
    if (out / "comfyui_lora.safetensors").exists():
        torch.testing.assert_close(run(kijai_merge(base_model(base), out / "comfyui_lora.safetensors")), expected,
                                   atol=REPRODUCE_ATOL, rtol=0)


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def peft_folder(trained, folder: Path) -> Path:
    """A trained tiny LoRA saved as a PEFT adapter folder (`base_model.model.` keys, adapter_config.json)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained.model).items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    trained.model.peft_config["default"].save_pretrained(str(folder))
    return folder


def stores_lora_metadata(folder: Path) -> bool:
    """Whether diffusers' `save_lora_adapter` wrote the LoraConfig as `lora_adapter_metadata` (diffusers 0.34 on;
    0.32 writes the tensors alone, so its files store no lora_alpha and no patterns)."""
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        return "lora_adapter_metadata" in (handle.metadata() or {})
