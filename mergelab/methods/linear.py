"""Linear: a weighted average of the models, out = sum_i w_i x_i / sum_i w_i.

Source: Wortsman et al., Model soups, arXiv:2203.05482. With `normalize: false` the weights
are used as given (a weighted sum). Every listed model is an input, the base model included
(as in mergekit, a `base_model` that is not listed in `models` joins them and needs a weight).
As mergekit 0.1.5: the weights and the sum in float32 (float64 for float64 inputs) whatever the
inputs' dtype, the result rounded to the inputs' dtype (unless `arithmetic: float32`).
"""

from __future__ import annotations

import torch

from mergelab.methods._common import CHUNK, result_dtype, work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param


class Linear(MergeMethod):
    name = "linear"
    elementwise = True
    base_policy = "input"
    params = (
        Param("weight", float, "model", doc="this model's weight"),
        Param("normalize", bool, "global", True, doc="divide by the sum of the weights"),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        first = inputs.tensors[0]
        work = work_dtype(first)
        weights = torch.tensor([float(p["weight"]) for p in inputs.params], dtype=work, device=first.device)  # (models,)
        total = weights.sum() if inputs.options["normalize"] else None
        xs = [x.reshape(-1) for x in inputs.tensors]
        out = torch.empty(first.numel(), dtype=result_dtype(inputs, work), device=first.device)
        for start in range(0, first.numel(), CHUNK):  # chunk by chunk, accumulated in `work`
            stop = start + CHUNK
            acc = torch.zeros(xs[0][start:stop].shape, dtype=work, device=first.device)
            for x, w in zip(xs, weights):
                acc.addcmul_(x[start:stop], w)  # acc += x * w, as mergekit
            if total is not None:
                acc.div_(total)
            out[start:stop] = acc
        return out.reshape(first.shape)
