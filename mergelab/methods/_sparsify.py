"""Sparsifiers for task vectors: which entries of delta = model - base survive, and how the
survivors are rescaled. Each takes the magnitudes |delta| (all any of them needs) and returns
a `Sparse` (a keep-mask and a scale) rather than a new tensor, so the merge can apply it chunk
by chunk without another full-size copy.

| name               | keeps                                             | source |
|--------------------|---------------------------------------------------|--------|
| magnitude          | the top `density` fraction by |delta|             | TIES, arXiv:2306.01708 |
| random             | each entry with probability `density`             | DARE, arXiv:2311.03099 |
| magnitude_outliers | drops the top `gamma` fraction, then the smallest | Breadcrumbs, arXiv:2312.06795 |
| della_magprune     | each entry with probability density - eps + 2 eps * rank/(cols-1) within its row | DELLA, arXiv:2406.11617 |

Rescaling (`rescale_mode`): "l1" (mergekit's choice: scale the survivors so the L1 norm of
the task vector is unchanged), "l2", "linf", or "probability" (the papers' choice: divide
each survivor by its keep probability, 1/density for DARE, 1/p_i for DELLA).

`memo` (see `_cache.py`): in a search, what depends only on the magnitudes (their ranks) or on
the seed (the random draws) is made once and remembered, so a new density costs one comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelab.methods._cache import NO_MEMO, Memo
from mergelab.methods._select import rank_window_mask, sorted_ranks, top_k_mask

RESCALE_MODES = ("l1", "l2", "linf", "probability")


@dataclass
class Sparse:
    """delta_sparse = delta * keep * scale; `keep` None means keep all; `scale` float or tensor."""

    keep: torch.Tensor | None = None
    scale: float | torch.Tensor = 1.0


def magnitude(mag: torch.Tensor, density: float, memo: Memo = NO_MEMO, tie_break: str = "mergekit") -> Sparse:
    """Keep the k = max(1, int(density * n)) entries of largest magnitude (equal ones: see `_select.py`)."""
    window = magnitude_window(mag.numel(), density)
    if window is None:
        return Sparse()
    if window[1] == 0:
        return Sparse(keep=torch.zeros_like(mag, dtype=torch.bool))
    ranked = keys(mag)
    return Sparse(keep=top_k_mask(ranked, window[1], _ranks(ranked, memo, True, tie_break), tie_break))


def magnitude_window(n: int, density: float) -> tuple[int, int, bool] | None:
    """What `magnitude` keeps of n entries: [lo, hi) of their sort, descending (True); None: all of them."""
    if density >= 1:
        return None
    return 0, 0 if density <= 0 or n == 0 else max(1, int(density * n)), True


def outliers_window(n: int, density: float, gamma: float) -> tuple[int, int, bool] | None:
    """What `magnitude_outliers` keeps of n entries: [lo, hi) of their ascending sort (False); None: all."""
    if density >= 1:
        return None
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))  # fewer outliers dropped when density demands it
    return n_bottom, n_bottom + target, False


def keys(mag: torch.Tensor) -> torch.Tensor:
    """What mergekit ranks: on CPU the magnitudes in float32 (its `w.float()`, for any dtype), elsewhere as they are."""
    return mag.float() if mag.device.type == "cpu" else mag


def order_keys(mag: torch.Tensor) -> torch.Tensor:
    """Keys in the order of `keys(mag)`, with its equalities, for selection only (never for mergekit's sort):
    half-precision magnitudes as they are (their float32 widening is exact), others as `keys` makes them."""
    return mag if mag.dtype in (torch.float16, torch.bfloat16) else keys(mag)


def _ranks(ranked: torch.Tensor, memo: Memo, descending: bool, tie_break: str) -> torch.Tensor | None:
    """With a cache, the keys' positions in their sort (one sort, remembered); without, None: select each time."""
    if not memo.active:
        return None
    return memo(("ranks", descending, tie_break, ranked.dtype), lambda: sorted_ranks(ranked, descending, tie_break))


def magnitude_outliers(mag: torch.Tensor, density: float, gamma: float, memo: Memo = NO_MEMO, tie_break: str = "mergekit") -> Sparse:
    """Drop the int(gamma * n) largest magnitudes and enough of the smallest to keep int(density * n)."""
    window = outliers_window(mag.numel(), density, gamma)
    if window is None:
        return Sparse()
    lo, hi, _ = window
    ranked = keys(mag)
    return Sparse(keep=rank_window_mask(ranked, lo, hi, _ranks(ranked, memo, False, tie_break), tie_break))


def _draws(shape: torch.Size, generator: torch.Generator, device: torch.device, memo: Memo) -> torch.Tensor:
    """Uniform draws in [0, 1) of `shape` from `generator` (remembered per seed with a cache)."""
    return memo(("draws", tuple(shape)), lambda: torch.rand(shape, generator=generator, device=device), seeded=True)


def random(mag: torch.Tensor, density: float, generator: torch.Generator, memo: Memo = NO_MEMO) -> Sparse:
    """Keep each entry independently with probability `density` (a seeded Bernoulli mask)."""
    if density >= 1:
        return Sparse()
    draws = _draws(mag.shape, generator, mag.device, memo)
    return Sparse(keep=draws < density, scale=1.0 / density if density > 0 else 0.0)


def della_magprune(mag: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   memo: Memo = NO_MEMO) -> Sparse:
    """Keep entries with a probability that grows linearly with their magnitude rank in the row."""
    if density >= 1:
        return Sparse()
    if density <= 0:
        return Sparse(keep=torch.zeros_like(mag, dtype=torch.bool))
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1 (density {density}, epsilon {epsilon})")
    rows = mag.reshape(1, -1) if mag.dim() < 2 else mag.reshape(mag.shape[0], -1)  # (rows, cols)
    rank_norm = memo("row_ranks", lambda: _row_rank_fraction(rows))  # (rows, cols)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)  # (rows, cols)
    draws = _draws(probs.shape, generator, mag.device, memo)
    keep = (draws < probs).reshape(mag.shape)
    return Sparse(keep=keep, scale=(1.0 / probs).reshape(mag.shape))


def _row_rank_fraction(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's ascending rank within its row over (cols - 1), in [0, 1]; 0.5 for one column."""
    cols = rows.shape[1]
    order = rows.argsort(dim=1, stable=True)  # (rows, cols)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=rows.device).expand_as(order))
    return ranks.to(torch.float32) / (cols - 1) if cols > 1 else torch.full_like(rows, 0.5)


def rescale(mag: torch.Tensor, sparse: Sparse, mode: str | None, eps: float = 1e-7, memo: Memo = NO_MEMO) -> Sparse:
    """Choose the survivors' scale: by keep probability, or to preserve a norm of delta (from |delta|)."""
    if sparse.keep is None or mode == "probability":
        return sparse
    if mode is None:
        return Sparse(sparse.keep, 1.0)
    if mode not in _NORMS:
        raise ValueError(f"unknown rescale mode {mode!r}; choose one of {', '.join(RESCALE_MODES)}")
    before = memo(("norm", mode, mag.dtype), lambda: _NORMS[mode](mag))  # in mag's dtype, as mergekit
    after = _NORMS[mode](mag * sparse.keep)
    if before < eps or after < eps:
        return Sparse(sparse.keep, 1.0)
    return Sparse(sparse.keep, float(before / after))


_NORMS = {"l1": torch.sum, "l2": torch.norm, "linf": torch.max}
