"""SLERP: spherical linear interpolation between the base model (t = 0) and one other (t = 1).

Source: Shoemake, Animating rotation with quaternion curves (1985); as used by mergekit.
Each tensor is treated as one vector; with v0 = base, v1 = other, both normalised for the angle:

    theta = arccos(<v0/|v0|, v1/|v1|>)
    out   = sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1

and plain linear interpolation (1-t) v0 + t v1 when |cos theta| > 0.9995 (nearly colinear).
Norms below 1e-8 count as 1, as in mergekit.
"""

from __future__ import annotations

import math

import torch

from mergelab.methods._common import work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    dtype = work_dtype(v0)
    a, b = v0.to(dtype), v1.to(dtype)
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    norm_a, norm_b = (norm_a if norm_a > EPS else 1.0), (norm_b if norm_b > EPS else 1.0)
    dot = max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:
        return a * (1 - t) + b * t
    theta = math.acos(dot)
    s = math.sin(theta)
    return a * (math.sin((1 - t) * theta) / s) + b * (math.sin(t * theta) / s)


class Slerp(MergeMethod):
    name = "slerp"
    base_policy = "required"
    min_inputs = 1
    max_inputs = 1
    params = (Param("t", float, "global", low=0.0, high=1.0, doc="0 gives the base model, 1 the other"),)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return slerp(float(inputs.options["t"]), inputs.base, inputs.tensors[0])
