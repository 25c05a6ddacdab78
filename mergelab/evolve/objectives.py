"""Several objectives of a search job: each candidate's loss per objective, the Pareto front, the pick.

    objectives:                       # optional; at least two entries
      - {name: reverse, terms: [reverse]}   # the fitness restricted to these terms (task names or task/metric
      - {name: sort, terms: [sort]}         #   keys), normalised and signed as the fitness is
      - {name: depth}                       # data-flow jobs: the candidate's layer count
    pick: {weights: {reverse: 1, sort: 1, depth: 0.5}}   # how best.yaml is chosen from the front

The optimizer is told the vector of losses (nevergrad's multi-objective mode: it optimises the
hypervolume of its front). When the search ends, the non-dominated trials (on the fitness split)
are ranked by the pick rule; the first `FRONT_CAP` are re-scored on the select split and the
rule picks `best.yaml` among them (the overfit guard of the single-objective search). The rule
minimises the weighted sum of the objectives (default weights: all 1), each in its own unit: a
skill objective as the fitness measures it (with `normalize: gap`, 1 = its expert's whole gain
lost), the depth as a share of `max_layers` (1 = the deepest route allowed).

Scaling each objective to [0, 1] over the front instead was tried and dropped: on the reduced zoo
a skill that no route learnt (its loss 0.9995-1.0000 across the front) then weighed as much as
one that was kept or lost, and the rule traded 10% of the kept skill for that noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from mergelab.blackbox.pool import Genome, Metrics
from mergelab.errors import RecipeError
from mergelab.evolve.fitness import Fitness, Reference
from mergelab.evolve.schema import ObjectiveSpec, PickSpec

DEPTH = "depth"
FRONT_CAP = 10  # at most this many front members are re-scored on the select split


@dataclass(frozen=True)
class Objective:
    """One objective: the fitness over some of its terms (indices into `Fitness.terms`), or the depth."""

    name: str
    terms: tuple[int, ...] = ()  # empty: the depth

    @property
    def is_depth(self) -> bool:
        return not self.terms


@dataclass(frozen=True)
class Objectives:
    """A job's objectives and its pick rule (one weight per objective)."""

    items: tuple[Objective, ...]
    weights: tuple[float, ...]
    depth_unit: float = 1.0  # the depth counts in the pick rule as depth / depth_unit (max_layers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.items)

    @property
    def rule_weights(self) -> tuple[float, ...]:
        """The pick rule's factor per objective: its weight, over its unit (`max_layers` for the depth)."""
        return tuple(w / self.depth_unit if o.is_depth else w for o, w in zip(self.items, self.weights))

    def losses(self, fitness: Fitness, metrics: Metrics, reference: Reference | None, genome: Genome,
               space: Any) -> dict[str, float]:
        """Each objective's loss for one candidate (its metrics on one split; `space.chosen` for the depth)."""
        out: dict[str, float] = {}
        for o in self.items:
            if o.is_depth:
                out[o.name] = float(len(space.chosen(genome)))
            else:
                part = replace(fitness, terms=tuple(fitness.terms[i] for i in o.terms))
                out[o.name] = part.loss(metrics, reference)
        return out


def resolve_objectives(specs: list[ObjectiveSpec] | None, pick: PickSpec | None, fitness: Fitness,
                       max_layers: int | None, label: str) -> Objectives | None:
    """`objectives:` and `pick:` checked against the fitness terms; None without objectives.
    `max_layers`: a data-flow job's depth bound (None: a parameter job, which has no depth objective).
    Every error is one line naming the key."""
    if specs is None:
        if pick is not None:
            raise RecipeError(f"{label}: pick: chooses among the front of several objectives; declare objectives: first")
        return None
    if len(specs) < 2:
        raise RecipeError(f"{label}: objectives: give at least 2 (with one, the fitness itself is the objective)")
    items: list[Objective] = []
    for i, spec in enumerate(specs):
        where = f"{label}: objectives[{i}]"
        if spec.name in [o.name for o in items]:
            raise RecipeError(f"{where}.name: '{spec.name}' is given twice")
        if spec.terms is None:
            if spec.name != DEPTH:
                raise RecipeError(f"{where}.terms: required (the fitness terms this objective scores), "
                                  f"unless the objective is '{DEPTH}'")
            if max_layers is None:
                raise RecipeError(f"{where}: {DEPTH} needs a dataflow job (a parameter search's depth does not change)")
            items.append(Objective(DEPTH))
            continue
        if spec.name == DEPTH:
            raise RecipeError(f"{where}.terms: '{DEPTH}' is the layer count and takes no terms; name this objective otherwise")
        items.append(Objective(spec.name, _term_indices(spec.terms, fitness, where)))
    names = [o.name for o in items]
    given = dict(pick.weights) if pick is not None and pick.weights is not None else {}
    for name, w in given.items():
        if name not in names:
            raise RecipeError(f"{label}: pick.weights.{name}: not an objective (objectives: {', '.join(names)})")
        if not (math.isfinite(w) and w >= 0):
            raise RecipeError(f"{label}: pick.weights.{name}: give a finite weight >= 0, got {w}")
    weights = tuple(float(given.get(n, 1.0)) for n in names)
    if not any(weights):
        raise RecipeError(f"{label}: pick.weights: at least one weight must be above 0")
    return Objectives(tuple(items), weights, float(max_layers or 1))


def _term_indices(terms: list[str], fitness: Fitness, where: str) -> tuple[int, ...]:
    """The fitness terms an objective names: by task (every term of that task) or by `task/metric` key."""
    if not terms:
        raise RecipeError(f"{where}.terms: name at least one fitness term")
    out: list[int] = []
    for j, name in enumerate(terms):
        hits = [i for i, t in enumerate(fitness.terms) if name in (t.task, t.key)]
        if not hits:
            known = ", ".join(dict.fromkeys(t.task for t in fitness.terms))
            raise RecipeError(f"{where}.terms[{j}]: '{name}' is not a fitness term (terms: {known})")
        out += [i for i in hits if i not in out]
    return tuple(out)


# ---------------------------------------------------------------- the front and the pick
def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is no worse than `b` in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """The indices of the non-dominated points, in their order (equal points are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def pick_scores(points: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    """The pick rule's score of each point: the weighted sum of its objectives; lower is better."""
    return [sum(w * x for x, w in zip(p, weights)) for p in points]


def pick_order(points: Sequence[Sequence[float]], weights: Sequence[float]) -> list[int]:
    """The indices of `points`, best first by the pick rule (ties: the earlier point first)."""
    scores = pick_scores(points, weights)
    return sorted(range(len(points)), key=lambda i: (scores[i], i))
