"""The end of a search with several objectives: the front, re-scored on the select split, the pick.

    RUN/front.json   the objectives, the pick weights, and each member of the front (the
                     non-dominated trials on the fitness split), best first by the pick rule: its
                     trial index, losses on the fitness split, on the select split (the first
                     `FRONT_CAP`, re-scored), its values and its recipe; the pick weights and the
                     depth's unit (max_layers); `rule` is the trial the
                     rule picked (its report-split scores are report.json's `best`), `picked` the
                     one best.yaml holds now (`mergelab search pick RUN TRIAL` changes it)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mergelab.blackbox.pool import WorkerPool
from mergelab.errors import DataError
from mergelab.evolve.evaluator import SearchEvaluator
from mergelab.evolve.job import Job
from mergelab.evolve.objectives import FRONT_CAP, pareto_front, pick_order

if TYPE_CHECKING:
    from mergelab.evolve.loop import Trial

FRONT = "front.json"
BEST = "best.yaml"


def front_of(trials: Sequence[Trial], names: Sequence[str]) -> list[Trial]:
    """The non-dominated trials (every objective minimised), failed ones left out, in trial order."""
    ok = sorted((t for t in trials if t.error is None and t.losses is not None), key=lambda t: t.index)
    return [ok[i] for i in pareto_front([vector(t.losses, names) for t in ok])]


def vector(losses: dict[str, float] | None, names: Sequence[str]) -> list[float]:
    assert losses is not None
    return [losses[n] for n in names]


def choose_from_front(job: Job, pool: WorkerPool[SearchEvaluator], trials: Sequence[Trial], run_dir: Path) -> Trial:
    """Rank the front by the pick rule, re-score its first `FRONT_CAP` on the select split, pick
    by the rule there, write `front.json` and `best.yaml`; returns the picked trial."""
    objectives = job.objectives
    assert objectives is not None
    names, weights = objectives.names, objectives.rule_weights
    front = front_of(trials, names)
    front = [front[i] for i in pick_order([vector(t.losses, names) for t in front], weights)]
    ref = pool.call(SearchEvaluator.reference, "select")
    select: dict[int, dict[str, float]] = {}
    seen: dict[str, dict[str, float]] = {}  # an optimizer may ask a genome twice: scored once
    for t in front[:FRONT_CAP]:
        key = json.dumps(t.genome, sort_keys=True)
        if key not in seen:
            metrics = pool.call(SearchEvaluator.score, t.genome, "select")
            seen[key] = objectives.losses(job.fitness, metrics, ref, t.genome, job.space)
        if all(math.isfinite(v) for v in seen[key].values()):
            select[t.index] = seen[key]
    scored = [t for t in front if t.index in select] or front[:1]
    picked = scored[pick_order([vector(select.get(t.index, t.losses), names) for t in scored], weights)[0]]
    members = [{"trial": t.index, "fitness": t.losses, "select": select.get(t.index), "values": t.values,
                "recipe": job.space.to_recipe(t.genome).to_yaml(absolute_paths=True)} for t in front]
    data = {"objectives": list(names), "weights": dict(zip(names, objectives.weights)), "depth_unit": objectives.depth_unit,
            "cap": FRONT_CAP, "rule": picked.index, "picked": picked.index, "members": members}
    (run_dir / FRONT).write_text(json.dumps(data, indent=1) + "\n")
    (run_dir / BEST).write_text(members[front.index(picked)]["recipe"])
    return picked


def read_front(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / FRONT
    return json.loads(path.read_text()) if path.is_file() else None


def pick(run_dir: str | Path, trial: int) -> Path:
    """`mergelab search pick RUN TRIAL`: best.yaml becomes the recipe of front member `trial`."""
    run_dir = Path(run_dir)
    data = read_front(run_dir)
    if data is None:
        raise DataError(f"{run_dir / FRONT}: not found; a search with several objectives writes it when it finishes")
    members = {m["trial"]: m for m in data["members"]}
    if trial not in members:
        raise DataError(f"{run_dir}: trial {trial} is not on the front (its trials: {', '.join(map(str, sorted(members)))})")
    best = run_dir / BEST
    best.write_text(members[trial]["recipe"])
    data["picked"] = trial
    (run_dir / FRONT).write_text(json.dumps(data, indent=1) + "\n")
    return best
