"""Fast evaluation of a model held in memory: the metrics of `mergelab.metrics` (exact match,
answer NLL and probability, for causal and seq2seq models) and lm-eval tasks.

    task = load_task("zoo", "add", "test", limit=200)
    score(model, tokenizer, task, metric="nll")          # -> Score(task, split, metric, value, n, seconds)
    lm_eval_score(model, tokenizer, zoo_task_folder("zoo", "add", tmp))
"""

from __future__ import annotations

from mergelab.eval.data import Example, TaskSplit, load_task, read_jsonl, task_file
from mergelab.eval.lm_eval_bridge import lm_eval_score, zoo_task_folder
from mergelab.eval.models import load_model, load_tokenizer
from mergelab.eval.scorers import Score, answer_nll, answer_prob, exact_match_accuracy, greedy_answers, score

__all__ = [
    "Example",
    "Score",
    "TaskSplit",
    "answer_nll",
    "answer_prob",
    "exact_match_accuracy",
    "greedy_answers",
    "lm_eval_score",
    "load_model",
    "load_task",
    "load_tokenizer",
    "read_jsonl",
    "score",
    "task_file",
    "zoo_task_folder",
]
