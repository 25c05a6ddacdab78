"""RAM+ (tensor-local): RAM, with each model's unique entries scaled up by how much it overlaps.

Source: Reinforced Agent Merging, arXiv:2601.13572 (RAM+), as in mergekit's ramplus_tl; the
ratio is taken per tensor ("tensor-local"), not over the whole model. With RAM's c_i and n
(`ram.py`), per tensor and model i:

    shared_i = #{entries: c_i and n > 1}          entries model i changed together with others
    unique_i = #{entries: c_i and n = 1}          entries model i alone changed
    rho_i    = shared_i / max(unique_i, epsilon)
    s_i      = 1 + r * clamp(rho_i, 0, alpha)
    out      = b + sum_i (s_i c_i d_i [n = 1] + c_i d_i [n > 1] / n)

A model whose changes mostly overlap others' has its few unique ones boosted (by at most
r * alpha: 2% with the defaults), making up for what the averaging of shared entries took.
Computed in the inputs' dtype, as mergekit; s is float32 there and here, so over bfloat16
inputs the result is float32 before the output cast.
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param
from mergelab.methods.ram import EPSILON, Changes, changes, ram_merge


def unique_scale(c: Changes, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """s_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), shape (N,)."""
    shared = (c.changed & c.shared).sum(dim=1)  # (N,) int
    unique = (c.changed & c.unique).sum(dim=1)  # (N,) int
    rho = shared / unique.clamp(min=epsilon)  # (N,) float32
    return 1 + r * rho.clamp(min=0, max=alpha)


class RamPlusTl(MergeMethod):
    name = "ramplus_tl"
    base_policy = "required"
    params = (
        Param("r", float, "global", 0.1, low=0.0, doc="strength of the boost of each model's unique entries"),
        Param("alpha", float, "global", 0.2, low=0.0, doc="cap on the overlap ratio rho"),
        EPSILON,
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        xs, base = aligned(inputs)
        assert base is not None
        opts = inputs.options
        c = changes(xs, base, float(opts["epsilon"]))
        scale = unique_scale(c, float(opts["r"]), float(opts["alpha"]), float(opts["epsilon"]))
        return ram_merge(c, base, scale)
