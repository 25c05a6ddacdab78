"""SLERP: spherical linear interpolation between the base model (t = 0) and one other (t = 1).

Source: Shoemake, Animating rotation with quaternion curves (1985); as in mergekit 0.1.5's
`slerp`, op for op. Each tensor is one vector; with v0 = base, v1 = other:

    |v|   = norm of the norms of 1M-element chunks of v   (1 where below 1e-8)
    cos   = clamp(sum over chunks of <v0/|v0|, v1/|v1|>, -1, 1)
    theta = arccos(cos)
    out   = sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1

and plain linear interpolation (1-t) v0 + t v1 when |cos| > 0.9995 (nearly colinear). All of
it in float32 tensors (float64 for float64 inputs), t included, whatever the inputs' dtype; the
result is rounded to the inputs' dtype, as mergekit writes it, unless `arithmetic: float32`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from mergelab.methods._common import result_dtype, work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8
CHUNK = 1 << 20  # mergekit's slerp chunk (not `_common.CHUNK`): its norms and dot are sums over chunks of this many elements


def _chunks(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """(start, a chunk, b chunk) over two (1, n) tensors, the chunks (1, c) in `dtype`."""
    for start in range(0, a.shape[1], CHUNK):
        yield start, a[:, start : start + CHUNK].to(dtype), b[:, start : start + CHUNK].to(dtype)


def _norm_parts(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each chunk's two norms, (1, 1) each."""
    return [(torch.linalg.vector_norm(x, dim=1, keepdim=True), torch.linalg.vector_norm(y, dim=1, keepdim=True))
            for _, x, y in _chunks(a, b, dtype)]


def _norms(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1) each: the norm of the chunks' norms; 1 where it is below EPS."""
    norms = [torch.linalg.vector_norm(torch.stack(side), dim=0) for side in zip(*parts)]
    return tuple(torch.where(n > EPS, n, 1) for n in norms)  # type: ignore[return-value]


def _dot_parts(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, norm_a: torch.Tensor, norm_b: torch.Tensor) -> list[torch.Tensor]:
    """Each chunk's sum of the product of the normalised vectors, (1, 1)."""
    return [(x / norm_a * (y / norm_b)).sum(dim=1, keepdim=True) for _, x, y in _chunks(a, b, dtype)]


def _coefficients(t: float, dot_parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """2) the coefficients of v0 and v1 from the chunks' dot products (the linear ones when nearly colinear)."""
    tt = torch.tensor([[t]], dtype=dtype, device=device)  # (1, 1): t as mergekit holds it
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)  # (1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out_dtype: torch.dtype | None = None,
          coefficients: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SLERP of two same-shape tensors; the result in `out_dtype` (default: v0's dtype).

    `coefficients`: those of the whole tensors, when v0 and v1 are a block of them (`Slerp.block_stats`)."""
    dtype = work_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, n)
    result = torch.empty(a.shape, dtype=out_dtype or v0.dtype, device=a.device)
    if a.shape[1] == 0:
        return result.reshape(v0.shape)
    if coefficients is None:
        # 1) the norms, and the cosine of the angle summed over chunks of the normalised vectors; 2) coefficients
        norm_a, norm_b = _norms(_norm_parts(a, b, dtype))
        coefficients = _coefficients(t, _dot_parts(a, b, dtype, norm_a, norm_b), dtype, a.device)
    coef_a, coef_b = coefficients
    # 3) the weighted sum, chunk by chunk, rounded into the result
    for start, x, y in _chunks(a, b, dtype):
        result[:, start : start + CHUNK] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)


class Slerp(MergeMethod):
    name = "slerp"
    base_policy = "required"
    min_inputs = 1
    max_inputs = 1
    params = (Param("t", float, "global", low=0.0, high=1.0, doc="0 gives the base model, 1 the other"),)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        base = inputs.base
        return slerp(float(inputs.options["t"]), base, inputs.tensors[0], result_dtype(inputs, work_dtype(base)), inputs.stats)

    def blockwise(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        return True  # blocks are whole 1M-element chunks: the chunks' norms and dots are those of the whole tensor

    def block_passes(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        return True

    def block_stats(self, inputs: MergeInputs, blocks: Callable[[], Iterator[MergeInputs]], budget: int) -> Any:
        """The coefficients of the whole tensors, from two passes: the chunks' norms, then their dot products."""
        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.dtype]]:
            for block in blocks():
                assert block.base is not None
                yield block.base.reshape(1, -1), block.tensors[0].reshape(1, -1), work_dtype(block.base)

        parts = [part for a, b, dtype in pairs() for part in _norm_parts(a, b, dtype)]
        if not parts:
            return None
        norm_a, norm_b = _norms(parts)
        dots = [part for a, b, dtype in pairs() for part in _dot_parts(a, b, dtype, norm_a, norm_b)]
        return _coefficients(float(inputs.options["t"]), dots, dots[0].dtype, dots[0].device)
