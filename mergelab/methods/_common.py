"""Small helpers shared by the method files."""

from __future__ import annotations

import torch

from mergelab.methods.base import MergeInputs

CHUNK = 1 << 18  # elements per step of element-wise passes (~1 MB of float32: stays in cache)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Merges compute in float32, or float64 when the inputs already are."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def promoted_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype torch promotes all `tensors` to (bfloat16 stays bfloat16)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def aligned(inputs: MergeInputs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs and the base (if any) in their promoted dtype, without upcasting.

    mergekit's newer methods (multislerp, sce, ram, nearswap, ...) compute in this dtype, so over
    bfloat16 inputs their arithmetic is bfloat16; the methods that mirror them call this."""
    every = inputs.tensors + ([inputs.base] if inputs.base is not None else [])
    dtype = promoted_dtype(every)
    xs = [x.to(dtype) for x in inputs.tensors]
    return xs, (inputs.base.to(dtype) if inputs.base is not None else None)
