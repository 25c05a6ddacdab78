"""`_sort_prefix`: the first m of torch's CPU sort, found by following its partitions (no sort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.methods import _sort_prefix
from mergelab.methods._select import rank_window_mask, top_k_mask
from mergelab.methods._sort_prefix import MIN_KEYS, sort_prefix_mask, trusted


def torch_prefix(keys: torch.Tensor, m: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[torch.sort(keys, descending=descending).indices[:m]] = True
    return mask


def test_this_torch_sorts_as_modelled() -> None:
    """If a torch release changes its CPU sort, this says so (the merge then sorts, still exact)."""
    assert trusted()


def tie_heavy(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, bool]:
    """Keys with many equal values, and whether they were put in an order (not shuffled)."""
    distinct = int(rng.choice([1, 2, 5, 60, 5000, 10**7]))
    keys = rng.integers(0, distinct, n).astype(np.float32)
    shape = rng.integers(0, 5)
    if shape == 1:
        keys.sort()  # sorted, reversed and organ-pipe inputs steer the median of three
    elif shape == 2:
        keys = np.ascontiguousarray(np.sort(keys)[::-1])
    elif shape == 3:
        keys = np.concatenate([np.sort(keys[: n // 2]), np.sort(keys[n // 2 :])[::-1]])
    return torch.from_numpy(keys), bool(shape in (1, 2, 3))


@pytest.mark.parametrize("seed", range(6))
def test_prefix_is_the_sorts_first_m(seed: int) -> None:
    """Exact wherever it answers; it answers on every shuffled input. Ordered inputs (an organ pipe
    defeats the median of three) may reach libstdc++'s depth limit, where it heap-sorts: None."""
    rng = np.random.default_rng(seed)
    for _ in range(12):
        n = int(rng.choice([17, 18, 100, 1000, 16_383, 16_384, 16_385, 50_000, 200_003]))
        keys, ordered = tie_heavy(rng, n)
        for descending in (True, False):
            for m in {1, int(rng.integers(1, n)), n // 2, n - 1}:
                want = torch_prefix(keys, m, descending)
                got = _sort_prefix._prefix(keys.numpy(), m, descending)
                assert (got is None and ordered) or torch.equal(torch.from_numpy(got), want), (n, m, ordered)
                if n >= MIN_KEYS and descending:
                    assert torch.equal(top_k_mask(keys, m), want)  # the sort stands in where the model gives up


@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_bf16_ties_cut_without_a_sort(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TIES cut over bf16-valued weights takes mergekit's entries with no sort call at all."""
    g = torch.Generator().manual_seed(11)
    n = 1_500_007
    base = (0.02 * torch.randn(n, generator=g)).bfloat16().float()
    v = ((base + 0.004 * torch.randn(n, generator=g)).bfloat16().float() - base).abs()
    k = int(density * n)
    lo, hi = n // 20, k
    want_top, want_window = torch_prefix(v, k, True), torch_prefix(v, hi, False) & ~torch_prefix(v, lo, False)
    assert trusted()  # checked before the sort is taken away
    monkeypatch.setattr(torch, "argsort", None)
    monkeypatch.setattr(torch, "sort", None)
    assert torch.equal(top_k_mask(v, k), want_top)
    assert torch.equal(rank_window_mask(v, lo, hi), want_window)


def test_the_sort_stands_in_where_the_model_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch that sorts otherwise (not trusted), half-precision keys, or few keys: mergekit's own sort call."""
    g = torch.Generator().manual_seed(12)
    v = torch.randint(0, 9, (MIN_KEYS + 5,), generator=g).float()
    k = v.numel() // 3
    monkeypatch.setattr(_sort_prefix, "trusted", lambda: False)
    assert sort_prefix_mask(v, k, True) is None
    assert torch.equal(top_k_mask(v, k), torch_prefix(v, k, True))
    monkeypatch.undo()
    assert sort_prefix_mask(v.bfloat16(), k, True) is None
    assert sort_prefix_mask(v, k, True) is not None
