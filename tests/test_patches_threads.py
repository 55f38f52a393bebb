"""Patch state under threads (issue 16, item 5): apply/revert from many threads on one model end consistent (no
patched processor or pre-hook left while `applied()` says none), and the registry's first use from two threads at
once sees the built-ins in every fresh process."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading

import pytest

from cogsurgeon import patches
from cogsurgeon.patches.errors import PatchAlreadyAppliedError, PatchConflictError, PatchNotAppliedError
from cogsurgeon.patches.processor import PatchedCogVideoXAttnProcessor, attention_modules

NAMES = ("causal-attention", "frame-causal-attention", "attention-mask")


@pytest.fixture
def short_switch_interval():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def consistent(model) -> bool:
    """The processors and the pre-hook say patched exactly when `applied()` names a patch."""
    on = bool(patches.applied(model))
    processors = [module.processor for _, module in attention_modules(model)]
    wrapped = [isinstance(p, PatchedCogVideoXAttnProcessor) for p in processors]
    return all(w == on for w in wrapped) and bool(model._forward_pre_hooks) == on


def test_many_threads_applying_and_reverting_on_one_model_leave_it_consistent(tiny_model, short_switch_interval):
    patches.available()  # the registry is filled: this test is about the model's state
    originals = [module.processor for _, module in attention_modules(tiny_model)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        try:
            for _ in range(150):
                action = rng.random()
                try:
                    if action < 0.45:
                        patches.apply(tiny_model, rng.choice(NAMES))
                    elif action < 0.8:
                        patches.revert(tiny_model, rng.choice(NAMES))
                    elif action < 0.9:
                        patches.revert(tiny_model)
                    else:
                        with patches.patched(tiny_model, "attention-mask"):
                            pass
                except (PatchAlreadyAppliedError, PatchConflictError, PatchNotAppliedError):
                    pass  # another thread got there first: refused, as it should be
        except BaseException as exc:  # anything else is a failure of the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    assert consistent(tiny_model)
    patches.revert(tiny_model)
    assert [module.processor for _, module in attention_modules(tiny_model)] == originals
    assert not tiny_model._forward_pre_hooks and patches.applied(tiny_model) == []


RACE = textwrap.dedent(
    """
    import sys, threading
    sys.setswitchinterval(1e-6)
    from cogsurgeon import patches

    seen = []
    start = threading.Barrier(2)

    def first_use():
        start.wait()
        try:
            seen.append(patches.get_patch("causal-attention").name)
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(seen)
    """
)


def test_two_threads_first_using_the_registry_both_see_the_built_ins():
    for _ in range(12):  # a fresh process each time: the registry's very first use
        result = subprocess.run(
            [sys.executable, "-c", RACE], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "['causal-attention', 'causal-attention']", result.stdout
