"""Racing the fitness split: most candidates are not worth all of its examples.

With `fitness.racing: {first: 0.25, keep: 0.5, warmup: 8}` each worker scores a candidate first
on the first quarter of every term's fitness examples (the same ones for every candidate, so
the partial losses compare fairly), and on all of them only when that partial loss is within
the best half of the partial losses it has seen so far; the first `warmup` candidates always go
on. One rung of successive halving, decided in the worker, so it needs no round trip and works
the same on one worker or many (each keeps its own history; on a resumed run it starts afresh).

A candidate that goes on is scored on the whole split, the first share again included: its
metrics are exactly those it gets without racing. One that stops is told its partial loss (the
same normalisation, on fewer examples): it was behind the better half on the very examples the
others were measured on. `trials.jsonl` shows which is which: `seconds.race` is the partial
scoring, `seconds.eval` the full one (absent for a candidate that stopped).
"""

from __future__ import annotations

import math
from dataclasses import replace

from mergelab.evolve.fitness import Racing
from mergelab.evolve.scoring import TermData


def first_share(terms: list[TermData], share: float) -> list[TermData]:
    """Each term on the first `share` of its examples (at least one); an lm-eval term on the first
    `share` of its documents when they are a range, all of them when it scores a whole task."""
    out: list[TermData] = []
    for d in terms:
        if d.task is not None:
            out.append(replace(d, task=d.task.head(_count(len(d.task.examples), share))))
        elif d.lm_eval is not None and d.lm_eval[1] is not None:
            task, docs = d.lm_eval
            out.append(replace(d, lm_eval=(task, docs[:_count(len(docs), share)])))
        else:
            out.append(d)
    return out


def _count(n: int, share: float) -> int:
    return max(1, min(n, math.ceil(n * share)))


class Racer:
    """One worker's racing state: the first-share terms and the partial losses seen so far."""

    def __init__(self, racing: Racing, terms: list[TermData]) -> None:
        self.racing = racing
        self.first = first_share(terms, racing.first)
        self.seen: list[float] = []

    def cutoff(self) -> float:
        """The largest partial loss that still goes on (inf during the warm-up)."""
        if len(self.seen) < self.racing.warmup:
            return math.inf
        ranked = sorted(self.seen)
        return ranked[max(0, math.ceil(self.racing.keep * len(ranked)) - 1)]

    def goes_on(self, partial_loss: float) -> bool:
        """Whether a candidate with this partial loss is scored on the whole split; records it."""
        ok = math.isfinite(partial_loss) and partial_loss <= self.cutoff()
        if math.isfinite(partial_loss):
            self.seen.append(partial_loss)
        return ok
