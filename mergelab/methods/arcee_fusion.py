"""Arcee Fusion: keep the other model's changes only where they are outliers of importance.

Source: Arcee AI (https://arcee.ai; no paper),
as in mergekit's arcee_fusion. With base b and the other model x, per tensor (rows are the
slices x[..., :] along the last dim; a 1-D tensor is one row):

1) distributions  p = softmax(x) + 1e-8, q = softmax(b) + 1e-8         per row
2) divergence     KL = sum p log(p / q)                                  per row, (rows, 1)
3) importance     s = |x - b| * KL                                       per entry
4) threshold      T = Q2(s) + 1.5 (Q3(s) - Q1(s))                       Tukey's upper fence
5) fuse           out = b + (x - b) [s >= T]

Q1, Q2, Q3 are the entries of ascending rank floor(q (n - 1)) of s for q = 1/4, 1/2, 3/4 (no
interpolation). mergekit estimates them from 1M draws with replacement from the global RNG when
s has more than 1M entries; mergelab always takes the exact ranks (`_select.value_at_rank`,
deterministic), so above 1M entries the fence, and a few of the entries kept, can differ from
mergekit's (which differs between runs). Computed in the inputs' dtype, as mergekit; the 0/1
mask is float32 there and here, so over bfloat16 inputs step 5 adds in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergelab.methods._common import aligned
from mergelab.methods._select import value_at_rank
from mergelab.methods.base import MergeInputs, MergeMethod

EPS = 1e-8


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """1)-3) |x - b| times the KL divergence of the rows' softmaxes, shape of x."""
    p = F.softmax(x, dim=-1) + EPS
    q = F.softmax(base, dim=-1) + EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (rows, 1)
    return (x - base).abs() * kl


def upper_fence(scores: torch.Tensor) -> torch.Tensor:
    """4) median + 1.5 * interquartile range, from the exact order statistics."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (value_at_rank(flat, rank)[0] for rank in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    base_policy = "required"
    min_inputs = 1
    max_inputs = 1

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        (x,), base = aligned(inputs)
        assert base is not None
        scores = importance(x, base)
        keep = (scores >= upper_fence(scores)).float()  # float32, as mergekit
        return base + (x - base) * keep
