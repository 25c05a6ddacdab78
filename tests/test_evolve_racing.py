"""Racing (`fitness.racing`): the rule by hand; a candidate that goes on gets exactly the scores
it gets without racing, one that stops the scores of the first share; the search runs with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergelab.errors import RecipeError
from mergelab.eval import TaskSplit
from mergelab.evolve import loop
from mergelab.evolve.evaluator import SearchEvaluator
from mergelab.evolve.fitness import Racing, Term
from mergelab.evolve.job import load_job
from mergelab.evolve.racing import Racer, first_share
from mergelab.evolve.scoring import TermData, measure
from mergelab.metrics import get_metric

REPO = Path(__file__).resolve().parents[1]


def test_cutoff_rule_by_hand() -> None:
    racer = Racer(Racing(first=0.25, keep=0.5, warmup=3), [])
    # warm-up: everything goes on, whatever its loss
    assert [racer.goes_on(x) for x in (0.9, 0.5, 0.7)] == [True, True, True]
    # seen 0.5, 0.7, 0.9: the best half (ceil(0.5 * 3) = 2) ends at 0.7
    assert racer.cutoff() == 0.7
    assert racer.goes_on(0.8) is False  # seen: 0.5 0.7 0.8 0.9 -> cutoff 0.7
    assert racer.goes_on(0.7) is True  # seen: 0.5 0.7 0.7 0.8 0.9 -> cutoff the 3rd best, 0.7
    assert racer.goes_on(float("nan")) is False and len(racer.seen) == 5  # a NaN never goes on, nor counts


def test_first_share_takes_the_same_leading_examples() -> None:
    examples = [object() for _ in range(10)]
    term = Term("reverse", get_metric("prob"))
    task = TermData(term, TaskSplit("reverse", "validation", examples))
    lm = TermData(term, lm_eval=("arc", tuple(range(100, 140))))
    whole = TermData(term, lm_eval=("arc", None))
    short, docs, same = first_share([task, lm, whole], 0.25)
    assert short.task.examples == examples[:3] and docs.lm_eval == ("arc", tuple(range(100, 110))) and same is whole
    assert first_share([task], 0.01)[0].task.examples == examples[:1]  # at least one


def racing_job(tmp: Path, zoo_dir: Path, budget: int, **racing: object) -> Path:
    """search/evolve.yaml beside the test zoo, small splits, with `fitness.racing`."""
    (tmp / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    (tmp / "search").mkdir()
    data = yaml.safe_load((REPO / "search" / "evolve.yaml").read_text())
    data["fitness"]["racing"] = racing
    data["optimizer"] = {"budget": budget, "seed": 0}
    data["splits"] = {"fitness": "validation[0:16]", "select": "validation[16:32]", "report": "test[0:16]"}
    path = tmp / "search" / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_raced_scores_are_partial_or_exact(tmp_path: Path, zoo_dir: Path) -> None:
    """A candidate that goes on has exactly its unraced scores; one that stops, the first share's.
    (The rule is tested above; here the history decides: a warm-up, then a history it cannot beat,
    then one it beats.)"""
    job = load_job(racing_job(tmp_path, zoo_dir, 4, first=0.25, keep=0.5, warmup=1))
    raced = SearchEvaluator(job, "cpu")
    plain = SearchEvaluator(load_job(_without_racing(tmp_path)), "cpu")
    start = job.space.start()

    went_on = raced.evaluate(start)  # the warm-up
    assert {"race", "eval"} <= set(went_on.seconds) and went_on.metrics == plain.evaluate(start).metrics
    raced.racer.seen = [-1e9] * 4
    stopped = raced.evaluate(start)
    assert "race" in stopped.seconds and "eval" not in stopped.seconds
    assert stopped.metrics == measure(plain.live.model, plain.tokenizer, raced.racer.first)
    assert len(raced.racer.first[0].task.examples) == 4  # a quarter of validation[0:16]
    raced.racer.seen = [1e9] * 4
    assert raced.evaluate(start).metrics == went_on.metrics


def _without_racing(tmp: Path) -> Path:
    path = tmp / "search" / "job.yaml"
    data = yaml.safe_load(path.read_text())
    data["fitness"].pop("racing")
    plain = tmp / "search" / "plain.yaml"
    plain.write_text(yaml.safe_dump(data))
    return plain


def test_search_with_racing_logs_both_stages(tmp_path: Path, zoo_dir: Path) -> None:
    run = tmp_path / "run"
    result = loop.run_search(load_job(racing_job(tmp_path, zoo_dir, 8, warmup=3)), run, progress=False)
    trials = [json.loads(line) for line in (run / loop.TRIALS).read_text().splitlines()]
    assert len(trials) == 8 and all("race" in t["seconds"] for t in trials)
    assert all("eval" in t["seconds"] for t in trials[:3])  # the warm-up goes on
    assert result.best_yaml.is_file() and "best" in result.report


@pytest.mark.parametrize(("racing", "message"), [
    ({"first": 1.0}, r"fitness.racing.first"),
    ({"keep": 0}, r"fitness.racing.keep"),
    ({"warmup": 0}, r"fitness.racing.warmup"),
    ({"fraction": 0.5}, r"fitness.racing.fraction"),
])
def test_bad_racing_is_a_one_line_error(tmp_path: Path, zoo_dir: Path, racing: dict, message: str) -> None:
    path = racing_job(tmp_path, zoo_dir, 4, **racing)
    with pytest.raises(RecipeError, match=message) as err:
        load_job(path)
    assert "\n" not in str(err.value)
    shutil.rmtree(tmp_path / "search")
