"""Bad inputs for the readers of the trainers' formats (torch DCP, kohya, trainer yaml, SAT pickles): through the real
CLI, exit 2 with one line on stderr, the input byte-identical, nothing written."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_trainers import save_cogkit_dcp, save_sat, train, tree_digest


def truncated_dcp(tmp: Path) -> Path:
    folder = save_cogkit_dcp(train("tiny", 4, 2), tmp / "out", 5)
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return folder


def kohya_pair(module: str = "lora_unet__transformer_blocks_0_attn1_to_q") -> dict[str, torch.Tensor]:
    return {f"{module}.lora_down.weight": torch.randn(4, 32), f"{module}.lora_up.weight": torch.randn(32, 4),
            f"{module}.alpha": torch.tensor(2.0)}


def kohya_without_up(tmp: Path) -> Path:
    tensors = kohya_pair()
    del tensors["lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight"]
    path = tmp / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def kohya_alpha_of_wrong_shape(tmp: Path) -> Path:
    tensors = kohya_pair()
    tensors["lora_unet__transformer_blocks_0_attn1_to_q.alpha"] = torch.ones(4)
    path = tmp / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def yaml_not_a_mapping(tmp: Path) -> Path:
    save_dir = save_sat(train("tiny", 4, 1), tmp / "sat", 100)
    (save_dir / "training_config.yaml").write_text("- lora_alpha\n- 2\n")
    return save_dir


def pickle_with_a_foreign_global(tmp: Path) -> Path:
    """SAT's dict with numpy rng state (allowed) and an argparse.Namespace (not on the allow-list)."""
    import numpy

    folder = tmp / "sat" / "100"
    folder.mkdir(parents=True)
    torch.save({"module": {"model.diffusion_model.transformer.layers.0.attention.dense.matrix_A.0": torch.randn(4, 32),
                           "model.diffusion_model.transformer.layers.0.attention.dense.matrix_B.0": torch.randn(32, 4)},
                "np_rng_state": numpy.random.get_state(), "args": argparse.Namespace(lr=1)},
               folder / "mp_rank_00_model_states.pt")
    return tmp / "sat"


BAD = {
    "truncated-dcp": (truncated_dcp, "distributed checkpoint is truncated"),
    "kohya-without-up": (kohya_without_up, "lora_A without lora_B"),
    "kohya-alpha-wrong-shape": (kohya_alpha_of_wrong_shape, "a kohya alpha is one number"),
    "yaml-not-a-mapping": (yaml_not_a_mapping, "is not a mapping"),
    "pickle-foreign-global": (pickle_with_a_foreign_global, "weights_only"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_repair_refuses_bad_trainer_input(name, tmp_path, cli):
    make, expected = BAD[name]
    source = tmp_path / "input"
    source.mkdir()
    checkpoint = make(source)
    before = tree_digest(source)
    out = tmp_path / "adapter"
    result = cli("lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "2")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cogsurgeon: error:") and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]
    assert tree_digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]  # no output, no staging folder
