"""NearSwap: move every entry of the base towards one other model by at most `t`.

Source: alchemonaut, QuartetAnemoi-70B-t0.0001 (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001),
as in mergekit's nearswap. With base a, the other model b and threshold t, per entry:

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w b + (1 - w) a

For t >= 0 and |a - b| >= 1e-6 that is a + min(t, |b - a|) sign(b - a): entries within t of each
other take b's value (they are "swapped"), the others move from a towards b by t. t <= 0 keeps
the base. Needs the base and exactly one other model; computed
in the inputs' dtype, as mergekit (no upcast).
"""

from __future__ import annotations

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param


def nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)  # share of b per entry
    return w * b + (1 - w) * a


class NearSwap(MergeMethod):
    name = "nearswap"
    elementwise = True
    base_policy = "required"
    min_inputs = 1
    max_inputs = 1
    params = (Param("t", float, "global", doc="largest step of an entry towards the other model; closer entries take its value"),)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        (x,), base = aligned(inputs)
        assert base is not None
        return nearswap(float(inputs.options["t"]), base, x)
