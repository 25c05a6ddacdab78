"""The ask/tell loop, local and single process: the driver of `mergelab search` before Ray.

    1) the job's space -> a nevergrad optimizer from its registry, seeded
    2) `--resume`: the trials in `trials.jsonl` are told again (none re-evaluated)
    3) each candidate: genome -> recipe -> merged into the live model -> scored -> told, logged
    4) the top candidates are re-scored on the select split; the best becomes `best.yaml`
    5) its report-split scores are logged beside those of each source model and of the start

A candidate whose merge raises (a `MergelabError`) or whose loss is NaN gets the worst loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mergelab.errors import MergelabError, OutputError
from mergelab.eval import load_model, load_tokenizer
from mergelab.evolve.fitness import Metrics, combine, measure, needs_reference, term_data
from mergelab.evolve.job import Job
from mergelab.evolve.live import LiveMerger
from mergelab.evolve.space import Genome, SearchSpace

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


class Evaluator:
    """The live model plus the fitness data and references of each split use."""

    def __init__(self, job: Job, space: SearchSpace, device: str) -> None:
        self.job, self.space = job, space
        self.live = LiveMerger(space.to_recipe(space.start()), device)
        self.tokenizer = load_tokenizer(self.live.plan.tokenizer_dir)
        self._terms = {use: term_data(job, use) for use in ("fitness", "select", "report")}
        self._refs: dict[str, Metrics | None] = {}

    def reference(self, use: str) -> Metrics | None:
        """What the split's scores are divided by: the experts', the start recipe's, or nothing."""
        if use not in self._refs:
            kind = needs_reference(self.job)
            self._refs[use] = None if kind == "none" else (self._experts(use) if kind == "experts" else self.score(self.space.start(), use)[0])
        return self._refs[use]

    def _experts(self, use: str) -> Metrics:
        out: Metrics = {}
        for term, expert in zip(self._terms[use], self.job.experts):
            model, tok = load_model(expert)
            out.update(measure(model, tok, [term]))
        return out

    def score(self, genome: Genome, use: str) -> tuple[Metrics, dict[str, float]]:
        """Merge `genome` into the live model and score it on split `use`; metrics and seconds."""
        timing = self.live.set_recipe(self.space.to_recipe(genome))
        start = time.perf_counter()
        metrics = measure(self.live.model, self.tokenizer, self._terms[use])
        return metrics, {"merge": timing.merge, "load": timing.load, "eval": time.perf_counter() - start}

    def trial(self, index: int, genome: Genome) -> Trial:
        """Score one candidate on the fitness split; failures get the worst loss."""
        values = _values(self.space, genome)
        try:
            metrics, seconds = self.score(genome, "fitness")
            loss = combine(self.job, metrics, self.reference("fitness"))
        except MergelabError as exc:
            log.warning("trial %d: merge failed (%s); scored worst", index, exc)
            return Trial(index, genome, values, {}, WORST, {}, error=str(exc))
        if math.isnan(loss):
            log.warning("trial %d: fitness is NaN (%s); scored worst", index, metrics)
            return Trial(index, genome, values, metrics, WORST, seconds, error="fitness is NaN")
        return Trial(index, genome, values, metrics, loss, seconds)


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
               progress: bool = True) -> SearchResult:
    """Run the search of `job` in `run_dir` (created); returns the best trial and `best.yaml`."""
    import nevergrad as ng

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    told = read_trials(run_dir)
    if told and not resume:
        raise OutputError(f"{run_dir / TRIALS}: already holds {len(told)} trials; pass --resume to continue, or another run folder")
    space = SearchSpace(job)
    opt = job.spec.optimizer
    optimizer = ng.optimizers.registry[opt.name](parametrization=space.parametrization(seed=opt.seed), budget=opt.budget, num_workers=1)
    for t in told:  # 2) replay, nothing re-evaluated
        optimizer.tell(optimizer.parametrization.spawn_child(new_value=space.to_ng(t.genome)), t.loss)
    evaluator = Evaluator(job, space, device or job.spec.workers.device)
    trials = list(told)
    bar = tqdm(total=opt.budget, initial=len(told), disable=not progress, desc="search", unit="candidate")
    try:
        for index in range(len(told), opt.budget):  # 3) ask, evaluate, tell
            candidate = optimizer.ask()
            trial = evaluator.trial(index, space.from_ng(candidate.value))
            optimizer.tell(candidate, trial.loss)
            append_trial(run_dir, trial)
            trials.append(trial)
            bar.set_postfix_str(f"best {min(t.loss for t in trials):.4g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return _finish(job, space, evaluator, trials, run_dir)


def _finish(job: Job, space: SearchSpace, evaluator: Evaluator, trials: list[Trial], run_dir: Path) -> SearchResult:
    """4) re-score the top candidates on the select split; 5) report the best on the report split."""
    ok = sorted((t for t in trials if t.error is None), key=lambda t: t.loss)[:TOP_K]
    if not ok:
        raise MergelabError(f"{run_dir / TRIALS}: every candidate failed; see the log for why")
    ref = evaluator.reference("select")
    selected = min(ok, key=lambda t: combine(job, evaluator.score(t.genome, "select")[0], ref))
    best_yaml = run_dir / BEST
    best_yaml.write_text(space.to_recipe(selected.genome).to_yaml(absolute_paths=True))
    report = {"best": evaluator.score(selected.genome, "report")[0], "start": evaluator.score(space.start(), "report")[0]}
    for term_model in dict.fromkeys(evaluator.live.plan.model_keys):
        model, tok = load_model(term_model.path) if term_model.adapter is None else load_model(term_model.adapter)
        report[str(term_model)] = measure(model, tok, term_data(job, "report"))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for who, metrics in report.items():
        log.info("report %-40s %s", who, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return SearchResult(selected, best_yaml, report)
