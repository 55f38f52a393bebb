"""A VideoX-Fun LoRA trained with --train_text_encoder (issue 23, item 6): its network saves the T5 encoder's LoRA
(`lora_te_` keys) beside the transformer's (`lora_unet_`) in one checkpoint-N.safetensors (tests/lora_trainers.py
save_videox_fun_network replicates VideoX-Fun 804a425 videox_fun/utils/lora_utils.py:170-172, 229, 261, 335-358 and
scripts/cogvideox_fun/train_lora.py:873, 1411). The transformer part is repaired at the trained strength; the
text-encoder part is left out, and inspect and repair say so.
"""

from __future__ import annotations

import json

import pytest

from lora_trainers import all_linear_names, assert_reproduces, save_videox_fun_network, train, tree_digest

pytestmark = pytest.mark.diffusers_versions


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))


def test_text_encoder_lora_is_left_out_and_said(tmp_path, cli):
    trained = train("tiny", 4, 2, all_linear_names("tiny"), seed=51)
    out_dir = save_videox_fun_network(trained, tmp_path / "out", 7, text_encoder=tiny_t5())
    checkpoint = out_dir / "checkpoint-7.safetensors"
    before = tree_digest(out_dir)

    inspected = cli("lora", "inspect", str(checkpoint), "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert (report["format"], report["alpha"], report["problems"]) == ("kohya", 2, [])
    # 2 T5 blocks: q, k, v, o of self-attention and wi, wo of the feed-forward, 3 tensors each
    assert len(report["text_encoder"]) == 2 * 6 * 3
    assert "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in report["text_encoder"]
    assert "TEXT ENCODER LEFT OUT: 36 tensors of a text-encoder LoRA (12 lora_te_ modules" in inspected.stderr

    out = tmp_path / "adapter"
    repaired = cli("lora", "repair", str(checkpoint), "--out", str(out), "--to", "peft,diffusers,comfyui")
    assert repaired.returncode == 0, repaired.stderr
    assert "TEXT ENCODER LEFT OUT" in repaired.stderr
    assert tree_digest(out_dir) == before
    assert_reproduces("tiny", out, trained.output)


def test_a_file_with_only_the_text_encoder_lora_says_so(tmp_path, cli):
    from safetensors.torch import load_file, save_file

    trained = train("tiny", 4, 2, seed=52)
    out_dir = save_videox_fun_network(trained, tmp_path / "out", 7, text_encoder=tiny_t5())
    only_te = {k: v for k, v in load_file(str(out_dir / "checkpoint-7.safetensors")).items() if k.startswith("lora_te")}
    save_file(only_te, str(tmp_path / "te.safetensors"))
    result = cli("lora", "inspect", str(tmp_path / "te.safetensors"))
    assert result.returncode == 2 and "only a text encoder's LoRA (36 lora_te_ tensors)" in result.stderr
