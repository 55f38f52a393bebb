"""Which CogVideoX variants a LoRA fits: every LoRA module's (in, out) features against the Linear shapes that a
transformer config implies (layer count, inner dim, in-channels of the patch embedding). Pure: configs are dicts
(the published ones shipped with the package, the tiny ones, or a local model's config.json); no torch.
"""

from __future__ import annotations

import re
from typing import Any

from cogsurgeon.inspector.model_specs import PUBLISHED_SPECS, TINY_SPECS, published_config, tiny_config

_BLOCK = re.compile(r"^transformer_blocks\.(?P<index>\d+)\.(?P<rest>.+)$")


def linear_shapes(config: dict[str, Any]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(number of blocks, {module pattern: (in_features, out_features)}) of a CogVideoXTransformer3DModel config;
    block modules are keyed by the part after `transformer_blocks.N.`."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    time_dim = config["time_embed_dim"]
    patch, patch_t = config["patch_size"], config.get("patch_size_t")
    shapes = {
        "attn1.to_q": (inner, inner), "attn1.to_k": (inner, inner), "attn1.to_v": (inner, inner),
        "attn1.to_out.0": (inner, inner), "ff.net.0.proj": (inner, 4 * inner), "ff.net.2": (4 * inner, inner),
        "norm1.linear": (time_dim, 6 * inner), "norm2.linear": (time_dim, 6 * inner),
        "patch_embed.text_proj": (config["text_embed_dim"], inner),
        "time_embedding.linear_1": (inner, time_dim), "time_embedding.linear_2": (time_dim, time_dim),
        "norm_out.linear": (time_dim, 2 * inner),
    }
    if patch_t:  # CogVideoX 1.5: the patch embedding is a Linear over p*p*pt*C inputs
        shapes["patch_embed.proj"] = (config["in_channels"] * patch * patch * patch_t, inner)
        shapes["proj_out"] = (inner, patch * patch * patch_t * config["out_channels"])
    else:
        shapes["proj_out"] = (inner, patch * patch * config["out_channels"])
    if config.get("ofs_embed_dim"):
        shapes["ofs_embedding.linear_1"] = (config["ofs_embed_dim"], config["ofs_embed_dim"])
        shapes["ofs_embedding.linear_2"] = (config["ofs_embed_dim"], config["ofs_embed_dim"])
    return config["num_layers"], shapes


def mismatch(config: dict[str, Any], modules: dict[str, tuple[int, int]], *, strict: bool = True) -> str | None:
    """Why LoRA modules {name: (in_features, out_features)} do not fit `config`, or None when they do. Not `strict`:
    names that are no CogVideoX module at all are left to the loaders' own key checks (verify reports them)."""
    layers, shapes = linear_shapes(config)
    for module, features in sorted(modules.items()):
        block = _BLOCK.match(module)
        key = block["rest"] if block else module
        if block and int(block["index"]) >= layers:
            return f"{module}: the base has {layers} blocks"
        expected = shapes.get(key)
        if expected is None:
            if not strict:
                continue
            return f"{module}: no such Linear in the base"
        if tuple(features) != expected:
            return (f"{module}: LoRA maps {features[0]} -> {features[1]} features, the base's Linear "
                    f"{expected[0]} -> {expected[1]}")
    return None


def describe(config: dict[str, Any]) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return f"{config['num_layers']} blocks of {width}, {config['in_channels']} in-channels"


LoraShapes = list[tuple[str, str, tuple[int, ...]]]  # (module, "A" | "B", shape)


def lora_features(tensors: LoraShapes) -> tuple[dict[str, tuple[int, int]], int, int | None]:
    """{module: (in, out)} from (module, part, shape) entries: A is (r, in), B is (out, r); the block count; and the
    inner dim (the attention's in-features), when the LoRA has a to_q or to_k."""
    features: dict[str, list[int]] = {}
    for module, part, shape in tensors:
        pair = features.setdefault(module, [0, 0])
        if len(shape) == 2:
            if part == "A":
                pair[0] = shape[1]
            elif part == "B":
                pair[1] = shape[0]
    blocks = {int(m["index"]) for m in (_BLOCK.match(name) for name in features) if m}
    inner = next((f[0] for m, f in features.items() if m.endswith(("attn1.to_q", "attn1.to_k"))), None)
    return {m: (f[0], f[1]) for m, f in features.items()}, (max(blocks) + 1 if blocks else 0), inner


def known_configs() -> dict[str, dict[str, Any]]:
    configs = {name: published_config(name) for name in PUBLISHED_SPECS}
    configs.update({name: tiny_config(name) for name in TINY_SPECS})
    return configs


def lora_fits(tensors: LoraShapes) -> tuple[tuple[str, ...], str]:
    """The known variants (published and tiny) a LoRA fits, and a line saying so."""
    modules, blocks, inner = lora_features(tensors)
    fits = tuple(name for name, config in known_configs().items() if mismatch(config, modules) is None)
    shape = f"LoRA over {blocks} blocks" + (f" of {inner}" if inner else "")
    if not fits:
        return (), f"{shape}: fits none of {', '.join(known_configs())}"
    published = [name for name in fits if name in PUBLISHED_SPECS]
    return fits, f"{shape}: fits {', '.join(published or fits)}" + (" only" if len(published or fits) == 1 else "")


def check_fits(config: dict[str, Any], tensors: LoraShapes, base_name: str) -> str | None:
    """None when the LoRA fits `config`, else one line naming the mismatch (for verify and merge)."""
    modules, blocks, inner = lora_features(tensors)
    why = mismatch(config, modules, strict=False)
    if why is None:
        return None
    near = [name for name, known in known_configs().items()
            if mismatch(known, modules) is None and name in PUBLISHED_SPECS]
    lora = f"LoRA: {blocks} blocks" + (f" of {inner}" if inner else "") + (f" ({', '.join(near)})" if near else "")
    return f"the LoRA does not fit {base_name}: {lora}; base: {describe(config)} ({why})"


__all__ = [
    "check_fits", "known_configs", "linear_shapes", "lora_fits",
]
