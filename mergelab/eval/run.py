"""`mergelab eval`: score a model folder on a zoo skill, a JSONL file, or an lm-eval task."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mergelab.errors import DataError
from mergelab.eval.data import TaskSplit, load_task, read_jsonl, tasks_root
from mergelab.eval.lm_eval_bridge import lm_eval_score, zoo_task_folder
from mergelab.eval.models import load_model
from mergelab.eval.scorers import Score, score
from mergelab.metrics import LM_EVAL, example_metrics, get_metric


def find_zoo(model_dir: str | Path) -> Path | None:
    """The zoo a model folder sits in (`ZOO/base`, `ZOO/experts/x`, ...): the nearest parent with `tasks/`."""
    folder = Path(model_dir).resolve()
    for parent in [folder, *folder.parents][:4]:
        if (parent / "tasks").is_dir():
            return parent
    return None


def evaluate(
    model_dir: str | Path,
    task: str,
    *,
    split: str = "test",
    metric: str | None = None,
    limit: int | None = None,
    zoo: str | Path | None = None,
    batch_size: int = 256,
) -> Score:
    """Load `model_dir` and score it on `task`.

    `task` is a zoo skill (tasks of `zoo`, or of the zoo `model_dir` sits in), a JSONL file,
    or an lm-eval task (a name or a local task folder). `metric` is a name of the registry
    (`mergelab.metrics`): "accuracy" (default for zoo skills and files), "nll", "prob", or
    "lm-eval" (default otherwise; for a zoo skill it runs the shipped lm-eval task on the
    skill's test split).
    """
    if metric is not None:
        get_metric(metric)  # a one-line error naming the known ones
    root = Path(zoo) if zoo is not None else find_zoo(model_dir)
    is_skill = root is not None and (tasks_root(root) / task).is_dir()
    is_file = Path(task).is_file()
    if metric in example_metrics() and not (is_skill or is_file):
        where = f"in {tasks_root(root)}" if root is not None else "(no zoo found; pass zoo=DIR)"
        raise DataError(f"no task {task!r} {where}; give a zoo skill, a JSONL file, or use metric='lm-eval'", arguments=("zoo", "metric"))
    model, tokenizer = load_model(model_dir)
    if is_file and metric != LM_EVAL:
        data = TaskSplit(Path(task).stem, "file", read_jsonl(task)).head(limit)
        return score(model, tokenizer, data, metric or "accuracy", batch_size)
    if is_skill and metric != LM_EVAL:
        return score(model, tokenizer, load_task(root, task, split, limit), metric or "accuracy", batch_size)
    if is_skill:
        with tempfile.TemporaryDirectory(prefix="mergelab-lm-eval-") as tmp:
            return lm_eval_score(model, tokenizer, zoo_task_folder(root, task, tmp), limit=limit, batch_size=batch_size)
    return lm_eval_score(model, tokenizer, task, limit=limit, batch_size=batch_size)
