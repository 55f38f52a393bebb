"""Hostile inputs to the parsers (issue 16 items 6-8): each ends in exit 2 with one line on stderr, no traceback,
in bounded time (every subprocess has a timeout: a hang fails the test), the input byte-identical and nothing
written; the inventory cache rebuilds silently instead. Files are crafted byte by byte, as an attacker would."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import cli_environment, run_cli_in_process, runs_in_process
from lora_helpers import tree_digest

A_KEY = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"
B_KEY = "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"
TIMEOUT = 60  # seconds; every case here takes about one


def cogsurgeon(*args: str, env: dict[str, str] | None = None, stdout=subprocess.PIPE, prefix: tuple[str, ...] = (),
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The CLI on ARGS, stdout and stderr as bytes: in this process where nothing about the process is under test
    (`conftest.run_cli`'s rule), else a subprocess (a `prefix` such as `ulimit`, stdout a given file, start-up
    variables)."""
    if prefix == () and stdout is subprocess.PIPE and runs_in_process(args, env):
        result = run_cli_in_process(list(args), env=env, timeout=timeout, text=False)
        return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, result.stderr)
    return subprocess.run([*prefix, sys.executable, "-m", "cogsurgeon.inspector", *args], stdout=stdout,
                          stderr=subprocess.PIPE, env=cli_environment(env), timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, expected: str = "", prefix: str = "cogsurgeon: error:") -> None:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (result.returncode, result.stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and lines[0].startswith(prefix), stderr
    assert expected in lines[0], lines[0]


def safetensors_bytes(header: dict | str | bytes, data: bytes = b"") -> bytes:
    """A file from a header given as an object, as JSON text, or as raw bytes (padded to 8 like safetensors)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def lora_header(a_shape=(4, 8), b_shape=(8, 4), dtype="F32", metadata: dict | None = None) -> tuple[dict, bytes]:
    a_bytes = 4 * int(np.prod(a_shape))
    b_bytes = 4 * int(np.prod(b_shape))
    header: dict = {A_KEY: {"dtype": dtype, "shape": list(a_shape), "data_offsets": [0, a_bytes]},
                    B_KEY: {"dtype": dtype, "shape": list(b_shape), "data_offsets": [a_bytes, a_bytes + b_bytes]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    return header, b"\x01" * (a_bytes + b_bytes)


def with_metadata(config: dict) -> bytes:
    """A diffusers >= 0.34 file whose lora_adapter_metadata holds `config` (values as JSON text, NaN allowed)."""
    text = "{" + ", ".join(f'"transformer.{k}": {v}' for k, v in config.items()) + "}"
    header, data = lora_header(metadata={"format": "pt", "lora_adapter_metadata": text})
    return safetensors_bytes(header, data)


def entry_with(field: str, value_json: str) -> bytes:
    """The A tensor's `field` replaced by raw JSON text (so Infinity, 1e3 and friends survive as written)."""
    header, data = lora_header()
    text = json.dumps(header)
    original = json.dumps(header[A_KEY][field])
    return safetensors_bytes(text.replace(f'"{field}": {original}', f'"{field}": {value_json}', 1), data)


# (name, file bytes, words the one line must hold) for `lora repair FILE --out DIR` (and inspect where it applies)
DEPTH = 100_000
CRAFTED: list[tuple[str, bytes, str]] = [
    # item 6: what loaders reject or misread
    ("zero-rank", safetensors_bytes(*lora_header((0, 8), (8, 0))), "not a positive integer"),
    ("negative-shape", entry_with("shape", "[-4, 8]"), "shape"),
    ("lone-surrogate-key", safetensors_bytes(json.dumps(lora_header()[0]).replace(
        "to_q.lora_A", "to_q\\ud800.lora_A"), lora_header()[1]), "surrogate"),
    ("alpha-nan", with_metadata({"r": 4, "lora_alpha": "NaN"}), "lora_alpha"),
    ("alpha-infinity", with_metadata({"r": 4, "lora_alpha": "Infinity"}), "lora_alpha"),
    ("alpha-negative", with_metadata({"r": 4, "lora_alpha": "-8"}), "lora_alpha"),
    ("alpha-zero", with_metadata({"r": 4, "lora_alpha": "0"}), "lora_alpha"),
    ("alpha-boolean", with_metadata({"r": 4, "lora_alpha": "true"}), "lora_alpha"),
    ("alpha-401-digits", with_metadata({"r": 4, "lora_alpha": "9" * 401}), "lora_alpha"),
    ("alpha-pattern-string-values", with_metadata({"r": 4, "lora_alpha": "8", "alpha_pattern": '{"x": "big"}'}),
     "alpha_pattern"),
    ("alpha-pattern-a-list", with_metadata({"r": 4, "lora_alpha": "8", "alpha_pattern": "[1, 2]"}), "alpha_pattern"),
    ("shape-strings", entry_with("shape", '["4", "8"]'), "shape"),
    ("shape-floats", entry_with("shape", "[4.0, 8.0]"), "shape"),
    ("offsets-floats", entry_with("data_offsets", "[0.0, 128.0]"), "data_offsets"),
    ("offsets-strings", entry_with("data_offsets", '["0", "128"]'), "data_offsets"),
    ("byte-order-mark", safetensors_bytes(b"\xef\xbb\xbf" + json.dumps(lora_header()[0]).encode(), lora_header()[1]),
     "byte-order mark"),
    ("header-over-100-MB", struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6, "limit"),
    # item 7: what crashed the parsers
    ("dtype-a-list", entry_with("dtype", '["F32"]'), "dtype"),
    ("dtype-a-dict", entry_with("dtype", '{"F32": 1}'), "dtype"),
    ("shape-infinity", entry_with("shape", "[Infinity, 8]"), "not valid JSON"),
    ("offsets-infinity", entry_with("data_offsets", "[0, Infinity]"), "not valid JSON"),
    ("nested-header", safetensors_bytes("[" * DEPTH + "]" * DEPTH), "not valid JSON"),
    # item 8: a huge repeated shape (its element count overflows 64 bits long before the end)
    ("huge-repeated-shape", entry_with("shape", "[" + ", ".join(["4294967296"] * 100_000) + "]"), "overflows"),
]


@pytest.mark.parametrize("name, content, expected", CRAFTED, ids=[case[0] for case in CRAFTED])
def test_crafted_lora_files_are_refused_in_one_line(tmp_path, name, content, expected):
    source = tmp_path / "input"
    source.mkdir()
    (source / "pytorch_lora_weights.safetensors").write_bytes(content)
    before = tree_digest(source)
    result = cogsurgeon("lora", "repair", str(source), "--out", str(tmp_path / "out"), "--alpha", "8")
    assert_one_line(result, expected)
    assert result.stdout == b""
    assert tree_digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_nested_metadata_is_one_line(tmp_path):
    """A lora_adapter_metadata nested 100,000 deep: inspect lists it as a problem, repair refuses in one line."""
    header, data = lora_header(metadata={"lora_adapter_metadata": "[" * DEPTH + "]" * DEPTH})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    inspected = cogsurgeon("lora", "inspect", str(path), "--json", "--alpha", "8")
    assert inspected.returncode == 0 and b"Traceback" not in inspected.stderr, inspected.stderr
    assert any("nested too deeply" in problem for problem in json.loads(inspected.stdout)["problems"])
    assert_one_line(cogsurgeon("lora", "repair", str(path), "--out", str(tmp_path / "out"), "--alpha", "8"),
                    "nested too deeply")
    assert not (tmp_path / "out").exists()


def valid_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header, data = lora_header()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(safetensors_bytes(header, data))
    return folder


def symlink_loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def long_name(tmp: Path) -> Path:
    return tmp / ("x" * 300 + ".safetensors")


def undecodable_name(tmp: Path) -> Path:
    name = os.fsdecode(b"lora-\xff\xfe.safetensors")  # a name from a non-UTF-8 file system
    (tmp / name).write_bytes(b"not safetensors at all")
    return tmp / name


def fifo_in_folder(tmp: Path) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    os.mkfifo(folder / "lora.safetensors")  # no writer: opening it for reading blocks forever
    return folder


def fifo_itself(tmp: Path) -> Path:
    os.mkfifo(tmp / "pytorch_lora_weights.safetensors")
    return tmp / "pytorch_lora_weights.safetensors"


def sat_iteration_superscript(tmp: Path) -> Path:
    (tmp / "sat" / "²").mkdir(parents=True)
    (tmp / "sat" / "²" / "mp_rank_00_model_states.pt").write_bytes(b"")
    return tmp / "sat"


def sat_latest_not_utf8(tmp: Path) -> Path:
    (tmp / "sat").mkdir()
    (tmp / "sat" / "latest").write_bytes(b"\xff\xfe1000")
    return tmp / "sat"


def yaml_alias_bomb(tmp: Path) -> Path:
    folder = valid_checkpoint(tmp / "ckpt")
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    (folder / "training_config.yaml").write_text("\n".join(lines) + "\n")  # 9**12 strings if expanded
    return folder


# (name, make CKPT, extra arguments, words the one line must hold)
HOSTILE_PATHS = [
    ("symlink-loop", symlink_loop, "symlink loop"),
    ("name-over-255", long_name, "name too long"),
    ("no-such-user", lambda tmp: Path("~nosuchuser-cogsurgeon/lora.safetensors"), "cannot expand"),
    ("undecodable-name", undecodable_name, "not a safetensors file"),
    ("fifo-in-a-folder", fifo_in_folder, "holds no LoRA checkpoint"),
    ("fifo-itself", fifo_itself, "FIFO"),
    ("sat-iteration-superscript", sat_iteration_superscript, "holds no LoRA checkpoint"),
    ("sat-latest-not-utf8", sat_latest_not_utf8, "holds no LoRA checkpoint"),
]


@pytest.mark.parametrize("name, make, expected", HOSTILE_PATHS, ids=[case[0] for case in HOSTILE_PATHS])
def test_hostile_paths_are_one_line_and_never_hang(tmp_path, name, make, expected):
    checkpoint = make(tmp_path)
    for command in (["lora", "inspect", str(checkpoint)],
                    ["lora", "repair", str(checkpoint), "--out", str(tmp_path / "out"), "--alpha", "8"]):
        assert_one_line(cogsurgeon(*command), expected)
    assert not (tmp_path / "out").exists()


def test_a_yaml_alias_bomb_is_refused_not_expanded(tmp_path):
    checkpoint = yaml_alias_bomb(tmp_path)
    result = cogsurgeon("lora", "inspect", str(checkpoint), "--json")
    stderr = result.stderr.decode()
    assert "aliases" in stderr and "Traceback" not in stderr, stderr
    assert result.returncode in (0, 2)  # the config is ignored with a warning; the alpha question stands alone


def test_permission_errors_are_one_line(tmp_path):
    checkpoint = valid_checkpoint(tmp_path / "private" / "ckpt")
    # root reads everything: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), it obeys modes as users do
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    (tmp_path / "private").chmod(0o000)
    try:
        results = [cogsurgeon("lora", "inspect", str(checkpoint), prefix=prefix),
                   cogsurgeon("lora", "repair", str(checkpoint), "--out", str(tmp_path / "out"), "--alpha", "8",
                              prefix=prefix)]
    finally:
        (tmp_path / "private").chmod(0o700)
    for result in results:
        assert_one_line(result, "permission denied")
    assert not (tmp_path / "out").exists()


def test_stdout_on_a_full_device_is_one_line(tmp_path):
    checkpoint = valid_checkpoint(tmp_path / "ckpt")
    with open("/dev/full", "w") as full:
        result = cogsurgeon("lora", "inspect", str(checkpoint), "--json", "--alpha", "8", stdout=full)
    assert_one_line(result, "no space left")


# ---------------------------------------------------------------- model folders (inspector/loading.py)


def model_folder(tmp: Path, **config_changes) -> Path:
    from cogsurgeon.inspector.model_specs import tiny_config

    folder = tmp / "model"
    folder.mkdir()
    config = {**tiny_config("tiny"), "_class_name": "CogVideoXTransformer3DModel", **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"proj_out.weight": np.zeros((4, 4), np.float32)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def nested_config(tmp: Path) -> Path:
    folder = model_folder(tmp)
    (folder / "config.json").write_text("[" * DEPTH + "]" * DEPTH)
    return folder


def nested_shard_index(tmp: Path) -> Path:
    folder = model_folder(tmp)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ' + "[" * DEPTH + "]" * DEPTH + "}")
    return folder


def fifo_shard(tmp: Path) -> Path:
    folder = model_folder(tmp)
    os.mkfifo(folder / "shard-1.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"proj_out.weight": "shard-1.safetensors"}}))
    return folder


MODEL_FOLDERS = [
    ("num-layers-1e6", lambda tmp: model_folder(tmp, num_layers=1e6), "num_layers is 1000000.0"),
    ("num-layers-a-million", lambda tmp: model_folder(tmp, num_layers=1_000_000), "1,000,000 blocks"),
    ("heads-huge", lambda tmp: model_folder(tmp, num_attention_heads=100_000, attention_head_dim=4096), "parameters"),
    ("nested-config", nested_config, "nested too deeply"),
    ("nested-shard-index", nested_shard_index, "nested too deeply"),
    ("fifo-shard", fifo_shard, "FIFO"),
]


@pytest.mark.parametrize("name, make, expected", MODEL_FOLDERS, ids=[case[0] for case in MODEL_FOLDERS])
def test_hostile_model_folders_are_one_line_and_never_hang(tmp_path, name, make, expected):
    folder = make(tmp_path)
    before = tree_digest(folder) if name != "fifo-shard" else None
    assert_one_line(cogsurgeon("modules", str(folder)), expected)
    if before is not None:
        assert tree_digest(folder) == before


# issue 21 item 12: a size of 0 where sizes divide; each command that reads a folder's config names file and field
ZERO_SIZES = [("modules", "attention_head_dim"), ("trace", "attention_head_dim"), ("plan", "attention_head_dim"),
              ("plan", "patch_size")]


@pytest.mark.parametrize("command, field", ZERO_SIZES, ids=[f"{c}-{f}" for c, f in ZERO_SIZES])
def test_a_config_size_of_zero_is_one_line_naming_the_file_and_field(tmp_path, command, field):
    folder = model_folder(tmp_path, **{field: 0})
    before = tree_digest(folder)
    assert_one_line(cogsurgeon(command, str(folder)), f"{folder / 'config.json'}: {field} is 0; it must be a positive")
    assert tree_digest(folder) == before


@pytest.mark.slow
def test_a_non_utf8_refs_main_is_not_a_crash(tmp_path):
    repo = tmp_path / "hub" / "models--org--cogvideox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_bytes(b"\xff\xfe\x00binary")
    result = cogsurgeon("modules", "org/cogvideox", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_one_line(result, "not in the local Hugging Face cache")


# ---------------------------------------------------------------- the inventory cache: rebuild, never crash or hang


CACHE_SCRIPT = """
import json, os, sys
from pathlib import Path
from cogsurgeon.inspector import inventory_cache

entry = inventory_cache._entry_path("cogvideox-2b", None)
entry.parent.mkdir(parents=True, exist_ok=True)
kind = sys.argv[1]
if kind == "dev-zero":
    entry.symlink_to("/dev/zero")
elif kind == "fifo":
    os.mkfifo(entry)
elif kind == "nested":
    entry.write_text("[" * 100000 + "]" * 100000)
elif kind == "wrong-row-types":
    entry.write_text(json.dumps({"source_stamps": {}, "modules": [{"name": 1, "class_name": [], "class_module": {},
        "file": None, "line": "x", "own_params": "many", "params": None, "dtype": None, "device": None,
        "processor": None}]}))
elif kind == "rows-not-objects":
    entry.write_text(json.dumps({"source_stamps": {}, "modules": [[1, 2, 3], "row"]}))
elif kind == "stamps-wrong-types":
    entry.write_text(json.dumps({"source_stamps": {"1": "x"}, "modules": []}))
print("rebuild" if inventory_cache.load_cached_inventory("cogvideox-2b") is None else "used")
"""


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "nested", "wrong-row-types", "rows-not-objects",
                                  "stamps-wrong-types"])
def test_a_hostile_cache_entry_is_rebuilt_silently(tmp_path, kind):
    result = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, kind], capture_output=True, text=True,
                            env=cli_environment({"COGSURGEON_CACHE_DIR": str(tmp_path)}), timeout=TIMEOUT * 3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rebuild" and result.stderr == ""  # None: the caller rebuilds the entry


def test_a_directory_as_cache_entry_leaves_no_temporary_files(tmp_path, monkeypatch):
    from cogsurgeon.inspector import inventory_cache
    from cogsurgeon.inspector.inventory import ModuleInfo

    monkeypatch.setenv("COGSURGEON_CACHE_DIR", str(tmp_path))
    entry = inventory_cache._entry_path("cogvideox-2b", None)
    entry.mkdir(parents=True)
    infos = [ModuleInfo(name="", class_name="CogVideoXTransformer3DModel", class_module="diffusers", file=None,
                        line=None, own_params=0, params=0, dtype=None, device=None, processor=None)]
    for _ in range(3):
        inventory_cache.store_inventory("cogvideox-2b", None, infos)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]


def test_verify_of_a_folder_with_a_nested_adapter_config_is_one_line(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("[" * DEPTH + "]" * DEPTH)
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        (folder / name).write_bytes(b"")
    assert_one_line(cogsurgeon("lora", "verify", str(folder), "--base", "tiny"), "nested too deeply")


# ---------------------------------------------------------------- numbers whose result overflows or rounds to nothing
# (issue 21 items 6, 8-11): refused in one line, exit 2, nothing written, instead of inf/zero weights or a traceback


def lora_file(path: Path, b_value: float = 0.5, dtype=np.float32, alpha: float | None = None,
              alpha_dtype=np.float32) -> Path:
    """A one-module LoRA (rank 4 on the tiny model's 32-wide to_q): diffusers keys, or kohya keys with `.alpha`."""
    down = np.linspace(-1, 1, 4 * 32, dtype=np.float32).reshape(4, 32).astype(dtype)
    up = np.full((32, 4), b_value, dtype=dtype)
    if alpha is None:
        save_file({A_KEY: down, B_KEY: up}, str(path))
    else:
        module = "lora_unet__transformer_blocks_0_attn1_to_q"
        save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                   f"{module}.alpha": np.array(alpha, dtype=alpha_dtype)}, str(path))
    return path


def assert_nothing_written(result: subprocess.CompletedProcess, folder: Path, before: set[str], expected: str) -> None:
    assert_one_line(result, expected, prefix="cogsurgeon")  # an option's usage error names the command
    assert result.stdout == b""
    assert {p.name for p in folder.iterdir()} == before  # no output, no staging folder left behind


REPAIRS = [
    ("bake-alpha-1e300", {}, ["--alpha", "1e300", "--bake-scale"], "float32 can hold"),
    ("bake-alpha-1e-300", {}, ["--alpha", "1e-300", "--bake-scale"], "float32 can hold"),
    ("bake-overflows-f32", {"b_value": 10.0}, ["--alpha", "3e38", "--bake-scale"], "overflows F32"),
    ("bake-rounds-to-zero-f16", {"dtype": np.float16, "b_value": 1.0}, ["--alpha", "1e-30", "--bake-scale"],
     "rounds to all zeros in F16"),
    ("comfyui-alpha-1e39", {}, ["--alpha", "1e39", "--to", "comfyui"], "float32 can hold"),
    ("kohya-alpha-1e300", {"alpha": 1e300, "alpha_dtype": np.float64}, [], ".alpha 1e+300 is not a positive finite"),
    ("kohya-alpha-1e300-comfyui", {"alpha": 1e300, "alpha_dtype": np.float64}, ["--to", "comfyui"], ".alpha 1e+300"),
]


@pytest.mark.parametrize("name, file_options, args, expected", REPAIRS, ids=[case[0] for case in REPAIRS])
def test_repair_refuses_values_that_overflow_or_vanish(tmp_path, name, file_options, args, expected):
    checkpoint = lora_file(tmp_path / "lora.safetensors", **file_options)
    before = {p.name for p in tmp_path.iterdir()}
    result = cogsurgeon("lora", "repair", str(checkpoint), "--out", str(tmp_path / "adapter"), *args)
    assert_nothing_written(result, tmp_path, before, expected)


def test_repair_at_float32s_largest_alpha_is_finite(tmp_path):
    checkpoint = lora_file(tmp_path / "lora.safetensors", b_value=0.5)
    result = cogsurgeon("lora", "repair", str(checkpoint), "--out", str(tmp_path / "adapter"), "--alpha", "3e38",
                        "--to", "peft,comfyui", "--bake-scale")
    assert result.returncode == 0, result.stderr
    from safetensors.numpy import load_file

    for name in ("adapter_model.safetensors", "comfyui_lora.safetensors"):
        assert all(np.isfinite(value).all() for value in load_file(str(tmp_path / "adapter" / name)).values())


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from cogsurgeon.inspector import load_transformer

    folder = tmp_path_factory.mktemp("base") / "transformer"
    load_transformer("tiny").save_pretrained(str(folder))
    return folder


MERGES = [("weight-1e39", "1e39", 0.5, "outside float32's range"),
          ("weight-1e-300", "1e-300", 0.5, "outside float32's range"),
          ("fused-weights-overflow", "3e38", 2.0, "not finite in torch.float32")]


@pytest.mark.parametrize("name, weight, b_value, expected", MERGES, ids=[case[0] for case in MERGES])
def test_merge_refuses_weights_that_overflow_or_vanish(tmp_path, tiny_base, name, weight, b_value, expected):
    adapter = lora_file(tmp_path / "lora.safetensors", b_value=b_value, alpha=4.0)
    before = {p.name for p in tmp_path.iterdir()}
    result = cogsurgeon("lora", "merge", str(tiny_base), f"{adapter}:{weight}", "--out", str(tmp_path / "merged"))
    assert_nothing_written(result, tmp_path, before, expected)


BAD_CONFIGS = [("invalid-json", b'{"num_layers": ', "is not valid JSON"), ("json-array", b"[1, 2]", "not a JSON object"),
               ("not-utf8", b'{"\xff": 1}', "is not UTF-8")]


@pytest.mark.parametrize("name, content, expected", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_merge_of_a_base_with_a_broken_config_is_one_line(tmp_path, tiny_base, name, content, expected):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "config.json").write_bytes(content)
    adapter = lora_file(tmp_path / "lora.safetensors", alpha=4.0)
    before = {p.name for p in tmp_path.iterdir()}
    result = cogsurgeon("lora", "merge", str(base), str(adapter), "--out", str(tmp_path / "merged"))
    assert_nothing_written(result, tmp_path, before, expected)


PLANS = [
    ("gpu-memory-rounds-to-0", ["--gpu-memory", "0.0000001"], "is 1e-07 bytes"),
    ("gpu-memory-1e400", ["--gpu-memory", "1e400"], "is inf bytes"),
    ("rank-2**62", ["--train", f"lora:{2**62}"], "at most 18 digits"),
    ("rank-5000-digits", ["--train", "lora:" + "9" * 5000], "at most 18 digits"),
    ("rank-past-int64-tensors", ["--train", "lora:999999999999999999"], "more than torch can size"),
]


@pytest.mark.parametrize("name, args, expected", PLANS, ids=[case[0] for case in PLANS])
def test_plan_refuses_sizes_that_overflow_or_vanish(name, args, expected):
    assert_one_line(cogsurgeon("plan", "tiny", "--frames", "9", "--height", "64", "--width", "64", *args), expected)


@pytest.mark.parametrize("card", [0, -5, 10**30])
def test_plan_memory_refuses_a_card_of_no_bytes_or_past_int64(card):
    from cogsurgeon.inspector.plan import PlanError, plan_memory

    with pytest.raises(PlanError, match="a card's memory of"):
        plan_memory("tiny", frames=9, height=64, width=64, gpu_memory=card)


def test_a_text_timestep_past_the_timestep_dtype_is_refused_before_any_forward():
    result = cogsurgeon("patch", "verify", "per-frame-timesteps:text_timestep=1e39")
    assert_one_line(result, "text_timestep must be within the timestep's range")
    assert result.stdout == b""
