"""One Ulysses rank, seen on the meta device: what `plan --ulysses N` and `trace --ulysses N` run.

`one_rank(model, degree)` makes a meta-device model run exactly the code rank 0 of a Ulysses group runs under
`cogsurgeon.parallel.enable` (its text, video and rotary shards, padded as there; the same processors and patches;
diffusers' own templated Ulysses attention), with no process group: each all-to-all gives an empty tensor of the
size the real one returns, and the video is "gathered" after `norm_final` into an empty tensor of the full size. So
the planner's allocator books every tensor one GPU of N holds, and the trace shows each module's per-rank shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cogsurgeon.parallel import (
    _check_processors,
    _drop_video_padding,
    _insert_ulysses,
    _pad_tokens,
    _parameters,
    _read_lengths_and_pad_rotary,
    _remove_ulysses,
    _with_arguments,
    check_degree_for_heads,
)
from cogsurgeon.patches.ulysses import PARALLEL_ATTRIBUTE, SequenceParallel, padded_length

ROUTE_SIMULATED = "one rank on meta (no process group)"


class _NoMesh:
    def get_group(self) -> None:
        return None


@dataclass
class _ContextConfig:
    """What diffusers' templated attention reads of a `ContextParallelConfig`."""

    ulysses_degree: int
    ring_degree: int = 1
    ulysses_anything: bool = False
    ring_anything: bool = False
    _ulysses_mesh: Any = field(default_factory=_NoMesh)


@dataclass
class _ParallelConfig:
    context_parallel_config: _ContextConfig


def _empty_all_to_all(tensor: Any, group: Any) -> Any:
    """diffusers' `_all_to_all_single` without a group: its output, same size, unset."""
    import torch

    return torch.empty_like(tensor)


def _first_rotary_shard(parallel: SequenceParallel, parameters: list[str], transformer: Any, args: tuple,
                        kwargs: dict) -> Any:
    arguments = {**dict(zip(parameters, args)), **kwargs}
    rotary = arguments.get("image_rotary_emb")
    if rotary is None:
        return None
    shard = padded_length(parallel.video_tokens, parallel.degree) // parallel.degree
    return _with_arguments(parameters, args, kwargs, {"image_rotary_emb": tuple(part[:shard] for part in rotary)})


def _first_token_shard(parameters: list[str], block: Any, args: tuple, kwargs: dict, *, degree: int) -> Any:
    arguments = {**dict(zip(parameters, args)), **kwargs}
    changes = {name: arguments[name][:, : arguments[name].shape[1] // degree]
               for name in ("hidden_states", "encoder_hidden_states")}
    return _with_arguments(parameters, args, kwargs, changes)


def _gathered_video(parallel: SequenceParallel, norm_final: Any, args: tuple, output: Any) -> Any:
    batch, _, dim = output.shape
    return output.new_empty(batch, padded_length(parallel.video_tokens, parallel.degree), dim)


@contextmanager
def one_rank(model: Any, degree: int) -> Iterator[SequenceParallel]:
    """Run `model` (on meta) as rank 0 of `degree` Ulysses ranks for the length of the block (see the module
    docstring); patches applied before stay on and run as they do under context parallelism."""
    from diffusers.models import attention_dispatch

    check_degree_for_heads(model.config.num_attention_heads, degree)
    modules = _check_processors(model)
    parallel = SequenceParallel(parallel_config=_ParallelConfig(_ContextConfig(degree)), degree=degree, rank=0,
                                route=ROUTE_SIMULATED, plan={})
    first_block = model.transformer_blocks[0]
    model_parameters, block_parameters = _parameters(model), _parameters(first_block)
    hooks = [
        model.register_forward_pre_hook(partial(_read_lengths_and_pad_rotary, parallel, model_parameters),
                                        with_kwargs=True),
        model.register_forward_pre_hook(partial(_first_rotary_shard, parallel, model_parameters), with_kwargs=True),
        first_block.register_forward_pre_hook(partial(_pad_tokens, parallel, block_parameters), with_kwargs=True),
        first_block.register_forward_pre_hook(partial(_first_token_shard, block_parameters, degree=degree),
                                              with_kwargs=True),
        model.norm_final.register_forward_hook(partial(_gathered_video, parallel)),
        model.norm_final.register_forward_hook(partial(_drop_video_padding, parallel)),
    ]
    for module in modules:
        _insert_ulysses(module, parallel)
    setattr(model, PARALLEL_ATTRIBUTE, parallel)
    all_to_all = attention_dispatch._all_to_all_single
    attention_dispatch._all_to_all_single = _empty_all_to_all
    try:
        yield parallel
    finally:
        attention_dispatch._all_to_all_single = all_to_all
        delattr(model, PARALLEL_ATTRIBUTE)
        for module in modules:
            _remove_ulysses(module, parallel)
        for hook in hooks:
            hook.remove()


def one_rank_of(model: Any, ulysses: int) -> Any:
    """`one_rank(model, ulysses)` for a degree above 1; nothing for 1 (no context parallelism)."""
    return one_rank(model, ulysses) if ulysses > 1 else nullcontext()


__all__ = [
    "one_rank", "one_rank_of",
]
