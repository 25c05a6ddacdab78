"""Linear: a weighted average of the models, out = sum_i w_i x_i / sum_i w_i.

Source: Wortsman et al., Model soups, arXiv:2203.05482. With `normalize: false` the weights
are used as given (a weighted sum). Every listed model is an input, the base model included
(as in mergekit, a `base_model` that is not listed in `models` joins them and needs a weight).
"""

from __future__ import annotations

import torch

from mergelab.methods._common import CHUNK, work_dtype
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
        work = work_dtype(first)
        weights = [float(p["weight"]) for p in inputs.params]
        total = sum(weights) if inputs.options["normalize"] else 1.0
        xs = [x.reshape(-1) for x in inputs.tensors]
        out = torch.empty(first.numel(), dtype=inputs.out_dtype or work, device=first.device)
        for start in range(0, first.numel(), CHUNK):  # cache-sized chunks, accumulated in float32
            stop = start + CHUNK
            acc = torch.zeros(xs[0][start:stop].shape, dtype=work, device=first.device)
            for x, w in zip(xs, weights):
                acc.add_(x[start:stop], alpha=w)
            if total != 1.0:
                acc /= total
            out[start:stop] = acc
        return out.reshape(first.shape)
