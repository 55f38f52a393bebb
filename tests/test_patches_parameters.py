"""Patch parameters: declared by a patch (`PatchParameter`), validated by `apply` (typed errors naming the parameter),
kept in the model's record (`applied_options`), spelled `NAME:key=value,...` on the command line (`patch list`,
`patch verify`, `run --patch`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cogsurgeon import patches
from cogsurgeon.patches import registry
from cogsurgeon.patches.parameters import format_patch_spec, parse_patch_spec, parse_value

PLUGIN_MODULE = '''
"""A third-party patch with parameters: scales the transformer's output projection while applied."""
from cogsurgeon import patches
from cogsurgeon.patches import PatchParameter, PatchParameterError


class ScaleOutput(patches.Patch):
    name = "scale-output"
    summary = "scales proj_out (a test plugin with parameters)"
    parameters = (
        PatchParameter("factor", float, 2.0, "what proj_out's output is multiplied by"),
        PatchParameter("every", int, 1, "scale every n-th call only"),
        PatchParameter("label", (str, type(None)), None, "a name for the record"),
        PatchParameter("enabled", bool, True, "false: apply, but change nothing"),
    )

    def check_options(self, options):
        if options["every"] < 1:
            raise PatchParameterError(self.name, "every", f"{self.name}: every must be >= 1, got {options['every']}")

    def apply(self, transformer, *, factor, every, label, enabled):
        scale = factor if enabled else 1.0
        return transformer.proj_out.register_forward_hook(lambda module, args, out: out * scale)

    def revert(self, transformer, record):
        record.remove()
'''


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """The plugin installed as pip leaves a distribution, and this process's registry reloaded to see it."""
    (tmp_path / "cogsurgeon_scale_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "cogsurgeon_scale_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cogsurgeon-scale-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[cogsurgeon.patches]\nscale-output = cogsurgeon_scale_plugin:ScaleOutput\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_loaded", False)
    return tmp_path


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("causal-attention", ("causal-attention", {})),
        ("block:chunk=3,window=none,sink=0", ("block", {"chunk": 3, "window": None, "sink": 0})),
        ("p:a=1.5,b=-2,c=True,d=false,e=max,f=None,g=1e-3", ("p", {"a": 1.5, "b": -2, "c": True, "d": False, "e": "max", "f": None, "g": 1e-3})),
        (" p : a = 1 ", ("p", {"a": 1})),
        ("p:a=nan,b=inf", ("p", {"a": "nan", "b": "inf"})),  # no parameter takes a non-finite number
    ],
)
def test_parse_patch_spec_reads_names_and_typed_values(spec, expected):
    assert parse_patch_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "has no patch name"),
        (":a=1", "has no patch name"),
        ("p:", "nothing after ':'"),
        ("p:a", "'a' is not key=value"),
        ("p:a=1,", "'' is not key=value"),
        ("p:=1", "'=1' is not key=value"),
        ("p:a-b=1", "'a-b=1' is not key=value"),
        ("p:a=1,a=2", "gives a twice"),
    ],
)
def test_a_malformed_spec_is_a_typed_error(spec, message):
    with pytest.raises(patches.PatchSpecError, match=message):
        parse_patch_spec(spec)


def test_format_patch_spec_reads_back():
    options = {"chunk": 3, "window": None, "sink": 0, "scale": 0.5, "text": "max", "flag": False}
    spec = format_patch_spec("block", options)
    assert spec == "block:chunk=3,window=none,sink=0,scale=0.5,text=max,flag=false"
    assert parse_patch_spec(spec) == ("block", options)
    assert format_patch_spec("causal-attention", {}) == "causal-attention"
    assert parse_value("0") == 0 and isinstance(parse_value("0"), int)


def test_parameters_are_listed_validated_and_kept_in_the_record(plugin_installed, tiny_model):
    from cogsurgeon.patches.verify import forward, tiny_inputs

    info = {info.name: info for info in patches.available()}["scale-output"]
    assert [(p.name, p.type_name, p.default) for p in info.parameters] == [
        ("factor", "float", 2.0), ("every", "int", 1), ("label", "str | None", None), ("enabled", "bool", True),
    ]
    assert {info.name: info for info in patches.available()}["causal-attention"].parameters == ()

    bad = [
        ({"facter": 3.0}, "facter", "scale-output has no parameter 'facter' .its parameters: factor, every, label, enabled."),
        ({"factor": "3"}, "factor", "factor must be float, got '3'"),
        ({"every": 2.0}, "every", "every must be int, got 2.0"),
        ({"every": True}, "every", "every must be int, got True"),  # a bool is not a number
        ({"enabled": 1}, "enabled", "enabled must be bool, got 1"),
        ({"factor": float("nan")}, "factor", "factor must be float"),
        ({"every": 0}, "every", "every must be >= 1, got 0"),  # the patch's own check
    ]
    for options, parameter, message in bad:
        with pytest.raises(patches.PatchParameterError, match=message) as refused:
            patches.apply(tiny_model, "scale-output", **options)
        assert (refused.value.patch, refused.value.parameter) == ("scale-output", parameter)
    assert patches.applied(tiny_model) == [] and not tiny_model.proj_out._forward_hooks

    inputs = tiny_inputs(tiny_model)
    unpatched = forward(tiny_model, inputs)
    handle = patches.apply(tiny_model, "scale-output", factor=3, label="x")  # an int is accepted where a float is
    assert patches.applied(tiny_model) == ["scale-output"]
    assert patches.applied_options(tiny_model) == {
        "scale-output": {"factor": 3, "every": 1, "label": "x", "enabled": True}
    }
    scaled = forward(tiny_model, inputs)
    handle.revert()
    assert torch.equal(forward(tiny_model, inputs), unpatched)
    assert not torch.equal(scaled, unpatched)
    assert patches.applied_options(tiny_model) == {}


def test_patched_gives_each_option_to_the_patches_that_declare_it(plugin_installed, tiny_model):
    with patches.patched(tiny_model, "causal-attention", "scale-output", factor=0.5, enabled=False):
        assert patches.applied_options(tiny_model) == {
            "causal-attention": {},
            "scale-output": {"factor": 0.5, "every": 1, "label": None, "enabled": False},
        }
    with pytest.raises(patches.PatchParameterError, match="none of causal-attention, scale-output has a parameter 'chunk'"):
        with patches.patched(tiny_model, "causal-attention", "scale-output", chunk=3):
            pass
    assert patches.applied(tiny_model) == []


def test_memory_estimate_validates_options(plugin_installed):
    shape = dict(batch=1, heads=1, text_tokens=1, video_tokens=1, frames=1, dtype_bytes=2)
    assert patches.memory_estimate("scale-output", **shape, options={"factor": 2.5}) is None
    with pytest.raises(patches.PatchParameterError, match="has no parameter 'chunk'"):
        patches.memory_estimate("scale-output", **shape, options={"chunk": 2})


# -- the command line ----------------------------------------------------------------------------------------------


REPO_ROOT = Path(__file__).resolve().parents[1]


def plugin_environment(folder) -> dict[str, str]:
    return {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{folder}"}


def test_patch_list_shows_each_parameter_with_its_default(cli, plugin_installed):
    environment = plugin_environment(plugin_installed)
    listed = {row["name"]: row for row in json.loads(cli("patch", "list", "--json", env=environment).stdout)}
    assert listed["causal-attention"]["parameters"] == []
    assert listed["scale-output"]["parameters"][0] == {
        "name": "factor", "type": "float", "default": 2.0, "doc": "what proj_out's output is multiplied by",
    }
    text = cli("patch", "list", env=environment).stdout
    assert "    factor: float = 2.0  what proj_out's output is multiplied by" in text
    assert "    label: str | None = none  a name for the record" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (("patch", "verify", "causal-attention:chunk=3"), "causal-attention has no parameter 'chunk' (it takes no parameters)"),
        (("patch", "verify", "causal-attention:chunk"), "'chunk' is not key=value"),
        (("run", "--patch", "causal-attention:window=2", "--", "true"), "causal-attention has no parameter 'window'"),
        (("run", "--patch", "scale-output:factor=big", "--", "true"), "scale-output: factor must be float, got 'big'"),
        (("run", "--patch", "scale-output:every=0", "--", "true"), "every must be >= 1, got 0"),
        (("run", "--patch", "scale-output:factor=2", "--patch", "scale-output:factor=3", "--", "true"), "--patch names scale-output twice with different options"),
        # a number torch cannot hold and a non-finite text timestep (str-typed, so "nan" used to pass as float("nan"))
        (("patch", "verify", f"block-causal-attention:chunk={2**80}"), f"chunk must fit in 64 bits, got {2**80}"),
        (("run", "--patch", "scale-output:every=-99999999999999999999", "--", "true"), "every must fit in 64 bits"),
        (("patch", "verify", "per-frame-timesteps:text_timestep=nan"), "text_timestep must be finite, got 'nan'"),
        (("run", "--patch", "per-frame-timesteps:text_timestep=-inf", "--", "true"), "must be finite, got '-inf'"),
    ],
)
def test_bad_parameters_on_the_command_line_are_one_line_and_exit_2(cli, plugin_installed, args, message):
    result = cli(*args, env=plugin_environment(plugin_installed))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and result.stdout == ""


SCRIPT = '''
import json, sys
from cogsurgeon import patches
from cogsurgeon.inspector.loading import build_tiny

model = build_tiny("tiny")
print(json.dumps(patches.applied_options(model)))
'''


@pytest.mark.slow  # `run` launches the script: two interpreters
def test_run_applies_a_patch_with_its_parameters_in_the_child(cli, plugin_installed, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = cli(
        "run", "--patch", "scale-output:factor=0.25,label=ema", "--patch", "causal-attention", "--",
        sys.executable, str(script), env=plugin_environment(plugin_installed),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "scale-output": {"factor": 0.25, "every": 1, "label": "ema", "enabled": True}, "causal-attention": {},
    }
    assert "cogsurgeon run: scale-output:factor=0.25,label=ema, causal-attention -> CogVideoXTransformer3DModel" in result.stderr
