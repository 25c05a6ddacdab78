"""Several objectives: the Pareto front and the pick rule by hand; on the reduced zoo a data-flow
search (reverse, sort, depth) and a parameter search record each objective, resume, list exactly
the non-dominated trials in the report, and write a best.yaml (by the rule, or picked by trial
index) that `mergelab merge` runs; bad `objectives:`/`pick:` sections are one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from mergelab.blackbox.loop import WORST, ask_tell
from mergelab.blackbox.pool import Evaluation, WorkerPool
from mergelab.cli import main
from mergelab.errors import DataError, OutputError, RecipeError
from mergelab.evolve import front as front_mod
from mergelab.evolve import loop
from mergelab.evolve.evaluator import SearchEvaluator
from mergelab.evolve.job import load_job, parse_job
from mergelab.evolve.objectives import FRONT_CAP, dominates, pareto_front, pick_order, pick_scores
from mergelab.evolve.report import write_report
from tests.test_evolve_dataflow import dataflow_job
from tests.test_evolve_loop import catalog_job

SKILLS = [{"name": "reverse", "terms": ["reverse"]}, {"name": "sort", "terms": ["sort/prob"]}]


# ---------------------------------------------------------------- the front and the pick, by hand
def test_front_by_hand() -> None:
    points = [[1, 5], [2, 3], [3, 3], [2, 3], [4, 1], [5, 0], [5, 5], [0, 9]]
    # [3, 3] is dominated by [2, 3]; [5, 5] by everything but [0, 9]; equal points are both kept
    assert pareto_front(points) == [0, 1, 3, 4, 5, 7]
    assert dominates([1, 1], [1, 2]) and not dominates([1, 2], [1, 2]) and not dominates([0, 3], [1, 2])
    assert pareto_front([[1, 1, 1], [0, 2, 2], [2, 2, 0], [1, 1, 2]]) == [0, 1, 2]
    rng = random.Random(0)
    for _ in range(20):  # against a brute force: a point is kept iff no other is <= everywhere and < somewhere
        pts = [[rng.randint(0, 4) for _ in range(3)] for _ in range(12)]
        brute = [i for i, p in enumerate(pts)
                 if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in pts)]
        assert pareto_front(pts) == brute


def test_pick_rule_by_hand(tmp_path: Path, zoo_dir: Path) -> None:
    # (loss, depth) with the depth in units of max_layers 8: 0.2 + 6/8, 0.4 + 4/8, 1.0 + 2/8
    points = [[0.2, 6], [0.4, 4], [1.0, 2]]
    assert pick_scores(points, [1, 1 / 8]) == pytest.approx([0.95, 0.9, 1.25])
    assert pick_order(points, [1, 1 / 8]) == [1, 0, 2]  # the knee
    assert pick_order(points, [1, 0]) == [0, 1, 2]  # only the loss counts
    assert pick_order(points, [0.1, 1]) == [2, 1, 0]  # mostly the depth
    assert pick_order([[1, 1], [0.5, 1.5], [1, 1]], [1, 1]) == [0, 1, 2]  # ties: the earlier first
    data = yaml.safe_load(objectives_job(tmp_path, zoo_dir, 2, pick={"weights": {"sort": 2, "depth": 3}}).read_text())
    objectives = parse_job(data, tmp_path, "job.yaml").objectives
    assert objectives is not None and objectives.weights == (1.0, 2.0, 3.0)
    assert objectives.rule_weights == (1.0, 2.0, 3.0 / 6)  # dataflow_job's max_layers: 6


class FirstFails:
    """Two objectives, x^2 and (1 - x)^2; the first two candidates fail."""

    def __init__(self) -> None:
        self.n = 0

    def evaluate(self, genome: dict) -> Evaluation:
        self.n += 1
        x = genome["x"]
        return Evaluation({}, {}, "RuntimeError: boom") if self.n <= 2 else Evaluation({"a": x * x, "b": (1 - x) ** 2})


def test_failures_before_the_first_success_do_not_set_nevergrads_bounds() -> None:
    """nevergrad takes its hypervolume's bounds from the first vectors told: failures (WORST in
    every objective) wait for the first success, else the bounds would be 1e9."""
    import nevergrad as ng

    out: list = []
    optimizer = ng.optimizers.registry["RandomSearch"](parametrization=ng.p.Dict(x=ng.p.Scalar(init=0.5, lower=0, upper=1)),
                                                      budget=8)
    with WorkerPool(FirstFails, 1) as pool:
        ask_tell(optimizer, pool, budget=8, decode=lambda v: {"x": float(v["x"])},
                 loss_of=lambda d: d.result.metrics["a"] + d.result.metrics["b"], on_result=lambda d, loss: out.append(loss),
                 progress=False, objectives=("a", "b"), objectives_of=lambda d: d.result.metrics)
    assert [loss.values for loss in out[:2]] == [{"a": WORST, "b": WORST}] * 2 and optimizer.num_tell == 8
    assert all(loss.error is None for loss in out[2:]) and set(out[2].values) == {"a", "b"}
    assert max(optimizer._hypervolume_pareto._upper_bounds) <= 1.0  # from the successes only (x in [0, 1])


# ---------------------------------------------------------------- bad sections
@pytest.mark.parametrize(("objectives", "pick", "message"), [
    ([SKILLS[0]], None, r"objectives: give at least 2"),
    ([SKILLS[0], {"name": "x", "terms": ["add"]}], None, r"objectives\[1\].terms\[0\]: 'add' is not a fitness term \(terms: reverse, sort\)"),
    ([SKILLS[0], {"name": "reverse", "terms": ["sort"]}], None, r"objectives\[1\].name: 'reverse' is given twice"),
    ([SKILLS[0], {"name": "speed"}], None, r"objectives\[1\].terms: required"),
    ([SKILLS[0], {"name": "depth", "terms": ["sort"]}], None, r"objectives\[1\].terms: 'depth' is the layer count"),
    ([SKILLS[0], {"name": "s", "terms": []}], None, r"objectives\[1\].terms: name at least one fitness term"),
    ([SKILLS[0], {"name": "s", "term": ["sort"]}], None, r"objectives\[1\].term: unknown key"),
    (SKILLS, {"weights": {"depth": 1}}, r"pick.weights.depth: not an objective \(objectives: reverse, sort\)"),
    (SKILLS, {"weights": {"reverse": -1}}, r"pick.weights.reverse: give a finite weight >= 0"),
    (SKILLS, {"weights": {"reverse": 0, "sort": 0}}, r"pick.weights: at least one weight must be above 0"),
    (None, {"weights": {"reverse": 1}}, r"pick: chooses among the front of several objectives; declare objectives"),
])
def test_bad_sections_are_one_line_errors(tmp_path: Path, zoo_dir: Path, objectives, pick, message: str) -> None:
    data = yaml.safe_load(dataflow_job(tmp_path, zoo_dir, 2).read_text())
    data.update({k: v for k, v in (("objectives", objectives), ("pick", pick)) if v is not None})
    with pytest.raises(RecipeError, match="^job.yaml: " + message) as err:
        parse_job(data, tmp_path, "job.yaml")
    assert "\n" not in str(err.value)


def test_depth_needs_a_dataflow_job(tmp_path: Path, zoo_dir: Path) -> None:
    job = catalog_job(tmp_path, zoo_dir, 2)
    data = yaml.safe_load(job.path.read_text())
    data["objectives"] = [{"name": "depth"}, {"name": "back", "terms": ["back"]}]
    with pytest.raises(RecipeError, match=r"^p.yaml: objectives\[0\]: depth needs a dataflow job"):
        parse_job(data, job.path.parent, "p.yaml")


# ---------------------------------------------------------------- the search on the reduced zoo
def objectives_job(tmp: Path, zoo_dir: Path, budget: int, **extra: object) -> Path:
    path = dataflow_job(tmp, zoo_dir, budget)
    data = yaml.safe_load(path.read_text())
    data.update({"objectives": [*SKILLS, {"name": "depth"}], **extra})
    path.write_text(yaml.safe_dump(data))
    return path


def listed_front(md: str) -> list[int]:
    """The trial indices of the report's front table."""
    section = md.split("## Pareto front", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    return [int(row.split("|")[1].split()[0]) for row in rows]


def test_dataflow_search_keeps_the_front_resumes_and_picks(tmp_path: Path, zoo_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    job = load_job(objectives_job(tmp_path, zoo_dir, 5))
    assert job.objectives is not None and job.objectives.names == ("reverse", "sort", "depth")
    loop.run_search(job, run, progress=False)
    first = (run / loop.TRIALS).read_text().splitlines()

    # resume: the told trials' losses are replayed, only the new candidates evaluated
    evaluated: list[dict] = []
    original = SearchEvaluator.evaluate
    monkeypatch.setattr(SearchEvaluator, "evaluate", lambda self, g: evaluated.append(g) or original(self, g))
    result = loop.run_search(load_job(objectives_job(tmp_path, zoo_dir, 8)), run, resume=True, progress=False)
    assert len(evaluated) == 3 and (run / loop.TRIALS).read_text().splitlines()[:5] == first
    trials = loop.read_trials(run)
    assert [t.index for t in trials] == list(range(8))
    for t in trials:  # every objective recorded; the two skills add up to the fitness (weights 1, both gap)
        assert set(t.losses) == {"reverse", "sort", "depth"}
        assert t.losses["depth"] == t.values["depth"] == len(job.space.chosen(t.genome))
        assert t.losses["reverse"] + t.losses["sort"] == pytest.approx(t.loss)

    # the front: exactly the non-dominated trials (brute force), listed by the report and in front.json
    vecs = {t.index: [t.losses[n] for n in ("reverse", "sort", "depth")] for t in trials}
    brute = sorted(i for i, p in vecs.items() if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in vecs.values()))
    assert main(["-q", "search", "report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert sorted(listed_front(md)) == brute and (run / "front.png").read_bytes()[:4] == b"\x89PNG"
    front = json.loads((run / front_mod.FRONT).read_text())
    assert sorted(m["trial"] for m in front["members"]) == brute
    # the rule: equal weights over the re-scored members' select-split losses, the depth over max_layers (6)
    scored = [m for m in front["members"] if m["select"] is not None]
    assert len(scored) == min(len(brute), FRONT_CAP) and front["depth_unit"] == 6
    order = pick_order([[m["select"][n] for n in front["objectives"]] for m in scored], [1, 1, 1 / 6])
    assert front["rule"] == front["picked"] == scored[order[0]]["trial"] == result.best.index
    assert (run / loop.BEST).read_text() == scored[order[0]]["recipe"]
    assert {"best", "start"} <= set(json.loads((run / "report.json").read_text()))

    # pick another member by its trial index: best.yaml is its recipe and `mergelab merge` runs it
    other = next((m for m in front["members"] if m["trial"] != front["rule"]), front["members"][0])
    assert main(["-q", "search", "pick", str(run), str(other["trial"])]) == 0
    best = yaml.safe_load((run / loop.BEST).read_text())
    assert len(best["slices"]) == other["values"]["depth"] and json.loads((run / front_mod.FRONT).read_text())["picked"] == other["trial"]
    assert main(["-q", "merge", str(run / loop.BEST), str(tmp_path / "picked")]) == 0
    assert json.loads((tmp_path / "picked" / "config.json").read_text())["num_hidden_layers"] == other["values"]["depth"]
    write_report(run)
    assert f"| {other['trial']} (best.yaml) |" in (run / "report.md").read_text()
    not_front = next(i for i in range(8) if i not in brute) if len(brute) < 8 else 99
    with pytest.raises(DataError, match=f"trial {not_front} is not on the front"):
        front_mod.pick(run, not_front)

    # a job whose objectives differ from the run's cannot resume it
    with pytest.raises(OutputError, match="holds objectives .* the job declares"):
        loop.run_search(load_job(dataflow_job(tmp_path, zoo_dir, 12)), run, resume=True, progress=False)


def test_parameter_search_with_objectives_and_a_pick_rule(tmp_path: Path, zoo_dir: Path) -> None:
    """A parameter-space job with one objective per skill and a rule weighing only `back`: the
    rule's pick has the best select-split `back` among the re-scored members; one-objective
    runs keep the lines of before (no `losses`)."""
    job = catalog_job(tmp_path, zoo_dir, 5, start=0.05)
    data = yaml.safe_load(job.path.read_text())
    data["objectives"] = [{"name": "back", "terms": ["back"]}, {"name": "sort", "terms": ["sort/nll"]}]
    data["pick"] = {"weights": {"back": 1, "sort": 0}}
    job.path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    result = loop.run_search(load_job(job.path), run, progress=False)
    trials = loop.read_trials(run)
    assert all(set(t.losses) == {"back", "sort"} for t in trials)
    front = json.loads((run / front_mod.FRONT).read_text())
    scored = [m for m in front["members"] if m["select"]]
    assert front["rule"] == result.best.index == min(scored, key=lambda m: (m["select"]["back"], scored.index(m)))["trial"]
    assert main(["-q", "merge", str(run / loop.BEST), str(tmp_path / "out")]) == 0
    _, md = write_report(run)
    assert sorted(listed_front(md.read_text())) == sorted(m["trial"] for m in front["members"])

    single = tmp_path / "single"
    loop.run_search(catalog_job(tmp_path, zoo_dir, 2, start=0.05), single, progress=False)
    assert all("losses" not in json.loads(line) for line in (single / loop.TRIALS).read_text().splitlines())
    assert "Pareto front" not in write_report(single)[1].read_text() and not (single / "front.png").exists()


def test_pick_needs_a_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="front.json: not found"):
        front_mod.pick(tmp_path, 0)
    assert main(["search", "pick", str(tmp_path)]) == 2
    assert "search pick: give the run folder and a trial index" in capsys.readouterr().err
