"""How `lora repair` publishes its folder (issue 16 items 1-4, the LoRA parts of 13, issue 11 item 7): nothing a
repair did not create is ever deleted, --force replaces only an unchanged earlier repair, concurrent repairs of one
output cannot both win, signals and dead runs leave nothing behind, and the folder gets the usual permissions.

Races are real (threads released together by a barrier, or two processes), signals are real (`os.kill`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import cli_environment, run_cli
from lora_helpers import staging_of_a_dead_run, tree_digest

KEYS = ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight")
REPAIR_FILES = ["adapter_config.json", "adapter_model.safetensors", "cogsurgeon-repair.json",
                "pytorch_lora_weights.safetensors"]


def make_checkpoint(folder: Path, features: int = 32, rank: int = 4, seed: int = 0) -> Path:
    """A diffusers-script LoRA (transformer. keys); `features` sets its size (4 * 2 * rank * features bytes)."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    save_file({KEYS[0]: generator.standard_normal((rank, features), dtype=np.float32),
               KEYS[1]: generator.standard_normal((features, rank), dtype=np.float32)},
              str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def run_repair(*args: str, timeout: float = 120, in_process: bool | None = None):
    """`cogsurgeon lora repair ARGS` through `conftest.run_cli` (in this process unless `in_process=False`)."""
    return run_cli("lora", "repair", *args, timeout=timeout, in_process=in_process)


def is_unchanged_repair(folder: Path) -> bool:
    """The folder holds exactly the files its manifest lists, with those sha256 (checked here independently)."""
    manifest = json.loads((folder / "cogsurgeon-repair.json").read_text())
    names = sorted(p.name for p in folder.iterdir())
    if names != sorted([*manifest["files"], "cogsurgeon-repair.json"]):
        return False
    return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
               for name, entry in manifest["files"].items())


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_refused(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]


# ---------------------------------------------------------------- item 1: never delete what appeared meanwhile


def test_a_folder_appearing_at_out_during_the_repair_is_kept(tmp_path):
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"

    def someone_creates_out(done: int, total: int) -> None:  # called while the tensor bytes are written
        if not out.exists():
            out.mkdir()
            (out / "mine.txt").write_text("years of work")

    with pytest.raises(CogsurgeonError, match="appeared while the repair ran"):
        repair_checkpoint(checkpoint, out, alpha=4, progress=someone_creates_out)
    assert (out / "mine.txt").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no staging folder, no lock file


def test_an_empty_folder_appearing_at_out_is_not_replaced(tmp_path):
    """A rename over an empty folder succeeds on POSIX: the publish must refuse it all the same."""
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    with pytest.raises(CogsurgeonError, match="appeared while the repair ran"):
        repair_checkpoint(checkpoint, out, alpha=4, progress=lambda done, total: out.mkdir(exist_ok=True))
    assert list(out.iterdir()) == []


def test_force_keeps_an_earlier_repair_that_changed_during_the_repair(tmp_path):
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    repair_checkpoint(checkpoint, out, alpha=4)

    def user_edits_it(done: int, total: int) -> None:
        (out / "notes.txt").write_text("my notes")

    with pytest.raises(CogsurgeonError, match="changed while the repair ran"):
        repair_checkpoint(checkpoint, out, alpha=8, force=True, progress=user_edits_it)
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


# ---------------------------------------------------------------- item 2: --force replaces only a real repair


def cogkit_training_folder(folder: Path) -> None:
    folder.mkdir()
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 32), np.float32)},
              str(folder / "adapter_model.safetensors"))


def edited_earlier_repair(folder: Path) -> None:
    make_checkpoint(folder.parent / "other")
    run_repair(str(folder.parent / "other"), "--out", str(folder), "--alpha", "4")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 99}))


def repair_with_an_extra_file(folder: Path) -> None:
    make_checkpoint(folder.parent / "other")
    run_repair(str(folder.parent / "other"), "--out", str(folder), "--alpha", "4")
    (folder / "eval.mp4").write_bytes(b"a sample I rendered")


@pytest.mark.parametrize("make_folder, why", [
    (cogkit_training_folder, "no cogsurgeon-repair.json"),
    (lambda folder: folder.mkdir(), "no cogsurgeon-repair.json"),
    (edited_earlier_repair, "adapter_config.json differs"),
    (repair_with_an_extra_file, "eval.mp4"),
], ids=["cogkit-training-folder", "empty-folder", "edited-repair", "repair-plus-a-file"])
def test_force_replaces_only_an_unchanged_earlier_repair(tmp_path, make_folder, why):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    make_folder(out)
    before = tree_digest(out)
    result = run_repair(str(checkpoint), "--out", str(out), "--force", "--alpha", "4")
    assert_refused(result, why)
    assert tree_digest(out) == before and out.is_dir()
    assert hidden_leftovers(tmp_path) == []


def test_force_replaces_an_unchanged_earlier_repair(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert run_repair(str(checkpoint), "--out", str(out), "--alpha", "4").returncode == 0
    assert is_unchanged_repair(out)
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "8", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8
    assert sorted(p.name for p in out.iterdir()) == REPAIR_FILES and is_unchanged_repair(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


# ---------------------------------------------------------------- item 3: one repair per output at a time


def race(count: int, work) -> list[BaseException | None]:
    """Run `work(i)` in `count` threads released together; each result is None or the exception raised."""
    barrier = threading.Barrier(count)
    results: list[BaseException | None] = [None] * count

    def runner(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            results[index] = exc

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_two_repairs_to_one_output_at_once_cannot_both_win(tmp_path):
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    checkpoints = [make_checkpoint(tmp_path / f"ckpt{i}", features=65536, seed=i) for i in range(2)]
    out = tmp_path / "out"
    for _ in range(3):
        results = race(2, lambda i: repair_checkpoint(checkpoints[i], out, alpha=4 + i))
        winners = [i for i, result in enumerate(results) if result is None]
        assert len(winners) == 1, results  # one repair wins; the other is told, not silently replaced
        loser = results[1 - winners[0]]
        assert isinstance(loser, CogsurgeonError), loser
        assert any(text in str(loser) for text in ("another repair holds", "already exists", "appeared")), loser
        assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 4 + winners[0]
        assert is_unchanged_repair(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt0", "ckpt1", "out"]
        for entry in out.iterdir():
            entry.unlink()
        out.rmdir()


@pytest.mark.slow
def test_two_processes_repairing_one_output_exit_0_and_2(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=1 << 20)  # 32 MiB of tensors: a window to race in
    out = tmp_path / "out"
    arguments = ["lora", "repair", str(checkpoint), "--out", str(out), "--alpha", "4"]
    go = tmp_path / "go"
    # both interpreters import everything, say so, then wait for the same file: they start repairing together
    starter = ("import os, sys, time\n"
               "from cogsurgeon.inspector.cli import main\n"
               "import cogsurgeon.inspector.cli.lora, cogsurgeon.tools.lora.repair\n"
               "open(sys.argv[1], 'w').close()\n"
               f"while not os.path.exists({str(go)!r}): time.sleep(0.0005)\n"
               "sys.exit(main(sys.argv[2:]))\n")
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", starter, str(ready[i]), *arguments], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=cli_environment())
                 for i in range(2)]
    while not all(path.exists() for path in ready):
        assert all(process.poll() is None for process in processes)
        time.sleep(0.01)
    go.write_text("")
    outcomes = [process.communicate(timeout=120) + (process.returncode,) for process in processes]
    codes = sorted(code for _, _, code in outcomes)
    assert codes == [0, 2], outcomes
    loser_stderr = next(stderr for _, stderr, code in outcomes if code == 2)
    assert "another repair holds" in loser_stderr or "already exists" in loser_stderr or "appeared" in loser_stderr
    assert is_unchanged_repair(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "go", "out", "ready0", "ready1"]


STRESS_SCRIPT = """
import os, sys, time, traceback
from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.tools.lora.repair import repair_checkpoint

checkpoint, out, ready, go, alpha = sys.argv[1:6]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
for _ in range(25):
    try:
        repair_checkpoint(checkpoint, out, alpha=float(alpha), force=True)
        print("ok")
    except CogsurgeonError as exc:
        print("refused:", exc)
    except Exception:
        print("CRASH:", traceback.format_exc().replace(chr(10), " | "))
"""


@pytest.mark.slow
def test_force_under_stress_leaves_one_complete_repair_and_no_hidden_folders(tmp_path):
    """Four processes repair --force the same output 25 times each, all at once."""
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    checkpoints = [make_checkpoint(tmp_path / f"ckpt{i}", seed=i) for i in range(4)]
    out = tmp_path / "out"
    repair_checkpoint(checkpoints[0], out, alpha=1)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    processes = [subprocess.Popen([sys.executable, "-c", STRESS_SCRIPT, str(checkpoints[i]), str(out), str(ready[i]),
                                   str(go), str(1 + i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=cli_environment()) for i in range(4)]
    while not all(path.exists() for path in ready):
        assert all(process.poll() is None for process in processes)
        time.sleep(0.01)
    go.write_text("")
    lines = [line for process in processes for line in process.communicate(timeout=300)[0].splitlines()]
    assert hidden_leftovers(tmp_path) == []  # no .out.old-*, .out.partial-* or lock file
    assert len(lines) == 100 and not [line for line in lines if line.startswith("CRASH")], lines
    refusals = [line for line in lines if line.startswith("refused")]
    assert all("another repair holds" in line for line in refusals), refusals
    assert sorted(p.name for p in out.iterdir()) == REPAIR_FILES and is_unchanged_repair(out)


# ---------------------------------------------------------------- item 4: signals and dead runs


# The tail of the scripts below: repair, and exit as the signal that stopped it would (128 + its number).
REPAIR_EXITING_AS_THE_SIGNAL = """
try:
    repair_checkpoint(sys.argv[1], sys.argv[2], alpha=4, **options)
except BaseException as exc:  # cogsurgeon's Interrupted carries the signal's number
    if hasattr(exc, "signum"):
        print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    raise
print("finished")
"""

SIGNAL_SCRIPT = """
import os, signal, sys
from cogsurgeon.tools.lora.repair import repair_checkpoint

def terminate_once(done, total, sent=[]):
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.{name})  # a real signal, mid-write: the staging folder exists now
options = dict(progress=terminate_once)
""" + REPAIR_EXITING_AS_THE_SIGNAL


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_terminating_signal_mid_write_removes_the_partial_output(tmp_path, name):
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT.format(name=name), str(checkpoint), str(out)],
                            capture_output=True, text=True, env=cli_environment(), timeout=120)
    assert result.returncode == 128 + getattr(signal, name), (result.returncode, result.stdout, result.stderr)
    assert "finished" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no out, no .out.partial-*, no lock


SIGNAL_RIGHT_AFTER_CREATING = """
import os, signal, sys, threading
from cogsurgeon.tools.lora import publish
from cogsurgeon.tools.lora.repair import repair_checkpoint

# A second thread that does not block signals, as numpy's BLAS threads are: a process-directed SIGTERM may go to it
# (and does, whenever the main thread blocks it), so holding signals on the main thread alone holds nothing.
threading.Thread(target=threading.Event().wait, daemon=True).start()

original = getattr(publish, "{step}")

def signalled_right_after(*args):
    made = original(*args)
    os.kill(os.getpid(), signal.SIGTERM)  # lands between making it and the caller recording it, unless held
    return made

setattr(publish, "{step}", signalled_right_after)
options = dict()
""" + REPAIR_EXITING_AS_THE_SIGNAL


@pytest.mark.parametrize("step", ["_create_parents", "_hidden_folder"])
def test_a_sigterm_right_after_a_folder_is_made_leaves_nothing(tmp_path, step):
    """The narrowest window: SIGTERM just after the parent folders or the staging folder were created, before the
    code that made them has recorded them for clean-up (the CLI-level test above hits it now and then)."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=64)
    out = tmp_path / "new" / "out"
    result = subprocess.run([sys.executable, "-c", SIGNAL_RIGHT_AFTER_CREATING.format(step=step), str(checkpoint),
                             str(out)], capture_output=True, text=True, env=cli_environment(), timeout=120)
    assert result.returncode == 143, (result.returncode, result.stdout, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no new/, no .out.partial-*, no lock


SECOND_SIGNAL_DURING_CLEAN_UP = """
import os, shutil, signal, sys
from cogsurgeon.tools.lora.repair import repair_checkpoint

def terminate_once(done, total, sent=[]):
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # the first SIGTERM, mid-write

original_rmtree = shutil.rmtree

def rmtree_{behaviour}(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM, as the clean-up starts (an impatient user, systemd)
    if "{behaviour}" == "works":
        return original_rmtree(*args, **kwargs)

shutil.rmtree = rmtree_{behaviour}
options = dict(progress=terminate_once)
""" + REPAIR_EXITING_AS_THE_SIGNAL


def test_a_second_sigterm_during_clean_up_cannot_leave_the_partial_output(tmp_path):
    """Issue 21 item 4: the clean-up runs with signals held, so it finishes, and the message is true."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_DURING_CLEAN_UP.format(behaviour="works"),
                             str(checkpoint), str(tmp_path / "out")], capture_output=True, text=True,
                            env=cli_environment(), timeout=120)
    assert result.returncode == 143, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == "interrupted by SIGTERM; the partial output was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_partial_output_that_could_not_be_removed_is_named_and_the_next_run_removes_it(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_DURING_CLEAN_UP.format(behaviour="fails"),
                             str(checkpoint), str(out)], capture_output=True, text=True, env=cli_environment(),
                            timeout=120)
    assert result.returncode == 143, (result.returncode, result.stdout, result.stderr)
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    message = result.stderr.strip().splitlines()[-1]
    assert message == (f"interrupted by SIGTERM; the partial output {left} could not be removed: the next run on this "
                       "output removes it, or remove it yourself"), message
    assert run_repair(str(checkpoint), "--out", str(out), "--alpha", "4").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


@pytest.mark.slow
def test_sigterm_to_the_cli_mid_write_exits_143_and_cleans_up(tmp_path):
    """The real CLI, signalled from outside while it writes: poll for its staging folder, then SIGTERM it. A
    run that finished before the poll saw the folder says nothing; it is retried with a larger checkpoint."""
    for attempt, features in enumerate((1 << 21, 1 << 22, 1 << 23)):
        checkpoint = make_checkpoint(tmp_path / f"ckpt{attempt}", features=features)
        out = tmp_path / f"out{attempt}"
        process = subprocess.Popen([sys.executable, "-m", "cogsurgeon.inspector", "lora", "repair", str(checkpoint),
                                    "--out", str(out), "--alpha", "4"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=cli_environment())
        signalled = False
        while process.poll() is None:
            if any(p.name.startswith(f".{out.name}.partial-") for p in tmp_path.iterdir()):
                process.send_signal(signal.SIGTERM)
                signalled = True
                break
            time.sleep(0.0005)
        stdout, stderr = process.communicate(timeout=120)
        if not signalled:
            continue
        assert process.returncode == 143, (process.returncode, stdout, stderr)
        # a progress line may have been drawn (checkpoints of 64 MiB and more) and ended before the one message
        lines = stderr.strip().splitlines()
        assert lines[-1] == "cogsurgeon: interrupted by SIGTERM; the partial output was removed", stderr
        assert all(line.lstrip("\r").startswith("writing:") for line in lines[:-1]), stderr
        assert not out.exists()
        assert hidden_leftovers(tmp_path) == []
        return
    pytest.fail("every repair finished before its staging folder was seen; no signal was sent")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_partials_of_dead_runs_are_removed_by_the_next_run(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    stale = staging_of_a_dead_run(out)
    assert stale.is_dir() and stale.name.startswith(".out.partial-")
    alive = tmp_path / f".out.partial-{os.getpid()}-00c0ffee"  # this test's process is alive: not touched
    alive.mkdir()
    other_output = staging_of_a_dead_run(tmp_path / "elsewhere")  # another output's: not ours to clean
    # a process of its own: a run in this process would be the live owner of `alive`
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "4", in_process=False)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert alive.is_dir() and other_output.is_dir()


def users_backup(tmp_path: Path, out: Path) -> Path:
    return tmp_path / ".out.old-20241204-1"  # 20241204 is no live process id


def named_like_a_dead_runs_staging(tmp_path: Path, out: Path) -> Path:
    return tmp_path / f".out.partial-{dead_pid()}-0badc0de"


def a_dead_runs_staging_renamed(tmp_path: Path, out: Path) -> Path:
    """A real staging folder, marker and all, under another name: its marker names the folder it was made as."""
    return staging_of_a_dead_run(out).rename(tmp_path / f".out.old-{dead_pid()}-00ff")


@pytest.mark.parametrize("make", [users_backup, named_like_a_dead_runs_staging, a_dead_runs_staging_renamed])
def test_a_folder_only_named_like_a_stale_partial_is_kept(tmp_path, make):
    """Issue 21 item 2: a name alone proves nothing. A user's backup `.out.old-20241204-1`, a folder named exactly
    like a dead run's staging folder, or one whose owner marker names another folder, is never removed."""
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    kept = make(tmp_path, out)
    kept.mkdir(exist_ok=True)
    (kept / "my-only-copy.safetensors").write_bytes(b"my only copy")
    before = tree_digest(kept)
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "4")
    assert result.returncode == 0, result.stderr
    assert tree_digest(kept) == before


def test_a_killed_run_leaves_a_partial_that_the_next_run_removes(tmp_path):
    """SIGKILL cannot be handled: the staging folder stays, named with the dead pid, until the next run."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    out = tmp_path / "out"
    script = SIGNAL_SCRIPT.format(name="SIGKILL")
    killed = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(out)], capture_output=True,
                            text=True, env=cli_environment(), timeout=120)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftovers) == 1
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


# ---------------------------------------------------------------- issue 16 item 13, issue 11 item 7


def test_repaired_folder_gets_the_usual_permissions(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "cogsurgeon.inspector", "lora", "repair", str(checkpoint),
                             "--out", str(out), "--alpha", "4"], capture_output=True, text=True,
                            env=cli_environment(), timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o755
    assert {(p.name, p.stat().st_mode & 0o777) for p in out.iterdir()} == {(name, 0o644) for name in REPAIR_FILES}


def test_out_inside_the_checkpoint_folder_is_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    before = tree_digest(checkpoint)
    result = run_repair(str(checkpoint), "--out", str(checkpoint / "adapter"), "--alpha", "4")
    assert_refused(result, "inside the checkpoint folder")
    assert tree_digest(checkpoint) == before and sorted(p.name for p in checkpoint.iterdir()) == [
        "pytorch_lora_weights.safetensors"]


def test_a_dangling_symlink_out_is_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "4")
    assert_refused(result, "dangling symlink")
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_symlink_loop_at_out_is_called_a_loop(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.symlink_to(out)
    result = run_repair(str(checkpoint), "--out", str(out), "--alpha", "4")
    assert_refused(result, "a symlink loop")
    assert "dangling" not in result.stderr


SWAP_DURING_THE_REPAIR = """
import os, sys
from pathlib import Path
from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.tools.lora.repair import repair_checkpoint

checkpoint, out, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def swap_once(done, total, swapped=[]):
    if swapped or done < total:  # once every file is written: the next step publishes
        return
    swapped.append(True)
    if what == "parent":  # the folder of --out moved away, a symlink to an empty folder in its place
        os.rename(out.parent, out.parent.with_name("moved"))
        out.parent.with_name("elsewhere").mkdir()
        out.parent.symlink_to(out.parent.with_name("elsewhere"))
    else:  # the earlier repair at --out moved away, a symlink to it in its place
        os.rename(out, out.with_name("real"))
        out.symlink_to(out.with_name("real"))

try:
    repair_checkpoint(checkpoint, out, alpha=4, force=what == "out", progress=swap_once)
except CogsurgeonError as exc:
    print(exc)
    sys.exit(2)
"""


def test_the_parent_of_out_swapped_for_a_symlink_mid_repair_leaves_nothing_anywhere(tmp_path):
    """Issue 21 item 15: the staging folder and the lock live in the folder that was moved; the repair refuses to
    publish through the symlink now in its place, and removes both from where they really are."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    out = tmp_path / "parent" / "out"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "-c", SWAP_DURING_THE_REPAIR, str(checkpoint), str(out), "parent"],
                            capture_output=True, text=True, env=cli_environment(), timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "nothing was written" in result.stdout  # the check of the last file written, or the publish, notices
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == []


def test_out_swapped_for_a_symlink_during_force_is_put_back_and_nothing_is_left(tmp_path):
    """Issue 21 item 15: the swap would have put the symlink at the staging path, and clean-up (which does not
    follow symlinks) would have left it there as `.out.partial-*`."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", features=4096)
    out = tmp_path / "out"
    assert run_repair(str(checkpoint), "--out", str(out), "--alpha", "4").returncode == 0
    earlier = tree_digest(out)
    result = subprocess.run([sys.executable, "-c", SWAP_DURING_THE_REPAIR, str(checkpoint), str(out), "out"],
                            capture_output=True, text=True, env=cli_environment(), timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "changed while the repair ran" in result.stdout
    assert out.is_symlink() and os.readlink(out) == str(tmp_path / "real")
    assert tree_digest(tmp_path / "real") == {path.replace(str(out), str(tmp_path / "real")): digest
                                              for path, digest in earlier.items()}
    assert hidden_leftovers(tmp_path) == []


def test_out_creates_missing_parent_folders(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "runs" / "2026" / "adapter"
    result = subprocess.run([sys.executable, "-m", "cogsurgeon.inspector", "lora", "repair", str(checkpoint),
                             "--out", str(out), "--alpha", "4"], capture_output=True, text=True,
                            env=cli_environment(), timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    assert is_unchanged_repair(out)
    assert (tmp_path / "runs").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]


def test_a_refused_repair_creates_no_parent_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_repair(str(tmp_path / "empty"), "--out", str(tmp_path / "runs" / "adapter"), "--alpha", "4")
    assert_refused(result, "holds no LoRA checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
