"""The fitness of a candidate: a weighted combination of per-skill scores, as a loss to minimise.

Each term scores the live model on one task (the zoo scorers: answer NLL or exact-match
accuracy) on one split range. With several skills, plain mean NLL is dominated by the hardest
skill and a search on it trades the others away, so each term is first put on a common scale
by a `Reference`, a (zero, one) pair per term: normalised = (value - zero) / (one - zero).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.errors import DataError
from mergelab.eval import TaskSplit, lm_eval_score, load_task, score
from mergelab.evolve.job import FitnessTerm, Job, SplitRange, goal_of, lm_eval_task, normalize_of

Metrics = dict[str, float]  # "add/nll" -> value
Reference = dict[str, tuple[float, float]]  # "add/nll" -> (zero, one) of its normalisation


@dataclass(frozen=True)
class TermData:
    """One fitness term with its examples on one split: a zoo task split, or for an lm-eval term
    the task and the indices of its documents (None: all)."""

    term: FitnessTerm
    task: TaskSplit | None = None
    lm_eval: tuple[str, tuple[int, ...] | None] | None = None

    @property
    def key(self) -> str:
        return f"{self.term.task}/{self.term.metric}"


def term_data(job: Job, use: str) -> list[TermData]:
    """The examples of every term on split `use` (fitness, select or report).

    `limit` applies to the fitness and select splits; the report split is scored whole, zoo
    tasks on both metrics (answer NLL and exact-match accuracy). An lm-eval term reads the split
    range as document indices of its task's own evaluation split (the split name is not used)."""
    split = job.splits[use]
    out: list[TermData] = []
    zoo_tasks: dict[str, None] = {}
    for t in job.spec.fitness.terms:
        if t.metric == "lm-eval":
            limit = None if use == "report" else t.limit
            out.append(TermData(t, lm_eval=(lm_eval_task(t, job.path.parent), _documents(split, limit))))
        elif use != "report":
            out.append(TermData(t, _range(load_task(job.tasks, t.task, split.name), split).head(t.limit)))
        else:
            zoo_tasks[t.task] = None
    task_splits = {name: _range(load_task(job.tasks, name, split.name), split) for name in zoo_tasks}
    out += [TermData(FitnessTerm(task=name, metric=metric), task) for name, task in task_splits.items()
            for metric in ("accuracy", "nll")]
    return out


def _documents(split: SplitRange, limit: int | None) -> tuple[int, ...] | None:
    """The document indices of a split range, at most `limit` of them; None: every document."""
    ends = [e for e in (split.end, None if limit is None else split.start + limit) if e is not None]
    return tuple(range(split.start, min(ends))) if ends else None


def _range(task: TaskSplit, split: SplitRange) -> TaskSplit:
    return TaskSplit(task.name, task.split, task.examples[split.start:split.end])


def measure(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, terms: list[TermData]) -> Metrics:
    """Every term's score of `model` (keys `task/metric`)."""
    out: Metrics = {}
    for d in terms:
        if d.lm_eval is not None:
            task, docs = d.lm_eval
            out[d.key] = lm_eval_score(model, tokenizer, task, samples=None if docs is None else list(docs),
                                       metric=d.term.lm_eval_metric).value
        else:
            out[d.key] = score(model, tokenizer, d.task, d.term.metric).value
    return out


def combine(job: Job, metrics: Metrics, reference: Reference | None) -> float:
    """The loss: weighted, normalised by `reference` (when given), negated to maximise; NaN stays NaN."""
    total = 0.0
    for t in job.spec.fitness.terms:
        key = f"{t.task}/{t.metric}"
        value = metrics[key]
        if reference is not None:
            zero, one = reference[key]
            value = (value - zero) / (one - zero) if one != zero else math.nan
        total += t.weight * value
    return total if goal_of(job.spec.fitness) == "minimize" else -total


def make_reference(kind: str, metrics: Metrics, base: Metrics | None = None) -> Reference:
    """The (zero, one) pairs of a normalisation from the reference scores (and the base's, for gap)."""
    if kind != "gap":
        return {k: (0.0, v) for k, v in metrics.items()}
    assert base is not None
    return {k: (v, base[k]) for k, v in metrics.items()}


def check_gap(ref: Reference, where: str) -> None:
    """Each expert must beat the base on its own skill, or the gap to close is empty (or negative)."""
    for key, (expert, base) in ref.items():
        better = expert < base if key.endswith("/nll") else expert > base
        if not better:
            raise DataError(f"{where}: {key}: the expert ({expert:.4g}) is no better than the base ({base:.4g}); "
                            "normalize: gap has no gap to close there, use normalize: experts")


def needs_reference(job: Job) -> str:
    """`experts`, `start` or `none`: what the fitness is normalised by."""
    return normalize_of(job.spec.fitness)
