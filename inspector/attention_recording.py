"""An attention recording as a value: the group×group attention mass of every layer, head, step and batch item (and
per-word spatial maps), the statistics derived from it, and its files (`save` / `load_recording`).

`inspector.attention_xray` fills one during a real forward; the CLI, the TUI viewer and scripts read it. Every number
here is computed from the stored masses; nothing is sampled.

Derived statistics of one head (video queries are those of non-text groups; shares are over query tokens):
- `video_to_text`: the mean over video queries of their attention on text keys;
- `text_to_video`: the mean over text queries of their attention on video keys;
- `text_sink`: the mean over every query (text and video) of its attention on text keys;
- `own_frame` (groups "frames" only): of the attention video queries give video keys, the share that stays in their
  own frame (1: purely spatial);
- `first_frame_sink` (groups "frames", 2+ frames): the mean over the queries of frames 1.. of their attention on
  frame 0's keys;
- `kind`: "text" when `video_to_text >= TEXT_HEAD_SHARE`; else "spatial" when `own_frame >= SPATIAL_HEAD_SHARE`;
  "temporal" when `own_frame <= TEMPORAL_HEAD_SHARE`; else "mixed" (None without frames: grid and word groups cannot
  tell a frame's keys from another's).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cogsurgeon.inspector.errors import CogsurgeonError
from cogsurgeon.inspector.user_files import read_json, write_atomically

FORMAT = "cogsurgeon.attention-recording"
VERSION = 1
TEXT_HEAD_SHARE = 0.5
SPATIAL_HEAD_SHARE = 0.7
TEMPORAL_HEAD_SHARE = 0.3
HEAD_KINDS = ("spatial", "temporal", "text", "mixed")
# Past this many stored numbers a recording's tensors go to a safetensors file beside its JSON index.
INLINE_NUMBERS = 1 << 20
RECORDING_FILE_LIMIT = 1 << 30  # a JSON index (or an inline recording) larger than this is not one of ours


class RecordingError(CogsurgeonError):
    """A recording request or file that cannot be used: bad groups, a layer that was not recorded, a broken file."""


@dataclass(frozen=True)
class HeadStats:
    """What one head does, derived from its group×group mass (see the module's docstring for each rule)."""

    video_to_text: float
    text_to_video: float | None
    text_sink: float
    own_frame: float | None
    first_frame_sink: float | None
    kind: str | None


@dataclass(frozen=True)
class GroupInfo:
    """The groups attention was summed over, in order: names, query tokens per group, which are text, the frame of
    each frame group (None otherwise)."""

    spec: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    is_text: tuple[bool, ...]
    frame: tuple[int | None, ...]


class AttentionRecording:
    """Recorded attention of one transformer. `mass` holds `(steps, layers, batch, heads, groups, groups)` float32:
    `mass[s, l, b, h, i, j]` is the mean over the query tokens of group i of their attention summed over the keys of
    group j (each row sums to 1, or less where a query may see no key). `word_maps`, when words were selected, holds
    `(steps, layers, batch, heads, words, video_tokens)`: each video token's attention on that text token."""

    def __init__(
        self,
        *,
        groups: GroupInfo,
        layers: list[str],
        heads: int,
        layout: dict[str, int],
        words: list[tuple[int, str]] | None = None,
        model: dict[str, Any] | None = None,
    ) -> None:
        self.group_info = groups
        self.layers = list(layers)
        self.heads = heads
        self.layout = dict(layout)  # text_tokens, frames, grid_height, grid_width
        self.words = list(words or [])
        self.model = dict(model or {})
        self._mass_steps: list[torch.Tensor] = []  # one (layers, batch, heads, G, G) per step
        self._map_steps: list[torch.Tensor] = []  # one (layers, batch, heads, W, N) per step, when words are kept

    # -- filling -------------------------------------------------------------------------------------------------

    def add_step(self, mass: torch.Tensor, word_maps: torch.Tensor | None) -> None:
        """One forward's statistics (CPU float32). Every step holds the same layers, batch and groups."""
        if self._mass_steps and mass.shape != self._mass_steps[0].shape:
            raise RecordingError(
                f"this forward's attention has shape {tuple(mass.shape)} (layers, batch, heads, groups, groups), "
                f"the recording's earlier steps {tuple(self._mass_steps[0].shape)}: a recording holds one batch size "
                "and video size; record the other forward in a recording of its own"
            )
        self._mass_steps.append(mass)
        if word_maps is not None:
            self._map_steps.append(word_maps)

    # -- reading -------------------------------------------------------------------------------------------------

    @property
    def groups(self) -> list[str]:
        return list(self.group_info.names)

    @property
    def steps(self) -> int:
        return len(self._mass_steps)

    @property
    def batch(self) -> int:
        return int(self._mass_steps[0].shape[1]) if self._mass_steps else 0

    def all_mass(self) -> torch.Tensor:
        """Every mass, `(steps, layers, batch, heads, groups, groups)`."""
        if not self._mass_steps:
            raise RecordingError("nothing was recorded: no forward of the transformer ran inside the recording")
        return torch.stack(self._mass_steps)

    def layer_index(self, layer: int | str) -> int:
        """A layer given by its attention module's name (`transformer_blocks.0.attn1`) or its index."""
        if isinstance(layer, str):
            if layer in self.layers:
                return self.layers.index(layer)
            raise RecordingError(f"no recorded attention layer {layer!r}; recorded: {_listed(self.layers)}")
        if isinstance(layer, int) and not isinstance(layer, bool) and -len(self.layers) <= layer < len(self.layers):
            return layer % len(self.layers)
        raise RecordingError(f"layer {layer!r} is out of range: {len(self.layers)} layers were recorded")

    def _check(self, step: int, batch: int) -> None:
        if not self._mass_steps:
            raise RecordingError("nothing was recorded: no forward of the transformer ran inside the recording")
        for label, value, count in (("step", step, self.steps), ("batch", batch, self.batch)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
                raise RecordingError(f"{label} {value!r} is out of range: the recording has {count} ({label}s "
                                     f"0-{count - 1})")

    def mass(self, layer: int | str, step: int = 0, batch: int = 0) -> torch.Tensor:
        """`(heads, groups, groups)`: row i is where the queries of group i attend, summed per key group."""
        index = self.layer_index(layer)
        self._check(step, batch)
        return self._mass_steps[step][index, batch].clone()

    def head_stats(self, layer: int | str, step: int = 0, batch: int = 0) -> list[HeadStats]:
        """One `HeadStats` per head of a layer."""
        return [head_stats(matrix, self.group_info) for matrix in self.mass(layer, step, batch)]

    def word_index(self, word: int | str) -> int:
        """A selected word by its position among the text tokens or its label."""
        for number, (position, label) in enumerate(self.words):
            if word == position if isinstance(word, int) else word in (label, label.lstrip("▁")):
                return number
        recorded = ", ".join(f"{position}:{label}" for position, label in self.words) or "none"
        raise RecordingError(f"word {word!r} has no map in this recording (maps kept for: {recorded})")

    def word_map(
        self, word: int | str, layer: int | str, step: int = 0, batch: int = 0, head: int | None = None
    ) -> torch.Tensor:
        """`(frames, grid_height, grid_width)`: each video token's attention on the text token `word`, for one head or
        (head None) the mean over heads."""
        number = self.word_index(word)
        index = self.layer_index(layer)
        self._check(step, batch)
        maps = self._map_steps[step][index, batch, :, number]  # (heads, N)
        values = maps.mean(0) if head is None else maps[head]
        layout = self.layout
        return values.reshape(layout["frames"], layout["grid_height"], layout["grid_width"]).clone()

    def summary(self, step: int = 0, batch: int = 0) -> list[dict[str, Any]]:
        """One row per layer: how many heads of each kind, and the mean of each statistic over its heads."""
        rows = []
        for index, name in enumerate(self.layers):
            stats = self.head_stats(index, step, batch)
            row: dict[str, Any] = {"layer": name}
            row["kinds"] = {kind: sum(s.kind == kind for s in stats) for kind in HEAD_KINDS}
            for field in ("video_to_text", "text_to_video", "text_sink", "own_frame", "first_frame_sink"):
                values = [getattr(s, field) for s in stats if getattr(s, field) is not None]
                row[field] = sum(values) / len(values) if values else None
            rows.append(row)
        return rows

    # -- files ---------------------------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        """Everything but the numbers."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "groups": asdict(self.group_info),
            "layers": self.layers,
            "heads": self.heads,
            "steps": self.steps,
            "batch": self.batch,
            "layout": self.layout,
            "words": [{"index": position, "label": label} for position, label in self.words],
            "head_kind_rule": {"text": f"video_to_text >= {TEXT_HEAD_SHARE}",
                               "spatial": f"own_frame >= {SPATIAL_HEAD_SHARE}",
                               "temporal": f"own_frame <= {TEMPORAL_HEAD_SHARE}", "mixed": "otherwise"},
        }

    def to_json(self) -> dict[str, Any]:
        """The whole recording as JSON values: the header, `mass` as nested lists `[step][layer][batch][head][i][j]`,
        `word_maps` `[step][layer][batch][head][word][video token]`, and `stats` per step, layer, batch and head."""
        document = self.header()
        document["mass"] = self.all_mass().tolist()
        document["word_maps"] = torch.stack(self._map_steps).tolist() if self._map_steps else None
        document["stats"] = [
            [[[asdict(s) for s in self.head_stats(layer, step, batch)] for batch in range(self.batch)]
             for layer in range(len(self.layers))]
            for step in range(self.steps)
        ]
        return document

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the recording to `path` (`.json`); one with more than `INLINE_NUMBERS` numbers keeps them in
        `<stem>.safetensors` beside it, the JSON being its index. Written atomically; returns the files written."""
        path = Path(path)
        if path.suffix != ".json":
            raise RecordingError(f"{path}: a recording is saved as .json (its index, when large, beside a "
                                 ".safetensors)")
        numbers = self.all_mass().numel() + sum(maps.numel() for maps in self._map_steps)
        if numbers <= INLINE_NUMBERS:
            write_atomically(path, json.dumps(self.to_json()).encode())
            return [path]
        from safetensors.torch import save as save_tensors

        tensors_path = path.with_suffix(".safetensors")
        tensors = {"mass": self.all_mass().contiguous()}
        if self._map_steps:
            tensors["word_maps"] = torch.stack(self._map_steps).contiguous()
        write_atomically(tensors_path, save_tensors(tensors))
        write_atomically(path, json.dumps({**self.header(), "tensors": tensors_path.name}).encode())
        return [path, tensors_path]


def head_stats(matrix: torch.Tensor, groups: GroupInfo) -> HeadStats:
    """The statistics of one head's `(groups, groups)` mass (the rules: the module's docstring)."""
    mass = matrix.double()
    sizes = torch.tensor(groups.sizes, dtype=torch.float64)
    text = torch.tensor(groups.is_text)
    video = ~text
    on_text = mass[:, text].sum(1)
    on_video = mass[:, video].sum(1)

    def mean_over(queries: torch.Tensor, values: torch.Tensor) -> float | None:
        weight = sizes[queries].sum()
        return float((sizes[queries] * values[queries]).sum() / weight) if weight > 0 else None

    video_to_text = mean_over(video, on_text) or 0.0
    text_to_video = mean_over(text, on_video)
    text_sink = mean_over(torch.ones_like(text), on_text) or 0.0
    own_frame = first_frame_sink = None
    frames = [index for index, frame in enumerate(groups.frame) if frame is not None]
    if frames:
        frame_index = torch.tensor(frames)
        own = mass[frame_index, frame_index]
        video_mass = (sizes[frame_index] * on_video[frame_index]).sum()
        own_frame = float((sizes[frame_index] * own).sum() / video_mass) if video_mass > 0 else None
        if len(frames) > 1:
            later = frame_index[1:]
            first_frame_sink = float((sizes[later] * mass[later, frames[0]]).sum() / sizes[later].sum())
    return HeadStats(video_to_text, text_to_video, text_sink, own_frame, first_frame_sink,
                     head_kind(video_to_text, own_frame))


def head_kind(video_to_text: float, own_frame: float | None) -> str | None:
    """The head-kind rule (module docstring): text, spatial, temporal or mixed; None without frame groups."""
    if video_to_text >= TEXT_HEAD_SHARE:
        return "text"
    if own_frame is None:
        return None
    if own_frame >= SPATIAL_HEAD_SHARE:
        return "spatial"
    if own_frame <= TEMPORAL_HEAD_SHARE:
        return "temporal"
    return "mixed"


def load_recording(path: str | os.PathLike) -> AttentionRecording:
    """A recording saved by `AttentionRecording.save` (its JSON; the safetensors beside it when it names one)."""
    path = Path(path)
    document = read_json(path, RECORDING_FILE_LIMIT)
    try:
        return _from_document(document, path)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RecordingError(f"{path} is not a readable cogsurgeon attention recording "
                             f"({type(exc).__name__}: {exc})") from None


def _from_document(document: Any, path: Path) -> AttentionRecording:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RecordingError(f"{path} is not a cogsurgeon attention recording (no \"format\": \"{FORMAT}\")")
    if document.get("version") != VERSION:
        raise RecordingError(f"{path} is a version {document.get('version')!r} recording; this cogsurgeon reads "
                             f"{VERSION}")
    group_fields = document["groups"]
    groups = GroupInfo(
        spec=str(group_fields["spec"]), names=tuple(map(str, group_fields["names"])),
        sizes=tuple(map(int, group_fields["sizes"])), is_text=tuple(map(bool, group_fields["is_text"])),
        frame=tuple(None if frame is None else int(frame) for frame in group_fields["frame"]),
    )
    recording = AttentionRecording(
        groups=groups, layers=[str(name) for name in document["layers"]], heads=int(document["heads"]),
        layout={key: int(value) for key, value in document["layout"].items()},
        words=[(int(word["index"]), str(word["label"])) for word in document["words"]], model=document.get("model"),
    )
    if "tensors" in document:
        tensors_path = path.parent / Path(str(document["tensors"])).name  # beside the index, never elsewhere
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(tensors_path)
        except (OSError, SafetensorError) as exc:
            raise RecordingError(f"cannot read {tensors_path}, the numbers of {path}: {exc}") from None
        mass, maps = tensors["mass"], tensors.get("word_maps")
    else:
        mass = torch.tensor(document["mass"], dtype=torch.float32)
        maps = None if document.get("word_maps") is None else torch.tensor(document["word_maps"], dtype=torch.float32)
    groups_count, layers = len(groups.names), len(recording.layers)
    expected = (int(document["steps"]), layers, int(document["batch"]), recording.heads, groups_count, groups_count)
    if tuple(mass.shape) != expected:
        raise RecordingError(f"{path}: mass has shape {tuple(mass.shape)}, its header says {expected}")
    for step in range(mass.shape[0]):
        recording.add_step(mass[step].float(), None if maps is None else maps[step].float())
    return recording


def _listed(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


__all__ = [
    "AttentionRecording", "FORMAT", "GroupInfo", "RecordingError", "head_kind", "load_recording",
]
