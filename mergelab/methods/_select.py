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
and `torch.sort(|d|).indices[lo:hi]` (breadcrumbs). torch's CPU sort is not stable: it is
libstdc++'s introsort, so which of the tied elements it puts first depends on the whole tensor
(neither the first nor the last by position). Where the cut splits a tie group (most cuts over
bf16-valued checkpoints; nearly none over float32 ones), `tie_break: mergekit` (the default)
takes exactly the elements that sort puts first, found by following its partitions that hold
the cut (`_sort_prefix`: a quickselect, no sort; 2.5-3x cheaper), or by making mergekit's own
sort call where that model does not apply (small tensors, half-precision keys, a range the
sort would heap-sort, a torch that sorts otherwise). `tie_break: position` takes them by
position instead (the order of the same calls with `stable=True`): selection only, but not
mergekit's entries.

A search asks for masks of the same magnitudes at many densities: it sorts once
(`sorted_ranks`, remembered) and passes the ranks, and each mask is one comparison.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mergelab.methods._common import CHUNK
from mergelab.methods._sort_prefix import MIN_KEYS, sort_prefix_mask

TIE_BREAKS = ("mergekit", "position")
_SAMPLE = 1 << 16
_SMALL = 1 << 17


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
    for start in range(0, n, CHUNK):
        chunk = v[start : start + CHUNK]
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
    """Mask of the elements at [lo, hi) of the sort of flat `v`: selected; sorted (once) only where a cut needs it."""
    flat = v.reshape(-1)
    order = functools.cache(lambda: _order(flat, descending, tie_break))
    upper = _leading(flat, hi, descending, tie_break, order)
    lower = _leading(flat, lo, descending, tie_break, order) if lo > 0 else None
    if upper is None or (lo > 0 and lower is None):  # a NaN: where the sort puts it
        upper, lower = torch.zeros_like(flat, dtype=torch.bool), None
        upper[order()[lo:hi]] = True
    if lower is not None:
        upper &= ~lower
    return upper.reshape(v.shape)


def _leading(flat: torch.Tensor, m: int, descending: bool, tie_break: str,
             order: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Mask of the first m elements of the sort of `flat`; None on a NaN (a sort puts it at one end).
    `order`: mergekit's sort of `flat`, asked for only where the cut splits equal values under `tie_break: mergekit`."""
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
    mask = flat > val if descending else flat < val
    if tie_break == "mergekit":  # 3) the equal ones the sort puts first
        if n >= MIN_KEYS and (leading := sort_prefix_mask(flat, m, descending)) is not None:
            return leading  # found without the sort
        mask[order()[m - take : m]] = True  # right after the m - take ahead of them
        return mask
    # 3) `position`: the first `take` equal to the value
    for start in range(0, n, CHUNK):  # scanning no further than needed
        idx = torch.nonzero(flat[start : start + CHUNK] == val).squeeze(1)[:take]
        mask[start + idx] = True
        take -= idx.numel()
        if take == 0:
            break
    return mask


def _order(flat: torch.Tensor, descending: bool, tie_break: str) -> torch.Tensor:
    """mergekit's sort call (`stable=False`: its order among equal values), or the stable one (by position)."""
    return torch.argsort(flat, descending=descending, stable=tie_break == "position")


# ---------------------------------------------------------------- over blocks
# A tensor too large to hold (`mergelab merge --memory`) is seen as blocks of flat elements, one
# pass at a time. The same windows are found there exactly, in bounded memory, by radix selection
# on the keys' bits (non-negative floats order as their bit patterns): one pass per 16 bits of the
# key (one for half precision, two for float32) counts each 16-bit digit among the elements that
# share the digits found so far: the value at the rank and the counts below and equal to it;
# `position` ties take one more pass. Windows that need mergekit's own sort (a cut inside a group of
# equal keys under `tie_break: mergekit`, or a NaN) are found on the whole keys, gathered in one more
# pass: the one case not bounded by the blocks (the keys, and the sort's 12 bytes per element).

KeyBlocks = Callable[[], Iterator[list[torch.Tensor]]]  # one pass: each block's keys, one tensor per stream
_DIGIT = 16
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class Leading:
    """The first m elements of the sort of a flat tensor, as a rule: those ahead of `value` in the order
    (above it when descending), and those equal to it at positions below `cutoff`. `value` None: all
    (cutoff > 0) or none."""

    value: torch.Tensor | None
    descending: bool
    cutoff: int

    def mask(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """The rule on `keys`, the flat elements [offset, offset + len) of the tensor."""
        if self.value is None:
            return torch.full_like(keys, self.cutoff > 0, dtype=torch.bool)
        ahead = keys > self.value if self.descending else keys < self.value
        if self.cutoff <= offset:
            return ahead
        equal = keys == self.value
        equal[max(0, self.cutoff - offset):] = False
        return ahead | equal


@dataclass(frozen=True)
class Window:
    """Elements [lo, hi) of the sort of a flat tensor: `upper` (first hi) less `lower` (first lo), or a
    mask of the whole tensor where only a sort could say."""

    upper: Leading | None = None
    lower: Leading | None = None
    whole: torch.Tensor | None = None  # bool (n,)

    def mask(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[offset : offset + keys.numel()]
        assert self.upper is not None
        mask = self.upper.mask(keys, offset)
        return mask & ~self.lower.mask(keys, offset) if self.lower is not None else mask


def windows_over_blocks(blocks: KeyBlocks, n: int, windows: list[tuple[int, int, bool]], tie_break: str,
                        on_sort: Callable[[int], None] | None = None,
                        sort_keys: Callable[[torch.Tensor], torch.Tensor] = lambda keys: keys) -> list[Window]:
    """`rank_window_mask`/`top_k_mask` of each stream's keys as rules, found in passes over `blocks`.

    `windows[i]`: (lo, hi, descending) for stream i, n elements each. `on_sort(i)` is called before the
    keys of stream i are gathered whole for a sort (all such streams in one pass); `sort_keys` turns the
    gathered keys into what the sort ranks, where the blocks hold narrower keys of the same order."""
    cuts = [(i, m, d) for i, (lo, hi, d) in enumerate(windows) for m in ((hi, lo) if lo > 0 else (hi,))]
    leading = dict(zip(cuts, _leading_over_blocks(blocks, n, cuts, tie_break)))
    rules = [(leading[(i, hi, d)], leading.get((i, lo, d))) for i, (lo, hi, d) in enumerate(windows)]
    whole = [i for i, ((lo, _, _), (up, low)) in enumerate(zip(windows, rules)) if up is None or (lo > 0 and low is None)]
    for i in whole if on_sort is not None else ():
        on_sort(i)
    columns = zip(*([keys[i] for i in whole] for keys in blocks())) if whole else ()  # one pass gathers them all
    gathered = {i: torch.cat(column) for i, column in zip(whole, columns)}
    out = []
    for i, ((lo, hi, d), (upper, lower)) in enumerate(zip(windows, rules)):
        if i in gathered:
            out.append(Window(whole=_window(sort_keys(gathered.pop(i)), lo, hi, d, tie_break)))
        else:
            out.append(Window(upper, lower))
    return out


def _leading_over_blocks(blocks: KeyBlocks, n: int, cuts: list[tuple[int, int, bool]], tie_break: str) -> list[Leading | None]:
    """`_leading` of stream i's first m elements, for each (i, m, descending) in `cuts`; None where only the sort can say."""
    out: list[Leading | None] = [Leading(None, d, n if m >= n else 0) if m <= 0 or m >= n else None for _, m, d in cuts]
    todo = [j for j, (_, m, _) in enumerate(cuts) if 0 < m < n]
    ranks = [n - cuts[j][1] if cuts[j][2] else cuts[j][1] - 1 for j in todo]
    found = _select_ranks(blocks, [cuts[j][0] for j in todo], ranks)
    ties = []
    for j, hit in zip(todo, found):
        if hit is None:  # a NaN: a sort puts it at one end
            continue
        (i, m, d), (val, n_less, n_equal) = cuts[j], hit
        take = m - (n - n_less - n_equal) if d else m - n_less
        if take == n_equal:  # all the equal ones: no order among them needed
            out[j] = Leading(val, d, n)
        elif tie_break == "position":
            ties.append((j, i, val, take))
    for (j, i, val, take), cutoff in zip(ties, _cutoffs(blocks, [(i, val, take) for j, i, val, take in ties])):
        out[j] = Leading(val, cuts[j][2], cutoff)
    return out


def _select_ranks(blocks: KeyBlocks, streams: list[int], ranks: list[int]) -> list[tuple[torch.Tensor, int, int] | None]:
    """(value, count below, count equal) at ascending rank ranks[j] of stream streams[j]; None if a key is not finite."""
    if not ranks:
        return []
    prefix, below, equal = [0] * len(ranks), [0] * len(ranks), [0] * len(ranks)
    finite = [True] * len(ranks)
    dtype, levels, level = torch.float32, 1, 0
    while level < levels:  # one pass per 16-bit digit, the highest first
        counts: list[torch.Tensor | None] = [None] * len(ranks)
        for keys in blocks():
            for j, i in enumerate(streams):
                dtype = keys[i].dtype
                bits = keys[i].view(_BITS[dtype])
                levels = bits.element_size() * 8 // _DIGIT
                shift = (levels - level - 1) * _DIGIT
                if level == 0:
                    finite[j] = finite[j] and bool(torch.isfinite(keys[i]).all())
                else:
                    bits = bits[(bits >> (shift + _DIGIT)) == prefix[j]]
                digit = (bits >> shift).long() & 0xFFFF
                hist = torch.bincount(digit, minlength=1 << _DIGIT)
                counts[j] = hist if counts[j] is None else counts[j] + hist
        for j in range(len(ranks)):
            cum = counts[j].cumsum(0)  # type: ignore[union-attr]
            d = int(torch.searchsorted(cum, ranks[j] - below[j], right=True))
            below[j] += int(cum[d - 1]) if d > 0 else 0
            equal[j] = int(counts[j][d])  # type: ignore[index]
            prefix[j] = (prefix[j] << _DIGIT) | d
        level += 1
    values = [torch.tensor(p, dtype=_BITS[dtype]).view(dtype) for p in prefix]
    return [(v, b, e) if f else None for v, b, e, f in zip(values, below, equal, finite)]


def _cutoffs(blocks: KeyBlocks, wanted: list[tuple[int, torch.Tensor, int]]) -> list[int]:
    """For each (stream, value, take): one past the position of the take-th element equal to value."""
    left = [take for _, _, take in wanted]
    cutoff = [0] * len(wanted)
    offset = 0
    for keys in blocks() if wanted else ():
        for j, (i, val, _) in enumerate(wanted):
            if left[j] > 0:
                where = torch.nonzero(keys[i] == val).squeeze(1)[: left[j]]
                left[j] -= where.numel()
                if left[j] == 0:
                    cutoff[j] = offset + int(where[-1]) + 1
        offset += keys[0].numel()
        if not any(left):
            break
    return cutoff
