"""The driver of `mergelab search`: nevergrad ask/tell over a pool of workers.

    1) the job's space -> a nevergrad optimizer from its registry, seeded
    2) `--resume`: the trials in `trials.jsonl` are told again (none re-evaluated)
    3) each worker (`workers.WorkerPool`: in process, or a Ray actor) builds a `SearchEvaluator`
       once; each candidate: genome -> recipe -> merged into the worker's live model -> scored ->
       told as soon as it is back, appended to `trials.jsonl`
    4) the top candidates are re-scored on the select split; the best becomes `best.yaml`
    5) its report-split scores are logged beside those of the start (the template), the uniform
       merge (the template's method, every model at the mean weight) and each source model
       (`report.json`)

A candidate whose merge raises or whose fitness is NaN gets the worst loss and is logged with
its error; the search goes on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError, OutputError
from mergelab.eval import load_model, load_tokenizer
from mergelab.evolve.fitness import Metrics, Reference, check_gap, combine, make_reference, measure, needs_reference, term_data
from mergelab.evolve.job import Job
from mergelab.evolve.live import LiveMerger
from mergelab.evolve.optimizer import make_optimizer
from mergelab.evolve.space import Genome, SearchSpace
from mergelab.evolve.workers import Done, WorkerPool, ask_tell
from mergelab.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

WORST = 1e9  # the loss of a failed candidate: finite, so every optimizer can take it
TRIALS = "trials.jsonl"
BEST = "best.yaml"
TOP_K = 5


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate, as one line of `trials.jsonl`."""

    index: int
    genome: Genome
    values: dict[str, Any]  # the recipe's parameters and method
    metrics: Metrics
    loss: float
    seconds: dict[str, float]
    worker: str = "local"
    error: str | None = None


@dataclass
class SearchResult:
    best: Trial
    best_yaml: Path
    report: dict[str, Metrics] = field(default_factory=dict)  # who -> report-split scores


class SearchEvaluator:
    """What each worker holds: the live model, the fitness data of each split use, the references.

    Built once per worker by `functools.partial(SearchEvaluator, job, device)`; `evaluate` scores
    one candidate on the fitness split and never raises (a failure is a result with `error`)."""

    def __init__(self, job: Job, device: str) -> None:
        self.job = job
        self.space = SearchSpace(job)
        self.live = LiveMerger(self.space.to_recipe(self.space.start()), device)
        self.tokenizer = load_tokenizer(self.live.plan.tokenizer_dir)
        self._terms = {use: term_data(job, use) for use in ("fitness", "select", "report")}

    def evaluate(self, genome: Genome) -> dict[str, Any]:
        """{"metrics", "seconds", "error"} of one candidate on the fitness split."""
        try:
            metrics, seconds = self.score_timed(genome, "fitness")
        except Exception as exc:  # noqa: BLE001 - any failed candidate is scored worst, the search goes on
            log.debug("candidate failed", exc_info=True)
            return {"metrics": {}, "seconds": {}, "error": f"{type(exc).__name__}: {exc}"}
        return {"metrics": metrics, "seconds": seconds, "error": None}

    def score_timed(self, genome: Genome, use: str) -> tuple[Metrics, dict[str, float]]:
        """Merge `genome` into the live model and score it on split `use`; metrics and seconds."""
        timing = self.live.set_recipe(self.space.to_recipe(genome))
        start = time.perf_counter()
        metrics = measure(self.live.model, self.tokenizer, self._terms[use])
        return metrics, {"merge": timing.merge, "load": timing.load, "eval": time.perf_counter() - start}

    def score(self, genome: Genome, use: str) -> Metrics:
        return self.score_timed(genome, use)[0]

    def score_recipe(self, recipe: Recipe, use: str) -> Metrics:
        """Any recipe of the template's models (the uniform merge), scored on split `use`."""
        self.live.set_recipe(recipe)
        return measure(self.live.model, self.tokenizer, self._terms[use])

    def reference(self, use: str) -> Reference | None:
        """What the split's scores are normalised by (`fitness.reference`), or None."""
        kind = needs_reference(self.job)
        if kind == "none":
            return None
        if kind == "start":
            return make_reference(kind, self.score(self.space.start(), use))
        experts: Metrics = {}
        for term, expert in zip(self._terms[use], self.job.experts):
            experts.update(self._measure(expert, [term]))
        if kind == "experts":
            return make_reference(kind, experts)
        ref = make_reference(kind, experts, self._measure(self.job.base, self._terms[use]))
        check_gap(ref, f"{self.job.path}: fitness on {use} split")
        return ref

    def _measure(self, path: Path | None, terms: list) -> Metrics:
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


def uniform_recipe(job: Job) -> Recipe | None:
    """The template with every model's weight set to their mean: the same method, the experts
    weighted evenly (None when the models carry no weight)."""
    data = job.template.model_dump(mode="json", exclude_none=True, exclude={"root"})
    weights = [(m.get("parameters") or {}).get("weight") for m in data["models"]]
    if any(w is None or isinstance(w, dict) or (isinstance(w, list) and not all(isinstance(x, (int, float)) for x in w))
           for w in weights):
        return None
    mean = sum(sum(w) / len(w) if isinstance(w, list) else w for w in weights) / len(weights)
    for m in data["models"]:
        m["parameters"]["weight"] = mean
    return parse_recipe(data, job.template.root, "uniform recipe")


def _values(space: SearchSpace, genome: Genome) -> dict[str, Any]:
    recipe = space.to_recipe(genome)
    data = recipe.model_dump(mode="json", exclude_none=True, exclude={"root"})
    return {"merge_method": data["merge_method"], "parameters": data.get("parameters", {}),
            "models": [m.get("parameters", {}) for m in data.get("models", [])]}


# ---------------------------------------------------------------- trials log
def read_trials(run_dir: Path) -> list[Trial]:
    path = run_dir / TRIALS
    if not path.is_file():
        return []
    return [Trial(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def append_trial(run_dir: Path, trial: Trial) -> None:
    with open(run_dir / TRIALS, "a") as fh:
        fh.write(json.dumps(asdict(trial)) + "\n")


# ---------------------------------------------------------------- the loop
def run_search(job: Job, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
               workers: int | None = None, address: str | None = None, progress: bool = True) -> SearchResult:
    """Run the search of `job` in `run_dir` (created); returns the best trial and `best.yaml`.

    `device`, `workers` and `address` override the job's `workers:` settings."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    told = read_trials(run_dir)
    if told and not resume:
        raise OutputError(f"{run_dir / TRIALS}: already holds {len(told)} trials; pass --resume to continue, or another run folder")
    space = SearchSpace(job)
    opt, spec = job.spec.optimizer, job.spec.workers
    count = workers or spec.count
    optimizer = make_optimizer(opt.name, opt.options, space.parametrization(seed=opt.seed), opt.budget, count, str(job.path))
    for t in told:  # 2) replay, nothing re-evaluated
        optimizer.tell(optimizer.parametrization.spawn_child(new_value=space.to_ng(t.genome)), t.loss)
    device = device or spec.device
    trials = list(told)

    def record(done: Done, loss: float) -> None:
        trial = _trial(space, done, loss, _loss(job, done.result, reference)[1])
        append_trial(run_dir, trial)
        trials.append(trial)

    with WorkerPool(partial(SearchEvaluator, job, device), count, device=device, address=address or spec.address) as pool:
        reference = pool.call("reference", "fitness")
        ask_tell(optimizer, pool, budget=max(0, opt.budget - len(told)), total=opt.budget, progress=progress,
                 first_index=max((t.index for t in told), default=-1) + 1, decode=space.from_ng,
                 loss_of=lambda done: _loss(job, done.result, reference)[0], on_result=record)
        return _finish(job, space, pool, trials, run_dir)


def _loss(job: Job, result: dict[str, Any], reference: Reference | None) -> tuple[float, str | None]:
    """The loss told for a result and why it is the worst, if it is: a failed merge or a NaN fitness."""
    if result["error"] is not None:
        return WORST, result["error"]
    loss = combine(job, result["metrics"], reference)
    return (WORST, "fitness is NaN") if math.isnan(loss) else (loss, None)


def _trial(space: SearchSpace, done: Done, loss: float, error: str | None) -> Trial:
    result = done.result
    if error is not None:
        log.warning("trial %d: %s; scored worst", done.index, error)
    return Trial(done.index, done.genome, _values(space, done.genome), result["metrics"], loss, result["seconds"],
                 done.worker, error)


def _finish(job: Job, space: SearchSpace, pool: WorkerPool, trials: list[Trial], run_dir: Path) -> SearchResult:
    """4) re-score the top candidates on the select split; 5) report the best on the report split."""
    ok = sorted((t for t in trials if t.error is None), key=lambda t: t.loss)[:TOP_K]
    if not ok:
        raise MergelabError(f"{run_dir / TRIALS}: every candidate failed; see the log for why")
    ref = pool.call("reference", "select")
    selected = min(ok, key=lambda t: combine(job, pool.call("score", t.genome, "select"), ref))
    best_yaml = run_dir / BEST
    best_yaml.write_text(space.to_recipe(selected.genome).to_yaml(absolute_paths=True))
    report = {"best": pool.call("score", selected.genome, "report"), "start": pool.call("score", space.start(), "report")}
    uniform = uniform_recipe(job)
    if uniform is not None:
        report["uniform"] = pool.call("score_recipe", uniform, "report")
    report.update(pool.call("source_scores", "report"))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for who, metrics in report.items():
        log.info("report %-40s %s", who, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return SearchResult(selected, best_yaml, report)
