"""Small helpers shared by the method files."""

from __future__ import annotations

import torch

from mergelab.methods.base import MergeInputs

CHUNK = 1 << 20  # elements per step of chunked passes (4 MB of float32): bounded temporaries, few Python steps


HALF = (torch.bfloat16, torch.float16)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the inputs already are: what mergekit's linear and slerp compute in,
    and what a LoRA update is added to its weight in (`lora/apply.py`, as PEFT)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def promoted_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype torch promotes all `tensors` to (bfloat16 stays bfloat16)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def compute_dtype(inputs: MergeInputs) -> torch.dtype:
    """The dtype most of mergekit's methods compute in: the inputs' promoted dtype, so bfloat16 over
    bfloat16 inputs (a `dtype: bfloat16` recipe); float32 instead under `arithmetic: float32`."""
    dtype = promoted_dtype(inputs.tensors + ([inputs.base] if inputs.base is not None else []))
    return torch.float32 if inputs.float32_arithmetic and dtype in HALF else dtype


def result_dtype(inputs: MergeInputs, work: torch.dtype) -> torch.dtype:
    """What a method computing in `work` returns: mergekit rounds a half-precision merge to the inputs'
    dtype (then to the output's); under `arithmetic: float32` it goes straight to the output dtype."""
    dtype = compute_dtype(inputs)
    return dtype if dtype in HALF else (inputs.out_dtype or work)


def aligned(inputs: MergeInputs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs and the base (if any) in `compute_dtype` (bfloat16 stays bfloat16 unless widened).

    mergekit's methods other than linear and slerp compute in this dtype, so over bfloat16 inputs
    their arithmetic is bfloat16; the methods that mirror them call this."""
    dtype = compute_dtype(inputs)
    xs = [x.to(dtype) for x in inputs.tensors]
    return xs, (inputs.base.to(dtype) if inputs.base is not None else None)
