"""`cogsurgeon modules` as a user runs it: a real subprocess."""

import json

import torch

from cogsurgeon.inspector import load_transformer


def test_modules_json_for_the_5b_i2v_architecture(cli):
    result = cli("modules", "cogvideox-5b-i2v", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1067
    attn = next(row for row in rows if row["name"] == "transformer_blocks.0.attn1")
    assert attn["class"] == "Attention"
    assert attn["file"].endswith("attention_processor.py") and attn["line"] > 0
    assert attn["processor"] == "CogVideoXAttnProcessor2_0"
    assert {"name", "class", "file", "line", "params", "dtype", "device", "processor"} <= attn.keys()
    assert rows[0]["device"] == "meta"


def test_modules_of_a_saved_bf16_folder_show_cpu_and_bfloat16(cli, tmp_path):
    load_transformer("tiny", dtype=torch.bfloat16).save_pretrained(tmp_path)
    result = cli("modules", str(tmp_path), "--json", "--filter", "to_q")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows and all(row["device"] == "cpu" and row["dtype"] == "bfloat16" for row in rows)


def test_human_table_folds_repeated_blocks(cli):
    result = cli("modules", "tiny")
    assert result.returncode == 0, result.stderr
    assert "transformer_blocks.(0-1).attn1" in result.stdout
    assert "CogVideoXAttnProcessor2_0" in result.stdout


def test_bad_model_is_one_line_and_exit_2(cli, tmp_path):
    for args in (["modules", "cogvideox-9b"], ["modules", str(tmp_path)], ["modules", "tiny", "--dtype", "int8"]):
        result = cli(*args)
        assert result.returncode == 2, args
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_usage_error_is_one_line_and_exit_2(cli):
    result = cli("modules", "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--no-such-flag" in result.stderr
