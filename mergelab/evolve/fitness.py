"""The fitness of a candidate: a weighted combination of per-skill scores, as a loss to minimise.

Each term scores the live model on one task with a metric of the registry (`mergelab.metrics`:
answer NLL, answer probability, exact-match accuracy, or an lm-eval task's metric) on one split
range. With several skills, plain mean NLL is dominated by the hardest skill and a search on it
trades the others away, so each term is first put on a common scale by a `Reference`, a
(zero, one) pair per term: normalised = (value - zero) / (one - zero).

| normalize | zero, one | normalised value |
|---|---|---|
| gap (default, several skills) | expert's, base's | share of the expert's gain over the base that is lost: 0 = as good as the expert, 1 = no better than the base |
| experts | 0, expert's | value / expert's |
| start | 0, start recipe's | value / start recipe's |
| none | - | value |

`gap` weighs every skill by how much of its expert's gain the merge keeps, whatever the
skill's scale; `experts` divides by the expert's score, so a skill whose expert has a much
smaller NLL than the others weighs more (on the earlier zoo: sort, expert NLL 0.03, against
add's 0.40). On one zoo build plain CMA on expert-relative NLL found better merges than NGOpt
on `gap`-normalised `prob`, and on another far worse (README): the latter is the default. The loss is
`sum(weight * normalised)`, negated when the goal is to maximise (raw or ratio accuracy).

A `Fitness` is resolved once, when the job is loaded (`fitness_spec.py`): its terms carry their
registry metric (and so their direction), and its goal and normalisation are decided there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergelab.blackbox.pool import Metrics
from mergelab.blackbox.spec import SplitRange
from mergelab.errors import DataError
from mergelab.metrics import Metric

Normalize = Literal["gap", "experts", "start", "none"]
Goal = Literal["minimize", "maximize"]
Reference = dict[str, tuple[float, float]]  # "add/nll" -> (zero, one) of its normalisation
USES = ("fitness", "select", "report")  # what each split is for


@dataclass(frozen=True)
class Racing:
    """Two-stage fitness: the first `first` share of each term's examples, then (for the candidates
    whose partial loss is within the best `keep` share so far, after `warmup` candidates) all of them."""

    first: float
    keep: float
    warmup: int


@dataclass(frozen=True)
class Term:
    """One fitness term: a task scored by a metric, its weight, how many examples, its expert."""

    task: str  # as the job names it (the key's first part)
    metric: Metric
    weight: float = 1.0
    limit: int | None = None
    expert: Path | None = None  # the model the term is normalised by (gap, experts)
    lm_eval_task: str | None = None  # metric lm-eval: the task's folder or name
    lm_eval_metric: str | None = None

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric.name}"


@dataclass(frozen=True)
class Fitness:
    """A job's fitness, resolved: the terms, how they are normalised and whether to minimise."""

    terms: tuple[Term, ...]
    normalize: Normalize
    goal: Goal
    tasks: Path  # the zoo's tasks folder
    base: Path | None  # the template's base model (the other end of `normalize: gap`)
    splits: dict[str, SplitRange]  # USES -> split range
    racing: Racing | None = None  # score the fitness split in two stages (`racing.py`)

    def loss(self, metrics: Metrics, reference: Reference | None) -> float:
        """Weighted, normalised by `reference` (when given), negated to maximise; NaN stays NaN."""
        total = 0.0
        for t in self.terms:
            value = metrics[t.key]
            if reference is not None:
                zero, one = reference[t.key]
                value = (value - zero) / (one - zero) if one != zero else math.nan
            total += t.weight * value
        return total if self.goal == "minimize" else -total

    def check_gap(self, ref: Reference, where: str) -> None:
        """Each expert must beat the base on its own skill, or the gap to close is empty (or negative)."""
        for t in self.terms:
            expert, base = ref[t.key]
            if not t.metric.better(expert, base):
                raise DataError(f"{where}: {t.key}: the expert ({expert:.4g}) is no better than the base ({base:.4g}); "
                                "normalize: gap has no gap to close there, use normalize: experts")


def make_reference(kind: Normalize, metrics: Metrics, base: Metrics | None = None) -> Reference:
    """The (zero, one) pairs of a normalisation from the reference scores (and the base's, for gap)."""
    if kind != "gap":
        return {k: (0.0, v) for k, v in metrics.items()}
    assert base is not None
    return {k: (v, base[k]) for k, v in metrics.items()}
