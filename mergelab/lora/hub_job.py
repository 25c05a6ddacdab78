"""LoraHub jobs (`search/lorahub_*.yaml`): a base, a pool of adapters, a few examples, the optimizer.

    base: ../zoo/base
    adapters: ../zoo/adapters/*                # a glob, or a list of folders
    examples: {task: mirror, tasks: ../zoo/tasks, split: "train[0:5]"}   # or a JSONL file (prompt, answer)
    report: {task: mirror, tasks: ../zoo/tasks, split: test, limit: 200}  # optional
    optimizer: {name: NGOpt, budget: 40, seed: 0, low: -1.5, high: 1.5}     # any nevergrad registry name
    l1: 0.05                                   # penalty l1 * mean |w|
    workers: {count: 1, device: cpu}

Paths are relative to the job file. Everything is checked before the base model is loaded
(adapter folders have a LoRA `adapter_config.json`, the examples have prompts and answers, the
optimizer exists); each error is one line naming the key path. Loading resolves the job once:
the optimizer's start points (w = 0, then each adapter alone at `high`), the report's metrics
(registry entries) and the settings the search reads.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, TypeVar, Union

from pydantic import AfterValidator, Field

from mergelab.blackbox.optimizer import OptimizerSpec, check_optimizer
from mergelab.blackbox.spec import SplitRange, WorkerSpec, check_device, load_job_file, parse_split
from mergelab.errors import MergelabError, RecipeError
from mergelab.eval.data import Example, TaskSplit, load_task, read_jsonl
from mergelab.lora.adapter import read_config
from mergelab.metrics import REPORTED, Metric, example_metric_name, get_metric
from mergelab.user_yaml import Strict, resolve_path, validated

T = TypeVar("T")


class TaskSpec(Strict):
    """Examples of a zoo-style task: `<tasks>/<task>/<split name>.jsonl`, optionally a range of it."""

    task: str
    tasks: str
    split: str


class ExamplesSpec(TaskSpec):
    split: str = "train[0:5]"


class ReportSpec(TaskSpec):
    split: str = "test"
    limit: int | None = Field(None, ge=1)
    metrics: list[Annotated[str, AfterValidator(example_metric_name)]] = Field(list(REPORTED), min_length=1)


class HubOptimizerSpec(OptimizerSpec):
    name: str = "NGOpt"
    budget: int = Field(40, ge=1)
    low: float = -1.5
    high: float = 1.5
    singles: bool = True  # after w = 0, try each adapter alone at `high` (N steps of the budget)


class HubJobSpec(Strict):
    base: str
    adapters: Union[str, list[str]]
    examples: Union[str, ExamplesSpec]
    report: ReportSpec | None = None
    optimizer: HubOptimizerSpec = HubOptimizerSpec()
    l1: float = Field(0.05, ge=0)
    workers: WorkerSpec = WorkerSpec()


@dataclass(frozen=True)
class HubJob:
    """A validated LoraHub job, resolved: paths, loaded examples, the search's settings (small, picklable)."""

    path: Path
    base: Path
    adapters: tuple[Path, ...]
    examples: tuple[Example, ...]
    report: TaskSplit | None
    metrics: tuple[Metric, ...]  # what the report split is scored by
    optimizer: HubOptimizerSpec
    starts: tuple[tuple[float, ...], ...]  # weight vectors tried first, in order
    l1: float
    workers: WorkerSpec

    def penalty(self, weights: list[float]) -> float:
        """l1 * mean |w|."""
        return self.l1 * sum(abs(w) for w in weights) / len(weights)


# ---------------------------------------------------------------- loading
def load_hub_job(path: str | os.PathLike[str]) -> HubJob:
    """Read and validate a LoraHub job; every error is a one-line `RecipeError` naming the key."""
    return load_job_file(path, "a LoraHub job must be a YAML mapping with 'base', 'adapters' and 'examples' keys",
                         parse_hub_job)


def parse_hub_job(data: dict, root: Path, label: str, path: Path | None = None) -> HubJob:
    """Validate a job given as a dict; paths are relative to `root`; `label` names it in errors."""
    spec = validated(HubJobSpec, data, label)
    base = resolve_path(root, spec.base)
    if not (base / "config.json").is_file():
        raise RecipeError(f"{label}: base: {base}: not a model folder (no config.json)")
    adapters = _adapters(spec.adapters, root, label)
    _check_bounds(spec.optimizer, label)
    check_optimizer(spec.optimizer, label)
    check_device(spec.workers, label)
    examples = _examples(spec.examples, root, label)
    report = _report(spec, root, label)
    metrics = tuple(get_metric(m) for m in dict.fromkeys(spec.report.metrics)) if spec.report else ()
    return HubJob(path or root / "job.yaml", base, adapters, examples, report, metrics, spec.optimizer,
                  starts(spec.optimizer, len(adapters)), spec.l1, spec.workers)


def starts(opt: HubOptimizerSpec, n: int) -> tuple[tuple[float, ...], ...]:
    """w = 0 (the base model), then with `singles` each adapter alone at `high`: near 0 the loss is
    flat (an update grows with w^2), so these give the optimizer a foothold in every single-adapter basin."""
    zero = (0.0,) * n
    if not opt.singles:
        return (zero,)
    return (zero, *(tuple(opt.high if j == i else 0.0 for j in range(n)) for i in range(n)))


def _adapters(source: str | list[str], root: Path, label: str) -> tuple[Path, ...]:
    """The adapter folders: a list, or a glob (sorted); each must hold a LoRA adapter_config.json."""
    if isinstance(source, str):
        found = sorted(Path(p) for p in glob.glob(str(resolve_path(root, source))) if Path(p).is_dir())
        if not found:
            raise RecipeError(f"{label}: adapters: {source!r} matches no folder")
        keys = [f"adapters ({p.name})" for p in found]
    else:
        found = [resolve_path(root, p) for p in source]
        keys = [f"adapters[{i}]" for i in range(len(found))]
    if len(found) < 2:
        raise RecipeError(f"{label}: adapters: LoraHub composes a pool; give at least 2 adapters, got {len(found)}")
    if len(set(found)) < len(found):
        raise RecipeError(f"{label}: adapters: the same folder is listed twice")
    for key, folder in zip(keys, found):
        _reworded(lambda: read_config(folder), f"{label}: {key}")
    return tuple(found)


def _check_bounds(opt: HubOptimizerSpec, label: str) -> None:
    """The search starts at weight 0 (the base model), so 0 must lie inside [low, high]."""
    if not opt.low < opt.high:
        raise RecipeError(f"{label}: optimizer.low ({opt.low:g}) must be below optimizer.high ({opt.high:g})")
    if not opt.low <= 0 <= opt.high:
        raise RecipeError(f"{label}: optimizer: the search starts at weight 0, so low must be <= 0 <= high")


def _examples(source: str | ExamplesSpec, root: Path, label: str) -> tuple[Example, ...]:
    """The few-shot examples: a JSONL file, or a task split range."""
    if isinstance(source, str):
        return _reworded(lambda: read_jsonl(resolve_path(root, source)), f"{label}: examples")
    examples = _task_range(source, root, f"{label}: examples").examples
    if not examples:
        raise RecipeError(f"{label}: examples.split: {source.split!r} holds no example")
    return examples


def _report(spec: HubJobSpec, root: Path, label: str) -> TaskSplit | None:
    """The report split, which must share no example with the few-shot examples."""
    if spec.report is None:
        return None
    if isinstance(spec.examples, ExamplesSpec) and _same_task(spec.examples, spec.report, root):
        ranges = [parse_split(s.split, label) for s in (spec.examples, spec.report)]
        if ranges[0].overlaps(ranges[1]):
            raise RecipeError(f"{label}: report.split: overlaps examples.split; report on examples the search did not see")
    task = _task_range(spec.report, root, f"{label}: report")
    return task.head(spec.report.limit)


def _same_task(a: TaskSpec, b: TaskSpec, root: Path) -> bool:
    return a.task == b.task and resolve_path(root, a.tasks) == resolve_path(root, b.tasks)


def _task_range(spec: TaskSpec, root: Path, where: str) -> TaskSplit:
    """`<tasks>/<task>/<split>.jsonl`, cut to the split's [start:end] range."""
    split: SplitRange = parse_split(spec.split, f"{where}.split")
    task = _reworded(lambda: load_task(resolve_path(root, spec.tasks), spec.task, split.name), where)
    return TaskSplit(task.name, spec.split, task.examples[split.start:split.end])


def _reworded(load: Callable[[], T], where: str) -> T:
    """`load()`, its error (a bad file, a missing folder) prefixed with the job key it came from."""
    try:
        return load()
    except MergelabError as exc:
        raise RecipeError(f"{where}: {exc}", arguments=exc.arguments) from None
