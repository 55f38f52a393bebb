"""Errors of the patch registry, each saying what was asked, why it cannot be done, and what to do instead.

All are `CogsurgeonError`s: the CLI prints them as one line and exits 2. Torch-free, like `inspector.errors`.
"""

from cogsurgeon.inspector.errors import CogsurgeonError


class PatchError(CogsurgeonError):
    """A patch request that cannot be met; the model is left as it was."""


class UnknownPatchError(PatchError):
    """A patch name that no built-in or installed (`cogsurgeon.patches` entry point) patch has."""


class PatchTargetError(PatchError):
    """The object given is not a CogVideoX transformer, nor a pipeline holding one, or its attention is not the
    CogVideoX attention the patches know."""


class PatchAlreadyAppliedError(PatchError):
    """The same patch applied twice to one model."""


class PatchConflictError(PatchError):
    """Two patches whose attention rules do not compose (e.g. causal and frame-causal)."""


class PatchNotAppliedError(PatchError):
    """Reverting a patch that is not on the model."""


class AttentionMaskError(PatchError):
    """An `attention_mask` that is not one of the accepted forms, or that arrives where no patch handles masks."""


class PatchParameterError(PatchError):
    """An option a patch does not declare, of the wrong type, or out of range; `.patch` and `.parameter` name it."""

    def __init__(self, patch: str, parameter: str, message: str):
        super().__init__(message)
        self.patch = patch
        self.parameter = parameter

    def __reduce__(self):
        return type(self), (self.patch, self.parameter, str(self))


class PatchSpecError(PatchError):
    """A `NAME:key=value,...` patch spec that does not parse."""


__all__ = [
    "AttentionMaskError", "PatchAlreadyAppliedError", "PatchConflictError", "PatchError", "PatchNotAppliedError",
    "PatchParameterError", "PatchSpecError", "PatchTargetError", "UnknownPatchError",
]
