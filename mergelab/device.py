"""The torch device a merge, a composition or a worker computes on, checked before any work.

A module of its own, below everything that takes a `device` argument (the executor, LoRA
composition and extraction, the search's workers), so none of them imports another for it.
"""

from __future__ import annotations

import torch

from mergelab.errors import RecipeError


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, checked to exist: `cpu`, `cuda`, `cuda:1`, `mps`."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"--device: unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RecipeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
