"""Small helpers shared by the method files."""

from __future__ import annotations

import torch

CHUNK = 1 << 18  # elements per step of element-wise passes (~1 MB of float32: stays in cache)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Merges compute in float32, or float64 when the inputs already are."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
