"""`cogsurgeon doctor` against the real installed diffusers and peft. The probes never look at versions; only the
expectations here do (CI runs these on diffusers 0.42.x and again on 0.32.x)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from packaging.version import Version

from cogsurgeon.inspector.doctor import PROBE_IDS, PROBES, run_doctor, run_probe

DIFFUSERS = Version(version("diffusers"))


def expected_statuses() -> dict[str, str]:
    """What the two diffusers releases CI runs are known to do (seen by hand in their source)."""
    if DIFFUSERS.major == 0 and DIFFUSERS.minor == 32:
        return {
            "mask-pad-length": "present",
            "fused-processor-text-length": "present",
            "block-drops-attention-kwargs": "present",
            "attention-backend-ignored": "absent",  # no set_attention_backend at all
            "cogvideox-not-context-parallel": "present",  # no engine at all
            "lora-alpha-lost": "present",
            "peft-local-path-hub": "present",
        }
    if DIFFUSERS >= Version("0.42"):
        return {
            "mask-pad-length": "present",
            "fused-processor-text-length": "present",
            "block-drops-attention-kwargs": "absent",
            "attention-backend-ignored": "present",
            "cogvideox-not-context-parallel": "present",  # no _cp_plan; the processor calls SDPA itself
            "lora-alpha-lost": "present",
            "peft-local-path-hub": "present",
        }
    pytest.skip(f"no recorded expectation for diffusers {DIFFUSERS}")


def _probe(probe_id: str):
    return next(probe for probe in PROBES if probe.id == probe_id)


@pytest.mark.diffusers_versions
@pytest.mark.parametrize("probe_id", [pid for pid in PROBE_IDS if pid != "peft-local-path-hub"])
def test_probe_finds_what_this_diffusers_does(probe_id):
    finding = run_probe(_probe(probe_id))
    assert finding.status == expected_statuses()[probe_id], finding.detail
    if finding.status == "present":  # a cogsurgeon command, or (the backend) torch's own kernel choice around the call
        assert finding.fix.startswith("cogsurgeon ") or finding.fix.startswith("choose the SDPA kernel"), finding.fix
    else:
        assert finding.fix is None


@pytest.mark.diffusers_versions
def test_details_report_what_the_experiment_saw():
    details = {finding.id: finding.detail for finding in run_doctor(
        ("mask-pad-length", "fused-processor-text-length", "block-drops-attention-kwargs", "lora-alpha-lost",
         "attention-backend-ignored"))}
    assert "padded a length-3 mask to 8 for target length 5" in details["mask-pad-length"]
    assert "prepared a mask for 8 keys where the joint sequence has 24" in details["fused-processor-text-length"]
    assert "reloads at scale 1" in details["lora-alpha-lost"]
    if expected_statuses()["block-drops-attention-kwargs"] == "present":
        assert "in 0 of 2 attention calls" in details["block-drops-attention-kwargs"]
    else:
        assert "in 2 of 2 attention calls" in details["block-drops-attention-kwargs"]
    if expected_statuses()["attention-backend-ignored"] == "present":
        assert "0 of 2 attention calls" in details["attention-backend-ignored"]
    else:
        assert "no set_attention_backend" in details["attention-backend-ignored"]


@pytest.mark.diffusers_versions
def test_attention_backend_probe_puts_global_state_back():
    import importlib.util

    from diffusers.utils import logging as diffusers_logging

    has_registry = importlib.util.find_spec("diffusers.models.attention_dispatch") is not None
    assert has_registry == (expected_statuses()["attention-backend-ignored"] == "present")
    if has_registry:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry._active_backend
    verbosity = diffusers_logging.get_verbosity()
    run_probe(_probe("attention-backend-ignored"))
    assert diffusers_logging.get_verbosity() == verbosity
    if has_registry:
        assert _AttentionBackendRegistry._active_backend == backend


def test_unknown_check_is_a_cogsurgeon_error():
    from cogsurgeon.inspector.errors import CogsurgeonError

    with pytest.raises(CogsurgeonError, match="unknown check nope"):
        run_doctor(("nope",))


@pytest.mark.slow
@pytest.mark.diffusers_versions
def test_cli_doctor_json_all_findings(cli):
    completed = cli("doctor", "--json")
    assert completed.returncode == 0, completed.stderr
    findings = json.loads(completed.stdout)["findings"]
    assert [finding["id"] for finding in findings] == list(PROBE_IDS)
    assert {finding["id"]: finding["status"] for finding in findings} == expected_statuses()
    for finding in findings:
        assert set(finding) == {"id", "status", "detail", "fix"}
        assert "\n" not in finding["detail"]
    peft = findings[-1]["detail"]
    assert "HFValidationError" in peft  # an absolute path is taken for a repo id
    assert "relative path" in peft and "0 connection attempt(s); relative" in peft


def test_cli_doctor_table_and_bad_usage(cli):
    completed = cli("doctor", "--check", "mask-pad-length")
    assert completed.returncode == 0, completed.stderr
    assert "mask-pad-length" in completed.stdout and "present" in completed.stdout
    assert "cogsurgeon run --patch attention-mask" in completed.stdout
    bad = cli("doctor", "--check", "nope")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "cogsurgeon: error: unknown check nope: known checks are " + ", ".join(PROBE_IDS)
    ]


def test_no_fix_changes_what_the_model_computes():
    """A fix avoids a pitfall; it never changes the model's semantics. `causal-attention` (or any attention-pattern
    patch) would: the backend finding's fix is torch's own kernel choice, which reaches the processor's SDPA call."""
    from cogsurgeon import patches

    semantic_patches = {info.name for info in patches.available()} - {"attention-mask"}
    for probe in PROBES:
        assert not any(f"--patch {name}" in probe.fix for name in semantic_patches), (probe.id, probe.fix)
    assert "sdpa_kernel(" in _probe("attention-backend-ignored").fix
