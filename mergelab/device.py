"""The torch device a merge, a composition or a worker computes on, checked before any work.

A module of its own, below everything that takes a `device` argument (the executor, LoRA
composition and extraction, the search's workers), so none of them imports another for it.
"""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError

ARG = ("device",)  # the argument the errors name


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, checked to exist: `cpu`, `cuda`, `cuda:1`, `mps`."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"device={str(device)!r}: unknown device; use cpu, cuda or cuda:N", arguments=ARG) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device={str(device)!r}: no CUDA device is available on this machine; use device='cpu'", arguments=ARG)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RecipeError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here", arguments=ARG)
    return dev
