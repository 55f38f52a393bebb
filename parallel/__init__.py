"""Several GPUs on diffusers' own context-parallel engine (Ulysses), with every cogsurgeon patch kept exact.

    import torch.distributed as dist
    from cogsurgeon import parallel, patches
    dist.init_process_group("nccl")                    # torchrun --nproc-per-node N ...; gloo on CPUs
    parallel.enable(pipe, ulysses=dist.get_world_size())   # a CogVideoX transformer or a pipeline holding one
    patches.apply(pipe, "frame-causal-attention")       # before or after: every patch keeps its meaning
    video = pipe(...)                                   # every rank gets the whole output
    parallel.disable(pipe)                              # the model as it was, bit for bit

`enable` returns the model's `SequenceParallel` (`ulysses_degree(model)` reads the degree back, None when not
parallel). A degree must divide the attention heads: `valid_degrees(heads)` lists those that do,
`check_degree_for_heads(heads, ulysses)` raises the `ContextParallelError` that `enable` would, and
`shard_bounds(length, degree)` gives each rank's slice of a sequence. diffusers older than `MINIMUM_DIFFUSERS` has no
context-parallel engine.

What it hands diffusers: a context-parallel plan for CogVideoX (`cogvideox_cp_plan()`: split the text and the video
tokens at the first block and the rotary embedding at the transformer, gather the video after the last block's
`norm_final`) given to `enable_parallelism(config=ContextParallelConfig(ulysses_degree=N), cp_plan=...)`, and a
processor per attention module that routes attention through diffusers' dispatcher (`dispatch_attention_fn` with
the parallel config; CogVideoX's own processor calls SDPA directly, diffusers#13622). With patches on, their
attention runs inside diffusers' templated Ulysses all-to-all, on the whole sequence for H/N heads, in the original
token order and with the global geometry (`patches.ulysses`); per-frame timesteps modulate each rank's video shard
by its frames; a `patches.streaming` KV cache holds this rank's H/N heads.

Lengths that do not divide by N (226 text tokens over 4 ranks) are padded with zero tokens in front of diffusers'
split (torch hooks run outside diffusers' `forward` wrappers) and the padding is never attended and dropped after
the last block: diffusers' own answer, `ulysses_anything`, has no backward and gathers unequal shards with an
`all_gather` that gloo cannot run.

Versions: diffusers' context-parallel engine came with 0.36 (0.32 to 0.35: `enable` refuses, naming the version);
the pieces used here (`ContextParallelConfig`, `ParallelConfig.setup`, `apply_context_parallel`,
`remove_context_parallel`, `_templated_context_parallel_attention`, `dispatch_attention_fn(parallel_config=)`) have
the same signatures from 0.36 to 0.42.1, which CI runs. diffusers >= 0.42 picks the device in `enable_parallelism`
as `rank % torch.accelerator.device_count()`, which divides by zero on a machine without an accelerator; there (CPU and
gloo, as in CI) the same steps run through the engine's own pieces: `ParallelConfig.setup` on a CPU device mesh, then
`hooks.context_parallel.apply_context_parallel` with the same plan (`SequenceParallel.route` says which ran).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from cogsurgeon.inspector.geometry import layout_of_inputs
from cogsurgeon.patches.processor import (
    UlyssesCogVideoXAttnProcessor,
    attention_modules,
    attention_state,
)
from cogsurgeon.patches.registry import resolve_transformer
from cogsurgeon.patches.ulysses import (
    PARALLEL_ATTRIBUTE,
    ContextParallelError,
    SequenceParallel,
    padded_length,
    shard_bounds,
    valid_degrees,
)

MINIMUM_DIFFUSERS = "0.36"  # the first release with diffusers' context-parallel engine
ROUTE_ENABLE_PARALLELISM = "enable_parallelism"
ROUTE_PIECES = "apply_context_parallel"  # no accelerator: the engine's pieces (see the module docstring)
_HOOK_HANDLE_ATTRIBUTE = "_cogsurgeon_parallel_hook"


def cogvideox_cp_plan() -> dict[str, Any]:
    """The context-parallel plan of a CogVideoX transformer, in diffusers' `_cp_plan` form: the rotary embedding
    split by video token at the transformer's input (every block reads it from there), text and video split at the
    first block's input (the patch embedding needs the whole latent), the video gathered after `norm_final` (the
    final norm, projection and unpatchify need every token). Text and video are split separately, so each rank's
    joint sequence is `[text shard ; video shard]` and the all-to-all order is rank-major (`patches.ulysses` puts it
    back for the patches)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rotary = ContextParallelInput(split_dim=0, expected_dims=2)
    tokens = ContextParallelInput(split_dim=1, expected_dims=3)
    return {
        "": {"image_rotary_emb": [rotary, rotary]},
        "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "norm_final": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def enable(target: Any, ulysses: int) -> SequenceParallel:
    """Run a CogVideoX transformer (or a pipeline's) context-parallel over the `ulysses` ranks of the initialised
    default process group (its whole world). Patches applied before or after keep their meaning. Raises
    `ContextParallelError` (nothing changed) for a degree the heads or the world do not allow, a model already
    parallel, no process group, or a diffusers without the engine."""
    transformer = resolve_transformer(target)
    _check_degree(transformer, ulysses)
    modules = _check_processors(transformer)
    plan = cogvideox_cp_plan()
    from diffusers.models._modeling_parallel import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses)
    # diffusers' hook removal leaves a module's bound `forward` as an instance attribute: note which had none
    plain = tuple(name for name in plan if "forward" not in vars(transformer.get_submodule(name)))
    route = _enter_engine(transformer, config, plan)
    parallel = SequenceParallel(
        parallel_config=transformer._parallel_config, degree=ulysses, rank=config._ulysses_local_rank, route=route,
        plan=plan, plain_forward_modules=plain,
    )
    for module in modules:
        _insert_ulysses(module, parallel)
    setattr(transformer, PARALLEL_ATTRIBUTE, parallel)
    first_block = transformer.transformer_blocks[0]
    hooks = [  # torch's hooks run outside diffusers' (which wrap `forward`): before its split, after its gather
        transformer.register_forward_pre_hook(
            partial(_read_lengths_and_pad_rotary, parallel, _parameters(transformer)), with_kwargs=True
        ),
        first_block.register_forward_pre_hook(
            partial(_pad_tokens, parallel, _parameters(first_block)), with_kwargs=True
        ),
        transformer.norm_final.register_forward_hook(partial(_drop_video_padding, parallel)),
        transformer.register_forward_pre_hook(partial(_keep_ulysses_processors, parallel, modules)),
    ]
    setattr(transformer, _HOOK_HANDLE_ATTRIBUTE, hooks)
    return parallel


def disable(target: Any) -> None:
    """Undo `enable`: diffusers' hooks removed, the processors and the model's attributes as they were (outputs bit
    for bit those of a model never made parallel). The process groups stay (they are the caller's)."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    transformer = resolve_transformer(target)
    parallel = getattr(transformer, PARALLEL_ATTRIBUTE, None)
    if parallel is None:
        raise ContextParallelError("context parallelism is not enabled on this model")
    for hook in vars(transformer).pop(_HOOK_HANDLE_ATTRIBUTE):
        hook.remove()
    for _, module in attention_modules(transformer):
        _remove_ulysses(module, parallel)
    remove_context_parallel(transformer, parallel.plan)
    for name in parallel.plan:
        module = transformer.get_submodule(name)
        registry = vars(module).get("_diffusers_hook")
        if registry is not None and not registry.hooks:
            del module._diffusers_hook  # the registry diffusers made for our plan, now empty
            if name in parallel.plain_forward_modules:
                vars(module).pop("forward", None)
    vars(transformer).pop("_parallel_config", None)  # back to the class's None
    delattr(transformer, PARALLEL_ATTRIBUTE)


def ulysses_degree(target: Any) -> int | None:
    """The Ulysses degree a model runs at (None: not context-parallel)."""
    parallel = getattr(resolve_transformer(target), PARALLEL_ATTRIBUTE, None)
    return None if parallel is None else parallel.degree


# -- checks -------------------------------------------------------------------------------------------------------


def check_degree_for_heads(heads: int, ulysses: Any) -> None:
    """A degree the Ulysses all-to-all can split `heads` by, or a `ContextParallelError` naming the ones it can."""
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 2:
        raise ContextParallelError(f"ulysses must be a whole number >= 2, got {ulysses!r}")
    if heads % ulysses:
        degrees = ", ".join(map(str, valid_degrees(heads)))
        raise ContextParallelError(
            f"ulysses={ulysses} does not divide this model's {heads} attention heads (each rank attends H/N heads): "
            f"use one of {degrees}"
        )


def _check_degree(transformer: Any, ulysses: Any) -> None:
    check_degree_for_heads(transformer.config.num_attention_heads, ulysses)
    try:
        import diffusers.hooks.context_parallel  # noqa: F401
    except ImportError:
        import diffusers

        raise ContextParallelError(
            f"context parallelism runs on diffusers' context-parallel engine, which diffusers {diffusers.__version__} "
            f"does not have: install diffusers>={MINIMUM_DIFFUSERS}"
        ) from None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError(
            "context parallelism needs an initialised process group: launch with torchrun --nproc-per-node N and call "
            "torch.distributed.init_process_group() first (or use `cogsurgeon run --ulysses N`)"
        )
    if dist.get_world_size() != ulysses:
        raise ContextParallelError(
            f"ulysses={ulysses} but the process group has {dist.get_world_size()} ranks: the Ulysses group is the "
            "whole world, so launch as many processes as the degree"
        )
    if getattr(transformer, PARALLEL_ATTRIBUTE, None) is not None or transformer._parallel_config is not None:
        raise ContextParallelError("this model already runs in parallel; disable it first")


def _check_processors(transformer: Any) -> list[Any]:
    """The attention modules, once each runs a processor cogsurgeon can route through the dispatcher."""
    from cogsurgeon.patches.processor import _cogvideox_processor_classes

    known = _cogvideox_processor_classes()
    modules = attention_modules(transformer)
    for name, module in modules:
        processor = _innermost(module.processor, transformer)
        if not isinstance(processor, known):
            raise ContextParallelError(
                f"{name} uses {type(processor).__name__}, not CogVideoX's attention processor: restore it "
                "(model.set_attn_processor(CogVideoXAttnProcessor2_0())) before enabling context parallelism"
            )
    return [module for _, module in modules]


# -- entering diffusers' engine -----------------------------------------------------------------------------------


def _enter_engine(transformer: Any, config: Any, plan: dict[str, Any]) -> str:
    """`enable_parallelism` with our plan; where it cannot pick a device (no accelerator, diffusers >= 0.42), the same
    steps through its pieces. Returns the route taken."""
    try:
        transformer.enable_parallelism(config=config, cp_plan=plan)
        return ROUTE_ENABLE_PARALLELISM
    except ZeroDivisionError:  # `rank % torch.accelerator.device_count()` with no accelerator; nothing was changed
        pass
    import torch
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh
    from diffusers.models._modeling_parallel import ParallelConfig

    parallel_config = ParallelConfig(context_parallel_config=config)
    mesh = init_device_mesh("cpu", mesh_shape=config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel_config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = parallel_config
    apply_context_parallel(transformer, config, plan)
    return ROUTE_PIECES


def _innermost(processor: Any, transformer: Any) -> Any:
    """The processor under cogsurgeon's patch wrapper (if any)."""
    state = attention_state(transformer)
    return state.unwrapped(processor) if state is not None else processor


def _insert_ulysses(module: Any, parallel: SequenceParallel) -> None:
    """Put a Ulysses processor directly around diffusers' processor, under a patch wrapper if one is there."""
    processor = module.processor
    if hasattr(processor, "state") and hasattr(processor, "original"):  # a patch wrapper: keep it outermost
        processor.original = UlyssesCogVideoXAttnProcessor(processor.original, parallel)
    else:
        module.set_processor(UlyssesCogVideoXAttnProcessor(processor, parallel))


def _routes_through(processor: Any, parallel: SequenceParallel) -> bool:
    while processor is not None:
        if isinstance(processor, UlyssesCogVideoXAttnProcessor) and processor.sequence_parallel is parallel:
            return True
        processor = getattr(processor, "original", None)
    return False


def _keep_ulysses_processors(parallel: SequenceParallel, modules: list[Any], transformer: Any, args: tuple) -> None:
    """Transformer pre-hook: after something swapped processors under us (`fuse_qkv_projections()` installs fused
    ones everywhere), put the Ulysses processor back around the new one, so no attention runs on a shard alone."""
    from cogsurgeon.patches.processor import _cogvideox_processor_classes

    for module in modules:
        if _routes_through(module.processor, parallel):
            continue
        if not isinstance(_innermost(module.processor, transformer), _cogvideox_processor_classes()):
            raise ContextParallelError(
                f"an attention processor was replaced by {type(module.processor).__name__} under context "
                "parallelism; disable it before changing processors"
            )
        _insert_ulysses(module, parallel)


def _remove_ulysses(module: Any, parallel: SequenceParallel) -> None:
    holder, processor = None, module.processor
    while processor is not None:
        if isinstance(processor, UlyssesCogVideoXAttnProcessor) and processor.sequence_parallel is parallel:
            if holder is None:
                module.set_processor(processor.original)
            else:
                holder.original = processor.original
            return
        holder, processor = processor, getattr(processor, "original", None)


def _parameters(module: Any) -> list[str]:
    return list(inspect.signature(type(module).forward).parameters)[1:]


def _with_arguments(parameters: list[str], args: tuple, kwargs: dict, changes: dict[str, Any]) -> tuple[tuple, dict]:
    """A call's `(args, kwargs)` with the named arguments replaced wherever they were passed."""
    args = list(args)
    for name, value in changes.items():
        position = parameters.index(name)
        if position < len(args):
            args[position] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _pad(tensor: Any, dim: int, degree: int) -> Any:
    """Zero tokens at the end of `dim` up to a multiple of `degree` (a tensor that divides is returned as it is)."""
    import torch.nn.functional as F

    missing = padded_length(tensor.shape[dim], degree) - tensor.shape[dim]
    if not missing:
        return tensor
    widths = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [0, missing]
    return F.pad(tensor, widths)


def _read_lengths_and_pad_rotary(parallel: SequenceParallel, parameters: list[str], transformer: Any, args: tuple,
                                 kwargs: dict) -> Any:
    """Transformer pre-hook (before diffusers' hooks split anything): the forward's global text and video lengths,
    and the rotary embedding padded like the video tokens."""
    arguments = {**dict(zip(parameters, args)), **kwargs}
    layout = layout_of_inputs(transformer.config, arguments)
    parallel.read_lengths(layout.text_tokens, layout.video_tokens)
    rotary = arguments.get("image_rotary_emb")
    if rotary is None or layout.video_tokens % parallel.degree == 0:
        return None
    padded = tuple(_pad(part, 0, parallel.degree) for part in rotary)
    return _with_arguments(parameters, args, kwargs, {"image_rotary_emb": padded})


def _pad_tokens(parallel: SequenceParallel, parameters: list[str], block: Any, args: tuple, kwargs: dict) -> Any:
    """First block's pre-hook: text and video padded to multiples of the degree, so that diffusers splits them
    evenly."""
    arguments = {**dict(zip(parameters, args)), **kwargs}
    hidden_states, encoder_hidden_states = arguments["hidden_states"], arguments["encoder_hidden_states"]
    degree = parallel.degree
    if hidden_states.shape[1] % degree == 0 and encoder_hidden_states.shape[1] % degree == 0:
        return None
    changes = {"hidden_states": _pad(hidden_states, 1, degree),
               "encoder_hidden_states": _pad(encoder_hidden_states, 1, degree)}
    return _with_arguments(parameters, args, kwargs, changes)


def _drop_video_padding(parallel: SequenceParallel, norm_final: Any, args: tuple, output: Any) -> Any:
    """`norm_final`'s forward hook (after diffusers gathered the video): the padding dropped."""
    return None if output.shape[1] == parallel.video_tokens else output[:, : parallel.video_tokens]


__all__ = [
    "MINIMUM_DIFFUSERS",
    "ContextParallelError",
    "SequenceParallel",
    "check_degree_for_heads",
    "cogvideox_cp_plan",
    "disable",
    "enable",
    "shard_bounds",
    "ulysses_degree",
    "valid_degrees",
]
