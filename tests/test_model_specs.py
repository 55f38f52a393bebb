"""MODEL spec classification and the shipped configs (pure: no model is built here)."""

import pytest

from cogsurgeon.inspector.errors import ModelSpecError
from cogsurgeon.inspector.model_specs import (
    DEFAULT_SPEC,
    PUBLISHED_SPECS,
    TINY_SPECS,
    published_config,
    resolve_spec,
)


def test_default_is_the_original_forks_model():
    assert resolve_spec(None).spec == DEFAULT_SPEC == "cogvideox-5b-i2v"
    assert resolve_spec(None).kind == "published"


@pytest.mark.parametrize("name", PUBLISHED_SPECS)
def test_published_names_resolve_to_published(name):
    assert resolve_spec(name).kind == "published"
    assert published_config(name)["_class_name"] == "CogVideoXTransformer3DModel"


@pytest.mark.parametrize("name", TINY_SPECS)
def test_tiny_names_resolve_to_tiny(name):
    assert resolve_spec(name).kind == "tiny"


def test_existing_folder_is_a_folder_spec(tmp_path):
    resolved = resolve_spec(str(tmp_path))
    assert resolved.kind == "folder" and resolved.spec == str(tmp_path.resolve())


def test_org_slash_name_that_is_not_a_folder_is_a_hub_id():
    assert resolve_spec("THUDM/CogVideoX-5b-I2V").kind == "hub"


@pytest.mark.parametrize("spec", ["cogvideox-6b", "tiny2"])
def test_unknown_name_names_the_choices(spec):
    with pytest.raises(ModelSpecError, match="cogvideox-5b-i2v"):
        resolve_spec(spec)


def test_missing_path_says_the_folder_does_not_exist(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(str(tmp_path / "nowhere" / "model"))


def test_published_configs_share_the_documented_fields():
    shared = {
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": 64,
        "max_text_seq_length": 226,
        "out_channels": 16,
        "patch_size": 2,
        "text_embed_dim": 4096,
        "time_embed_dim": 512,
    }
    for name in PUBLISHED_SPECS:
        config = published_config(name)
        assert {key: config[key] for key in shared} == shared, name
