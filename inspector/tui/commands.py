"""The command palette's provider: namespaced commands (`patch: …`, `module: …`, `model: …`, `lora: …`) over the
main screen's actions."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from cogsurgeon.inspector.model_specs import known_specs

Command = tuple[str, str, Callable[[], object]]


class CogsurgeonCommands(Provider):
    """Commands for what is loaded now: one `module: go to` per module, apply/revert/verify per patch, a model
    switch per spec, and the LoRA screen."""

    def commands(self) -> list[Command]:
        main = self.app.main_screen  # type: ignore[attr-defined]  (this provider serves CogsurgeonApp)
        commands: list[Command] = [
            ("lora: repair a checkpoint", "inspect, repair and verify a LoRA checkpoint", main.action_open_lora),
            ("model: open…", "a published spec, a tiny model or a local folder", main.action_switch_model),
            ("plan: GPU memory", "peak GPU memory of inference, a training step or the VAE decode",
             main.action_open_plan),
        ]
        for spec in known_specs():
            commands.append((f"model: open {spec}", "load it in the background", partial(main.open, spec)))
        for row in main.patch_bench.rows(main.model):
            toggle = partial(main.toggle_patch, row.name, not row.applied)
            commands.append((f"patch: {'revert' if row.applied else 'apply'} {row.name}", row.summary, toggle))
            commands.append(
                (f"patch: verify {row.name}", "check it on the tiny models (plain and fused processors) against "
                                              "reference attention",
                 partial(main.verify_patch, row.name))
            )
        if main.loaded is not None:
            for info in main.loaded.infos[1:]:
                commands.append((f"module: go to {info.name}", info.class_name, partial(main.go_to_module, info.name)))
        return commands

    async def discover(self) -> Hits:
        for text, help_text, callback in self.commands():
            if not text.startswith("module: "):
                yield DiscoveryHit(text, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, help_text, callback in self.commands():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), callback, help=help_text)


__all__ = [
    "CogsurgeonCommands",
]
