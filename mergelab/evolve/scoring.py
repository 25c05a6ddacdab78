"""Scoring a model held in memory on a job's fitness terms, one split use at a time.

`term_data(fitness, use)` loads each term's examples on split `use` (fitness, select, report)
once, when a worker starts; `measure` scores a model on them (keys `task/metric`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.blackbox.pool import Metrics
from mergelab.blackbox.spec import SplitRange
from mergelab.eval import TaskSplit, lm_eval_score, load_task, score
from mergelab.evolve.fitness import Fitness, Term
from mergelab.metrics import REPORTED, get_metric


@dataclass(frozen=True)
class TermData:
    """One fitness term with its examples on one split: a zoo task split, or for an lm-eval term
    the task and the indices of its documents (None: all)."""

    term: Term
    task: TaskSplit | None = None
    lm_eval: tuple[str, tuple[int, ...] | None] | None = None

    @property
    def key(self) -> str:
        return self.term.key


def term_data(fitness: Fitness, use: str) -> list[TermData]:
    """The examples of every term on split `use` (fitness, select or report).

    `limit` applies to the fitness and select splits; the report split is scored whole, zoo
    tasks on the `REPORTED` metrics (exact-match accuracy and answer NLL). An lm-eval term reads
    the split range as document indices of its task's own evaluation split (the split name is not used)."""
    split = fitness.splits[use]
    out: list[TermData] = []
    zoo_tasks: dict[str, None] = {}
    for t in fitness.terms:
        if t.lm_eval_task is not None:
            limit = None if use == "report" else t.limit
            out.append(TermData(t, lm_eval=(t.lm_eval_task, _documents(split, limit))))
        elif use != "report":
            out.append(TermData(t, _range(load_task(fitness.tasks, t.task, split.name), split).head(t.limit)))
        else:
            zoo_tasks[t.task] = None
    task_splits = {name: _range(load_task(fitness.tasks, name, split.name), split) for name in zoo_tasks}
    out += [TermData(Term(name, get_metric(metric)), task) for name, task in task_splits.items() for metric in REPORTED]
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
            out[d.key] = score(model, tokenizer, d.task, d.term.metric.name).value
    return out
