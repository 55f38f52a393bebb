"""`cogsurgeon attention MODEL`, `attention show FILE` and `run --record-attention FILE` through the real CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.inspector import load_recording, record_attention
from cogsurgeon.inspector.loading import build_tiny
from cogsurgeon.patches.verify import tiny_inputs

SCRIPT = """
import torch
from cogsurgeon.inspector.loading import build_tiny
from cogsurgeon.patches.verify import tiny_inputs
model = build_tiny("tiny-1.5")
with torch.no_grad():
    for seed in (0, 1):
        model(**tiny_inputs(model, seed=seed))
print("script done")
"""


def test_attention_records_a_seeded_forward_and_saves_what_show_reads(cli, tmp_path):
    saved = tmp_path / "tiny.json"
    result = cli("attention", "tiny-i2v", "--patch", "frame-causal-attention", "--words", "1,2", "--save", str(saved),
                 "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["groups"]["names"] == ["text", "frame 0", "frame 1", "frame 2"]
    assert document["model"]["patches"] == {"frame-causal-attention": {}}
    mass = torch.tensor(document["mass"])
    assert mass.shape == (1, 2, 2, 2, 4, 4)
    assert mass[..., torch.ones(4, 4, dtype=torch.bool).triu(1)].abs().max() == 0  # no mass on later frames
    model = build_tiny("tiny-i2v")  # the same forward in this process gives the same numbers
    patches.apply(model, "frame-causal-attention")
    with torch.no_grad(), record_attention(model, words=(1, 2)) as rec:
        model(**tiny_inputs(model))
    assert torch.allclose(mass, rec.all_mass(), atol=1e-6, rtol=0)
    assert torch.allclose(load_recording(saved).all_mass(), rec.all_mass(), atol=1e-6, rtol=0)
    shown = cli("attention", "show", str(saved), "--print")
    assert shown.returncode == 0, shown.stderr
    assert "transformer_blocks.1.attn1" in shown.stdout and "frame-causal-attention" in shown.stdout


@pytest.mark.slow  # `run` launches the script: two interpreters
def test_run_records_an_unchanged_script_with_its_patches(cli, tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(SCRIPT)
    target = tmp_path / "run.json"
    result = cli("run", "--record-attention", str(target), "--record-groups", "grid:2x2", "--patch",
                 "block-causal-attention:chunk=1,window=1", "--", sys.executable, str(script))
    assert result.returncode == 0, result.stderr
    assert "script done" in result.stdout and f"attention recorded in {target}" in result.stderr
    recording = load_recording(target)
    assert recording.steps == 2 and recording.groups == ["text", "cell 0,0", "cell 0,1", "cell 1,0", "cell 1,1"]
    assert recording.model["patches"] == {"block-causal-attention": {"chunk": 1, "window": 1, "sink": 0}}
    model = build_tiny("tiny-1.5")
    patches.apply(model, "block-causal-attention", chunk=1, window=1)
    with torch.no_grad(), record_attention(model, groups="grid:2x2") as rec:
        for seed in (0, 1):
            model(**tiny_inputs(model, seed=seed))
    assert torch.allclose(recording.all_mass(), rec.all_mass(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["attention", "tiny", "--groups", "grid:2"], "unknown attention groups"),
        (["attention", "tiny", "--groups", "grid:9x9"], "use at most grid:4x4"),
        (["attention", "tiny", "--words", "x"], "--words"),
        (["attention", "tiny", "--words", "99"], "outside the 8 text tokens"),
        (["attention", "tiny", "--patch", "no-such-patch"], "unknown patch"),
        (["attention", "tiny", "--save", "out.txt"], "FILE.json"),
        (["attention", "tiny", "--device", "nowhere"], "--device nowhere"),
        (["attention", "cogvideox-5b"], "meta device"),
        (["attention", "tiny", "--height", "70"], "not a multiple of 16"),
        (["attention", "show", "missing.json"], "does not exist"),
        (["run", "--record-attention", "out.txt", "--", "true"], "FILE.json"),
        (["run", "--record-attention", "no-folder/out.json", "--", "true"], "does not exist"),
        (["run", "--record-attention", "out.json", "--record-groups", "cells", "--", "true"], "unknown attention groups"),
        (["run", "--ulysses", "2", "--record-attention", "out.json", "--", "true"], "cannot be combined"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(cli, tmp_path, args, message):
    result = cli(*args, cwd=tmp_path, in_process=True)  # `run` refuses these before it launches anything
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    if message:
        assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_show_refuses_a_file_that_is_not_a_recording(cli, tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"format": "cogsurgeon.attention-recording", "version": 1, "groups": 3}')
    result = cli("attention", "show", str(other))
    assert result.returncode == 2 and "not a readable cogsurgeon attention recording" in result.stderr
    assert other.read_text().startswith('{"format"')


@pytest.mark.slow
def test_show_png_appears_whole_or_not_at_all(cli, tmp_path):
    """--png writes beside the name asked for and renames: a write cut off (here by a file-size limit, as a full
    disk would) leaves the file that was there as it was (Pillow's own save truncated it and left half a PNG), no
    temporary file, and no file where there was none."""
    import resource
    import subprocess

    from PIL import Image

    from conftest import REPO_ROOT, cli_environment

    model = build_tiny("tiny-1.5")
    with torch.no_grad(), record_attention(model) as rec:
        model(**tiny_inputs(model))
    saved = rec.save(tmp_path / "run.json")[0]
    out = tmp_path / "pictures"
    out.mkdir()
    limit = 512  # bytes: the PNG is larger

    def small_files() -> None:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def show_png_with_small_files(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cogsurgeon.inspector", "attention", "show", str(saved), "--png",
                               str(out / name)], capture_output=True, text=True, env=cli_environment(),
                              cwd=REPO_ROOT, timeout=300, preexec_fn=small_files)

    whole = cli("attention", "show", str(saved), "--png", str(out / "view.png"))
    assert whole.returncode == 0, whole.stderr
    with Image.open(out / "view.png") as image:
        image.verify()  # every chunk's checksum: the file is whole
    written = (out / "view.png").read_bytes()
    assert len(written) > limit

    for name in ("view.png", "new.png"):
        cut = show_png_with_small_files(name)
        assert cut.returncode == 2 and cut.stderr.startswith("cogsurgeon: error: "), cut.stderr
        assert [path.name for path in out.iterdir()] == ["view.png"]
        assert (out / "view.png").read_bytes() == written


def test_an_atomic_write_leaves_the_permissions_a_plain_write_leaves(tmp_path):
    """mkstemp makes its file 0o600: renamed over an export it would take the reader's access away."""
    import os
    import stat

    from cogsurgeon.inspector.user_files import write_atomically

    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.csv"
        write_atomically(fresh, b"a,b\n")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        shared = tmp_path / "shared.csv"
        shared.write_bytes(b"old\n")
        shared.chmod(0o664)
        write_atomically(shared, b"new\n")
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664 and shared.read_bytes() == b"new\n"
    finally:
        os.umask(old_umask)


def test_an_atomic_write_over_a_folder_names_the_folder(tmp_path):
    """The rename over a folder fails: the message names the user's path, not the temporary file beside it."""
    from cogsurgeon.inspector.user_files import write_atomically

    folder = tmp_path / "view.png"
    folder.mkdir()
    with pytest.raises(OSError) as raised:
        write_atomically(folder, b"png")
    assert raised.value.filename == str(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["view.png"] and not any(folder.iterdir())
