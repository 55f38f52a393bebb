"""Streaming CogVideoX: generate a video chunk by chunk with a KV cache, exactly as the one-shot causal forward.

    with patches.streaming(model, chunk=3, window=None, sink=0, text_timestep=0, height=480, width=720) as stream:
        stream.prefill(encoder_hidden_states)          # text K/V of every layer, computed once
        for k in range(num_chunks):
            for t in denoising_timesteps:
                out = stream.step(latents, t)          # latents (B, chunk, C, h, w); t (B,) or (B, chunk)
            stream.commit(clean_latents, timestep=0)   # appends this chunk's K/V to the cache
        stream.cache_bytes()

While the stream is open the model runs `block-causal-attention(chunk, window, sink)` and
`per-frame-timesteps(text_timestep)`; `text_timestep` must be a number, so text never changes and its K/V are
computed once. Under that rule a chunk's tokens attend text and the chunks before them (within the window, sinks
kept), never later ones: so the K/V of committed chunks are final, and a step only computes its own chunk's tokens.
`step` runs the model on the chunk alone (no text tokens) and its attention on `[text ; cached chunks ; this chunk]`;
the cache is unchanged by it. `commit` runs the chunk at its clean timestep and appends its K/V; a window evicts the
chunks no later query may attend (sinks stay). Positions are absolute: the rotary embedding and the sincos/learned
positional embedding of the chunk's real frames.

A stream is used from one thread at a time: a call while another of its calls runs (another thread's) raises
`StreamError`. Only the stream's own forwards use its cache: a forward of the model on another thread meanwhile runs
with the model's patches (block-causal, per-frame timesteps), never through the cache. Inputs that do not fit (dtype,
device, channels, batch 0, a timestep that is no number, sizes torch cannot make) are `StreamError`s before anything
runs, and leave the stream and the model as they were.

Each layer's cache is one buffer `(B, heads, capacity, head_dim)` for K and one for V, laid out `[text ; sink chunks ;
window chunks ; room for the chunk being stepped]`, so attention is one SDPA call over a contiguous prefix: no copy
of the cache per step and no mask. Without a window the buffers grow (doubling) unless `frames` says up front how
many latent frames the video has. Inference only (runs under `torch.no_grad()`).

"Frames" follow the patches' definition: for CogVideoX1.5 a frame is one temporal patch (`patch_size_t` latent
frames), so `chunk=1` steps 2 latent frames there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cogsurgeon.inspector.errors import shown
from cogsurgeon.inspector.geometry import (
    TORCH_MAX_BYTES,
    VAE_SPATIAL_FACTOR,
    VideoSizeError,
    latent_geometry,
    rotary_embedding,
    video_frame_count,
)
from cogsurgeon.patches.errors import PatchError
from cogsurgeon.patches.parameters import INT64_MAX
from cogsurgeon.patches.patterns import TIMESTEP_LIMIT, check_text_timestep
from cogsurgeon.patches.processor import attention_state, joint_query_key_value, project_attention_output
from cogsurgeon.patches.registry import patched, resolve_transformer


class StreamError(PatchError):
    """A streaming call that does not fit the stream: wrong shapes, dtypes or timesteps, out of order, past the
    model's positions, too large for torch, or made while another call of the same stream runs."""



@dataclass(frozen=True)
class StreamShape:
    """What one cached token costs and how many tokens a chunk has, for `kv_cache_bytes` and the stream."""

    layers: int
    heads: int
    head_dim: int
    text_tokens: int
    tokens_per_frame: int
    patch_frames: int  # latent frames per frame (CogVideoX1.5: patch_size_t)


def stream_shape(config: Any, height: int, width: int) -> StreamShape:
    """The cache geometry of a model at a video size in pixels (the VAE's 8x spatial factor, the patch size)."""
    from cogsurgeon.inspector.geometry import tokens_per_frame

    latent_height, latent_width = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
    return StreamShape(
        layers=config["num_layers"],
        heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"],
        text_tokens=config["max_text_seq_length"],
        tokens_per_frame=tokens_per_frame(config, latent_height, latent_width),
        patch_frames=config.get("patch_size_t") or 1,
    )


def cached_frames(frames: int, chunk: int, window: int | None, sink: int) -> int:
    """Frames (temporal patches for 1.5) the cache must hold room for: every frame without a window; with one, the
    sink chunks and the window's chunks (the chunk being stepped included)."""
    if window is None:
        return frames
    return min(frames, (sink + window) * chunk)


def kv_cache_bytes(
    config: Any,
    *,
    frames: int,
    height: int,
    width: int,
    batch: int = 2,
    chunk: int = 1,
    window: int | None = None,
    sink: int = 0,
    dtype_bytes: int = 2,
) -> int:
    """Bytes of a stream's K/V cache for a video of `frames` frames (latent frames / patch_size_t) at `height` x
    `width` pixels: K and V of every layer for the text and the frames the cache holds. Equals `Stream.cache_bytes()`
    of a stream opened with `frames=`."""
    shape = stream_shape(config, height, width)
    tokens = shape.text_tokens + cached_frames(frames, chunk, window, sink) * shape.tokens_per_frame
    return 2 * shape.layers * batch * shape.heads * tokens * shape.head_dim * dtype_bytes


@dataclass
class _LayerCache:
    keys: torch.Tensor  # (B, heads, capacity, head_dim)
    values: torch.Tensor


class Stream:
    """An open stream on one transformer (see the module docstring). Made by `patches.streaming`."""

    def __init__(self, model: nn.Module, *, chunk: int, window: int | None, sink: int, text_timestep: float,
                 height: int, width: int, frames: int | None):
        self.model = model
        self.config = model.config
        self.chunk, self.window, self.sink = chunk, window, sink
        self.text_timestep = text_timestep
        self.shape = stream_shape(self.config, height, width)
        self.latent_height, self.latent_width = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
        self.frames = frames
        self.committed_frames = 0  # frames (temporal patches) whose K/V are final
        self.finished = False  # a shorter last chunk was committed
        self._layers: dict[nn.Module, _LayerCache] = {}
        self._cached: list[tuple[int, int]] = []  # (chunk index, tokens) of the video chunks in the cache, in order
        self._length = 0  # tokens in the cache: text + cached chunks
        self._mode: str | None = None  # "prefill" | "step" | "commit" while a forward of ours runs
        self._chunk_tokens = 0
        self._positions: torch.Tensor | None = None
        self._busy = threading.Lock()  # held by the call (prefill, step, commit) under way
        self._owner: int | None = None  # the thread whose forward of ours is under way
        self._check_positions_possible()
        try:  # the sizes the pipelines allow (whole patches, 1.5's rotary grid): else diffusers drops rows silently
            latent_geometry(self.config, 1, height, width)
        except VideoSizeError as exc:
            raise StreamError(f"streaming: {exc}") from None

    # -- public ------------------------------------------------------------------------------------------------------

    def prefill(self, encoder_hidden_states: torch.Tensor) -> None:
        """Compute the text K/V of every layer from the prompt embeddings `(B, T, text_dim)`, once per stream."""
        with self._exclusive("prefill"):
            self._prefill(encoder_hidden_states)

    def _prefill(self, encoder_hidden_states: torch.Tensor) -> None:
        if self._layers:
            raise StreamError("prefill runs once per stream, before the first step")
        tokens, dim = self.shape.text_tokens, self.config["text_embed_dim"]
        self._check_tensor("encoder_hidden_states", encoder_hidden_states)
        if encoder_hidden_states.dim() != 3 or tuple(encoder_hidden_states.shape[1:]) != (tokens, dim) or \
                encoder_hidden_states.shape[0] < 1:
            shape = tuple(encoder_hidden_states.shape)
            raise StreamError(f"encoder_hidden_states of shape {shape}: expected (B, {tokens}, {dim}) with B >= 1")
        self._check_sizes(encoder_hidden_states.shape[0], encoder_hidden_states.element_size())
        self.batch = encoder_hidden_states.shape[0]
        self.device, self.dtype = encoder_hidden_states.device, encoder_hidden_states.dtype
        self._no_text = encoder_hidden_states.new_zeros(self.batch, 0, encoder_hidden_states.shape[-1])
        # The text path does not depend on video under the block-causal rule: run it beside one blank frame. A failure
        # part-way leaves no half-filled cache behind.
        try:
            with _memory_errors():
                blank = torch.zeros(self.batch, self.shape.patch_frames, self.config["in_channels"],
                                    self.latent_height, self.latent_width, dtype=self.dtype, device=self.device)
                self._run("prefill", blank, self._frame_timesteps(0.0, self.shape.patch_frames), first_frame=0,
                          encoder_hidden_states=encoder_hidden_states)
        except BaseException:
            self._layers.clear()
            raise
        self._length = self.shape.text_tokens

    def step(self, latents: torch.Tensor, timestep: Any, **forward_kwargs: Any) -> torch.Tensor:
        """The transformer's output for the next chunk's frames at `timestep` ((B,) or one per latent frame); the cache
        is unchanged. `forward_kwargs` (e.g. `ofs`) go to the model's forward."""
        with self._exclusive("step"):
            self._check_chunk(latents)
            timesteps = self._frame_timesteps(timestep, latents.shape[1])
            with _memory_errors():
                return self._run("step", latents, timesteps, first_frame=self.committed_frames, **forward_kwargs)

    def commit(self, clean_latents: torch.Tensor, timestep: Any = 0, **forward_kwargs: Any) -> None:
        """Append the chunk's K/V, computed from its clean latents at `timestep`, to the cache; the next step is the
        next chunk. A window evicts what no later query may attend."""
        with self._exclusive("commit"):
            self._commit(clean_latents, timestep, **forward_kwargs)

    def _commit(self, clean_latents: torch.Tensor, timestep: Any, **forward_kwargs: Any) -> None:
        frames = self._check_chunk(clean_latents)
        chunk_index = self.committed_frames // self.chunk
        timesteps = self._frame_timesteps(timestep, clean_latents.shape[1])
        with _memory_errors():
            self._run("commit", clean_latents, timesteps, first_frame=self.committed_frames, **forward_kwargs)
        self._cached.append((chunk_index, frames * self.shape.tokens_per_frame))
        self._length += frames * self.shape.tokens_per_frame
        self.committed_frames += frames
        self.finished = frames < self.chunk
        self._evict(next_chunk=chunk_index + 1)

    def cache_bytes(self) -> int:
        """Bytes the cache holds on its device (K and V buffers of every layer, room for a step included)."""
        return sum(c.keys.nbytes + c.values.nbytes for c in self._layers.values())

    def __getstate__(self) -> dict[str, Any]:
        """A copy (`copy.deepcopy` of the model while the stream is open) gets its own lock, not the held one."""
        return {name: value for name, value in self.__dict__.items() if name != "_busy"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._busy = threading.Lock()

    def runs_here(self) -> bool:
        """True while a forward of this stream's own runs on the calling thread: only then does attention go through
        the cache (a forward of the model on another thread meanwhile is an ordinary forward)."""
        return self._owner == threading.get_ident()

    @contextmanager
    def _exclusive(self, call: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise StreamError(
                f"stream.{call}() while another call of this stream runs (on another thread, or from inside its own "
                "forward): a stream is used from one thread at a time; give each thread its own model and stream, or "
                "wait for the call under way"
            )
        try:
            yield
        finally:
            self._busy.release()

    # -- checks --------------------------------------------------------------------------------------------------------

    def _check_positions_possible(self) -> None:
        embed = self.model.patch_embed
        if getattr(embed, "use_learned_positional_embeddings", False) and (
            (embed.sample_height, embed.sample_width) != (self.latent_height, self.latent_width)
        ):
            raise StreamError(
                f"this model's learned positional embeddings are for {embed.sample_height * VAE_SPATIAL_FACTOR}x"
                f"{embed.sample_width * VAE_SPATIAL_FACTOR} videos only; the stream was opened at "
                f"{self.latent_height * VAE_SPATIAL_FACTOR}x{self.latent_width * VAE_SPATIAL_FACTOR}"
            )

    def _check_tensor(self, name: str, value: Any) -> None:
        """A tensor in the model's dtype (any float under autocast) on its device: anything else fails deep inside
        torch (or, for a dtype the model's layers happen to accept, runs at another precision than the model)."""
        parameter = next(self.model.parameters())
        if not isinstance(value, torch.Tensor):
            raise StreamError(f"{name} is a {type(value).__name__}: expected a torch.Tensor")
        autocast = value.is_floating_point() and torch.is_autocast_enabled(value.device.type)  # casts for the layers
        if (value.dtype != parameter.dtype and not autocast) or value.device != parameter.device:
            raise StreamError(
                f"{name} is {value.dtype} on {value.device}, the model {parameter.dtype} on {parameter.device}: "
                f"pass it as {name}.to(model.device, model.dtype)"
            )

    def _check_sizes(self, batch: int, element_bytes: int) -> None:
        """Refuse a stream whose blank frame or K/V buffers torch cannot size (a huge height, width or frame count)."""
        shape = self.shape
        frame = batch * shape.patch_frames * self.config["in_channels"] * self.latent_height * self.latent_width
        buffer = batch * shape.heads * shape.head_dim * (
            shape.text_tokens + self._initial_frames() * shape.tokens_per_frame)
        largest = max(frame, buffer) * element_bytes
        if largest > TORCH_MAX_BYTES:
            raise StreamError(
                f"streaming at {self.latent_height * VAE_SPATIAL_FACTOR}x{self.latent_width * VAE_SPATIAL_FACTOR} with "
                f"chunk={self.chunk}, window={self.window}, frames={self.frames} needs a tensor of "
                f"{largest:.3g} bytes, more than torch can make: choose a smaller video size, chunk, window or "
                "frame count"
            )

    def _check_chunk(self, latents: torch.Tensor) -> int:
        """The chunk's frame count (temporal patches) after checking the latent's shape and the stream's order."""
        if not self._layers:
            raise StreamError("call stream.prefill(encoder_hidden_states) before the first step")
        if self.finished:
            raise StreamError("the last chunk (shorter than chunk) was committed: the video has ended")
        self._check_tensor("latents", latents)
        spatial = (self.latent_height, self.latent_width)
        patch_frames = self.shape.patch_frames
        if latents.dim() != 5 or latents.shape[0] != self.batch or tuple(latents.shape[-2:]) != spatial or \
                latents.shape[2] != self.config["in_channels"] or latents.shape[1] % patch_frames or \
                not 0 < latents.shape[1] <= self.chunk * patch_frames:
            raise StreamError(
                f"latents of shape {tuple(latents.shape)}: expected (B={self.batch}, up to {self.chunk * patch_frames}"
                f" latent frames{' in whole temporal patches' if patch_frames > 1 else ''}, "
                f"{self.config['in_channels']}, {spatial[0]}, {spatial[1]})"
            )
        frames = latents.shape[1] // patch_frames
        if self.frames is not None and self.committed_frames + frames > self.frames:
            raise StreamError(f"the stream was opened for {self.frames} frames; this chunk goes past them")
        return frames

    def _frame_timesteps(self, timestep: Any, latent_frames: int) -> torch.Tensor:
        """`(B, latent_frames)` timesteps from a number, `(B,)` or `(B, latent_frames)`."""
        value = timestep_tensor(timestep, self.device)
        if value.dim() == 0:
            value = value.expand(self.batch)
        if value.dim() == 1 and value.shape[0] == self.batch:
            value = value[:, None].expand(self.batch, latent_frames)
        if value.shape != (self.batch, latent_frames):
            raise StreamError(
                f"timestep of shape {tuple(value.shape)}: expected a number, ({self.batch},) or "
                f"({self.batch}, {latent_frames})"
            )
        return value

    # -- one forward of ours -------------------------------------------------------------------------------------------

    def _run(self, mode: str, latents: torch.Tensor, timesteps: torch.Tensor, *, first_frame: int,
             encoder_hidden_states: torch.Tensor | None = None, **forward_kwargs: Any) -> torch.Tensor:
        frames = latents.shape[1] // self.shape.patch_frames
        # step / commit: the text's K/V are cached, its tokens are not run again
        text = self._no_text if encoder_hidden_states is None else encoder_hidden_states
        rotary = self._rotary(first_frame, frames)
        if rotary is not None:
            forward_kwargs["image_rotary_emb"] = rotary
        self._mode, self._chunk_tokens = mode, frames * self.shape.tokens_per_frame
        self._positions = self._positional_embedding(first_frame, frames)
        state = attention_state(self.model)
        state.stream = self
        self._owner = threading.get_ident()
        try:
            with torch.no_grad():
                return self.model(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps,
                                  return_dict=False, **forward_kwargs)[0]
        finally:
            state.stream = None
            self._mode, self._positions, self._owner = None, None, None

    def _rotary(self, first_frame: int, frames: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary embedding of frames `[first_frame, first_frame + frames)` (their absolute positions)."""
        patch_frames = self.shape.patch_frames
        rotary = rotary_embedding(self.config, (first_frame + frames) * patch_frames, self.latent_height,
                                  self.latent_width, device=self.device)
        if rotary is None:
            return None
        start, end = first_frame * self.shape.tokens_per_frame, (first_frame + frames) * self.shape.tokens_per_frame
        return tuple(part[start:end] for part in rotary)

    def _positional_embedding(self, first_frame: int, frames: int) -> torch.Tensor | None:
        """The patch embedding's positions for these frames as the one-shot forward adds them: the learned table
        (frames within its length) or the 3-D sincos embedding (any frame; it does not depend on the total)."""
        embed = self.model.patch_embed
        learned = getattr(embed, "use_learned_positional_embeddings", False)
        if not (getattr(embed, "use_positional_embeddings", False) or learned):
            return None
        end = first_frame + frames
        text = embed.max_text_seq_length
        tokens = self.shape.tokens_per_frame
        if learned:
            table_frames = (embed.pos_embedding.shape[1] - text) // tokens
            if end > table_frames:
                raise StreamError(
                    f"this model's learned positional embeddings cover {table_frames} latent frames "
                    f"({embed.sample_frames} video frames); frame {end - 1} is past them"
                )
            table = embed.pos_embedding
        else:
            table = embed._get_positional_embeddings(
                self.latent_height, self.latent_width, video_frame_count(end, embed.temporal_compression_ratio),
                device=self.device,
            )
        return table[:, text + first_frame * tokens : text + end * tokens]

    # -- called by the patched processors and the patch embedding ------------------------------------------------------

    def embed_positions(self, embeds: torch.Tensor, text_tokens: int) -> torch.Tensor:
        """Add this chunk's absolute positions to the video part of the patch embedding's output."""
        if self._positions is None:
            return embeds
        video = embeds[:, text_tokens:] + self._positions.to(embeds.dtype)
        return torch.cat([embeds[:, :text_tokens], video], dim=1)

    def attend(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
               image_rotary_emb: Any, fused: bool, parallel: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention call of one layer, by the mode of the forward under way. Under Ulysses context parallelism
        (`parallel`, a `SequenceParallel`) it runs inside diffusers' all-to-all, so this rank caches K/V of its H/N
        heads for the whole sequence."""
        text_tokens = encoder_hidden_states.shape[1]
        query, key, value = joint_query_key_value(attn, hidden_states, encoder_hidden_states, image_rotary_emb, fused)
        if parallel is None:
            output = self._attend_cached(attn, query, key, value, text_tokens)
        else:
            output = parallel.attend(
                query, key, value, lambda q, k, v, text, video: self._attend_cached(attn, q, k, v, text)
            )
        return project_attention_output(attn, output, text_tokens)

    def _attend_cached(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       text_tokens: int) -> torch.Tensor:
        """The attention output `(B, heads, L, D)` of the call's tokens; prefill stores the text K/V, a step or a
        commit writes its chunk's K/V after the cached ones and attends the whole prefix."""
        if self._mode == "prefill":
            self._store_text(attn, key, value)
            text = F.scaled_dot_product_attention(query[:, :, :text_tokens], key[:, :, :text_tokens],
                                                  value[:, :, :text_tokens])
            video = F.scaled_dot_product_attention(query[:, :, text_tokens:], key, value)  # discarded: a blank frame
            return torch.cat([text, video], dim=2)
        cache = self._layers[attn]
        end = self._length + self._chunk_tokens
        self._reserve(cache, end)
        cache.keys[:, :, self._length:end] = key
        cache.values[:, :, self._length:end] = value
        return F.scaled_dot_product_attention(query, cache.keys[:, :, :end], cache.values[:, :, :end])

    # -- the cache -----------------------------------------------------------------------------------------------------

    def _store_text(self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
        text = self.shape.text_tokens
        capacity = text + (self._initial_frames() * self.shape.tokens_per_frame)
        batch, heads, _, head_dim = key.shape
        keys = key.new_empty(batch, heads, capacity, head_dim)
        values = value.new_empty(batch, heads, capacity, head_dim)
        keys[:, :, :text], values[:, :, :text] = key[:, :, :text], value[:, :, :text]
        self._layers[attn] = _LayerCache(keys, values)

    def _initial_frames(self) -> int:
        if self.frames is not None:
            return cached_frames(self.frames, self.chunk, self.window, self.sink)
        return self.chunk if self.window is None else (self.sink + self.window) * self.chunk

    def _reserve(self, cache: _LayerCache, tokens: int) -> None:
        """Grow a layer's buffers (doubling) to hold `tokens`; only without a window and an up-front frame count."""
        capacity = cache.keys.shape[2]
        if tokens <= capacity:
            return
        grown = max(tokens, self.shape.text_tokens + 2 * (capacity - self.shape.text_tokens))
        for name in ("keys", "values"):
            old = getattr(cache, name)
            new = old.new_empty(*old.shape[:2], grown, old.shape[3])
            new[:, :, : self._length] = old[:, :, : self._length]
            setattr(cache, name, new)

    def _evict(self, next_chunk: int) -> None:
        """Drop the cached chunks no query of chunk >= next_chunk may attend: j <= next_chunk - window, j >= sink."""
        if self.window is None:
            return
        keep = [(j, n) for j, n in self._cached if j < self.sink or j > next_chunk - self.window]
        if len(keep) == len(self._cached):
            return
        text = start = self.shape.text_tokens
        sources = []  # where the kept chunks are now, moved up against the text in order
        for entry in self._cached:
            if entry in keep:
                sources.append(slice(start, start + entry[1]))
            start += entry[1]
        for cache in self._layers.values() if sources else ():
            for buffer in (cache.keys, cache.values):
                kept = torch.cat([buffer[:, :, source] for source in sources], dim=2)
                buffer[:, :, text : text + kept.shape[2]] = kept
        self._cached = keep
        self._length = text + sum(n for _, n in keep)

    def close(self) -> None:
        """Free the cache and forget the model (the `with` block's end does this)."""
        self._layers.clear()
        self._no_text = None
        self.model = None


class _PositionedPatchEmbedding:
    """`patch_embed.forward` while a stream is open: the module's own projection without its positions, then the
    chunk's absolute positions from the stream (outside the stream's own calls, positions as unpatched)."""

    def __init__(self, embed: nn.Module, original: Any, stream: Stream):
        self.embed, self.original, self.stream = embed, original, stream

    def __call__(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        embed = self.embed
        if not self.stream.runs_here():  # not a forward of the stream's (none, or another thread's forward)
            return self.original(text_embeds, image_embeds)
        flags = embed.use_positional_embeddings, embed.use_learned_positional_embeddings
        embed.use_positional_embeddings = embed.use_learned_positional_embeddings = False
        try:
            embeds = self.original(text_embeds, image_embeds)
        finally:
            embed.use_positional_embeddings, embed.use_learned_positional_embeddings = flags
        return self.stream.embed_positions(embeds, text_embeds.shape[1])


def _check_options(chunk: Any, window: Any, sink: Any, text_timestep: Any, height: Any, width: Any,
                   frames: Any) -> None:
    integers = (("chunk", chunk, 1), ("window", window, 1), ("sink", sink, 0), ("frames", frames, 1),
                ("height", height, 8), ("width", width, 8))
    for name, value, minimum in integers:
        if value is None and name in ("window", "frames"):  # optional: no window, frame count not known up front
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
            raise StreamError(f"streaming: {name} must be an integer >= {minimum} (and below 2**63), "
                              f"got {shown(value)}")
    if isinstance(text_timestep, bool) or not isinstance(text_timestep, Real):
        raise StreamError(
            f"streaming: text_timestep must be a number (text K/V are computed once, so text needs one fixed "
            f"timestep), got {text_timestep!r}"
        )
    try:
        check_text_timestep(text_timestep)
    except PatchError as exc:
        raise StreamError(f"streaming: {exc}") from None


def timestep_tensor(timestep: Any, device: torch.device) -> torch.Tensor:
    """A timestep (a number, or a tensor or sequence of them) as a tensor of real numbers that the timestep embedding
    can take: finite, within int64's range; anything else (None, text, bools, complex, nan) a `StreamError`."""
    expected = "expected a number, or a (B,) or (B, frames) tensor of them"
    if timestep is None or isinstance(timestep, (str, bytes, bool)):
        raise StreamError(f"timestep {timestep!r}: {expected}")
    try:
        value = torch.as_tensor(timestep, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise StreamError(f"timestep {shown(timestep)}: {expected}") from None
    if value.dtype == torch.bool or value.is_complex():
        raise StreamError(f"timestep of dtype {value.dtype}: {expected}")
    if value.is_floating_point() and value.numel() and not bool(
            (value.isfinite() & (value.abs() < TIMESTEP_LIMIT)).all()):
        raise StreamError(f"timestep holds values that are not finite or beyond 2**63 ({value.tolist()!r:.60}): "
                          "give finite timesteps (0 to 1000 in use)")
    return value


@contextmanager
def _memory_errors() -> Iterator[None]:
    """The allocator's refusal (CPU or GPU) as a `StreamError`: a size the machine cannot hold is the input's fault."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError (a GPU) is one; the CPU allocator raises a plain one
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        detail = " ".join(str(exc).split())[:200]
        raise StreamError(f"out of memory while streaming: {detail}; choose a smaller video size, chunk, window or "
                          "batch") from None


@contextmanager
def streaming(target: Any, *, chunk: int, window: int | None = None, sink: int = 0, text_timestep: float = 0,
              height: int, width: int, frames: int | None = None) -> Iterator[Stream]:
    """Open a stream on a CogVideoX transformer (or a pipeline's): block-causal attention by chunks of `chunk` frames
    (`window` chunks back, `sink` first chunks always kept) with per-frame timesteps and a fixed `text_timestep`,
    for videos of `height` x `width` pixels. `frames`, if known, sizes the cache up front: the video's latent frames
    (temporal patches for CogVideoX1.5), not its video frames: 49 video frames are 13 latent frames
    (`inspector.geometry.latent_frame_count`), where `cogsurgeon plan` and `trace --frames` take the 49. On leaving, the
    patches are reverted, the patch embedding restored and the cache freed."""
    _check_options(chunk, window, sink, text_timestep, height, width, frames)
    model = resolve_transformer(target)
    embed = model.patch_embed
    with patched(model, "block-causal-attention", chunk=chunk, window=window, sink=sink):
        with patched(model, "per-frame-timesteps", text_timestep=text_timestep):
            stream = Stream(model, chunk=chunk, window=window, sink=sink, text_timestep=float(text_timestep),
                            height=height, width=width, frames=frames)
            own_forward = embed.__dict__.get("forward")
            embed.forward = _PositionedPatchEmbedding(embed, embed.forward, stream)
            try:
                yield stream
            finally:
                embed.__dict__.pop("forward", None)
                if own_forward is not None:
                    embed.forward = own_forward
                stream.close()


__all__ = [
    "StreamError", "kv_cache_bytes", "streaming",
]
