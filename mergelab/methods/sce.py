"""SCE: Select, Calculate, Erase - weight each task vector by its own size, after a TIES-like sign vote.

Source: Wan et al., FuseChat (SCE merging), arXiv:2408.07990, as in mergekit's sce. For base b
and task vectors d_i = x_i - b (i = 1..N), per tensor:

1) select    keep the k = int(select_topk * #{nonzero variances}) entries of largest variance
             across the models, var_j = mean_i (d_ij - mean_i d_ij)^2; d_i <- d_i * keep
             (select_topk >= 1 keeps all, <= 0 none)
2) calculate w_i = mean_j d_ij^2 / sum_i mean_j d_ij^2     (1/N each if that sum is below 1e-6)
3) erase     s = sign(sum_i d_i) (0 counts as +); a_i = [sign(d_i) == s] (a zero entry never agrees)
4) merge     out = b + sum_i a_i w_i d_i / max(sum_i a_i w_i, 1e-6)

There are no per-model weights: step 2 makes them. Note the 1e-6 in step 2 is absolute, so
task vectors whose entries are below ~1e-3 (common in LLM fine-tunes) get equal weights.
Computed in the inputs' dtype, as mergekit (no upcast); ties at the cut-off of step 1 are
broken as `torch.topk` breaks them, as in mergekit.
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param


def select_mask(deltas: torch.Tensor, topk: float) -> torch.Tensor:
    """1) A 0/1 mask (shape of one task vector) of the entries with the largest variance across models."""
    if topk <= 0:
        return torch.zeros_like(deltas[0])
    if topk >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)  # (*shape)
    k = int(torch.count_nonzero(var) * topk)  # in float32, as mergekit
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def size_weights(deltas: torch.Tensor) -> torch.Tensor:
    """2) w_i proportional to the mean square of d_i, shape (N,)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def agreement(deltas: torch.Tensor) -> torch.Tensor:
    """3) a_i: d_i's sign is the elected sign of sum_i d_i (>= 0 counts as +), shape (N, *shape)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1  # (*shape) of +-1
    return deltas.sign() == elected


class Sce(MergeMethod):
    name = "sce"
    base_policy = "required"
    params = (
        Param("select_topk", float, "global", 1.0, 0.0, 1.0, doc="fraction of entries kept, by variance across the models"),
        Param("int8_mask", bool, "global", False, doc="accepted for mergekit compatibility (a mask's dtype, no effect on the result)"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        xs, base = aligned(inputs)
        assert base is not None
        deltas = torch.stack([x - base for x in xs])  # (N, *shape)
        topk = float(inputs.options["select_topk"])
        if topk < 1:
            deltas = deltas * select_mask(deltas, topk).unsqueeze(0)
        weights = size_weights(deltas).view(-1, *[1] * (deltas.dim() - 1))  # (N, 1, ...)
        erased = weights * agreement(deltas)  # a_i w_i
        return base + (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
