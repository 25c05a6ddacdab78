"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere,
scaled by their mean norm.

Source: Karcher, Riemannian center of mass and mollifier smoothing (1977); for model merging
arXiv:2603.04972, as in mergekit's karcher. Every model is an input at weight a_i = 1/N (a base
model, if given, is one more input); each tensor x_i is one flat vector:

1) directions  n_i = |x_i|, u_i = x_i / n_i (0 where n_i = 0); only the inputs with n_i > tol
               take part in the direction, at weights a'_i = a_i / sum of theirs
2) start       m = sum_i a'_i u_i / |.|   (the first such u_i where that norm is below tol)
3) iterate     up to max_iter times (a Riemannian gradient step from m):
                 c_i = clamp(<m, u_i>, -1, 1), theta_i = arccos(c_i)
                 g   = sum_{theta_i >= tol} a'_i theta_i / sin(theta_i) (u_i - c_i m)   (log maps)
                 stop if |g| < tol
                 m  <- cos(|g|) m + sin(|g|) g / |g|,  then m / |m| if |m| > tol    (exp map)
4) rescale     out = (sum_i a_i n_i) m    (every input's norm, weights 1/N)

A single input is returned unchanged; if no norm exceeds tol the result is zero. As in mergekit,
norms are float32 (float64 for float64 inputs) and the directions stay in the inputs' dtype.
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned, work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param


def _norm(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(v.to(dtype))  # () in `dtype`


def _log_sum(mean: torch.Tensor, units: list[torch.Tensor], weights: list[float], tol: float) -> torch.Tensor:
    """3) g = sum_i a'_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) over the u_i not within tol of m."""
    g = torch.zeros_like(mean)
    for a, u in zip(weights, units):
        cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
        theta = torch.arccos(cos)
        if theta.item() < tol:
            continue
        g += a * (theta / torch.sin(theta)) * (u - cos * mean)
    return g


def karcher_mean(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    dtype = work_dtype(xs[0])
    alphas = [1.0 / len(xs)] * len(xs)
    # 1) directions; the inputs with a norm above tol, and their renormalised weights
    norms = [_norm(x, dtype) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    weights, units = [alphas[i] / total for i in valid], [units[i] for i in valid]
    # 2) start from the normalised weighted mean of the directions
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean += a * u
    length = _norm(mean, dtype)
    mean = units[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    # 3) gradient steps on the sphere
    for _ in range(max_iter):
        g = _log_sum(mean, units, weights, tol)
        step = _norm(g, dtype)
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (g / step)).to(mean.dtype)
        length = _norm(mean, dtype)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    # 4) at the mean norm of all the inputs
    return sum(a * n for a, n in zip(alphas, norms)) * mean


class Karcher(MergeMethod):
    name = "karcher"
    base_policy = "input"
    params = (
        Param("max_iter", int, "global", 10, low=0, doc="most gradient steps on the sphere"),
        Param("tol", float, "global", 1e-5, low=0.0, doc="stop when the step is shorter; norms at or below it are left out"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        xs, _ = aligned(inputs)
        if len(xs) == 1:
            return xs[0]
        return karcher_mean(xs, int(inputs.options["max_iter"]), float(inputs.options["tol"]))
