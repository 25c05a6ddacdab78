"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere.

Source: Goddard, Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as in
mergekit's multislerp. Weights w_i are divided by their sum (unless `normalize_weights: false`);
v_i = x_i - b with a base model, else x_i; each tensor is one flat vector:

1) project      u_i = v_i / (|v_i| + eps)                            onto the unit sphere
2) mean         m = sum_i w_i u_i,  m <- m / |m|                      weighted mean, back on the sphere
3) tangent      t_i = u_i - <u_i, m> m,  t = sum_i w_i t_i            interpolate in the plane at m
4) exp map      r = |t| + eps,  u = cos(r) m + sin(r) / r * t         back onto the sphere
5) rescale      out = (sum_i w_i |v_i|) u  (+ b)                      at the weighted mean norm

In exact arithmetic steps 3-4 change nothing: sum_i w_i t_i = M - <M, m> m is the tangent part of
M = sum_i w_i u_i at its own direction m, zero; so the result is the normalised weighted mean of the
unit vectors at the weighted mean norm (for two models at equal weights, SLERP's midpoint; at
other weights not SLERP's point). The steps are kept for mergekit's rounding.

A single model is returned unchanged. Where |m| < eps (the unit vectors cancel out, e.g. v and
-v at equal weights) two models give the linear w_0 v_0 + w_1 v_1 (+ b); with more it is an
error. Computed in the inputs' dtype, as mergekit (no upcast).
"""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError
from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param


def multislerp(vectors: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Steps 1-5 for vectors (N, n) and weights (N,); None where the weighted mean of the unit vectors vanishes."""
    norms = torch.norm(vectors, dim=-1, keepdim=True)  # (N, 1)
    units = vectors / (norms + eps)  # (N, n)
    mean = (units * weights.view(-1, 1)).sum(0)  # (n,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return None
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)  # (N, 1)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)  # (n,)
    r = torch.norm(tangent) + eps
    out = mean * torch.cos(r) + tangent * (torch.sin(r) / r)
    return out * (norms.squeeze(-1) * weights).sum()


class MultiSlerp(MergeMethod):
    name = "multislerp"
    base_policy = "optional"
    min_inputs = 1
    params = (
        Param("weight", float, "model", doc="this model's weight in the spherical mean"),
        Param("normalize_weights", bool, "global", True, doc="divide the weights by their sum"),
        Param("eps", float, "global", 1e-8, low=0.0, doc="added to norms; below it the mean direction counts as zero"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        xs, base = aligned(inputs)
        if len(xs) == 1:
            return xs[0]
        vectors = torch.stack(xs)  # (N, *shape)
        if base is not None:
            vectors -= base
        weights = torch.tensor([float(p["weight"]) for p in inputs.params], dtype=vectors.dtype, device=vectors.device)
        if inputs.options["normalize_weights"]:
            weights = weights / weights.sum()
        out = multislerp(vectors.view(len(xs), -1), weights, float(inputs.options["eps"]))
        if out is None:
            if len(xs) != 2:
                raise RecipeError(f"tensor '{inputs.name}': multislerp: the weighted mean of the models' directions is zero "
                                  "(opposite models whose weights cancel out); change models[*].parameters.weight")
            out = vectors[0] * weights[0] + vectors[1] * weights[1]
        out = out.view(xs[0].shape)
        return out + base if base is not None else out
