"""Run lm-eval tasks on a model held in memory, through lm-eval's own HF wrapper.

The model is wrapped with `HFLM(pretrained=model, tokenizer=tokenizer)`: no reload, no copy.
Tasks are lm-eval task names or local task-YAML folders whose data are local files
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`); the hub is switched off, so a
task that needs a download fails instead of fetching. `zoo_task_folder` writes such a folder
for any zoo skill from the template shipped in `lm_eval_tasks/zoo_skill.yaml`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from string import Template
from typing import Any, Iterator

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from mergelab.errors import DataError
from mergelab.eval.data import read_jsonl, task_file
from mergelab.eval.scorers import Score

ZOO_TEMPLATE = Path(__file__).parent / "lm_eval_tasks" / "zoo_skill.yaml"


def zoo_task_folder(zoo_or_tasks_dir: str | Path, skill: str, dest: str | Path) -> Path:
    """Write the lm-eval task `zoo_<skill>` (reading the zoo's local JSONL) into folder `dest`."""
    files = {split: task_file(zoo_or_tasks_dir, skill, split).resolve() for split in ("validation", "test")}
    for path in files.values():
        read_jsonl(path)  # fail here, on one line, rather than deep inside lm-eval
    text = Template(ZOO_TEMPLATE.read_text(encoding="utf-8")).substitute(
        skill=skill, validation_file=files["validation"], test_file=files["test"]
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"zoo_{skill}.yaml").write_text(text, encoding="utf-8")
    return dest


def _offline() -> None:
    """Forbid hub downloads, also when `datasets` was imported before the variables were set."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


class _IgnoreTags(yaml.SafeLoader):
    """A YAML loader that reads lm-eval's `!function` tags as plain values."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_names(folder: Path) -> list[str]:
    """The `task:` names defined by the YAML files of a local task folder."""
    names = []
    for path in sorted(folder.rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTags)  # noqa: S506 (safe loader)
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.append(doc["task"])
    return names


def _resolve(task: str | Path, include_path: str | Path | None) -> tuple[str, Path | None]:
    """(task name, folder to include): a folder with one task, or a name (looked up in `include_path`)."""
    if Path(task).is_dir():
        folder = Path(task)
        names = _task_names(folder)
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise DataError(f"{folder}: expected one lm-eval task in this folder, found {found}; pass a name and include_path")
        return names[0], folder
    if include_path is not None and not Path(include_path).is_dir():
        raise DataError(f"{include_path}: no such lm-eval task folder")
    return str(task), None if include_path is None else Path(include_path)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO; keep it to warnings unless mergelab itself is in debug."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    if not logging.getLogger("mergelab").isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"exact_match,none": 0.9, "exact_match_stderr,none": ...}` -> `{"exact_match": 0.9, ...}`."""
    out = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
            out[key.split(",")[0]] = float(value)
    return out


def lm_eval_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Path,
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    samples: list[int] | None = None,
    batch_size: int = 64,
    metric: str | None = None,
) -> Score:
    """Run one lm-eval task on the in-memory model; `metric` picks the reported one (default: the first).

    `task` is a local task folder holding one task, or a task name (found in `include_path` when
    given, else among lm-eval's own tasks). `samples` picks documents of the task's evaluation
    split by index (instead of the first `limit`). All of lm-eval's metrics land in `Score.details`.
    Seeds are left alone, so a search's random state is not reset by scoring.
    """
    _offline()
    name, folder = _resolve(task, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=folder is None)
        if name not in manager.all_tasks:
            raise DataError(f"unknown lm-eval task {name!r}" + (f" in {folder}" if folder else ""))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        start = time.perf_counter()
        results = simple_evaluate(
            model=lm, tasks=[name], limit=limit, samples=None if samples is None else {name: list(samples)},
            task_manager=manager, bootstrap_iters=0, log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    metrics = _metrics(results["results"][name])
    chosen = metric or next((k for k in metrics if not k.endswith("_stderr")), None)
    if chosen not in metrics:
        raise DataError(f"lm-eval task {name!r} has no metric {metric!r} (it reports: {', '.join(metrics)})")
    split = results["configs"][name].get("test_split") or results["configs"][name].get("validation_split") or "?"
    n = int(results["n-samples"][name]["effective"])
    return Score(name, str(split), chosen, metrics[chosen], n, seconds, metrics)
