"""The attention x-ray: exact attention statistics of every layer, head, step and batch item of a real CogVideoX
forward, with no `(L, L)` tensor.

    from cogsurgeon.inspector import record_attention
    with record_attention(pipe, groups="frames") as rec:      # or a CogVideoXTransformer3DModel
        pipe(prompt, num_inference_steps=50)
    rec.mass("transformer_blocks.0.attn1", step=0, batch=1)  # (heads, groups, groups)

How: for a partition of the keys into groups, `softmax(q kᵀ/√d) @ one_hot(group(key))` is each query's total
attention on each group, and SDPA computes it in the fused kernels like any attention (the one-hot values are
padded to the head dim, so flash/cuDNN take it; more groups than the head dim run as several passes). Summing those
rows by query group gives the group×group mass. Selected text tokens ("words") add one value column each: the
attention every video query gives that token, a spatial map per frame.

The statistics are those of the attention that runs, patches included: the query and key are taken where the
attention processor computes them (the outputs of `attn.norm_q` / `attn.norm_k`, read by forward hooks, rotary
applied as the processor applies it) and attention runs by the same plan the patched processor uses
(`patches.attention`), so a frame-causal model puts zero mass on later frames and a text mask drops the padded keys.
Nothing of the model is replaced: hooks only (no processor, no patch record), all removed on exit, so the forward's
outputs are bit-identical to an unrecorded run.

Memory: the work runs a few heads at a time, each chunk's tensors (its rotated q and k, the one-hot values, the
output) within `chunk_bytes`; what is kept is `(batch, heads, groups, groups)` per layer (and the maps asked for).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogsurgeon.inspector.attention_recording import AttentionRecording, GroupInfo, RecordingError
from cogsurgeon.inspector.geometry import FrameLayout
from cogsurgeon.patches.attention import AttentionPlan, QuerySegment, SegmentPlan, run_plan
from cogsurgeon.patches.processor import attention_modules, attention_state
from cogsurgeon.patches.registry import resolve_transformer

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
MAX_GRID_CELLS = 4096
_GRID = re.compile(r"grid:(?P<rows>[1-9]\d{0,3})x(?P<cols>[1-9]\d{0,3})")
GROUPS_HELP = ('"frames" (text, frame 0, frame 1, ...), "grid:RxC" (text, then R×C cells of the frame, the same cell '
               'across frames) or "words" (each text token, then the video)')


@dataclass(frozen=True)
class GroupSpec:
    """How keys (and queries) are grouped: "frames", "grid" (rows × cols cells) or "words"."""

    kind: str
    rows: int = 0
    cols: int = 0

    def __str__(self) -> str:
        return f"grid:{self.rows}x{self.cols}" if self.kind == "grid" else self.kind


def parse_groups(spec: str) -> GroupSpec:
    """`"frames"`, `"grid:RxC"` or `"words"`; anything else is one `RecordingError` saying what is accepted."""
    if not isinstance(spec, str):
        raise RecordingError(f"groups must be a string ({GROUPS_HELP}), got {type(spec).__name__}")
    text = spec.strip()
    if text in ("frames", "words"):
        return GroupSpec(text)
    match = _GRID.fullmatch(text)
    if match:
        rows, cols = int(match["rows"]), int(match["cols"])
        if rows * cols > MAX_GRID_CELLS:
            raise RecordingError(f"groups {spec!r}: {rows * cols} cells; at most {MAX_GRID_CELLS}")
        return GroupSpec("grid", rows, cols)
    raise RecordingError(f"unknown attention groups {spec[:60]!r}: use {GROUPS_HELP}")


@dataclass(frozen=True)
class VideoGrid:
    """The token grid of one forward: the joint sequence's layout and each frame's `grid_height × grid_width`."""

    layout: FrameLayout
    grid_height: int
    grid_width: int

    def to_json(self) -> dict[str, int]:
        return {"text_tokens": self.layout.text_tokens, "frames": self.layout.frames,
                "grid_height": self.grid_height, "grid_width": self.grid_width}


def token_groups(spec: GroupSpec, grid: VideoGrid,
                 token_labels: Sequence[str] | None = None) -> tuple[GroupInfo, list[int]]:
    """The groups of a forward and the group of every token of the joint sequence `[text ; video]` (video in
    frame-major raster order)."""
    layout = grid.layout
    text, frames, per_frame = layout.text_tokens, layout.frames, layout.tokens_per_frame
    if spec.kind == "frames":
        names = ["text"] + [f"frame {f}" for f in range(frames)]
        group_of_token = [0] * text + [1 + f for f in range(frames) for _ in range(per_frame)]
        is_text, frame_of_group = [True] + [False] * frames, [None] + list(range(frames))
    elif spec.kind == "grid":
        if spec.rows > grid.grid_height or spec.cols > grid.grid_width:
            raise RecordingError(
                f"groups {spec}: a frame here is {grid.grid_height}×{grid.grid_width} tokens, fewer than "
                f"{spec.rows}×{spec.cols} cells; use at most grid:{grid.grid_height}x{grid.grid_width}"
            )
        names = ["text"] + [f"cell {r},{c}" for r in range(spec.rows) for c in range(spec.cols)]
        cells = [
            1 + (y * spec.rows // grid.grid_height) * spec.cols + x * spec.cols // grid.grid_width
            for y in range(grid.grid_height) for x in range(grid.grid_width)
        ]
        group_of_token = [0] * text + cells * frames
        is_text, frame_of_group = [True] + [False] * (len(names) - 1), [None] * len(names)
    else:  # words
        labels = list(token_labels) if token_labels is not None else [f"t{i}" for i in range(text)]
        if len(labels) != text:
            raise RecordingError(f"{len(labels)} token labels for {text} text tokens")
        names = labels + ["video"]
        group_of_token = list(range(text)) + [text] * layout.video_tokens
        is_text, frame_of_group = [True] * text + [False], [None] * (text + 1)
    sizes = [0] * len(names)
    for group in group_of_token:
        sizes[group] += 1
    info = GroupInfo(str(spec), tuple(names), tuple(sizes), tuple(is_text), tuple(frame_of_group))
    return info, group_of_token


def resolve_words(words: Sequence[int | str], labels: Sequence[str] | None, text_tokens: int) -> list[tuple[int, str]]:
    """Selected text tokens as `(position, label)`: a position, or a label (the first token whose string is it,
    with or without SentencePiece's leading `▁`) when token strings are known."""
    chosen = []
    for word in words:
        if isinstance(word, int) and not isinstance(word, bool):
            if not 0 <= word < text_tokens:
                raise RecordingError(f"word position {word} is outside the {text_tokens} text tokens")
            chosen.append((word, labels[word] if labels else f"t{word}"))
            continue
        if not isinstance(word, str) or not labels:
            raise RecordingError(
                f"word {word!r}: give text token positions (0-{text_tokens - 1}), or a tokenizer and prompt so that "
                "words can be named"
            )
        matches = [i for i, label in enumerate(labels) if word in (label, label.lstrip("▁"))]
        if not matches:
            raise RecordingError(f"word {word!r} is not among the prompt's tokens: {', '.join(labels[:20])}")
        chosen.append((matches[0], labels[matches[0]]))
    return chosen


def prompt_token_labels(tokenizer: Any, prompt: str, text_tokens: int) -> list[str]:
    """The token strings of `prompt` as the CogVideoX pipelines tokenize it (padded to the text length)."""
    ids = tokenizer(prompt, padding="max_length", max_length=text_tokens, truncation=True,
                    add_special_tokens=True)["input_ids"]
    return [str(token) for token in tokenizer.convert_ids_to_tokens(list(ids))]


# ---------------------------------------------------------------------------------------------------------------
# The computation of one attention call


def full_plan(length: int) -> AttentionPlan:
    """Unpatched CogVideoX attention: every query sees every key."""
    return SegmentPlan((QuerySegment(0, length, length),))


def plan_for_heads(plan: AttentionPlan, heads: slice) -> AttentionPlan:
    """The plan of a run of heads: a dense mask with a heads dimension is cut to those heads."""
    if isinstance(plan, SegmentPlan) and plan.dense_mask is not None and plan.dense_mask.shape[1] > 1:
        return SegmentPlan(plan.segments, plan.dense_mask[:, heads])
    return plan


@dataclass
class ForwardGroups:
    """What every layer of one forward shares: the one-hot value columns `(L, columns)` (group of each key, then one
    column per selected word) and the one-hot query groups `(L, groups)` for the row sums."""

    value_columns: torch.Tensor
    query_groups: torch.Tensor
    query_counts: torch.Tensor
    group_count: int
    word_positions: list[int]


def forward_groups(group_of_token: list[int], group_count: int, word_positions: list[int], head_dim: int,
                   device: torch.device, dtype: torch.dtype) -> ForwardGroups:
    length = len(group_of_token)
    groups = torch.tensor(group_of_token, device=device)
    columns = group_count + len(word_positions)
    padded = -(-columns // head_dim) * head_dim  # whole passes of head_dim columns: the fused kernels' value width
    values = torch.zeros(length, padded, dtype=dtype, device=device)
    values[torch.arange(length, device=device), groups] = 1
    for number, position in enumerate(word_positions):
        values[position, group_count + number] = 1
    query_groups = torch.zeros(length, group_count, dtype=torch.float32, device=device)
    query_groups[torch.arange(length, device=device), groups] = 1
    return ForwardGroups(values, query_groups, query_groups.sum(0), group_count, word_positions)


def attention_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: Any,
    text_tokens: int,
    rotate_key: bool,
    plan: AttentionPlan,
    shared: ForwardGroups,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group mass `(B, heads, groups, groups)` (float32) and word maps `(B, heads, words, video tokens)` (or None) of
    one attention call, from its query and key `(B, heads, L, head_dim)` before rotary (applied here as the CogVideoX
    processors apply it), run by `plan`. Heads go a few at a time so that each chunk stays within `chunk_bytes`."""
    batch, heads, length, head_dim = query.shape
    columns = shared.value_columns.shape[1]
    passes = columns // head_dim
    element = query.element_size()
    # per head: rotated q and k, the values and output of one pass, the float32 rows, the rotary's float32 temporaries
    per_head = batch * length * (head_dim * element * 4 + head_dim * 4 * 4)
    step = max(1, min(heads, chunk_bytes // max(1, per_head)))
    mass = query.new_empty(batch, heads, shared.group_count, shared.group_count, dtype=torch.float32)
    words = len(shared.word_positions)
    maps = query.new_empty(batch, heads, words, length - text_tokens, dtype=torch.float32) if words else None
    for first in range(0, heads, step):
        chunk = slice(first, min(heads, first + step))
        chunk_query, chunk_key = query[:, chunk], key[:, chunk]
        owned = rotary is not None
        if owned:  # the processors' rotary: `x[:, :, T:] = apply_rotary_emb(x[:, :, T:], rotary)`, on our copies
            chunk_query = _rotated(chunk_query, rotary, text_tokens)
            chunk_key = _rotated(chunk_key, rotary, text_tokens) if rotate_key else chunk_key
        chunk_plan = plan_for_heads(plan, chunk)
        rows = []
        for number in range(passes):
            values = shared.value_columns[:, number * head_dim : (number + 1) * head_dim]
            values = values.expand(batch, chunk_query.shape[1], length, head_dim).contiguous()
            # keys may be overwritten only when ours and not needed by a later pass
            rows.append(run_plan(chunk_plan, chunk_query, chunk_key, values,
                                 keys_writable=owned and rotate_key and passes == 1))
        output = torch.cat(rows, dim=-1) if passes > 1 else rows[0]
        group_rows = output[..., : shared.group_count].float()
        mass[:, chunk] = (shared.query_groups.T @ group_rows) / shared.query_counts[:, None]
        if maps is not None:
            word_columns = output[:, :, text_tokens:, shared.group_count : shared.group_count + words].float()
            maps[:, chunk] = word_columns.transpose(-1, -2)
        del output, rows, group_rows
    return mass, maps


def _rotated(tensor: torch.Tensor, rotary: Any, text_tokens: int) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    rotated = tensor.clone()
    rotated[:, :, text_tokens:] = apply_rotary_emb(tensor[:, :, text_tokens:], rotary)
    return rotated


# ---------------------------------------------------------------------------------------------------------------
# The recorder: hooks on the transformer and its attention modules


@dataclass
class _Call:
    """What an attention module's pre-hook read for the processor's norm hooks."""

    text_tokens: int
    video_tokens: int
    rotary: Any
    mask: Any
    query: torch.Tensor | None = None


class AttentionRecorder:
    """Records while entered (`with record_attention(...) as rec`); removes every hook it added on exit."""

    def __init__(
        self,
        transformer: nn.Module,
        groups: GroupSpec,
        *,
        words: Sequence[int | str] = (),
        token_labels: Sequence[str] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.transformer = transformer
        self.groups = groups
        self.words_asked = list(words)
        self.token_labels = list(token_labels) if token_labels is not None else None
        self.chunk_bytes = chunk_bytes
        self.modules = attention_modules(transformer)
        if not self.modules:
            raise RecordingError(f"{type(transformer).__name__} has no attention modules to record")
        for name, module in self.modules:
            if getattr(module, "norm_q", None) is None or getattr(module, "norm_k", None) is None:
                raise RecordingError(
                    f"{name} has no query/key norm (qk_norm): the recorder reads q and k at attn.norm_q/attn.norm_k, "
                    "as every CogVideoX block has them"
                )
        self.recording: AttentionRecording | None = None
        self._handles: list[Any] = []
        self._calls: dict[int, _Call] = {}
        self._grid: VideoGrid | None = None
        self._shared: ForwardGroups | None = None
        self._shared_key: tuple[Any, ...] | None = None
        self._step_mass: dict[int, torch.Tensor] = {}
        self._step_maps: dict[int, torch.Tensor] = {}
        self._words: list[tuple[int, str]] | None = None

    # -- entering and leaving ------------------------------------------------------------------------------------

    def __enter__(self) -> AttentionRecording:
        config = self.transformer.config
        self.recording = AttentionRecording(
            groups=GroupInfo(str(self.groups), (), (), (), ()),  # set at the first forward, when the layout is known
            layers=[name for name, _ in self.modules],
            heads=int(config.num_attention_heads),
            layout={},
            model={"class": type(self.transformer).__name__, "layers": int(config.num_layers),
                   "heads": int(config.num_attention_heads), "patches": _applied_patches(self.transformer)},
        )
        try:
            self._handles.append(self.transformer.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            self._handles.append(self.transformer.register_forward_hook(self._end_forward))
            for index, (_, module) in enumerate(self.modules):
                self._handles.append(module.register_forward_pre_hook(self._attention_called(index), with_kwargs=True))
                self._handles.append(module.norm_q.register_forward_hook(self._query_ready(index)))
                self._handles.append(module.norm_k.register_forward_hook(self._key_ready(index, module)))
        except BaseException:
            self._remove()
            raise
        return self.recording

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()
        self._step_mass.clear()
        self._step_maps.clear()
        self._shared = None

    # -- per forward ---------------------------------------------------------------------------------------------

    def _begin_forward(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        _refuse_compiling()
        names = ("hidden_states", "encoder_hidden_states")
        arguments = {**dict(zip(names, args)), **kwargs}
        latents, text = arguments.get("hidden_states"), arguments.get("encoder_hidden_states")
        if not (isinstance(latents, torch.Tensor) and latents.dim() == 5 and isinstance(text, torch.Tensor)):
            raise RecordingError("record_attention needs the transformer called with a 5-D latent (B, F, C, H, W) "
                                 "and encoder_hidden_states")
        config = transformer.config
        patch, patch_t = int(config.patch_size), config.get("patch_size_t") or 1
        height, width = latents.shape[-2] // patch, latents.shape[-1] // patch
        layout = FrameLayout(int(text.shape[1]), int(latents.shape[1]) // patch_t, height * width)
        self._grid = VideoGrid(layout, height, width)
        self._step_mass.clear()
        self._step_maps.clear()
        self._calls.clear()

    def _end_forward(self, transformer: nn.Module, args: tuple, output: Any) -> None:
        recording = self.recording
        if not recording.steps:  # the patches in force when the first step ran (`run` applies them after building)
            recording.model["patches"] = _applied_patches(transformer)
        missing = [name for index, (name, _) in enumerate(self.modules) if index not in self._step_mass]
        if missing:
            raise RecordingError(f"the forward ran without attention in {', '.join(missing[:3])}: nothing recorded")
        mass = torch.stack([self._step_mass[index] for index in range(len(self.modules))]).cpu()
        maps = None
        if self._step_maps:
            maps = torch.stack([self._step_maps[index] for index in range(len(self.modules))]).cpu()
        recording.add_step(mass, maps)
        self._step_mass.clear()
        self._step_maps.clear()

    # -- per attention call --------------------------------------------------------------------------------------

    def _attention_called(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            arguments = {**dict(zip(("hidden_states", "encoder_hidden_states", "attention_mask"), args)), **kwargs}
            video, text = arguments.get("hidden_states"), arguments.get("encoder_hidden_states")
            if self._grid is None or video is None or text is None:
                raise RecordingError("record_attention records the CogVideoX transformer's forward: call the "
                                     "transformer, not its blocks or attention modules directly")
            self._calls[index] = _Call(int(text.shape[1]), int(video.shape[1]), arguments.get("image_rotary_emb"),
                                       arguments.get("attention_mask"))
        return hook

    def _query_ready(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            call = self._calls.get(index)
            if call is not None:
                call.query = output
        return hook

    def _key_ready(self, index: int, attention: nn.Module):
        def hook(module: nn.Module, args: tuple, key: torch.Tensor) -> None:
            call = self._calls.pop(index, None)
            if call is None:  # the norm called outside a call of its attention module (not the processor's q/k)
                return
            if call.query is None:
                raise RecordingError(f"{self.modules[index][0]}: the key norm ran before the query norm; this "
                                     "attention processor is not one the recorder knows")
            _refuse_compiling()
            self._record_call(index, attention, call, key)
        return hook

    def _record_call(self, index: int, attention: nn.Module, call: _Call, key: torch.Tensor) -> None:
        grid = self._grid
        layout = grid.layout
        if call.text_tokens != layout.text_tokens or call.video_tokens != layout.video_tokens:
            raise RecordingError(
                f"{self.modules[index][0]}: attention over {call.text_tokens} text + {call.video_tokens} video tokens "
                f"does not match the forward's latent ({layout.text_tokens} + {layout.video_tokens})"
            )
        query = call.query
        plan = self._plan(call, query)
        shared = self._forward_groups(query)
        mass, maps = attention_statistics(query.detach(), key.detach(), call.rotary, layout.text_tokens,
                                          not attention.is_cross_attention, plan, shared, self.chunk_bytes)
        self._step_mass[index] = mass
        if maps is not None:
            self._step_maps[index] = maps

    def _plan(self, call: _Call, query: torch.Tensor) -> AttentionPlan:
        """The plan the processor about to run will use (the patched processor's, or full attention)."""
        state = attention_state(self.transformer)
        length = self._grid.layout.sequence_length
        if state is None:
            if call.mask is not None:
                raise RecordingError(
                    "an attention_mask reached unpatched CogVideoX attention, which diffusers misapplies: apply the "
                    "attention-mask patch (patches.apply(model, 'attention-mask')) to record masked attention"
                )
            return full_plan(length)
        stream = state.stream
        if stream is not None and stream.runs_here():
            raise RecordingError("record_attention cannot record a patches.streaming generation (its attention runs "
                                 "over a KV cache); record a full forward")
        mask = call.mask if call.mask is not None else state.call_mask
        if state.structure is None and mask is None:
            return full_plan(length)
        if mask is not None and not state.masks_enabled:
            return full_plan(length)  # the processor refuses this call itself (AttentionMaskError)
        return state.plan(mask, call.text_tokens, call.video_tokens, query)

    def _forward_groups(self, query: torch.Tensor) -> ForwardGroups:
        grid = self._grid
        key = (grid, query.device, query.dtype, query.shape[-1])
        if self._shared is not None and self._shared_key == key:
            return self._shared
        labels = self.token_labels
        if labels is not None and len(labels) != grid.layout.text_tokens:
            raise RecordingError(f"{len(labels)} token labels for {grid.layout.text_tokens} text tokens")
        info, group_of_token = token_groups(self.groups, grid, labels)
        words = resolve_words(self.words_asked, labels, grid.layout.text_tokens)
        recording = self.recording
        if recording.group_info.names and recording.group_info != info:
            raise RecordingError("this forward's groups differ from the recording's earlier steps (another video "
                                 "size): record it in a recording of its own")
        recording.group_info, recording.words, recording.layout = info, words, grid.to_json()
        self._shared = forward_groups(group_of_token, len(info.names), [p for p, _ in words], query.shape[-1],
                                      query.device, query.dtype)
        self._shared_key = key
        return self._shared


def _refuse_compiling() -> None:
    if torch.compiler.is_compiling():
        raise RecordingError("record_attention cannot record inside torch.compile: record the uncompiled model "
                             "(the attention and its statistics are the same)")


def _applied_patches(transformer: nn.Module) -> dict[str, dict[str, Any]]:
    from cogsurgeon.patches.registry import applied_options

    return applied_options(transformer)


def _is_compiled(target: Any) -> bool:
    modules = [target] + [getattr(target, "transformer", None)]
    if any(type(module).__name__ == "OptimizedModule" for module in modules):
        return True
    transformer = resolve_transformer(target)
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in transformer.modules())


def record_attention(
    model_or_pipeline: Any,
    groups: str = "frames",
    *,
    words: Sequence[int | str] = (),
    tokenizer: Any = None,
    prompt: str | None = None,
    token_labels: Sequence[str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> AttentionRecorder:
    """Record the attention of a CogVideoX transformer (or a pipeline's `.transformer`) while the `with` block runs.

    `groups`: "frames", "grid:RxC" or "words". `words`: text tokens (positions, or token strings when `tokenizer`
    and `prompt` are given; a pipeline's own tokenizer is used when none is) whose per-video-token attention is kept
    as spatial maps. Every forward of the transformer is one step; batch items stay apart (a pipeline's guidance
    batch: item 0 unconditioned, item 1 conditioned). A `torch.compile`d model is refused: record the module inside.
    """
    spec = parse_groups(groups)
    if _is_compiled(model_or_pipeline):
        raise RecordingError("record_attention cannot record a torch.compile'd model (hooks inside a compiled graph "
                             "would be traced away): record the uncompiled module (compiled._orig_mod); its attention "
                             "and statistics are the same")
    transformer = resolve_transformer(model_or_pipeline)
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RecordingError("record_attention cannot record a context-parallel model: each rank's q and k are one "
                             "shard of the sequence where the recorder reads them; record it in one process "
                             "(cogsurgeon.parallel.disable first)")
    if chunk_bytes < 1:
        raise RecordingError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if prompt is not None and token_labels is None:
        tokenizer = tokenizer or getattr(model_or_pipeline, "tokenizer", None)
        if tokenizer is None:
            raise RecordingError("a prompt was given without a tokenizer to split it into tokens")
        token_labels = prompt_token_labels(tokenizer, prompt, int(transformer.config.max_text_seq_length))
    return AttentionRecorder(transformer, spec, words=words, token_labels=token_labels, chunk_bytes=chunk_bytes)


def record_seeded_forward(
    transformer: nn.Module,
    size: tuple[int, int, int],
    *,
    batch: int = 2,
    groups: str = "frames",
    words: Sequence[int | str] = (),
    seed: int = 0,
) -> AttentionRecording:
    """Record one forward of `transformer` (patches as they are on it, on the device and in the dtype of its weights)
    on seeded random inputs at video `size` (frames, height, width), shaped as the pipelines shape them; `batch` 2 is
    one video with guidance."""
    from cogsurgeon.inspector.geometry import pipeline_inputs

    if any(parameter.is_meta for parameter in transformer.parameters()):
        raise RecordingError("this model is on the meta device (a published config, no weights): there are no "
                             "values to record; record a tiny model or a local folder with weights")
    spec = parse_groups(groups)  # refused before the inputs are built
    weight = next(transformer.parameters())
    inputs = pipeline_inputs(transformer.config, size, batch, dtype=weight.dtype, device=weight.device, seed=seed)
    with torch.no_grad(), record_attention(transformer, str(spec), words=words) as recording:
        transformer(**inputs)
    recording.model["size"] = list(size)
    recording.model["seed"] = seed
    return recording


__all__ = [
    "DEFAULT_CHUNK_BYTES", "parse_groups", "record_attention", "record_seeded_forward",
]
