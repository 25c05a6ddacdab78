"""Passthrough: copy the one input tensor unchanged (optionally times `scale`).

Used with `slices` to stack layers from different models ("frankenmerges"); every output
tensor must come from exactly one source.
"""

from __future__ import annotations

import torch

from mergelab.methods.base import MergeInputs, MergeMethod, Param


class Passthrough(MergeMethod):
    name = "passthrough"
    elementwise = True
    base_policy = "input"
    max_inputs = 1
    params = (Param("scale", float, "model", None, doc="multiply the tensor by this value"),)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        (x,) = inputs.tensors
        scale = inputs.params[0].get("scale")
        return x if scale is None else x * scale
