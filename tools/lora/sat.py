"""The SAT reader: LoRA weights out of `mp_rank_00_model_states.pt`, loaded only with `torch.load(weights_only=True)`
(tools/lora/torch_pickle.py, which also refuses the torch releases where that is unsafe) plus an explicit allow-list
of the numpy globals that rebuild SAT's saved numpy rng state (`np_rng_state`, saved unless `--no-save-rng`); any
other global refuses the file. Imports torch: imported only when a SAT checkpoint is given. The fused
`query_key_value` LoRA is split into to_q/to_k/to_v as CogVideo's `tools/export_sat_lora_weight.py` does: SAT keeps
one A/B pair per partition (.0 .1 .2).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cogsurgeon.tools.lora.checkpoint import LoraCheckpointError, LoraTensor
from cogsurgeon.tools.lora.torch_pickle import SAFETENSORS_DTYPE as _SAFETENSORS_DTYPE  # noqa: F401 - dcp.py's import
from cogsurgeon.tools.lora.torch_pickle import load_weights_only
from cogsurgeon.tools.lora.torch_pickle import tensor_payload as _payload

_SAT_LORA_KEY = re.compile(
    r"^(?:model\.diffusion_model\.)?(?:transformer\.)?layers\.(?P<layer>\d+)\.attention\."
    r"(?P<linear>query_key_value|dense)\.matrix_(?P<part>[AB])\.(?P<partition>\d+)$"
)
_PARTITION_TARGETS = {("query_key_value", "0"): "to_q", ("query_key_value", "1"): "to_k",
                      ("query_key_value", "2"): "to_v", ("dense", "0"): "to_out.0"}


def sat_module_name(key: str) -> tuple[str, str] | None:
    """`…layers.3.attention.query_key_value.matrix_A.1` -> (`transformer_blocks.3.attn1.to_k`, "A")."""
    match = _SAT_LORA_KEY.match(key)
    target = _PARTITION_TARGETS.get((match["linear"], match["partition"])) if match else None
    if match is None or target is None:
        return None
    return f"transformer_blocks.{match['layer']}.attn1.{target}", match["part"]


def _state_dict(saved: Any) -> dict[str, Any]:
    """Where the weights sit in a SAT/DeepSpeed save: under "module", "model" or "state_dict"."""
    state = saved
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise LoraCheckpointError("the SAT checkpoint holds no state dict")
    return state


def read_sat_lora(path: Path) -> tuple[list[tuple[str, LoraTensor]], list[str]]:
    """The LoRA tensors of a SAT checkpoint as (original key, tensor) pairs, and the LoRA-looking keys that match no
    known target. The rest of the model (SAT saves it all) is ignored."""
    import torch

    saved = load_weights_only(path, numpy_rng_globals())
    found: list[tuple[str, LoraTensor]] = []
    unknown: list[str] = []
    for key, value in _state_dict(saved).items():
        if not isinstance(key, str) or ".matrix_" not in key:
            continue
        named = sat_module_name(key)
        if named is None or not isinstance(value, torch.Tensor) or str(value.dtype) not in _SAFETENSORS_DTYPE:
            unknown.append(key)  # no known target, or not a float tensor
            continue
        module, part = named
        tensor = value.detach()
        found.append((key, LoraTensor(module, part, _SAFETENSORS_DTYPE[str(tensor.dtype)], tuple(tensor.shape),
                                      tensor.numel() * tensor.element_size(), payload=_payload(tensor))))
    return found, unknown


def numpy_rng_globals() -> list[Any]:
    """What `pickle` needs to rebuild `np.random.get_state()` (a tuple holding a uint32 ndarray): the ndarray
    reconstructor, ndarray, dtype and the uint32 dtype class, under the names numpy 1.x and 2.x pickle them by.
    Nothing that can run code: these build arrays of numbers."""
    import numpy

    reconstruct = numpy.ndarray.__reduce__(numpy.zeros(1))[0]  # numpy's own _reconstruct, whatever module holds it
    allowed: list[Any] = [reconstruct, numpy.ndarray, numpy.dtype,
                          (reconstruct, "numpy.core.multiarray._reconstruct"),
                          (reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(numpy, "dtypes", None)
    for name in ("UInt32DType", "Int64DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


__all__ = [
    "read_sat_lora", "sat_module_name",
]
