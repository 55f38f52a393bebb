"""Fuzzing the safetensors reader and the LoRA key grammar (issue 16 item 9), bounded to well under a minute.

Every generated file either repairs (and then safetensors opens every output file, PEFT reads the config and the
weights, and the weights are the input's bytes) or is refused with a `CogsurgeonError` (the CLI's exit 2) — never
another exception, never a hang (an alarm fails the example), never a change to the input. The reader is also
checked against the `safetensors` library on the same bytes: whatever the library rejects, the reader rejects.
Most examples run in-process for speed; a few go through the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli

EXAMPLE_SECONDS = 20  # one example that takes longer is a hang
# files in memory where the system has it: a repair fsyncs what it publishes, and disks make that the slow part
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "I64": 8}

# ------------------------------------------------------------------ the key grammar, with its near misses

modules = st.one_of(
    st.builds(lambda block, target: f"transformer_blocks.{block}.attn1.{target}",
              st.integers(0, 3), st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"])),
    st.builds(lambda block, target: f"transformer_blocks.{block}.{target}",
              st.integers(0, 3), st.sampled_from(["ff.net.0.proj", "ff.net.2", "norm1.linear"])),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),  # anything at all
    st.sampled_from(["", ".", "..", "a..b", "\ud800", "x\udfffy", "ü.ß", "lora_A", "0"]),
)
prefixes = st.sampled_from(["", "transformer.", "base_model.model.", "base_model.model.transformer.",
                            "lora_unet_", "unet."])
parts = st.sampled_from(["lora_A", "lora_B", "lora_down", "lora_up", "lora_C", "lora_A.default", "lora_B.x.y",
                         "lora_magnitude_vector", "alpha"])
suffixes = st.sampled_from([".weight", "", ".bias", ".weight.weight"])
keys = st.one_of(
    st.builds(lambda p, m, part, s: f"{p}{m}.{part}{s}", prefixes, modules, parts, suffixes),
    st.text(max_size=30),
    st.just("__metadata__"),
)

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=8)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
alphas = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.just(10**401), st.text(max_size=4), st.none())


clean_modules = st.builds(lambda block, target: f"transformer_blocks.{block}.attn1.{target}",
                          st.integers(0, 3), st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"]))
MUTATIONS = ("key", "dtype", "shape", "field", "entry", "junk-entry", "rank-0", "metadata", "pattern", "raw",
             "length", "truncate", "append", "byte")


@st.composite
def lora_files(draw) -> bytes:
    """A safetensors file: a well-formed LoRA file (the grammar's valid keys, one float dtype, an alpha or none),
    then none, one (most often) or several hostile mutations — keys, dtypes, shapes, offsets, metadata values,
    header bytes, the length prefix, the data. One mutation on an otherwise valid file is what finds acceptance
    bugs; several find crashes in combinations."""
    count = draw(st.sampled_from([0, 1, 1, 1, 3]))
    chosen = set(draw(st.lists(st.sampled_from(MUTATIONS), min_size=count, max_size=count)))
    rank = 0 if "rank-0" in chosen else draw(st.integers(1, 4))
    features = draw(st.integers(1, 6))
    float_dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
    header: dict = {}
    data = b""
    file_prefix = draw(st.sampled_from(["", "transformer.", "base_model.model."]))  # one per file, as trainers do
    for module in draw(st.lists(clean_modules, min_size=1, max_size=4, unique=True)):
        for part, shape in (("lora_A", [rank, features]), ("lora_B", [features, rank])):
            key = f"{file_prefix}{module}.{part}.weight"
            dtype = float_dtype
            if "key" in chosen and draw(st.booleans()):
                key = draw(st.one_of(keys, st.builds(lambda p, m: f"{p}{m}.{part}.weight", prefixes, modules)))
            if "dtype" in chosen and draw(st.booleans()):
                dtype = draw(st.sampled_from(sorted(DTYPES)))
            if "shape" in chosen and draw(st.booleans()):
                shape = draw(st.lists(st.integers(0, 5), max_size=3))
            size = DTYPES[dtype] * math.prod(shape)
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
            data += draw(st.binary(min_size=size, max_size=size)) if size < 64 else b"\x01" * size
    if "metadata" in chosen or "pattern" in chosen or draw(st.booleans()):
        alpha = draw(alphas) if "metadata" in chosen else draw(st.integers(1, 256))
        r_value = draw(st.one_of(st.integers(-2, 8), json_values)) if "metadata" in chosen else rank
        config = {"transformer.r": r_value, "transformer.lora_alpha": alpha}
        if "pattern" in chosen:
            config["transformer.alpha_pattern"] = draw(st.one_of(
                st.dictionaries(st.text(max_size=5), alphas, max_size=2), json_values))
        header["__metadata__"] = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    if "field" in chosen:  # one field of one entry replaced by any JSON value
        name = draw(st.sampled_from(sorted(header)))
        if isinstance(header[name], dict):
            field = draw(st.sampled_from(sorted(header[name])))
            header[name] = {**header[name], field: draw(json_values)}
    if "entry" in chosen:
        header[draw(st.sampled_from(sorted(header)))] = draw(json_values)
    if "junk-entry" in chosen:
        header[draw(keys)] = draw(json_values)
    text = json.dumps(header, allow_nan=True)  # NaN/Infinity as Python writes them: invalid JSON elsewhere
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates as raw bytes: not UTF-8
    if "raw" in chosen:
        raw = draw(st.sampled_from([b"\xef\xbb\xbf" + raw, raw + b"  ", raw[:-1], b" " + raw, b"\t" + raw,
                                    raw.replace(b'"', b"'", 1), raw + b"}"]))
    raw += b" " * (-len(raw) % 8)
    length = len(raw)
    if "length" in chosen:
        length = draw(st.sampled_from([0, 7, length - 8, length + 8, 100_000_001, 2**64 - 1]))
    content = struct.pack("<Q", length) + raw + data
    if "truncate" in chosen:
        content = content[: draw(st.integers(0, max(len(content) - 1, 0)))]
    if "append" in chosen:
        content += draw(st.binary(min_size=1, max_size=16))
    if "byte" in chosen and content:
        position = draw(st.integers(0, len(content) - 1))
        content = content[:position] + bytes([draw(st.integers(0, 255))]) + content[position + 1:]
    return content


# ------------------------------------------------------------------ checks


@contextmanager
def alarm(seconds: int):
    """Fail, instead of hanging, when one example runs past `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"one example ran past {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - the library's verdict, whatever its error type
        return False


def check_published_adapter(out: Path, source: Path) -> None:
    """What a successful repair wrote: every safetensors file opens in the library and holds the source's bytes;
    PEFT parses the config and loads the weights."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    from cogsurgeon.inspector.safetensors_header import read_header

    content = source.read_bytes()
    source_tensors = {content[entry.start:entry.end] for entry in read_header(source).tensors}
    for path in out.glob("*.safetensors"):
        assert library_accepts(path), path
        written = path.read_bytes()
        for entry in read_header(path, ask_library=False).tensors:  # every tensor is one of the source's, unchanged
            assert written[entry.start:entry.end] in source_tensors, entry.name
    config = LoraConfig.from_pretrained(str(out))
    assert config.r > 0 and math.isfinite(config.lora_alpha) and config.lora_alpha > 0
    assert load_peft_weights(str(out), device="cpu")


def repair_or_refuse(content: bytes, *, alpha: float | None) -> str:
    """Write `content` as a checkpoint, repair it in-process; return "repaired" or "refused"."""
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.inspector.safetensors_header import read_header
    from cogsurgeon.tools.lora.repair import repair_checkpoint

    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        source = Path(folder) / "ckpt" / "pytorch_lora_weights.safetensors"
        source.parent.mkdir()
        source.write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        out = Path(folder) / "out"
        with alarm(EXAMPLE_SECONDS):
            try:
                read_header(source, ask_library=False)  # the reader's own verdict, before the library is asked
                reader_accepts = True
            except CogsurgeonError:
                reader_accepts = False
            if not library_accepts(source):
                assert not reader_accepts, "the reader accepted a file the safetensors library rejects"
            try:
                repair_checkpoint(source.parent, out, alpha=alpha)
                outcome = "repaired"
            except CogsurgeonError as exc:
                assert str(exc).strip(), "an error without a message"
                outcome = "refused"
        assert hashlib.sha256(source.read_bytes()).hexdigest() == digest, "the input changed"
        assert sorted(p.name for p in source.parent.iterdir()) == ["pytorch_lora_weights.safetensors"]
        if outcome == "repaired":
            assert reader_accepts
            check_published_adapter(out, source)
            assert sorted(p.name for p in Path(folder).iterdir()) == ["ckpt", "out"]
        else:
            assert sorted(p.name for p in Path(folder).iterdir()) == ["ckpt"], "a refused repair left files"
        return outcome


@pytest.mark.slow
@FUZZ
@given(content=lora_files(), alpha=st.one_of(st.none(), st.just(8.0)))
def test_fuzzed_lora_files_repair_or_are_refused(content, alpha):
    repair_or_refuse(content, alpha=alpha)


def test_the_fuzzer_reaches_both_outcomes():
    """A fuzzer whose files are all refused (or all repaired) tests little: both outcomes must be common."""
    outcomes = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(content=lora_files())
    def collect(content):
        outcomes.append(repair_or_refuse(content, alpha=8.0))

    collect()
    assert outcomes.count("repaired") >= 5 and outcomes.count("refused") >= 5, outcomes


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(content=lora_files())
def test_fuzzed_lora_files_through_the_cli(content):
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        source = Path(folder) / "pytorch_lora_weights.safetensors"
        source.write_bytes(content)
        for arguments in (["inspect", str(source), "--alpha", "8"],
                          ["repair", str(source), "--out", str(Path(folder) / "out"), "--alpha", "8"]):
            result = run_cli("lora", *arguments, timeout=60)
            assert result.returncode in (0, 2), result.stderr
            assert "Traceback" not in result.stderr
            if result.returncode == 2:
                assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert source.read_bytes() == content


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "C64", "F8_E4M3FNUZ"])
def test_dtypes_the_library_may_know_are_refused_by_name(tmp_path, dtype):
    """Newer safetensors releases add dtypes (some sub-byte); the reader refuses those it does not size, naming
    them, instead of guessing a size."""
    from cogsurgeon.inspector.errors import CogsurgeonError
    from cogsurgeon.inspector.safetensors_header import read_header

    header = json.dumps({"t": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(CogsurgeonError, match=f"unknown dtype '{dtype}'"):
        read_header(path)
