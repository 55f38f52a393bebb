"""The surgery behind the built-in attention patches: one wrapping processor per CogVideoX attention module and a
forward pre-hook on the transformer, both owned by an `AttentionPatchState` that records exactly what it replaced.

The pre-hook reads what the attention processors cannot see: the tokens per frame (from the latent's shape and the
config's patch size) and `attention_kwargs["attention_mask"]`, which diffusers <= 0.32 blocks drop before attention.
The plan (segments, kept keys) is made once per forward, at the first attention call, and reused by every layer.

What the hook read stays until the next forward, so gradient checkpointing's recomputation in backward sees the
layout of the forward it belongs to, as long as no other forward of the same model ran in between. Making a plan
with a key mask reads the mask on the host (one sync per forward); inside a torch.compile graph it does not (the mask
goes to SDPA), so a masked forward compiles with `fullgraph=True`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from cogsurgeon.inspector.geometry import TRANSFORMER_CLASS_NAME, FrameLayout, layout_of_call, tokens_per_frame
from cogsurgeon.patches.attention import AttentionPlan, plan_attention, run_plan
from cogsurgeon.patches.errors import AttentionMaskError, PatchError, PatchTargetError
from cogsurgeon.patches.patterns import Structure
from cogsurgeon.patches.ulysses import SequenceParallel


def is_cogvideox_transformer(obj: Any) -> bool:
    """True for diffusers' `CogVideoXTransformer3DModel` and subclasses (by class name: no diffusers import)."""
    return isinstance(obj, nn.Module) and any(cls.__name__ == TRANSFORMER_CLASS_NAME for cls in type(obj).__mro__)


def _cogvideox_processor_classes() -> tuple[type, type]:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

    return CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0


def is_fused_processor(processor: Any) -> bool:
    if isinstance(processor, UlyssesCogVideoXAttnProcessor):
        return processor.fused
    return isinstance(processor, _cogvideox_processor_classes()[1])


def _known_processor_classes() -> tuple[type, ...]:
    """The processors the patches wrap: diffusers' CogVideoX ones, and ours that runs one under context parallelism."""
    return (*_cogvideox_processor_classes(), UlyssesCogVideoXAttnProcessor)


def attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules (those with a processor) of a transformer, by name."""
    return [
        (name, module)
        for name, module in transformer.named_modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    ]


# ---------------------------------------------------------------------------------------------------------------
# The CogVideoX attention body, shared with `patches.reference` (text first, RoPE on the video part only).


def joint_query_key_value(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    image_rotary_emb: Any,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value `(B, heads, T+N, head_dim)` of the joint sequence, as diffusers' CogVideoX processors
    compute them (plain `to_q/to_k/to_v` or fused `to_qkv`, then q/k norms, then rotary on the video tokens)."""
    text_seq_length = encoder_hidden_states.size(1)
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    batch_size = hidden_states.shape[0]
    if fused:
        qkv = attn.to_qkv(hidden_states)
        query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (part.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                         for part in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
        if not attn.is_cross_attention:
            key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
    return query, key, value


def project_attention_output(
    attn: nn.Module, attention_output: torch.Tensor, text_seq_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(video hidden states, text hidden states)` from the attention output `(B, heads, T+N, head_dim)`."""
    batch_size, heads, _, head_dim = attention_output.shape
    hidden_states = attention_output.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    encoder_hidden_states, hidden_states = hidden_states.split(
        [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
    )
    return hidden_states, encoder_hidden_states


# ---------------------------------------------------------------------------------------------------------------


def _full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *lengths: int) -> torch.Tensor:
    """CogVideoX's own attention: SDPA over every key."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value)


class UlyssesCogVideoXAttnProcessor:
    """Stands in for one module's CogVideoX processor while Ulysses context parallelism is on (`cogsurgeon.parallel`):
    the same projections on this rank's shard, attention through diffusers' dispatcher (`dispatch_attention_fn` with
    the parallel config: its all-to-all, then the active backend on H/N heads); in a forward with padding (a length
    that does not divide by the degree), SDPA inside the same all-to-all without the padded keys. diffusers' own
    CogVideoX processor calls SDPA directly and so cannot run context-parallel (diffusers#13622)."""

    _attention_backend = None  # the dispatcher's active backend (what `enable_parallelism` checks)

    def __init__(self, original: Any, parallel: SequenceParallel):
        self.original = original
        self.fused = is_fused_processor(original)
        self.sequence_parallel = parallel

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if attention_mask is not None:
            raise AttentionMaskError(
                "an attention_mask reached CogVideoX attention under context parallelism without the attention-mask "
                "patch: apply it (patches.apply(model, 'attention-mask'), or --patch attention-mask)"
            )
        text_seq_length = encoder_hidden_states.size(1)
        query, key, value = joint_query_key_value(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.fused
        )
        parallel = self.sequence_parallel
        if parallel.padded:  # padded keys must not be attended: SDPA inside the all-to-all, over the real tokens
            output = parallel.attend(query, key, value, _full_attention)
        else:
            output = dispatch_attention_fn(
                *(tensor.transpose(1, 2) for tensor in (query, key, value)),  # the dispatcher's layout: (B, S, H, D)
                parallel_config=parallel.parallel_config,
            ).transpose(1, 2)
        return project_attention_output(attn, output, text_seq_length)

    def __repr__(self) -> str:
        original, degree = type(self.original).__name__, self.sequence_parallel.degree
        return f"{type(self).__name__}(original={original}, ulysses={degree})"


class PatchedCogVideoXAttnProcessor:
    """Stands in for one module's CogVideoX processor while attention patches are on.

    With no rule and no mask in force it calls the processor it replaced, unchanged; otherwise it computes the same
    projections and runs attention by the forward's plan (see `patches.attention`)."""

    def __init__(self, original: Any, state: AttentionPatchState):
        self.original = original
        self.fused = is_fused_processor(original)
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        stream = state.stream
        parallel = getattr(self.original, "sequence_parallel", None)  # Ulysses context parallelism (or None)
        if stream is not None and stream.runs_here():  # a `patches.streaming` stream's own forward: over its KV cache
            return stream.attend(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.fused, parallel)
        mask = attention_mask if attention_mask is not None else state.call_mask
        if mask is not None and not state.masks_enabled:
            raise AttentionMaskError(
                "an attention_mask reached CogVideoX attention, but the attention-mask patch is not applied, so it "
                "would be ignored or misapplied: apply it as well (patches.apply(model, 'attention-mask'), or "
                "--patch attention-mask)"
            )
        if state.structure is None and mask is None:
            return self.original(attn, hidden_states, encoder_hidden_states, image_rotary_emb=image_rotary_emb)
        text_seq_length = encoder_hidden_states.size(1)
        query, key, value = joint_query_key_value(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.fused
        )
        if parallel is None:
            output = state.attend(mask, query, key, value, text_seq_length, hidden_states.size(1))
        else:  # on the whole sequence for this rank's heads, with the global geometry
            output = parallel.attend(query, key, value, lambda *qkv_and_lengths: state.attend(mask, *qkv_and_lengths))
        return project_attention_output(attn, output, text_seq_length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(original={type(self.original).__name__})"


class AttentionPatchState:
    """The attention patches in force on one transformer: the record that the built-in attention patches share (each
    one's `apply` returns it, so it lives in the transformer's patch record and is copied and pickled with it).

    Each installed processor wraps the one it replaced (`.original`), so nothing else needs remembering: revert
    unwraps whatever of ours it finds, in the modules and in diffusers' own `original_attn_processors` (kept by
    `fuse_qkv_projections()` for `unfuse_qkv_projections()`)."""

    def __init__(self, transformer: nn.Module, modules: list[nn.Module]):
        self.structure: Structure | None = None
        self.masks_enabled = False
        self.modules = modules
        self.config = transformer.config
        self.forward_parameters = list(inspect.signature(transformer.forward).parameters)
        self.hook_handle: Any = None
        self.frame_tokens: int | None = None
        self.call_mask: torch.Tensor | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._plan_mask: torch.Tensor | None = None
        self._plan: AttentionPlan | None = None
        self.stream: Any = None  # set by `patches.streaming` for the length of one of its forwards

    # -- installing and removing -----------------------------------------------------------------------------------

    @classmethod
    def install(cls, transformer: nn.Module) -> AttentionPatchState:
        """Wrap every attention processor and hook the forward; checks everything before changing anything."""
        modules = attention_modules(transformer)
        if not modules:
            raise PatchTargetError(f"{type(transformer).__name__} has no attention modules to patch")
        known = _known_processor_classes()
        for name, module in modules:
            if not isinstance(module.processor, known):
                raise PatchTargetError(
                    f"{name} uses {type(module.processor).__name__}, not CogVideoX's attention processor "
                    "(CogVideoXAttnProcessor2_0 or FusedCogVideoXAttnProcessor2_0): restore it "
                    "(e.g. model.set_attn_processor(CogVideoXAttnProcessor2_0())) before patching"
                )
        state = cls(transformer, [module for _, module in modules])
        state._rewrap_replaced_processors()  # wraps every processor: none is ours yet
        state.hook_handle = transformer.register_forward_pre_hook(state._read_forward_call, with_kwargs=True)
        return state

    def owns(self, processor: Any) -> bool:
        return isinstance(processor, PatchedCogVideoXAttnProcessor) and processor.state is self

    def unwrapped(self, processor: Any) -> Any:
        while self.owns(processor):
            processor = processor.original
        return processor

    def uninstall(self, transformer: nn.Module) -> None:
        """Put back what our processors wrap wherever one of ours is (a processor someone set over ours stays), also
        in diffusers' `original_attn_processors`, and remove the hook and what the last forward left."""
        for module in self.modules:
            if self.owns(module.processor):
                module.set_processor(self.unwrapped(module.processor))
        saved = getattr(transformer, "original_attn_processors", None)
        if isinstance(saved, dict):
            for key, processor in saved.items():
                saved[key] = self.unwrapped(processor)
        if self.hook_handle is not None:
            self.hook_handle.remove()
            self.hook_handle = None
        self.call_mask = self.frame_tokens = None
        self._plan_key = self._plan = self._plan_mask = None

    def set_rules(self, transformer: nn.Module, **rules: Any) -> AttentionPatchState:
        """Set `structure` and/or `masks_enabled` (what an attention patch's apply and revert switch); when no rule is
        left in force, restore the original processors and remove the hook. Composition is the registry's to decide."""
        for name, value in rules.items():
            setattr(self, name, value)
        if self.structure is None and not self.masks_enabled:
            self.uninstall(transformer)
        return self

    # -- per forward call ------------------------------------------------------------------------------------------

    def _read_forward_call(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the latent's frame size and the mask in `attention_kwargs`, for this call's layers."""
        arguments = {**dict(zip(self.forward_parameters, args)), **kwargs}
        latents = arguments.get("hidden_states")
        is_video = isinstance(latents, torch.Tensor) and latents.dim() == 5
        self.frame_tokens = tokens_per_frame(self.config, *latents.shape[-2:]) if is_video else None
        self.call_mask = (arguments.get("attention_kwargs") or {}).get("attention_mask")
        self._plan_key = self._plan = self._plan_mask = None
        self._rewrap_replaced_processors()

    def _rewrap_replaced_processors(self) -> None:
        """Keep the patches on after something swapped processors under us: `fuse_qkv_projections()` installs
        fused processors on every module. The new processor becomes what a revert restores."""
        known = _known_processor_classes()
        for module in self.modules:
            current = module.processor
            if self.owns(current):
                continue
            if not isinstance(current, known):
                raise PatchTargetError(
                    f"an attention processor was replaced by {type(current).__name__} while patches were on; "
                    "revert the patches before changing processors"
                )
            module.set_processor(PatchedCogVideoXAttnProcessor(current, self))

    def attend(
        self, mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        text_tokens: int, video_tokens: int,
    ) -> torch.Tensor:
        """Attention under this forward's plan; q/k/v `(B, H, L, D)` are the caller's own temporaries."""
        plan = self.plan(mask, text_tokens, video_tokens, query)
        return run_plan(plan, query, key, value, keys_writable=True)

    def plan(
        self, mask: torch.Tensor | None, text_tokens: int, video_tokens: int, query: torch.Tensor
    ) -> AttentionPlan:
        """The attention plan of this call, made at the first layer and reused while nothing it depends on changes
        (inside a compiled graph it is traced, not cached: the graph holds it)."""
        batch, heads = query.shape[0], query.shape[1]
        cached = not torch.compiler.is_compiling()
        if cached:
            mask_version = None if mask is None else mask._version  # an in-place edit of the same mask re-plans
            key = (mask_version, text_tokens, video_tokens, self.frame_tokens, self.structure, batch, heads,
                   query.device)
            if self._plan is not None and self._plan_mask is mask and self._plan_key == key:
                return self._plan
        plan = plan_attention(
            self.structure, self.layout(text_tokens, video_tokens), mask,
            batch=batch, heads=heads, device=query.device, dtype=query.dtype,
        )
        if cached:
            self._plan, self._plan_key, self._plan_mask = plan, key, mask  # the mask held: its identity is unambiguous
        return plan

    def layout(self, text_tokens: int, video_tokens: int) -> FrameLayout:
        if self.frame_tokens is None:
            if self.structure not in (None, "causal"):
                raise PatchError(
                    "block and window attention need the frame layout, read when the transformer is called: call the "
                    "CogVideoXTransformer3DModel with a 5-D latent (B, frames, C, H, W), not its blocks directly"
                )
            return FrameLayout(text_tokens, 1, video_tokens)  # the token rules and masks need no frames
        return layout_of_call(text_tokens, video_tokens, self.frame_tokens)


def attention_state(transformer: nn.Module, *, install: bool = False) -> AttentionPatchState | None:
    """The attention surgery on a transformer: the record its attention patches share (None when none is on, unless
    `install`: then the processors are installed on first use)."""
    from cogsurgeon.patches.registry import applied_records

    records = applied_records(transformer).values()
    state = next((record for record in records if isinstance(record, AttentionPatchState)), None)
    return state or (AttentionPatchState.install(transformer) if install else None)


__all__ = [
    "PatchedCogVideoXAttnProcessor", "UlyssesCogVideoXAttnProcessor", "attention_modules", "attention_state",
    "is_cogvideox_transformer", "is_fused_processor", "joint_query_key_value", "project_attention_output",
]
