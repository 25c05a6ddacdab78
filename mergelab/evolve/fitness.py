"""The fitness of a candidate: a weighted combination of per-skill scores, as a loss to minimise.

Each term scores the live model on one task (the zoo scorers: answer NLL or exact-match
accuracy) on one split range. With several skills, plain mean NLL is dominated by the hardest
skill, so by default each term is divided by a reference score first: the expert's for that
skill (`normalize: experts`) or the template recipe's (`normalize: start`). The loss is
`sum(weight * value / reference)`, negated when the goal is to maximise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.eval import TaskSplit, load_task, score
from mergelab.evolve.job import FitnessTerm, Job, SplitRange, goal_of, normalize_of

Metrics = dict[str, float]  # "add/nll" -> value


@dataclass(frozen=True)
class TermData:
    """One fitness term with its examples on one split."""

    term: FitnessTerm
    task: TaskSplit

    @property
    def key(self) -> str:
        return f"{self.term.task}/{self.term.metric}"


def term_data(job: Job, use: str) -> list[TermData]:
    """The examples of every term on split `use` (fitness, select or report), `limit` applied."""
    split = job.splits[use]
    return [TermData(t, _range(load_task(job.tasks, t.task, split.name), split).head(t.limit)) for t in job.spec.fitness.terms]


def _range(task: TaskSplit, split: SplitRange) -> TaskSplit:
    return TaskSplit(task.name, task.split, task.examples[split.start:split.end])


def measure(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, terms: list[TermData]) -> Metrics:
    """Every term's score of `model` (keys `task/metric`)."""
    return {d.key: score(model, tokenizer, d.task, d.term.metric).value for d in terms}


def combine(job: Job, metrics: Metrics, reference: Metrics | None) -> float:
    """The loss: weighted, normalised by `reference` (when given), negated to maximise; NaN stays NaN."""
    total = 0.0
    for t in job.spec.fitness.terms:
        key = f"{t.task}/{t.metric}"
        value = metrics[key]
        if reference is not None:
            value = value / reference[key] if reference[key] else math.nan
        total += t.weight * value
    return total if goal_of(job.spec.fitness) == "minimize" else -total


def needs_reference(job: Job) -> str:
    """`experts`, `start` or `none`: what the fitness is normalised by."""
    return normalize_of(job.spec.fitness)
