"""Real LoRA checkpoints for the tests, made the way trainers make them: peft `add_adapter` on a tiny CogVideoX
transformer with random non-zero lora_B, then each trainer's save path (diffusers' `save_lora_weights`, PEFT state
dicts, a SAT torch save). Every LoRA is trained with lora_alpha != rank so that a wrong scale shows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "tiny-i2v"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ACCELERATE_FILES = {"optimizer.bin": b"accelerate optimizer state", "scheduler.bin": b"scheduler state",
                    "random_states_0.pkl": b"rng state"}


@dataclass
class TrainedLora:
    model: Any  # the transformer with the adapter active
    output: Any  # its output on `model_inputs`
    rank: int
    lora_alpha: float
    rank_pattern: dict[str, int]


def model_inputs(model) -> dict[str, Any]:
    from cogsurgeon.tools.lora.verify import forward_inputs

    return forward_inputs(model)


def run(model) -> Any:
    import torch

    with torch.no_grad():
        return model(**model_inputs(model))[0]


def train(rank: int, lora_alpha: float, rank_pattern: dict[str, int] | None = None, seed: int = 1) -> TrainedLora:
    import torch
    from peft import LoraConfig

    from cogsurgeon.inspector import load_transformer

    model = load_transformer(BASE)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=TARGETS, init_lora_weights=True,
                                 rank_pattern=rank_pattern or {}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # a "trained" adapter: B non-zero, A away from its init
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return TrainedLora(model, run(model), rank, lora_alpha, rank_pattern or {})


def peft_state_dict(trained: TrainedLora) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.contiguous() for k, v in get_peft_model_state_dict(trained.model).items()}


def save_cogvideo_checkpoint(trained: TrainedLora, folder: Path, *, accelerate_state: bool = True, metadata: bool = False) -> Path:
    """As CogVideo's finetune trainer saves: the pipeline classmethod, accelerate state files beside."""
    from diffusers import CogVideoXImageToVideoPipeline

    folder.mkdir(parents=True)
    extra = {}
    if metadata:
        extra["transformer_lora_adapter_metadata"] = trained.model.peft_config["default"].to_dict()
    CogVideoXImageToVideoPipeline.save_lora_weights(str(folder), transformer_lora_layers=peft_state_dict(trained), **extra)
    if accelerate_state:
        for name, content in ACCELERATE_FILES.items():
            (folder / name).write_bytes(content)
    return folder


def save_cogkit(trained: TrainedLora, folder: Path) -> Path:
    """CogKit's unprefixed `adapter_model.safetensors` (no adapter_config.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(peft_state_dict(trained), str(folder / "adapter_model.safetensors"))
    return folder


def save_with_adapter_name(trained: TrainedLora, folder: Path, *, with_config: bool) -> Path:
    """A raw state_dict of the PEFT-injected model: `.lora_A.default.weight` keys; optionally PEFT's config beside."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in trained.model.state_dict().items() if ".lora_" in k}
    save_file(tensors, str(folder / "lora.safetensors"))
    if with_config:
        trained.model.peft_config["default"].save_pretrained(str(folder))
    return folder


def save_peft_folder(trained: TrainedLora, folder: Path) -> Path:
    """What `PeftModel.save_pretrained` writes: `base_model.model.` keys and adapter_config.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({f"base_model.model.{k}": v for k, v in peft_state_dict(trained).items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    trained.model.peft_config["default"].save_pretrained(str(folder))
    return folder


SAT_NAMES = {"to_q": ("query_key_value", 0), "to_k": ("query_key_value", 1), "to_v": ("query_key_value", 2),
             "to_out.0": ("dense", 0)}


def save_sat(trained: TrainedLora, save_dir: Path, iteration: int = 1000, *, config_alpha: float | None = None) -> Path:
    """SAT's layout: `{save_dir}/{iteration}/mp_rank_00_model_states.pt` ({"module": state_dict}, the whole model
    with the LoRA matrices), `latest`, and `training_config.yaml` beside."""
    import torch

    import yaml

    state: dict[str, Any] = {}
    for key, value in peft_state_dict(trained).items():
        block, rest = key.removeprefix("transformer_blocks.").split(".attn1.")
        target, part = rest.split(".lora_")
        linear, partition = SAT_NAMES[target]
        state[f"model.diffusion_model.transformer.layers.{block}.attention.{linear}.matrix_{part[0]}.{partition}"] = value
    # the rest of the model, which SAT saves too
    state["model.diffusion_model.transformer.layers.0.attention.dense.weight"] = torch.zeros(32, 32)
    folder = save_dir / str(iteration)
    folder.mkdir(parents=True)
    torch.save({"module": state, "iteration": iteration}, folder / "mp_rank_00_model_states.pt")
    (save_dir / "latest").write_text(str(iteration))
    if config_alpha is not None:
        config = {"model": {"lora_config": {"target": "sat.model.finetune.lora2.LoraMixin",
                                            "params": {"r": trained.rank, "lora_alpha": config_alpha}}}}
        (save_dir / "training_config.yaml").write_text(yaml.safe_dump(config))
    return save_dir


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file) with its sha256: to show an input is byte-identical afterwards."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


STAGING_OF_A_DEAD_RUN = """
import os, sys
from pathlib import Path
from cogsurgeon.tools.lora.publish import _hidden_folder
folder = _hidden_folder(Path(sys.argv[1]), "partial")  # as a repair makes it, owner marker and all
(folder / "adapter_model.safetensors").write_bytes(bytes(4096))
print(folder)
os._exit(0)  # dies without cleaning up, as a SIGKILLed run would
"""


def staging_of_a_dead_run(out: Path) -> Path:
    """A staging folder of `out` made by cogsurgeon's own code in a process that then died without cleaning up."""
    import subprocess
    import sys

    from conftest import cli_environment

    made = subprocess.run([sys.executable, "-c", STAGING_OF_A_DEAD_RUN, str(out)], capture_output=True, text=True,
                          env=cli_environment(), timeout=120, check=True)
    return Path(made.stdout.strip())
