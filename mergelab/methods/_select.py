"""Exact rank selection without a full sort.

TIES, breadcrumbs and their kin keep the top-k magnitudes of every task vector. A full sort
(or `torch.kthvalue`) of a 100M-element tensor costs seconds; instead we find the value at a
given rank exactly in three cheap passes:

1) sort a strided sample of ~64K elements and read off a bracket [lo, hi] that holds the
   wanted rank with overwhelming probability (the bracket is verified, never trusted);
2) one pass counts the elements below `lo` and gathers those inside the bracket;
3) `kthvalue` on the few gathered elements gives the exact value.

Ties are broken by position (the earlier element ranks lower), so the masks below keep
exactly the number of elements asked for, as an argsort-based selection does.

A search asks for masks of the same magnitudes at many densities: it sorts once
(`ascending_ranks`, remembered) and passes the ranks, and each mask is one comparison.
"""

from __future__ import annotations

import math

import torch

_SAMPLE = 1 << 16
_SMALL = 1 << 17
_CHUNK = 1 << 20


def value_at_rank(v: torch.Tensor, r: int) -> tuple[torch.Tensor, int, int]:
    """Value of 0-based ascending rank `r` in flat `v`, with the counts below and equal to it."""
    n = v.numel()
    if n <= _SMALL:
        val = v.kthvalue(r + 1).values
        return val, int((v < val).sum()), int((v == val).sum())
    # 1) bracket from a strided sample; slack of ~4 standard deviations of the sample rank
    stride = n // _SAMPLE
    sample = v[::stride].sort().values
    m = sample.numel()
    pos = (r + 0.5) * m / n
    slack = 4.0 * math.sqrt(m * (r + 1) / n * (1 - r / n)) + 8
    i_lo, i_hi = int(pos - slack), int(pos + slack)
    lo = sample[i_lo] if i_lo >= 0 else None
    hi = sample[i_hi] if i_hi < m else None
    # 2) count below the bracket, gather inside it (cache-sized chunks)
    below, parts = 0, []
    for start in range(0, n, _CHUNK):
        chunk = v[start : start + _CHUNK]
        inside_mask = chunk >= lo if lo is not None else torch.ones_like(chunk, dtype=torch.bool)
        below += chunk.numel() - int(torch.count_nonzero(inside_mask))
        if hi is not None:
            inside_mask &= chunk <= hi
        parts.append(chunk[inside_mask])
    inside = torch.cat(parts)
    if not below <= r < below + inside.numel():  # the sample lied: exact fallback
        val = v.kthvalue(r + 1).values
        return val, int((v < val).sum()), int((v == val).sum())
    # 3) exact selection among the few
    val = inside.kthvalue(r - below + 1).values
    return val, below + int((inside < val).sum()), int((inside == val).sum())


def ascending_ranks(v: torch.Tensor) -> torch.Tensor | None:
    """Each element's ascending rank in `v` (shape of `v`; int32, int64 past 2**31 elements), ties
    broken by position as in the masks here. None when `v` holds a NaN: a sort places NaNs where
    the selection does not, so such masks are made by the selection."""
    flat = v.reshape(-1)
    if bool(torch.isnan(flat).any()):
        return None
    n = flat.numel()
    dtype = torch.int32 if n < 2**31 else torch.int64
    ranks = torch.empty(n, dtype=dtype, device=v.device)
    ranks[flat.argsort(stable=True)] = torch.arange(n, dtype=dtype, device=v.device)
    return ranks.reshape(v.shape)


def rank_at_least(v: torch.Tensor, r: int, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (shape of `v`) of the elements whose ascending rank is >= r: the top n - r.

    `ranks`: `ascending_ranks(v)`, when known; then the mask is one comparison."""
    if ranks is not None:
        return ranks >= r
    n = v.numel()
    if r <= 0:
        return torch.ones_like(v, dtype=torch.bool)
    if r >= n:
        return torch.zeros_like(v, dtype=torch.bool)
    flat = v.reshape(-1)
    val, n_less, n_equal = value_at_rank(flat, r)
    wanted_equal = n_less + n_equal - r  # how many of the tied elements rank >= r
    if wanted_equal == n_equal:
        return v >= val
    mask = flat >= val
    # the first (n_equal - wanted_equal) tied positions rank below r: drop them, scanning only
    # as far as needed
    to_drop = n_equal - wanted_equal
    for start in range(0, n, _CHUNK):
        tied = torch.nonzero(flat[start : start + _CHUNK] == val).squeeze(1)[:to_drop]
        mask[start + tied] = False
        to_drop -= tied.numel()
        if to_drop == 0:
            break
    return mask.reshape(v.shape)


def top_k_mask(v: torch.Tensor, k: int, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k largest elements of `v` (ties: earlier positions lose)."""
    return rank_at_least(v, v.numel() - k, ranks)


def rank_window_mask(v: torch.Tensor, lo: int, hi: int, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the elements whose ascending rank lies in [lo, hi)."""
    return rank_at_least(v, lo, ranks) & ~rank_at_least(v, hi, ranks)
