"""RAM: Reinforced Agent Merging - average each entry over only the models that changed it.

Source: Reinforced Agent Merging, arXiv:2601.13572, as in mergekit's ram. For base b and task
vectors d_i = x_i - b (i = 1..N), per entry:

    c_i = [|d_i| > epsilon]                        model i changed the entry
    n   = sum_i c_i                                how many models did
    out = b + sum_i c_i d_i / max(n, 1)

An entry that one model alone changed keeps that model's whole change (a plain average would
divide it by N); one that several changed gets their mean; one that none changed stays b.
`ramplus_tl.py` adds a per-model rescaling of the unique entries (RAM+). Computed in the inputs'
dtype, as mergekit (no upcast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelab.methods._common import aligned
from mergelab.methods.base import MergeInputs, MergeMethod, Param

EPSILON = Param("epsilon", float, "global", 1e-5, low=0.0, doc="a task-vector entry counts as changed where |x - b| > epsilon")


@dataclass(frozen=True)
class Changes:
    """Who changed which entry: the flat task vectors and the masks every RAM variant uses."""

    deltas: torch.Tensor  # (N, n) d_i
    changed: torch.Tensor  # (N, n) bool, c_i
    counts: torch.Tensor  # (1, n) models that changed each entry
    unique: torch.Tensor  # (1, n) bool, exactly one did
    shared: torch.Tensor  # (1, n) bool, more than one did


def changes(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> Changes:
    deltas = torch.stack([x - base for x in xs]).view(len(xs), -1)  # (N, n)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)  # (1, n)
    return Changes(deltas, changed, counts, counts == 1, counts > 1)


def ram_merge(c: Changes, base: torch.Tensor, unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """b + sum_i (c_i d_i [n = 1] s_i + c_i d_i [n > 1] / max(n, 1)); `unique_scale` s (N,), 1 if None."""
    kept = c.deltas * c.changed  # (N, n)
    alone = kept * c.unique
    if unique_scale is not None:
        alone = alone * unique_scale.unsqueeze(-1)  # RAM+: a float32 scale (promotes, as in mergekit)
    merged = (alone + kept * c.shared / c.counts.clamp(min=1)).sum(dim=0, keepdim=True)  # (1, n)
    return base + merged.reshape_as(base)


class Ram(MergeMethod):
    name = "ram"
    elementwise = True
    base_policy = "required"
    params = (EPSILON,)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        xs, base = aligned(inputs)
        assert base is not None
        return ram_merge(changes(xs, base, float(inputs.options["epsilon"])), base)
