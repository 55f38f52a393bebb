"""The command line as a new user meets it (issue 16, item 13, and the redesign's argument checks): locations never
cut, full paths in pipes, folded trace rows, fixes only for present pitfalls, the hub command that exists, tiny
models from the inventory cache, progress lines ended before errors, no torch warnings, bad arguments refused
before torch loads. Every test runs the real CLI in a subprocess (a pseudo-terminal where a terminal matters)."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import pty
import re
import resource
import struct
import subprocess
import sys
import termios
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_environment


def run_in_terminal(*args: str, columns: int, rows: int = 50) -> tuple[int, str, str]:
    """`cogsurgeon ARGS` with stdout on a pseudo-terminal `columns` wide; returns (status, stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "cogsurgeon.inspector", *args], stdout=slave, stderr=subprocess.PIPE,
        env=cli_environment({"COLUMNS": str(columns), "TERM": "xterm-256color"}), cwd=REPO_ROOT,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stderr = process.stderr.read().decode()
    process.wait(timeout=300)
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())  # styles are not text
    return process.returncode, output.replace("\r\n", "\n"), stderr


HEAVY = ("torch", "diffusers", "peft", "transformers")
_REPORT = "heavy modules imported: "


def run_cli_counting_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CLI in a process that says, as it exits, which of torch, diffusers, peft and transformers it imported;
    returns the run (that line taken off stderr) and those modules."""
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print({_REPORT!r} + ','.join(m for m in {HEAVY!r} if m in sys.modules), "
            "file=sys.stderr))\n"
            f"from cogsurgeon.inspector.cli import main\nsys.exit(main({list(args)!r}))\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_environment(),
                               cwd=REPO_ROOT, timeout=300)
    stderr, _, report = completed.stderr.rpartition(_REPORT)
    completed.stderr = stderr
    return completed, [name for name in report.strip().split(",") if name]


def assert_one_error_line(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], completed.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --- modules: the location is the headline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def published_rows():
    from conftest import run_cli

    completed = run_cli("modules", "cogvideox-5b", "--json")
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 160, 240])
def test_modules_never_cut_the_location_in_a_terminal(published_rows, columns):
    from cogsurgeon.inspector.source import display_path

    status, output, stderr = run_in_terminal("modules", "cogvideox-5b", columns=columns)
    assert status == 0, stderr
    assert max(len(line) for line in output.splitlines()) <= columns
    locations = {f"{display_path(row['file'])}:{row['line']}" for row in published_rows if row["file"]}
    missing = sorted(location for location in locations if location not in output)
    assert not missing, f"cut or missing at {columns} columns: {missing}\n{output[:3000]}"
    assert "diffusers/models/attention_processor.py:" in output  # the attention class, shortened


def test_modules_print_full_paths_one_line_per_row_when_piped(cli, published_rows):
    completed = cli("modules", "cogvideox-5b")
    assert completed.returncode == 0, completed.stderr
    attention = next(row for row in published_rows if row["name"] == "transformer_blocks.0.attn1")
    line = next(line for line in completed.stdout.splitlines() if "transformer_blocks.(0-41).attn1 " in line)
    assert Path(attention["file"]).is_absolute()
    assert f"{attention['file']}:{attention['line']}" in line
    for row in published_rows:
        if row["file"]:
            assert f"{row['file']}:{row['line']}" in completed.stdout
    assert "…" not in completed.stdout  # no cell cut


# --- trace, doctor, hub hint -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_trace_folds_identical_attention_calls(cli):
    folded = cli("trace", "cogvideox-2b", "--frames", "9", "--height", "64", "--width", "64")
    assert folded.returncode == 0, folded.stderr
    assert len(attention_rows(folded.stdout)) == 1, folded.stdout
    assert "transformer_blocks.(0-29).attn1  ×30" in attention_rows(folded.stdout)[0]
    unfolded = cli("trace", "cogvideox-2b", "--frames", "9", "--height", "64", "--width", "64", "--all")
    rows = attention_rows(unfolded.stdout)
    assert [row.split()[1] for row in rows] == [f"transformer_blocks.{i}.attn1" for i in range(30)]


def attention_rows(output: str) -> list[str]:
    """The body rows of the "N attention calls" table."""
    section = output[output.index("attention calls"):output.index("memory per attention call")]
    return [line for line in section.splitlines() if line.startswith("│ ")]


@pytest.mark.diffusers_versions
def test_doctor_prints_a_fix_only_for_present_findings(cli):
    # On every supported diffusers one of these two is absent and the other present.
    checks = ("--check", "block-drops-attention-kwargs", "--check", "attention-backend-ignored")
    findings = json.loads(cli("doctor", *checks, "--json").stdout)["findings"]
    assert {finding["status"] for finding in findings} == {"present", "absent"}
    for finding in findings:
        assert (finding["fix"] is not None) == (finding["status"] == "present"), finding
    table = cli("doctor", *checks).stdout
    fix_marker = {"block-drops-attention-kwargs": "--patch attention-mask",
                  "attention-backend-ignored": "sdpa_kernel("}
    for finding in findings:
        assert (fix_marker[finding["id"]] in table) == (finding["status"] == "present"), table


@pytest.mark.slow
def test_hub_hint_names_the_command_the_installed_hub_has(cli, tmp_path):
    completed = cli("modules", "THUDM/CogVideoX-5b", env={"HF_HUB_CACHE": str(tmp_path)})
    command = "hf" if int(metadata.version("huggingface_hub").split(".")[0]) >= 1 else "huggingface-cli"
    assert_one_error_line(completed, f"({command} download THUDM/CogVideoX-5b)")
    assert (Path(sys.executable).parent / command).exists()  # the hint names a program this install has


# --- tiny models from the cache ---------------------------------------------------------------------------------

def test_modules_tiny_comes_from_the_inventory_cache_without_torch(cli):
    built = cli("modules", "tiny", "--json")
    assert built.returncode == 0, built.stderr
    cached, imported = run_cli_counting_imports("modules", "tiny", "--json")
    assert cached.returncode == 0, cached.stderr
    assert imported == []
    assert json.loads(cached.stdout) == json.loads(built.stdout)
    rebuilt = cli("modules", "tiny", "--json", "--no-cache")
    assert json.loads(rebuilt.stdout) == json.loads(built.stdout)


# --- stderr: progress lines and torch's warnings ----------------------------------------------------------------

def _big_lora(folder: Path) -> Path:
    """A CogVideo-trainer LoRA of 66 MiB: big enough for `repair` to draw its progress line."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    tensors = {}
    for block in range(11):
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            prefix = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((64, 3072), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((3072, 64), np.float32)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def test_a_progress_line_ends_before_the_error(tmp_path):
    from test_cli_progress import run_with_stderr_in_a_terminal, what_the_terminal_shows

    checkpoint = _big_lora(tmp_path / "checkpoint")
    limit = 32 * 2**20  # files may not grow past 32 MiB: the write fails half way (EFBIG; Python ignores SIGXFSZ)
    status, stdout, sent = run_with_stderr_in_a_terminal(
        "lora", "repair", str(checkpoint), "--out", str(tmp_path / "out"), "--alpha", "64",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert status == 2 and stdout == b"", sent
    assert "MiB (" in sent  # the progress line was drawn (stderr is a terminal)
    [error_line] = what_the_terminal_shows(sent)  # and erased: the error is all the terminal shows
    assert error_line.startswith("cogsurgeon: error:"), repr(sent)
    assert not (tmp_path / "out").exists()


def test_torch_pickle_warnings_stay_out_of_stderr(cli, tmp_path):
    import torch

    save_dir = tmp_path / "sat"
    (save_dir / "1000").mkdir(parents=True)
    state = {f"model.diffusion_model.transformer.layers.0.attention.dense.matrix_{part}.0": torch.zeros(4, 4)
             for part in "AB"}
    torch.save({"module": state}, save_dir / "1000" / "mp_rank_00_model_states.pt", pickle_protocol=4)
    (save_dir / "latest").write_text("1000")
    completed = cli("lora", "inspect", str(save_dir))
    assert "Warning" not in completed.stderr and "pickle protocol" not in completed.stderr, completed.stderr
    assert completed.returncode in (0, 2)
    assert all(line.startswith(("cogsurgeon: error:", "warning:")) for line in completed.stderr.splitlines())


# --- arguments checked before the heavy imports -----------------------------------------------------------------

def test_a_bad_dtype_is_refused_before_torch_is_imported():
    completed, imported = run_cli_counting_imports("modules", "tiny", "--dtype", "int8")
    assert_one_error_line(completed, "--dtype", "'int8'")
    assert imported == []


@pytest.mark.parametrize("command", ["trace", "plan"])
@pytest.mark.parametrize("option", ["--frames", "--height", "--width", "--batch"])
def test_a_size_below_one_is_refused_before_torch_is_imported(command, option):
    completed, imported = run_cli_counting_imports(command, "tiny", option, "0")
    assert_one_error_line(completed, f"Invalid value for '{option}': 0 is not in the range x>=1")
    assert imported == []


@pytest.mark.parametrize("size", [
    ("--frames", str(10**23)),  # latent frames past int64: torch.empty could not unpack the size
    ("--batch", str(10**20), "--frames", "9", "--height", "64", "--width", "64"),
    ("--frames", "9", "--height", "6400016", "--width", "6400016"),  # the (B·heads, L, L) weights overflow
], ids=["frames", "batch", "height-width"])
@pytest.mark.parametrize("command", ["trace", "plan"])
def test_a_size_too_large_for_torch_to_trace_is_refused_before_torch_is_imported(command, size):
    completed, imported = run_cli_counting_imports(command, "tiny", *size)
    assert_one_error_line(completed, f"too large to {command}")
    assert imported == []


def test_lora_verify_checks_its_inputs_before_importing_diffusers(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        (adapter / name).write_bytes(b"")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    for folder, base, message in ((tmp_path / "nothing", "tiny", "does not exist"),
                                  (adapter, "cogvideox-5b", "meta device"),
                                  (adapter, "no-such-model", "unknown model")):
        completed, imported = run_cli_counting_imports("lora", "verify", str(folder), "--base", base)
        assert_one_error_line(completed, message)
        assert imported == []


# --- the library side of the same edges ------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("num_attention_heads", 3),  # weights of another shape: ValueError
    ("timestep_activation_fn", ["silu"]),  # a list where a name belongs (diffusers: AttributeError)
    ("flip_sin_to_cos", "yes"),  # text where a flag belongs (diffusers would take it as True)
    ("activation_fn", "no-such-activation"),  # diffusers leaves act_fn unbound: UnboundLocalError
])
def test_a_folder_diffusers_cannot_load_is_a_load_error(tmp_path, key, value):
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.errors import ModelLoadError

    load_transformer("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelLoadError, match="could not load|it must be a"):
        load_transformer(str(tmp_path))


@pytest.mark.parametrize("package", ["inspector", "patches", "tools/lora"])
def test_every_lazy_export_is_imported_for_type_checkers(package):
    """Editors resolve `from cogsurgeon.inspector import load_transformer` through the TYPE_CHECKING imports, which
    must name each lazy export from the module it resolves to at run time."""
    tree = ast.parse((REPO_ROOT / package / "__init__.py").read_text())
    exports = ast.literal_eval(next(node.value for node in tree.body if isinstance(node, ast.Assign)
                                    and getattr(node.targets[0], "id", "") == "_EXPORTS"))
    checked = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: statement.module for statement in checked.body for alias in statement.names}
    assert imported == exports
