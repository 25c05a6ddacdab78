"""The local ask/tell loop on the reduced zoo: it improves on its start, resumes without
re-evaluating, and its best.yaml merges to exactly the in-memory candidate's tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.evolve import loop
from mergelab.evolve.fitness import combine
from mergelab.evolve.job import load_job
from mergelab.merging import merge
from tests.helpers import load_state

CATALOG = Path(__file__).resolve().parents[1] / "search" / "evolve_task_arithmetic.yaml"


def catalog_job(tmp: Path, zoo_dir: Path, budget: int):
    """The catalog job, pointed at the test zoo, on small splits."""
    data = yaml.safe_load(CATALOG.read_text())
    data["optimizer"] = {"name": "OnePlusOne", "budget": budget, "seed": 0}
    data["fitness"]["terms"] = [{**t, "limit": 12} for t in data["fitness"]["terms"]]
    data["splits"] = {"fitness": "validation[0:12]", "select": "validation[100:112]", "report": "test[0:12]"}
    (tmp / "search").mkdir(exist_ok=True)
    if not (tmp / "zoo").exists():
        (tmp / "zoo").symlink_to(zoo_dir)
    path = tmp / "search" / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job(path)


def test_search_improves_resumes_and_best_yaml_reproduces(tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    first = loop.run_search(catalog_job(tmp_path, zoo_dir, 4), run, progress=False)
    lines = (run / loop.TRIALS).read_text().splitlines()
    assert len(lines) == 4 and {"genome", "values", "metrics", "loss", "seconds", "worker"} <= set(json.loads(lines[0]))

    # resume: the 4 told trials are replayed, only the 3 new ones are evaluated
    evaluated: list[int] = []
    original = loop.Evaluator.trial
    monkeypatch.setattr(loop.Evaluator, "trial", lambda self, i, g: evaluated.append(i) or original(self, i, g))
    job = catalog_job(tmp_path, zoo_dir, 7)
    result = loop.run_search(job, run, resume=True, progress=False)
    assert evaluated == [4, 5, 6]
    assert (run / loop.TRIALS).read_text().splitlines()[:4] == lines
    with pytest.raises(Exception, match="pass --resume"):
        loop.run_search(job, run, progress=False)

    # the search beat its start on the fitness split
    evaluator = loop.Evaluator(job, loop.SearchSpace(job), "cpu")
    start_metrics, _ = evaluator.score(evaluator.space.start(), "fitness")
    start_loss = combine(job, start_metrics, evaluator.reference("fitness"))
    trials = loop.read_trials(run)
    assert min(t.loss for t in trials) < start_loss
    assert first.best_yaml == result.best_yaml and set(result.report) >= {"best", "start"}

    # best.yaml is complete and merges to the in-memory candidate of the best genome, bit for bit
    evaluator.live.set_recipe(evaluator.space.to_recipe(result.best.genome))
    written = load_state(merge(result.best_yaml, tmp_path / "best_out", progress=False))
    state = evaluator.live.state()
    assert set(written) == set(state) and all(torch.equal(state[k], v) for k, v in written.items())
