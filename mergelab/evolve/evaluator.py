"""What each worker of `mergelab search` holds: the live model (merged, or assembled for data-flow
search), the fitness data, the references.

Built once per worker by `functools.partial(SearchEvaluator, job, device)`; the pool calls its
methods (`evaluate` for each candidate, the others through `WorkerPool.call`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mergelab.blackbox.pool import Evaluation, Genome, Metrics
from mergelab.eval import load_model, load_tokenizer
from mergelab.evolve.assemble import LiveAssembler
from mergelab.evolve.dataflow import DataflowSpace
from mergelab.evolve.fitness import USES, Reference, make_reference
from mergelab.evolve.job import Job
from mergelab.evolve.live import LiveMerger
from mergelab.evolve.racing import Racer
from mergelab.evolve.scoring import TermData, measure, term_data
from mergelab.recipe import Recipe

log = logging.getLogger(__name__)


def live_model(job: Job, device: str) -> LiveMerger | LiveAssembler:
    """Parameter space: the template merged into one live model; data-flow space: candidates
    assembled from the source layers."""
    if isinstance(job.space, DataflowSpace):
        return LiveAssembler(job.space.every_layer(), device)
    return LiveMerger(job.space.to_recipe(job.space.start()), device)


class SearchEvaluator:
    """The live model of the job's template, and the examples of every split use."""

    def __init__(self, job: Job, device: str) -> None:
        self.job = job
        self.space = job.space
        self.fitness = job.fitness
        self.live = live_model(job, device)
        self.tokenizer = load_tokenizer(self.live.plan.tokenizer_dir)
        self._terms = {use: term_data(job.fitness, use) for use in USES}
        racing = job.fitness.racing
        self.racer = Racer(racing, self._terms["fitness"]) if racing is not None else None
        self._references: dict[str, Reference | None] = {}

    def evaluate(self, genome: Genome) -> Evaluation:
        """One candidate scored on the fitness split (raced, with `fitness.racing`); never raises
        (a failure is an `error`)."""
        try:
            metrics, seconds = self._raced(genome) if self.racer is not None else self.score_timed(genome, "fitness")
        except Exception as exc:  # noqa: BLE001 - any failed candidate is scored worst, the search goes on
            log.debug("candidate failed", exc_info=True)
            return Evaluation({}, {}, f"{type(exc).__name__}: {exc}")
        return Evaluation(metrics, seconds)

    def _raced(self, genome: Genome) -> tuple[Metrics, dict[str, float]]:
        """The first share of the fitness split, then all of it if the candidate goes on (`racing.py`)."""
        assert self.racer is not None
        reference = self.reference("fitness")  # first: `normalize: start` scores the start in the live model
        seconds = self.live.set_recipe(self.space.to_recipe(genome)).as_dict()
        start = time.perf_counter()
        partial = measure(self.live.model, self.tokenizer, self.racer.first)
        seconds["race"] = time.perf_counter() - start
        if not self.racer.goes_on(self.fitness.loss(partial, reference)):
            return partial, seconds
        start = time.perf_counter()
        metrics = measure(self.live.model, self.tokenizer, self._terms["fitness"])
        seconds["eval"] = time.perf_counter() - start
        return metrics, seconds

    def score_timed(self, genome: Genome, use: str) -> tuple[Metrics, dict[str, float]]:
        """Merge `genome` into the live model and score it on split `use`; metrics and seconds."""
        timing = self.live.set_recipe(self.space.to_recipe(genome))
        start = time.perf_counter()
        metrics = measure(self.live.model, self.tokenizer, self._terms[use])
        return metrics, {**timing.as_dict(), "eval": time.perf_counter() - start}

    def score(self, genome: Genome, use: str) -> Metrics:
        return self.score_timed(genome, use)[0]

    def score_recipe(self, recipe: Recipe, use: str) -> Metrics:
        """Any recipe of the template's models (the uniform merge), scored on split `use`."""
        self.live.set_recipe(recipe)
        return measure(self.live.model, self.tokenizer, self._terms[use])

    def reference(self, use: str) -> Reference | None:
        """What the split's scores are normalised by (`fitness.normalize`), or None; computed once."""
        if use not in self._references:
            self._references[use] = self._reference(use)
        return self._references[use]

    def _reference(self, use: str) -> Reference | None:
        kind = self.fitness.normalize
        if kind == "none":
            return None
        if kind == "start":
            return make_reference(kind, self.score(self.space.start(), use))
        experts: Metrics = {}
        for term in self._terms[use]:
            experts.update(self._measure(term.term.expert, [term]))
        if kind == "experts":
            return make_reference(kind, experts)
        ref = make_reference(kind, experts, self._measure(self.fitness.base, self._terms[use]))
        self.fitness.check_gap(ref, f"{self.job.path}: fitness on {use} split")
        return ref

    def _measure(self, path: Path | None, terms: list[TermData]) -> Metrics:
        model, tok = load_model(path)
        return measure(model, tok, terms)

    def source_scores(self, use: str) -> dict[str, Metrics]:
        """Each model of the recipe (base, experts, adapted bases) scored on split `use`."""
        out: dict[str, Metrics] = {}
        for ref in dict.fromkeys(self.live.plan.model_keys):
            out[str(ref)] = self._measure(ref.path if ref.adapter is None else ref.adapter, self._terms[use])
        return out

    def close(self) -> None:
        self.live.close()
