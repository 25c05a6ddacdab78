"""Exact rank selection without a full sort, with mergekit's choice among equal values.

TIES, breadcrumbs and their kin keep the top-k magnitudes of every task vector. A full sort
(or `torch.kthvalue`) of a 100M-element tensor costs seconds; instead we find the value at a
given rank exactly in three cheap passes:

1) sort a strided sample of ~64K elements and read off a bracket [lo, hi] that holds the
   wanted rank with overwhelming probability (the bracket is verified, never trusted);
2) one pass counts the elements below `lo` and gathers those inside the bracket;
3) `kthvalue` on the few gathered elements gives the exact value.

The kept set is then every element above that value, and the cut is exact unless it splits a
group of equal values (ties). mergekit keeps `torch.argsort(|d|, descending=True)[:k]` (TIES)
and `torch.sort(|d|).indices[lo:hi]` (breadcrumbs). torch's CPU sort is not stable (it takes
`stable=False` to mean x86-simd-sort's quicksort on AVX2/AVX-512 CPUs, `std::sort` elsewhere),
so which of the tied elements it puts first depends on the whole tensor, not on the tied
elements alone: checked on torch 2.13 from 40 to 5M elements, in 1 and 2 threads (the order
is the same in both, and run to run). So where the cut splits a tie group we make mergekit's
own call on the whole tensor (`tie_break: mergekit`, the default); elsewhere (float32-valued
checkpoints, nearly always) selection alone is exact. Over bf16-valued checkpoints a task
vector has many equal magnitudes and most cuts split a group: those tensors are sorted, as
mergekit sorts them, which made a 1.1B TIES merge 3.4x slower (bench/bench_merge.py).
`tie_break: position` takes the tied elements by position instead (the order of the same
calls with `stable=True`): selection only, never a sort, but not mergekit's entries.

A search asks for masks of the same magnitudes at many densities: it sorts once
(`sorted_ranks`, remembered) and passes the ranks, and each mask is one comparison.
"""

from __future__ import annotations

import math

import torch

TIE_BREAKS = ("mergekit", "position")
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


def sorted_ranks(v: torch.Tensor, descending: bool, tie_break: str = "mergekit") -> torch.Tensor:
    """Each element's position in the sort of flat `v` (shape of `v`; int32, int64 past 2**31 elements)."""
    flat = v.reshape(-1)
    n = flat.numel()
    dtype = torch.int32 if n < 2**31 else torch.int64
    ranks = torch.empty(n, dtype=dtype, device=v.device)
    ranks[_order(flat, descending, tie_break)] = torch.arange(n, dtype=dtype, device=v.device)
    return ranks.reshape(v.shape)


def top_k_mask(v: torch.Tensor, k: int, ranks: torch.Tensor | None = None, tie_break: str = "mergekit") -> torch.Tensor:
    """Bool mask (shape of `v`) of `torch.argsort(v, descending=True)[:k]`: mergekit's TIES trim.

    `ranks`: `sorted_ranks(v, True, tie_break)`, when known; then the mask is one comparison."""
    if ranks is not None:
        return ranks < k
    return _window(v, 0, k, True, tie_break)


def rank_window_mask(v: torch.Tensor, lo: int, hi: int, ranks: torch.Tensor | None = None,
                     tie_break: str = "mergekit") -> torch.Tensor:
    """Bool mask (shape of `v`) of `torch.sort(v).indices[lo:hi]`: mergekit's breadcrumbs window.

    `ranks`: `sorted_ranks(v, False, tie_break)`, when known."""
    if ranks is not None:
        return (ranks >= lo) & (ranks < hi)
    return _window(v, lo, hi, False, tie_break)


def _window(v: torch.Tensor, lo: int, hi: int, descending: bool, tie_break: str) -> torch.Tensor:
    """Mask of the elements at [lo, hi) of the sort of flat `v`: selected, or sorted where only the sort can say."""
    flat = v.reshape(-1)
    upper = _leading(flat, hi, descending, tie_break)
    lower = _leading(flat, lo, descending, tie_break) if lo > 0 else None
    if upper is None or (lo > 0 and lower is None):
        return _positions(flat, _order(flat, descending, tie_break)[lo:hi]).reshape(v.shape)
    if lower is not None:
        upper &= ~lower
    return upper.reshape(v.shape)


def _leading(flat: torch.Tensor, m: int, descending: bool, tie_break: str) -> torch.Tensor | None:
    """Mask of the first m elements of the sort of `flat`; None when only the sort can say which they
    are: the cut splits equal values under `tie_break: mergekit`, or a NaN (a sort puts it at one end)."""
    n = flat.numel()
    if m <= 0 or m >= n:
        return torch.full_like(flat, m >= n, dtype=torch.bool)
    if not bool(torch.isfinite(flat.sum())):
        return None
    # 1) the value at the cut, and how many equal to it are among the first m
    val, n_less, n_equal = value_at_rank(flat, n - m if descending else m - 1)
    take = m - (n - n_less - n_equal if descending else n_less)
    if take == n_equal:  # 2) all of them: no order among them needed
        return flat >= val if descending else flat <= val
    if tie_break == "mergekit":
        return None
    # 3) `position`: those ahead of the value, and the first `take` equal to it
    mask = flat > val if descending else flat < val
    for start in range(0, n, _CHUNK):  # scanning no further than needed
        idx = torch.nonzero(flat[start : start + _CHUNK] == val).squeeze(1)[:take]
        mask[start + idx] = True
        take -= idx.numel()
        if take == 0:
            break
    return mask


def _order(flat: torch.Tensor, descending: bool, tie_break: str) -> torch.Tensor:
    """mergekit's sort call (`stable=False`: its order among equal values), or the stable one (by position)."""
    return torch.argsort(flat, descending=descending, stable=tie_break == "position")


def _positions(flat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[positions] = True
    return mask
