"""Linear: a weighted average of the models, out = sum_i w_i x_i / sum_i w_i.

Source: Wortsman et al., Model soups, arXiv:2203.05482. With `normalize: false` the weights
are used as given (a weighted sum). Every listed model is an input, the base model included
(as in mergekit, a `base_model` that is not listed in `models` joins them and needs a weight).
"""

from __future__ import annotations

import torch

from mergelab.methods._common import work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param


class Linear(MergeMethod):
    name = "linear"
    base_policy = "input"
    params = (
        Param("weight", float, "model", doc="this model's weight"),
        Param("normalize", bool, "global", True, doc="divide by the sum of the weights"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        first = inputs.tensors[0]
        weights = [float(p["weight"]) for p in inputs.params]
        out = torch.zeros(first.shape, dtype=work_dtype(first), device=first.device)
        for x, w in zip(inputs.tensors, weights):
            out.add_(x, alpha=w)  # accumulates in float32 without a converted copy of x
        if inputs.options["normalize"]:
            out /= sum(weights)
        return out
