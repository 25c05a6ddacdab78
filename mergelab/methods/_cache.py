"""What a search's merges share: per output tensor and input, what follows from the sources alone.

A search (`mergelab.evolve.live.LiveMerger`) merges the same source tensors once per candidate,
with other weights, densities or methods. Given a `TensorCache` (`MergeInputs.cache`), the
sparsifiers of the task-arithmetic methods (`_sparsify.py`) make these once and look them up
afterwards, so that a new density costs one comparison instead of a selection or a draw:

| key         | what                                                            | bytes per element | used by |
|-------------|-----------------------------------------------------------------|-------------------|---------|
| `ranks`     | position of each abs(x_i - b) in mergekit's sort of them (int32*) | 4 per order     | ties (descending: the top-k mask is `ranks < k`), breadcrumbs* (ascending) |
| `draws`     | the uniform draws of input i's generator, for the latest seed   | 4                 | dare_*, della* |
| `row_ranks` | DELLA: each magnitude's rank within its row, as a fraction      | 4                 | della* |
| `norm`      | the norm of abs(x_i - b) that rescaling keeps (one number)      | -                 | rescale l1, l2, linf |

(* int64, 8 bytes, past 2**31 elements.) So TIES and DARE hold 4 bytes per element of each
expert beside the sources, DELLA 8, task arithmetic nothing. Each is made by the code that makes
it without a cache (`ranks` by mergekit's own sort call, whose order among equal magnitudes is
the one `_select.py` falls back to), so results are the same bit for bit.
Remembering x_i - b and abs(x_i - b) too would take 4 bytes per element each and saved nothing
measurable (`bench/bench_candidates.py`): they are remade per candidate, as in `mergelab merge`.

Without a cache (`mergelab merge`, streaming tensor by tensor) every memo is `NO_MEMO`: it calls
`make()` each time and the sparsifiers select and draw as they always did.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class Memo:
    """One input's view of a `TensorCache`: `memo(key, make)` is `make()`, made once per key.

    `seeded=True` for what depends on the merge seed (random draws): made again when the seed
    changes, keeping only the latest. `active` is False for `NO_MEMO` (no cache): then a method
    skips what only pays off when remembered (a full sort)."""

    __slots__ = ("_store", "_index", "_seed")

    def __init__(self, store: dict[tuple[int, Hashable], tuple[int | None, Any]] | None, index: int, seed: int) -> None:
        self._store, self._index, self._seed = store, index, seed

    @property
    def active(self) -> bool:
        return self._store is not None

    def __call__(self, key: Hashable, make: Callable[[], T], *, seeded: bool = False) -> T:
        if self._store is None:
            return make()
        tag = self._seed if seeded else None
        slot = (self._index, key)
        hit = self._store.get(slot)
        if hit is None or hit[0] != tag:
            hit = self._store[slot] = (tag, make())
        return hit[1]


NO_MEMO = Memo(None, 0, 0)


class TensorCache:
    """What the merges of one output tensor (from the same source tensors) share."""

    def __init__(self) -> None:
        self._store: dict[tuple[int, Hashable], tuple[int | None, Any]] = {}

    def memo(self, index: int, seed: int) -> Memo:
        """The memo of input `index` (`MergeInputs.tensors[index]`) for merges with `seed`."""
        return Memo(self._store, index, seed)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self._store.values() if isinstance(v, torch.Tensor))


class MergeCache:
    """One `TensorCache` per output tensor and what it is made from (key chosen by the caller)."""

    def __init__(self) -> None:
        self._tensors: dict[Hashable, TensorCache] = {}

    def tensor(self, key: Hashable) -> TensorCache:
        cache = self._tensors.get(key)
        if cache is None:
            cache = self._tensors[key] = TensorCache()
        return cache

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._tensors.values())

    def clear(self) -> None:
        self._tensors.clear()
