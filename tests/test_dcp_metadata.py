"""A torch distributed checkpoint's `.metadata` is a pickle. cogsurgeon reads it only with an allow-listed unpickler
and checks every field before it allocates or reads anything: a payload that would run code never runs (lora
inspect, repair, --latest, the TUI's LoRA screen), and forged or damaged metadata and shards are one line, exit 2."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from lora_trainers import save_cogkit_dcp, train, tree_digest

MARKER_NAME = "pwned-marker"


def payload_metadata(metadata_bytes: bytes, marker: Path) -> bytes:
    """The real metadata pickle with a prefix that runs `exec` (creating `marker`) and discards its result, so an
    unrestricted `pickle.load` runs the code and still returns the real `Metadata`: nothing looks wrong."""
    assert metadata_bytes[:1] == pickle.PROTO
    code = f"open({str(marker)!r}, 'w').close()".encode()
    argument = pickle.BINUNICODE + len(code).to_bytes(4, "little") + code
    prefix = pickle.PROTO + metadata_bytes[1:2] + pickle.GLOBAL + b"builtins\nexec\n" + pickle.MARK + argument \
        + pickle.TUPLE + pickle.REDUCE + pickle.POP
    return prefix + metadata_bytes[2:]


@pytest.fixture(scope="module")
def cogkit_output(tmp_path_factory) -> Path:
    """A CogKit output folder (`out/checkpoint-5/`) written by CogKit's own dcp.save call."""
    root = tmp_path_factory.mktemp("cogkit")
    save_cogkit_dcp(train("tiny", 4, 2), root / "out", 5)
    return root / "out"


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.fixture
def poisoned(cogkit_output, tmp_path) -> tuple[Path, Path]:
    """A copy of the CogKit output whose checkpoint's .metadata carries the payload; (output folder, marker path)."""
    out = copy_tree(cogkit_output, tmp_path / "out")
    metadata = out / "checkpoint-5" / ".metadata"
    marker = tmp_path / MARKER_NAME
    metadata.write_bytes(payload_metadata(metadata.read_bytes(), marker))
    return out, marker


def test_the_payload_is_live_for_torchs_own_reader(poisoned):
    """What the fix guards against: torch's FileSystemReader.read_metadata runs the payload and returns real metadata."""
    import torch.distributed.checkpoint as dcp

    out, marker = poisoned
    metadata = dcp.FileSystemReader(str(out / "checkpoint-5")).read_metadata()
    assert marker.exists()
    assert any(key.startswith("app.model.") for key in metadata.state_dict_metadata)


def assert_refused(result, marker: Path, expected: str = "was not loaded") -> None:
    assert not marker.exists(), "the payload ran"
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0] and "builtins.exec" in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("command", [
    ("lora", "inspect", "{ckpt}"),
    ("lora", "inspect", "{out}", "--latest"),
    ("lora", "inspect", "{out}", "--step", "5", "--json"),
    ("lora", "repair", "{ckpt}", "--out", "{adapter}", "--alpha", "2"),
    ("lora", "repair", "{out}", "--latest", "--out", "{adapter}", "--alpha", "2"),
])
def test_a_metadata_payload_never_runs_from_the_cli(command, poisoned, tmp_path, cli):
    out, marker = poisoned
    before = tree_digest(out)
    names = {"ckpt": str(out / "checkpoint-5"), "out": str(out), "adapter": str(tmp_path / "adapter")}
    result = cli(*(part.format(**names) for part in command))
    assert_refused(result, marker)
    assert tree_digest(out) == before
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_a_metadata_payload_never_runs_from_the_tui(poisoned, monkeypatch):
    from test_tui import SIZE, inspect_in_the_lora_screen, notifications

    from cogsurgeon.inspector.tui.app import CogsurgeonApp

    out, marker = poisoned
    monkeypatch.chdir(out.parent)

    async def scenario():
        app = CogsurgeonApp("tiny")
        async with app.run_test(size=SIZE) as pilot:
            await inspect_in_the_lora_screen(pilot, "out/checkpoint-5")
            shown = notifications(app)
            assert any("builtins.exec" in message and "was not loaded" in message for message in shown), shown
            assert app.screen.query_one("#lora-repair").disabled

    asyncio.run(scenario())
    assert not marker.exists()


def test_the_real_metadata_passes_the_allow_list_and_reads_the_same_as_torch(cogkit_output):
    import torch.distributed.checkpoint as dcp

    from cogsurgeon.tools.lora.dcp import read_metadata_safely

    folder = cogkit_output / "checkpoint-5"
    ours = read_metadata_safely(folder)
    theirs = dcp.FileSystemReader(str(folder)).read_metadata()  # trusted here: written by the test itself
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


# ---------------------------------------------------------------- forged metadata and damaged shards


def forge(folder: Path, change) -> None:
    """Rewrite `folder`'s metadata (a file this test wrote, so plain pickle is fine here) after `change(metadata)`."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def first_lora_entry(metadata):
    return next(entry for fqn, entry in metadata.state_dict_metadata.items() if fqn.startswith("app.model."))


def first_storage(metadata):
    index = next(index for index in metadata.storage_data if index.fqn.startswith("app.model."))
    return index, metadata.storage_data[index]


def negative_size(metadata):
    first_lora_entry(metadata).size = torch.Size([-4, 32])


def huge_size(metadata):
    entry = first_lora_entry(metadata)
    entry.size = torch.Size([2**40, 2**20])
    entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2**40, 2**20]))]


def list_typed_size(metadata):
    first_lora_entry(metadata).size = [4, 32]


def list_typed_state(metadata):
    metadata.state_dict_metadata = list(metadata.state_dict_metadata.items())


def chunk_outside(metadata):
    first_lora_entry(metadata).chunks = [ChunkStorageMetadata(offsets=torch.Size([3, 0]), sizes=torch.Size([4, 32]))]


def negative_offset(metadata):
    index, info = first_storage(metadata)
    metadata.storage_data[index] = dataclasses.replace(info, offset=-10)


def path_outside(metadata):
    index, info = first_storage(metadata)
    metadata.storage_data[index] = dataclasses.replace(info, relative_path="../../etc/passwd")


def string_length(metadata):
    index, info = first_storage(metadata)
    metadata.storage_data[index] = dataclasses.replace(info, length="1261")


FORGED = {
    "negative-size": (negative_size, "has size"),
    "huge-size": (huge_size, "more than its shards hold"),
    "list-typed-size": (list_typed_size, "has size [4, 32]"),
    "list-typed-state": (list_typed_state, "not mappings"),
    "chunk-outside": (chunk_outside, "outside its size"),
    "negative-offset": (negative_offset, "offset -10"),
    "path-outside": (path_outside, "not a file of the checkpoint folder"),
    "string-length": (string_length, "length '1261'"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_metadata_is_one_line_and_exit_2(name, cogkit_output, tmp_path, cli):
    change, expected = FORGED[name]
    out = copy_tree(cogkit_output, tmp_path / "out")
    forge(out / "checkpoint-5", change)
    before = tree_digest(out)
    for command in (("lora", "inspect", str(out / "checkpoint-5")),
                    ("lora", "repair", str(out / "checkpoint-5"), "--out", str(tmp_path / "adapter"), "--alpha", "2")):
        result = cli(*command)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert expected in lines[0], lines[0]
    assert tree_digest(out) == before
    assert not (tmp_path / "adapter").exists()


def test_a_shard_overwritten_in_place_is_one_line_and_exit_2(cogkit_output, tmp_path, cli):
    """Same size, bytes overwritten where the LoRA tensors lie: torch raises CheckpointException, a BaseException."""
    out = copy_tree(cogkit_output, tmp_path / "out")
    folder = out / "checkpoint-5"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    _, info = first_storage(metadata)
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset:info.offset + info.length] = bytes(info.length)
    shard.write_bytes(bytes(data))
    result = cli("lora", "inspect", str(folder))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot be read, truncated or damaged" in lines[0], lines[0]


def test_the_unpickler_refuses_every_global_off_the_list():
    from cogsurgeon.tools.lora.dcp import MetadataUnpickler

    for module, name in (("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"),
                         ("torch.distributed.checkpoint.filesystem", "FileSystemReader")):
        data = f"c{module}\n{name}\n.".encode()
        with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
            MetadataUnpickler(io.BytesIO(data)).load()
    assert MetadataUnpickler(io.BytesIO(pickle.dumps(torch.bfloat16))).load() is torch.bfloat16
    assert MetadataUnpickler(io.BytesIO(pickle.dumps(MetadataIndex("a")))).load() == MetadataIndex("a")
