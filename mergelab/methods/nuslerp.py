"""NuSLERP: SLERP between two models with mergekit's "new" semantics.

Source: mergekit's nuslerp. The interpolation factor comes from the two models' weights,
t = w_1 / (w_0 + w_1) (0.5 if the weights sum to ~0). With a base model, the two *task
vectors* x_i - b are interpolated and b is added back. Vectors are the whole tensor
(`nuslerp_flatten: true`, default), or with `nuslerp_flatten: false` the slices x[i, :] along
the last dim, or the slices x[:, j] along dim 0 with `nuslerp_row_wise: true` (mergekit's name):

    u_i   = v_i / max(|v_i|, 1e-7)          per vector
    theta = arccos(clamp(<u_0, u_1>, -1, 1))
    out   = (sin((1-t) theta) v_0 + sin(t theta) v_1) / sin(theta)
    out   = (1-t) v_0 + t v_1   where 1 - cos^2(theta) <= 1e-16 (colinear)

in the inputs' dtype, as mergekit 0.1.5 (bfloat16 arithmetic for a `dtype: bfloat16` recipe),
unless `arithmetic: float32`.
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param

EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


class Nuslerp(MergeMethod):
    name = "nuslerp"
    base_policy = "optional"
    min_inputs = 2
    max_inputs = 2
    params = (
        Param("weight", float, "model", doc="t = w_1 / (w_0 + w_1)"),
        Param("nuslerp_row_wise", bool, "global", False, doc="with nuslerp_flatten false: interpolate the x[:, j] (dim 0) instead of the x[i, :]"),
        Param("nuslerp_flatten", bool, "global", True, doc="interpolate the whole tensor as one vector"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        (x0, x1), b = aligned(inputs)
        w0, w1 = (float(p["weight"]) for p in inputs.params)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        dim = 0 if inputs.options["nuslerp_row_wise"] else -1
        flatten = inputs.options["nuslerp_flatten"]
        if b is None:
            return nuslerp(t, x0, x1, dim=dim, flatten=flatten)
        return b + nuslerp(t, x0 - b, x1 - b, dim=dim, flatten=flatten)
