"""The metric registry: every metric a fitness term, a report or `mergelab eval` can name.

Each entry says once what the metric means: its name, whether lower or higher is better, and
how it is scored on a task's examples by a causal LM and by a seq2seq LM. Job schemas, the CLI's
choices, the fitness's goal and the reports read it; adding a metric is one entry here (its
scorers in `eval/`) and its test.

| name | better | causal LM (`eval/scorers.py`) | seq2seq LM (`eval/seq2seq.py`) |
|---|---|---|---|
| accuracy | higher | greedy exact match | greedy `generate` exact match |
| nll | lower | answer NLL, teacher-forced | the model's label loss |
| prob | higher | mean probability of the whole answer | the same from the label logits |
| lm-eval | higher | an lm-eval task's metric (`eval/lm_eval_bridge.py`; scored per task, not per example) | - |

Importing this module imports no model library (the CLI reads the names at start-up); a scorer
is imported when it is first called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from mergelab.errors import DataError


@dataclass(frozen=True)
class Scorer:
    """`module.function(model, tokenizer, examples, batch_size) -> float`, imported on first call
    (picklable, so resolved jobs travel to Ray workers)."""

    module: str
    function: str

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        return getattr(importlib.import_module(self.module), self.function)(*args, **kwargs)


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool
    causal: Scorer | None  # None: not scored on examples (lm-eval scores its own task)
    seq2seq: Scorer | None
    about: str

    @property
    def on_examples(self) -> bool:
        """Scored on a task's examples by mergelab's scorers (not by lm-eval)."""
        return self.causal is not None

    def better(self, a: float, b: float) -> bool:
        """Whether `a` is strictly better than `b`."""
        return a < b if self.lower_is_better else a > b

    def scorer_for(self, model: Any) -> Scorer:
        """The scorer for `model`: seq2seq when its config is encoder-decoder, else causal."""
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        scorer = self.seq2seq if seq2seq else self.causal
        if scorer is None:
            kind = "seq2seq" if seq2seq else "causal"
            raise DataError(f"metric '{self.name}' has no scorer for {kind} models")
        return scorer


_SCORERS, _SEQ2SEQ = "mergelab.eval.scorers", "mergelab.eval.seq2seq"
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", False, Scorer(_SCORERS, "exact_match_accuracy"), Scorer(_SEQ2SEQ, "seq2seq_accuracy"),
           "share of greedy answers equal to the expected one"),
    Metric("nll", True, Scorer(_SCORERS, "answer_nll"), Scorer(_SEQ2SEQ, "seq2seq_nll"),
           "mean negative log-likelihood per answer token (and <eos>): smooth"),
    Metric("prob", False, Scorer(_SCORERS, "answer_prob"), Scorer(_SEQ2SEQ, "seq2seq_prob"),
           "mean probability of the whole answer: smooth like nll, bounded like accuracy"),
    Metric("lm-eval", False, None, None, "an lm-eval task's own metric (lm_eval_metric)"),
)}
LM_EVAL = "lm-eval"
REPORTED = ("accuracy", "nll")  # what reports score every zoo task by (the search's and LoraHub's)


def get_metric(name: str) -> Metric:
    """The registry entry `name`; a one-line error listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise DataError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}") from None


def example_metrics() -> tuple[str, ...]:
    """The names of the metrics scored on examples (every one but lm-eval)."""
    return tuple(n for n, m in METRICS.items() if m.on_examples)


def metric_name(name: str) -> str:
    """A pydantic validator: `name` must be in the registry (its error is a ValueError)."""
    return get_metric(name).name


def example_metric_name(name: str) -> str:
    """A pydantic validator: `name` must be a registry metric scored on examples."""
    if get_metric(name).on_examples:
        return name
    raise DataError(f"'{name}' is not scored on a task's examples; choose one of: {', '.join(example_metrics())}")
