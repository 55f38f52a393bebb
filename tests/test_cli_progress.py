"""Progress for long silent work (issue 24 item 6): in a terminal, the CLI says on stderr what it is doing (importing,
building, which configuration the planner is on, n of N), on one line redrawn in place and erased when done; where
stderr is not a terminal (scripts, CI) nothing extra is printed; stdout, `--json` included, is byte for byte the same
either way. The real CLI in a process of its own, stderr on a pseudo-terminal and stdout on a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from conftest import REPO_ROOT, cli_environment, run_cli_in_process, runs_in_process


def run_with_stderr_in_a_terminal(*args: str, env: dict[str, str] | None = None, columns: int = 160,
                                  preexec_fn=None) -> tuple[int, bytes, str]:
    """`cogsurgeon ARGS` with stderr on a pseudo-terminal `columns` wide and stdout on a pipe: (status, stdout, what
    the terminal was sent on stderr, escape sequences and all)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "cogsurgeon.inspector", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=slave, env=cli_environment(env), cwd=REPO_ROOT,
                               preexec_fn=preexec_fn)
    os.close(slave)
    sent: list[bytes] = []

    def read_the_terminal() -> None:  # beside the stdout read: a child blocked on a full pipe would never close it
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                return
            if not data:
                return
            sent.append(data)

    reader = threading.Thread(target=read_the_terminal)
    reader.start()
    stdout = process.stdout.read()
    process.wait(timeout=300)
    reader.join(timeout=60)
    os.close(master)
    # the terminal's line discipline turns each \n into \r\n on the way out
    return process.returncode, stdout, b"".join(sent).decode().replace("\r\n", "\n")


def run_piped(*args: str, env: dict[str, str] | None = None):
    """The same command with stderr a pipe, the bytes it wrote: in this process where `run_cli` would run it there
    (its streams are pipes, not terminals), else a subprocess."""
    if runs_in_process(args, env):
        return run_cli_in_process(list(args), env=env, cwd=REPO_ROOT, timeout=300, text=False)
    return subprocess.run([sys.executable, "-m", "cogsurgeon.inspector", *args], capture_output=True,
                          stdin=subprocess.DEVNULL, env=cli_environment(env), cwd=REPO_ROOT, timeout=300)


def what_the_terminal_shows(sent: str) -> list[str]:
    """The lines a terminal shows after receiving `sent`: \\r goes back to the line's start, ESC[K erases from the
    cursor to the line's end, \\n starts a new line; a last line left empty is no line."""
    lines, column = [""], 0
    index = 0
    while index < len(sent):
        if sent.startswith("\x1b[K", index):
            lines[-1] = lines[-1][:column]
            index += 3
            continue
        char = sent[index]
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("")
            column = 0
        else:
            lines[-1] = lines[-1][:column] + char + lines[-1][column + 1:]
            column += 1
        index += 1
    return lines[:-1] if lines[-1] == "" else lines


def test_the_terminal_emulation_of_these_tests():
    assert what_the_terminal_shows("\rloading…\x1b[K\rbuilding…\x1b[K\r\x1b[K") == []
    assert what_the_terminal_shows("\rwriting: 5 MiB\x1b[K\r\x1b[Kcogsurgeon: error: disk full\n") == [
        "cogsurgeon: error: disk full"]
    assert what_the_terminal_shows("\rwriting: 5 MiB\ncogsurgeon: error: x\n") == ["writing: 5 MiB", "cogsurgeon: error: x"]


@pytest.mark.slow
def test_a_cold_modules_says_what_it_is_doing_in_a_terminal_and_nothing_in_a_pipe(tmp_path):
    """The inventory cache empty: torch and diffusers are imported and the 5B model built on meta (seconds of
    silence before). A second run reads the cache and has nothing to say."""
    cache = {"COGSURGEON_CACHE_DIR": str(tmp_path / "terminal-cache")}
    status, stdout, sent = run_with_stderr_in_a_terminal("modules", "cogvideox-5b", "--json", env=cache)
    assert status == 0, sent
    for step in ("importing torch and diffusers…", "building cogvideox-5b on the meta device…",
                 "reading where the classes of 1,067 modules are defined…"):
        assert step in sent, sent
    assert what_the_terminal_shows(sent) == []  # erased once the work is done

    piped = run_piped("modules", "cogvideox-5b", "--json", env={"COGSURGEON_CACHE_DIR": str(tmp_path / "pipe-cache")})
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert stdout == piped.stdout

    status, cached_stdout, sent = run_with_stderr_in_a_terminal("modules", "cogvideox-5b", "--json", env=cache)
    assert (status, sent) == (0, "")
    assert cached_stdout == piped.stdout


@pytest.mark.slow
def test_plan_json_says_which_configuration_it_plans_n_of_n_in_a_terminal():
    """A card too small for anything: the planner tries each switch, then every two, then all three."""
    args = ("plan", "tiny", "--train", "full", "--gpu-memory", "1KiB", "--json")
    status, stdout, sent = run_with_stderr_in_a_terminal(*args)
    assert status == 0, sent
    assert "planning a training step (full) of tiny at 9×64×64, batch 2…" in sent, sent
    for trial in ("trying 1 of 3: --checkpointing…", "trying 2 of 3: --train lora:128…", "trying 3 of 3: --batch 1…",
                  "trying 2 of 3: --checkpointing --batch 1…", "trying 1 of 1: --checkpointing --train lora:128 --batch 1…"):
        assert f"does not fit 1.0 KiB; {trial}" in sent, (trial, sent)
    assert what_the_terminal_shows(sent) == []

    piped = run_piped(*args)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert stdout == piped.stdout


@pytest.mark.slow
def test_trace_tables_are_the_same_bytes_with_progress_beside_them():
    args = ("trace", "tiny", "--frames", "9", "--height", "64", "--width", "64")
    status, stdout, sent = run_with_stderr_in_a_terminal(*args)
    assert status == 0, sent
    assert "building tiny (seeded weights)…" in sent and "tracing one forward at 9×64×64, batch 2, on the meta" in sent
    piped = run_piped(*args)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert stdout == piped.stdout and b"attention calls" in stdout


@pytest.mark.slow
def test_patch_verify_names_the_model_it_verifies_on_in_a_terminal_only():
    args = ("patch", "verify", "causal-attention", "--json")
    status, stdout, sent = run_with_stderr_in_a_terminal(*args)
    assert status == 0, sent
    assert "verifying causal-attention: tiny, plain processor…" in sent, sent
    assert "verifying causal-attention: tiny-1.5, fused processor…" in sent, sent
    piped = run_piped(*args)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr  # "verifying ..." lines went to pipes before
    assert stdout == piped.stdout


@pytest.mark.slow
def test_an_error_after_progress_is_the_one_line_the_terminal_shows():
    """The progress line is erased before the error is written: the terminal shows the error alone."""
    status, stdout, sent = run_with_stderr_in_a_terminal("plan", "tiny", "--patch", "no-such-patch")
    assert status == 2 and stdout == b""
    assert "planning inference of tiny" in sent, sent  # the patch is looked up when the planner applies it
    [line] = what_the_terminal_shows(sent)
    assert line.startswith("cogsurgeon: error:") and "no-such-patch" in line, sent


@pytest.mark.slow
def test_a_progress_line_never_wraps_in_a_narrow_terminal():
    status, _, sent = run_with_stderr_in_a_terminal("plan", "tiny", "--train", "full", "--gpu-memory", "1KiB",
                                                    columns=40)
    assert status == 0, sent
    drawn = [part.removesuffix("\x1b[K") for part in sent.split("\r") if part.removesuffix("\x1b[K")]
    assert drawn and "importing torch and diffusers…" in drawn, sent
    assert max(len(text) for text in drawn) == 39, sent  # cut one short of the edge: the cursor never wraps


def terminal_cells(text: str) -> int:
    """The columns a terminal gives `text`: two for an East Asian wide or full-width character, one otherwise."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


@pytest.mark.slow
def test_a_progress_line_naming_a_cjk_path_is_cut_by_cells_and_never_wraps(tmp_path, tiny_model):
    """A model folder whose name is Chinese: each of its characters takes two cells, so a line cut to one character
    short of the terminal's width took up to twice the columns there are and wrapped."""
    folder = tmp_path / "視頻生成模型的權重文件夾" / "transformer"
    tiny_model.save_pretrained(str(folder))
    columns = len(f"planning inference of {tmp_path}/") + 10  # the line is cut inside the Chinese name
    status, _, sent = run_with_stderr_in_a_terminal("plan", str(folder), columns=columns)
    assert status == 0, sent
    drawn = [part.removesuffix("\x1b[K") for part in sent.split("\r") if part.removesuffix("\x1b[K")]
    assert any("視頻" in text for text in drawn), sent  # the line that names the folder was drawn, cut
    assert max(terminal_cells(text) for text in drawn) <= columns - 1, sent
