"""Model Stock: move from the base towards the average of N fine-tunes by a factor set by
the angle between their task vectors.

Source: Jang et al., Model Stock, arXiv:2403.19522 (eq. 2), as in mergekit. With w_0 the base,
w_1..w_N the fine-tunes and cos(theta) the mean pairwise cosine of the offsets w_i - w_0
(over the whole tensor, or per row with `filter_wise: true`):

    t   = N cos(theta) / (1 + (N - 1) cos(theta))
    out = t * mean_i(w_i) + (1 - t) * w_0

Where the denominator is ~0 (|.| < 1e-6) the base is kept. Needs a base and >= 2 fine-tunes.
In the inputs' dtype, as mergekit 0.1.5 (bfloat16 arithmetic for a `dtype: bfloat16` recipe),
unless `arithmetic: float32`.
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param


class ModelStock(MergeMethod):
    name = "model_stock"
    base_policy = "required"
    min_inputs = 2
    params = (Param("filter_wise", bool, "global", False, doc="one angle per row instead of per tensor"),)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        ws, w0 = aligned(inputs)
        assert w0 is not None
        shape = w0.shape
        if inputs.options["filter_wise"]:
            if w0.dim() == 1:
                w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offsets = [w - w0 for w in ws]
        # mean pairwise cosine of the offsets, per row or for the whole tensor
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
                cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (rows, 1) or (1,)
        n = len(ws)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
        average = sum(ws) / n
        return (t * average + (1 - t) * w0).reshape(shape)
