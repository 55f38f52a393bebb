"""Loading every kind of MODEL spec through the real diffusers class: meta configs, tiny models, saved folders
(sharded and not, fp32 and bf16), the local Hugging Face cache, with the network provably unused."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from cogsurgeon.inspector import load_transformer
from cogsurgeon.inspector.errors import ModelLoadError, ModelSpecError
from cogsurgeon.inspector.inventory import module_inventory
from cogsurgeon.inspector.loading import cached_snapshot, transformer_class

# Loading and reading models goes through diffusers internals that change between releases.
pytestmark = pytest.mark.diffusers_versions

# DESIGN.md, "Published configs": the parameter totals of the real checkpoints.
PUBLISHED_PARAMS = {
    "cogvideox-2b": 1_693_783_872,
    "cogvideox-5b": 5_570_283_072,
    "cogvideox-5b-i2v": 5_570_479_680,
    "cogvideox1.5-5b": 5_570_676_352,
    "cogvideox1.5-5b-i2v": 5_571_594_880,
}


@pytest.mark.parametrize("spec", sorted(PUBLISHED_PARAMS))
def test_published_config_builds_on_meta_with_the_published_parameter_count(spec):
    model = load_transformer(spec)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[spec]
    assert {t.device.type for t in model.parameters()} == {"meta"}
    assert {t.device.type for t in model.buffers()} <= {"meta"}  # the 218 MB position table too
    assert isinstance(model, transformer_class())


def test_meta_buffers_take_the_model_dtype():
    model = load_transformer("cogvideox-5b-i2v")
    assert model.patch_embed.pos_embedding.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tiny_models_are_seeded_runnable_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = load_transformer("tiny")
    assert torch.equal(torch.random.get_rng_state(), before)
    second = load_transformer("tiny")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert {t.device.type for t in first.parameters()} == {"cpu"}


def test_the_class_is_diffusers_own_even_when_imported_alone():
    import diffusers

    assert transformer_class() is diffusers.CogVideoXTransformer3DModel


def _save_tiny(folder: Path, dtype: torch.dtype, max_shard_size: str | None) -> dict[str, torch.Tensor]:
    model = load_transformer("tiny", dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["single-file", "sharded"])
def test_saved_folder_loads_with_equal_tensors_in_the_saved_dtype(tmp_path, dtype, max_shard_size):
    saved = _save_tiny(tmp_path, dtype, max_shard_size)
    shards = list(tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_size is not None)

    model = load_transformer(str(tmp_path))
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded[name].dtype == dtype, name
        assert torch.equal(loaded[name], tensor), name
    devices = {info.device for info in module_inventory(model) if info.params}
    assert devices == {"cpu"}


def test_model_root_with_a_transformer_subfolder(tmp_path):
    saved = _save_tiny(tmp_path / "transformer", torch.float32, None)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    model = load_transformer(str(tmp_path))
    assert torch.equal(model.state_dict()["proj_out.weight"], saved["proj_out.weight"])


def test_a_dtype_can_be_asked_for(tmp_path):
    _save_tiny(tmp_path, torch.float32, None)
    model = load_transformer(str(tmp_path), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_folder_without_config_is_a_spec_error(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_transformer(str(tmp_path))


def test_config_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel, not a CogVideoXTransformer3DModel"):
        load_transformer(str(tmp_path))


def test_config_without_weights_says_what_is_missing(tmp_path):
    load_transformer("tiny").save_config(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_transformer(str(tmp_path))


def test_truncated_weights_are_a_load_error_not_a_crash(tmp_path):
    _save_tiny(tmp_path, torch.float32, None)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load|not a valid safetensors"):
        load_transformer(str(tmp_path))


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    _save_tiny(snapshot / "transformer", torch.float32, None)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Sockets that refuse to connect, and none of the Hub's offline switches set: a load must not need them."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_every_loader_runs_without_the_network(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "THUDM/CogVideoX-tiny")
    _save_tiny(tmp_path / "folder", torch.bfloat16, "20KB")

    assert load_transformer("cogvideox-5b").device.type == "meta"
    assert load_transformer("tiny-1.5").device.type == "cpu"
    assert load_transformer(str(tmp_path / "folder")).dtype == torch.bfloat16
    assert load_transformer("THUDM/CogVideoX-tiny").dtype == torch.float32
    with pytest.raises(ModelSpecError, match="not in the local Hugging Face cache"):
        load_transformer("THUDM/CogVideoX-5b")


OLD_COMMIT = "1111111111111111111111111111111111111111"
NEW_COMMIT = "2222222222222222222222222222222222222222"


@pytest.fixture
def two_snapshot_cache(tmp_path, monkeypatch, no_network) -> Path:
    """A cache as huggingface_hub leaves it after two downloads: `refs/main` names the OLDER snapshot (float32) and
    the tag `v2` the newer one (bfloat16), whose folder is also the newest by modification time."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import; the CLI reads the variable
    repo = cache / "models--org--cogvideox-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(OLD_COMMIT)
    (repo / "refs" / "v2").write_text(NEW_COMMIT)
    snapshots = ((OLD_COMMIT, torch.float32, 1_000_000_000), (NEW_COMMIT, torch.bfloat16, 2_000_000_000))
    for commit, dtype, mtime in snapshots:
        _save_tiny(repo / "snapshots" / commit / "transformer", dtype, None)
        os.utime(repo / "snapshots" / commit, (mtime, mtime))
    return repo


def test_a_hub_id_loads_the_snapshot_refs_main_names_not_the_newest_folder(two_snapshot_cache):
    assert cached_snapshot("org/cogvideox-tiny") == two_snapshot_cache / "snapshots" / OLD_COMMIT
    assert load_transformer("org/cogvideox-tiny").dtype == torch.float32


@pytest.mark.parametrize("revision", ["v2", NEW_COMMIT], ids=["tag", "commit"])
def test_an_explicit_revision_loads_that_snapshot(two_snapshot_cache, revision):
    assert cached_snapshot("org/cogvideox-tiny", revision) == two_snapshot_cache / "snapshots" / NEW_COMMIT
    assert load_transformer("org/cogvideox-tiny", revision=revision).dtype == torch.bfloat16


def test_refs_main_naming_a_snapshot_not_in_the_cache_is_not_answered_with_another(two_snapshot_cache):
    """An interrupted download: `main` moved to a commit whose files never arrived. The newest folder on disk is
    another commit; loading it would be a quiet guess. The error lists what the cache does hold."""
    (two_snapshot_cache / "refs" / "main").write_text("3" * 40)
    with pytest.raises(ModelSpecError, match=f"revision 'main' is not in the local Hugging Face cache .* holds "
                                             f"v2 -> 22222222, {OLD_COMMIT}"):
        cached_snapshot("org/cogvideox-tiny")


def test_a_revision_the_cache_lacks_and_a_model_it_lacks_are_clear_errors(two_snapshot_cache):
    with pytest.raises(ModelSpecError, match="revision 'v3' is not in the local Hugging Face cache"):
        load_transformer("org/cogvideox-tiny", revision="v3")
    with pytest.raises(ModelSpecError, match=r"org/other is not in the local Hugging Face cache .*download org/other"):
        load_transformer("org/other")
    with pytest.raises(ModelSpecError, match="revision 'v2' is for a hub id"):
        load_transformer("tiny", revision="v2")


@pytest.mark.parametrize(
    "broken",
    [
        ("diffusion_pytorch_model.safetensors", b'\x0b\x00\x00\x00\x00\x00\x00\x00{"a": 1}   '),
        ("diffusion_pytorch_model.safetensors.index.json", b'{"weight_map": {"proj_out.weight": 5}}'),
        ("diffusion_pytorch_model.safetensors.index.json", b'{"weight_map": ["a"]}'),
    ],
    ids=["header-entry-not-an-object", "shard-name-not-a-string", "weight-map-not-a-mapping"],
)
def test_malformed_weight_files_are_load_errors(tmp_path, broken):
    load_transformer("tiny").save_config(tmp_path)
    name, content = broken
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a valid|broken safetensors header"):
        load_transformer(str(tmp_path))
