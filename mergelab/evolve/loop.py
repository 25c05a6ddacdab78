"""The driver of `mergelab search`: nevergrad ask/tell over a pool of workers.

    1) the job's space -> a nevergrad optimizer from its registry, seeded
    2) `--resume`: the trials in `trials.jsonl` are told again (none re-evaluated)
    3) each worker (`blackbox.WorkerPool`: in process, or a Ray actor) builds a `SearchEvaluator`
       once; each candidate: genome -> recipe -> merged into the worker's live model -> scored ->
       its loss (`job.fitness`) told as soon as it is back (`blackbox.ask_tell`), appended to
       `trials.jsonl`
    4) the top candidates are re-scored on the select split; the best becomes `best.yaml`
    5) its report-split scores are logged beside those of the start (the template), the uniform
       merge (the template's method, every model at the mean weight) and each source model
       (`report.json`)

With several objectives (`job.objectives`, `objectives.py`) the optimizer is told each one's
loss, every trial records them (`losses`), and 4) becomes the front's: its members re-scored on
the select split, the pick rule choosing `best.yaml` (`front.py`, which writes `front.json`).

A candidate whose merge raises or whose fitness is not finite gets the worst loss
(`blackbox.loop.WORST`) and is logged with its error; the search goes on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from mergelab.blackbox.loop import Loss, ask_tell, tell
from mergelab.blackbox.optimizer import make_optimizer
from mergelab.blackbox.pool import Done, Genome, Metrics, WorkerPool
from mergelab.errors import MergelabError, OutputError
from mergelab.evolve.dataflow import DataflowSpace, with_merged_sources
from mergelab.evolve.evaluator import SearchEvaluator
from mergelab.evolve.front import BEST, choose_from_front
from mergelab.evolve.job import Job
from mergelab.evolve.space import SearchSpace
from mergelab.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

TRIALS = "trials.jsonl"
TOP_K = 5


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate, as one line of `trials.jsonl`."""

    index: int
    genome: Genome
    values: dict[str, Any]  # the recipe's parameters and method (data-flow: its layers)
    metrics: Metrics
    loss: float
    seconds: dict[str, float]
    worker: str = "local"
    error: str | None = None
    losses: dict[str, float] | None = None  # several objectives: each one's loss (fitness split)


@dataclass
class SearchResult:
    best: Trial
    best_yaml: Path
    report: dict[str, Metrics] = field(default_factory=dict)  # who -> report-split scores


def uniform_recipe(job: Job) -> Recipe | None:
    """The template with every model's weight set to their mean: the same method, the experts
    weighted evenly (None when the models carry no weight)."""
    if job.template.models is None:  # a data-flow job's template: a route, no weights
        return None
    data = job.template.model_dump(mode="json", exclude_none=True, exclude={"root"})
    weights = [(m.get("parameters") or {}).get("weight") for m in data["models"]]
    if any(w is None or isinstance(w, dict) or (isinstance(w, list) and not all(isinstance(x, (int, float)) for x in w))
           for w in weights):
        return None
    mean = sum(sum(w) / len(w) if isinstance(w, list) else w for w in weights) / len(weights)
    for m in data["models"]:
        m["parameters"]["weight"] = mean
    return parse_recipe(data, job.template.root, "uniform recipe")


# ---------------------------------------------------------------- trials log
def read_trials(run_dir: Path) -> list[Trial]:
    path = run_dir / TRIALS
    if not path.is_file():
        return []
    return [Trial(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def append_trial(run_dir: Path, trial: Trial) -> None:
    data = asdict(trial)
    if trial.losses is None:  # one objective: the lines of before
        del data["losses"]
    with open(run_dir / TRIALS, "a") as fh:
        fh.write(json.dumps(data) + "\n")


# ---------------------------------------------------------------- the loop
def run_search(job: Job, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
               workers: int | None = None, address: str | None = None, progress: bool = True) -> SearchResult:
    """Run the search of `job` in `run_dir` (created); returns the best trial and `best.yaml`.

    `device`, `workers` and `address` override the job's `workers:` settings."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    told = read_trials(run_dir)
    if told and not resume:
        raise OutputError(f"{run_dir / TRIALS}: already holds {len(told)} trials; pass resume=True to continue, or another run folder",
                          arguments=("resume",))
    if isinstance(job.space, DataflowSpace):  # recipe sources merged into the run folder first
        space = with_merged_sources(job.space, run_dir, progress)
        job = replace(job, space=space, template=space.to_recipe(space.start()))
    space, opt, spec = job.space, job.optimizer, job.workers
    count = workers or spec.count
    # a data-flow search scores its start (model 0 itself, or a parameter search's result) first,
    # whatever the optimizer's own first point (TwoPointsDE's is random)
    first = (space.to_ng(space.start()),) if isinstance(space, DataflowSpace) and not told else ()
    optimizer = make_optimizer(opt.name, opt.options, space.parametrization(seed=opt.seed), opt.budget, count, str(job.path),
                               suggestions=first)
    names = job.objectives.names if job.objectives else ()
    for t in sorted(told, key=lambda t: bool(names) and t.error is not None):  # 2) replay, nothing re-evaluated
        # (several objectives: successes first, as ask_tell tells them: nevergrad's bounds come from the first)
        tell(optimizer, optimizer.parametrization.spawn_child(new_value=space.to_ng(t.genome)), _told(t, names, run_dir))
    device = device or spec.device
    trials = list(told)

    def record(done: Done, loss: Loss) -> None:
        trial = _trial(space, done, loss)
        append_trial(run_dir, trial)
        trials.append(trial)

    with WorkerPool(partial(SearchEvaluator, job, device), count, device=device, address=address or spec.address) as pool:
        reference = pool.call(SearchEvaluator.reference, "fitness")
        ask_tell(optimizer, pool, budget=max(0, opt.budget - len(told)), total=opt.budget, progress=progress,
                 first_index=max((t.index for t in told), default=-1) + 1, decode=space.from_ng,
                 loss_of=lambda done: job.fitness.loss(done.result.metrics, reference), on_result=record, what="fitness",
                 objectives=names, objectives_of=lambda done: job.objectives.losses(  # type: ignore[union-attr]
                     job.fitness, done.result.metrics, reference, done.genome, space))
        return _finish(job, pool, trials, run_dir)


def _trial(space: SearchSpace | DataflowSpace, done: Done, loss: Loss) -> Trial:
    if loss.error is not None:
        log.warning("trial %d: %s; scored worst", done.index, loss.error)
    return Trial(done.index, done.genome, space.values(done.genome), done.result.metrics, loss.value,
                 done.result.seconds, done.worker, loss.error, loss.values)


def _told(t: Trial, names: tuple[str, ...], run_dir: Path) -> float | list[float]:
    """What a replayed trial tells the optimizer: its loss, or its objectives' (the job's, by name)."""
    if not names and t.losses is None:
        return t.loss
    if t.losses is None or set(t.losses) != set(names):
        raise OutputError(f"{run_dir / TRIALS}: trial {t.index} holds objectives {sorted(t.losses or ())}, the job "
                          f"declares {sorted(names)}; resume with the job the run was started with, or use another run folder",
                          arguments=("resume",))
    return [t.losses[n] for n in names]


def _finish(job: Job, pool: WorkerPool[SearchEvaluator], trials: list[Trial], run_dir: Path) -> SearchResult:
    """4) re-score the top candidates on the select split; 5) report the best on the report split."""
    ok = sorted((t for t in trials if t.error is None), key=lambda t: t.loss)[:TOP_K]
    if not ok:
        raise MergelabError(f"{run_dir / TRIALS}: every candidate failed; see the log for why")
    best_yaml = run_dir / BEST
    if job.objectives is not None:
        selected = choose_from_front(job, pool, trials, run_dir)
    else:
        ref = pool.call(SearchEvaluator.reference, "select")
        selected = min(ok, key=lambda t: job.fitness.loss(pool.call(SearchEvaluator.score, t.genome, "select"), ref))
        best_yaml.write_text(job.space.to_recipe(selected.genome).to_yaml(absolute_paths=True))
    report = {"best": pool.call(SearchEvaluator.score, selected.genome, "report"),
              "start": pool.call(SearchEvaluator.score, job.space.start(), "report")}
    uniform = uniform_recipe(job)
    if uniform is not None:
        report["uniform"] = pool.call(SearchEvaluator.score_recipe, uniform, "report")
    report.update(pool.call(SearchEvaluator.source_scores, "report"))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for who, metrics in report.items():
        log.info("report %-40s %s", who, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return SearchResult(selected, best_yaml, report)
