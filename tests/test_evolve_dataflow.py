"""Data-flow search: genome -> route (repaired into the depth bounds) -> passthrough `slices`
recipe with per-slot `scale`; the candidate assembled in memory computes exactly what
`mergelab merge` writes; the search runs, resumes and reports as the parameter search does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergelab.errors import RecipeError
from mergelab.eval import load_model, load_task, score
from mergelab.evolve import loop
from mergelab.evolve.assemble import LiveAssembler
from mergelab.evolve.dataflow import INCLUDE, SCALE, dataflow_space
from mergelab.evolve.evaluator import SearchEvaluator
from mergelab.evolve.job import load_job, parse_job
from mergelab.evolve.report import write_report
from mergelab.evolve.schema import DataflowSpec
from mergelab.merging import merge
from tests.helpers import load_state, make_family, make_gpt2


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("dataflow"), ["a", "b"], layers=3)


def space_of(fam: dict[str, Path], **kw: object):
    return dataflow_space(DataflowSpec(models=[str(fam["a"]), str(fam["b"])], **kw), fam["a"].parent, "job")


def genome(include: list[float], scale: list[float] | None = None) -> dict[str, list[float]]:
    return {INCLUDE: include, SCALE: scale or [1.0] * len(include)}


def test_slots_start_and_repair(fam: dict[str, Path]) -> None:
    space = space_of(fam, repeats=2, min_layers=2, max_layers=4)
    # a's 3 layers, b's 3 layers, twice: 12 slots
    assert [(s.model, s.layer) for s in space.slots] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)] * 2
    assert space.chosen(space.start()) == [0, 1, 2]  # model a itself
    # more than max_layers above the threshold: the 4 highest genes, in slot order
    assert space.chosen(genome([0.9, 0.6, 0.7, 0.95, 0.1, 0.8, 0.2, 0.2, 0.2, 0.2, 0.2, 0.99])) == [0, 3, 5, 11]
    # fewer than min_layers: the highest excluded genes join; equal genes go by slot order
    assert space.chosen(genome([0.1] * 12)) == [0, 1]
    assert space.chosen(genome([0.2, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])) == [0, 4]
    # scales are clipped into their bounds
    route = space.route(genome([0.9] * 3 + [0.1] * 9, [0.2, 1.0, 9.0] + [1.0] * 9))
    assert [scale for _, scale in route] == [0.5, 1.0, 1.5]


def test_recipe_is_passthrough_slices_with_scales(fam: dict[str, Path]) -> None:
    space = space_of(fam, repeats=2)
    recipe = space.to_recipe(genome([0.1, 0.9, 0.1, 0.1, 0.1, 0.8, 0.1, 0.7, 0.1, 0.1, 0.1, 0.1],
                                    [1.0, 1.25, 1.0, 1.0, 1.0, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    data = recipe.model_dump(mode="json", exclude_none=True, exclude={"root"})
    assert data["merge_method"] == "passthrough"
    got = [(Path(s["sources"][0]["model"]).name, s["sources"][0]["layer_range"], s["sources"][0]["parameters"]["scale"])
           for s in data["slices"]]
    assert got == [("a", [1, 2], [{"filter": "o_proj", "value": 1.25}, {"filter": "down_proj", "value": 1.25}]),
                   ("b", [2, 3], [{"filter": "o_proj", "value": 0.75}, {"filter": "down_proj", "value": 0.75}]),
                   ("a", [1, 2], [{"filter": "o_proj", "value": 1.0}, {"filter": "down_proj", "value": 1.0}])]
    assert space.values(genome([0.9] * 3 + [0.1] * 9)) == {
        "merge_method": "passthrough", "depth": 3, "layers": [[str(fam["a"]), i, 1.0] for i in range(3)]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_assembled_candidates_compute_what_merge_writes(tmp_path: Path, fam: dict[str, Path], arch: str) -> None:
    """Random routes (a layer may come twice, with different scales; depths 1 to 6): the assembled
    model's logits and greedy continuation (its cache numbered by output layer) equal those of the
    folder `mergelab merge` writes from the same recipe, and no unscaled tensor was copied. GPT-2:
    a tied head, and its layers' output projections are `c_proj`."""
    if arch == "gpt2":
        fam = make_family(tmp_path / "gpt2", ["a", "b"], "gpt2", layers=3)
    space = space_of(fam, repeats=2, max_layers=6)
    assert space.scale_tensors == {"llama": ("o_proj", "down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}[arch]
    live = LiveAssembler(space.every_layer())
    sources = {t.data_ptr() for t in live._tensors.values()}
    rng = random.Random(0)
    ids = torch.tensor([[3, 17, 5, 40, 2, 9, 11]])
    for i in range(4):
        g = genome([rng.random() for _ in space.slots], [rng.uniform(0.5, 1.5) for _ in space.slots])
        timing = live.set_recipe(space.to_recipe(g))
        assert set(timing.as_dict()) == {"plan", "assemble"} and timing.assemble > 0
        written = merge(space.to_recipe(g), tmp_path / f"out{i}", progress=False)
        model = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
        assert model.config.num_hidden_layers == live.model.config.num_hidden_layers == len(space.chosen(g))
        with torch.no_grad():
            assert torch.equal(live.model(ids).logits, model(ids).logits)
            ours = live.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(ours, model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
        # every unscaled tensor of the candidate is a source tensor itself; only scaled ones are new
        for name, p in live.model.named_parameters():
            scaled = any(part in name for part in space.scale_tensors)
            assert (p.data_ptr() in sources) != scaled, name
        assert set(load_state(written)) <= set(live.model.state_dict())
    live.close()


@pytest.mark.parametrize(("section", "message"), [
    ({"min_layers": 5, "max_layers": 4}, r"dataflow: need min_layers \(5\) <= max_layers \(4\)"),
    ({"max_layers": 13}, r"max_layers \(13\) <= the slots \(12 = 2 repeats x 6 layers\)"),
    ({"scale": [1.5, 0.5]}, r"dataflow.scale: give \[low, high\]"),
    ({"scale_tensors": ["w_out"]}, r"dataflow.scale_tensors\[0\]: 'w_out' matches no tensor of a layer"),
    ({"models": ["nowhere"]}, r"dataflow.models\[0\]: .*nowhere: folder not found"),
    ({"repeats": 0}, r"dataflow.repeats"),
])
def test_bad_sections_are_one_line_errors(fam: dict[str, Path], section: dict, message: str) -> None:
    flow = {"models": [str(fam["a"]), str(fam["b"])], "repeats": 2, **section}
    with pytest.raises(RecipeError, match=message) as err:
        parse_job({"dataflow": flow, "fitness": {"tasks": ".", "terms": ["a"]}}, fam["a"].parent, "job")
    assert "\n" not in str(err.value)


def test_other_shapes_and_recipe_keys_are_refused(tmp_path: Path, fam: dict[str, Path]) -> None:
    other = make_gpt2(tmp_path / "gpt2")
    with pytest.raises(RecipeError, match=r"dataflow.models\[1\]: layer 0 of .*gpt2 holds other tensors or shapes"):
        space_of({"a": fam["a"], "b": other})
    with pytest.raises(RecipeError, match="dataflow: searches layer routes, not a recipe's parameters; drop models"):
        parse_job({"dataflow": {"models": [str(fam["a"])]}, "models": [str(fam["a"]), str(fam["b"])],
                   "fitness": {"tasks": ".", "terms": ["a"]}}, fam["a"].parent, "job")


# ---------------------------------------------------------------- the search on the reduced zoo
def dataflow_job(tmp: Path, zoo_dir: Path, budget: int) -> Path:
    (tmp / "zoo").symlink_to(zoo_dir, target_is_directory=True) if not (tmp / "zoo").exists() else None
    data = {"dataflow": {"models": ["zoo/experts/reverse", "zoo/experts/sort"], "repeats": 2, "max_layers": 6},
            "base_model": "zoo/base",
            "fitness": {"tasks": "zoo/tasks", "terms": [{"task": "reverse", "limit": 12}, {"task": "sort", "limit": 12}]},
            "optimizer": {"budget": budget, "seed": 0},
            "splits": {"fitness": "validation[0:12]", "select": "validation[12:24]", "report": "test[0:12]"}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_search_runs_resumes_and_best_yaml_scores_as_reported(tmp_path: Path, zoo_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    job = load_job(dataflow_job(tmp_path, zoo_dir, 4))
    assert job.fitness.normalize == "gap" and job.template.slices is not None
    loop.run_search(job, run, progress=False)
    first = (run / loop.TRIALS).read_text().splitlines()
    trial = json.loads(first[0])
    assert trial["values"]["layers"] == [["zoo/experts/reverse", i, 1.0] for i in range(4)]  # the start: model 0
    assert {"plan", "assemble", "eval"} <= set(trial["seconds"])

    evaluated: list[dict] = []
    original = SearchEvaluator.evaluate
    monkeypatch.setattr(SearchEvaluator, "evaluate", lambda self, g: evaluated.append(g) or original(self, g))
    result = loop.run_search(load_job(dataflow_job(tmp_path, zoo_dir, 6)), run, resume=True, progress=False)
    assert len(evaluated) == 2 and (run / loop.TRIALS).read_text().splitlines()[:4] == first
    assert {"best", "start"} <= set(result.report) and "uniform" not in result.report
    assert {Path(k).name for k in result.report if k not in ("best", "start")} == {"reverse", "sort"}  # each source

    # best.yaml: a plain passthrough slices recipe; the merged folder scores what the report says
    best = yaml.safe_load(result.best_yaml.read_text())
    assert best["merge_method"] == "passthrough" and all("scale" in s["sources"][0]["parameters"] for s in best["slices"])
    model, tok = load_model(merge(result.best_yaml, tmp_path / "best", progress=False))
    for skill in ("reverse", "sort"):
        task = load_task(zoo_dir / "tasks", skill, "test")
        task = task.head(12)
        assert score(model, tok, task, "accuracy").value == result.report["best"][f"{skill}/accuracy"]
    _, md = write_report(run)
    assert "assemble" in md.read_text()


def test_a_parameter_search_recipe_as_a_source(tmp_path: Path, zoo_dir: Path) -> None:
    """Parameter then data-flow (the paper's order): a recipe file among the sources is merged once
    into the run folder; the search routes its layers, a resumed search reuses the folder, and
    best.yaml names it."""
    (tmp_path / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    recipe = {"merge_method": "task_arithmetic", "base_model": "zoo/base",
              "models": [{"model": f"zoo/experts/{s}", "parameters": {"weight": 0.6}} for s in ("reverse", "sort")]}
    (tmp_path / "param_best.yaml").write_text(yaml.safe_dump(recipe))
    path = dataflow_job(tmp_path, zoo_dir, 3)
    data = yaml.safe_load(path.read_text())
    data["dataflow"]["models"] = ["param_best.yaml", "zoo/experts/sort"]
    data["fitness"]["terms"][0]["expert"] = "zoo/experts/reverse"  # not a source: named
    path.write_text(yaml.safe_dump(data))
    job = load_job(path)
    assert job.space.layers == (4, 4)
    run = tmp_path / "run"
    result = loop.run_search(job, run, progress=False)
    merged = run / "sources" / "0-param_best"
    assert (merged / "model.safetensors").is_file() or list(merged.glob("*.safetensors"))
    first = json.loads((run / loop.TRIALS).read_text().splitlines()[0])
    assert first["values"]["layers"][0][0] == str(merged.resolve())
    stamp = (merged / "mergelab_source.yml").stat().st_mtime_ns
    data["optimizer"]["budget"] = 4
    path.write_text(yaml.safe_dump(data))
    result = loop.run_search(load_job(path), run, resume=True, progress=False)
    assert (merged / "mergelab_source.yml").stat().st_mtime_ns == stamp  # not merged again
    used = {Path(src["model"]).resolve() for s in yaml.safe_load(result.best_yaml.read_text())["slices"] for src in s["sources"]}
    assert used and used <= {merged.resolve(), (zoo_dir / "experts" / "sort").resolve()}
    # an unreadable recipe source is a one-line error naming the entry
    data["dataflow"]["models"] = ["missing.yaml", "zoo/experts/sort"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"dataflow.models\[0\]: .*missing.yaml: recipe file not found"):
        load_job(path)


def test_default_optimizer_explores_routes(tmp_path: Path, zoo_dir: Path) -> None:
    """TwoPointsDE unless the job names one (NGOpt tried a single route in 100 candidates)."""
    path = dataflow_job(tmp_path, zoo_dir, 7)
    data = yaml.safe_load(path.read_text())
    for optimizer, name in (({}, "TwoPointsDE"), ({"budget": 7}, "TwoPointsDE"), ({"name": "NGOpt"}, "NGOpt")):
        data["optimizer"] = optimizer
        path.write_text(yaml.safe_dump(data))
        job = load_job(path)
        assert job.optimizer.name == name and job.optimizer.budget == optimizer.get("budget", 100)


def test_two_ray_workers_with_racing(tmp_path: Path, zoo_dir: Path) -> None:
    """`mergelab search JOB --workers 2` on a data-flow job with racing: each Ray actor assembles
    its own candidates and races them; the report lists plan/assemble/race seconds."""
    import ray

    from mergelab.cli import main

    path = dataflow_job(tmp_path, zoo_dir, 6)
    data = yaml.safe_load(path.read_text())
    data["fitness"]["racing"] = {"warmup": 2}
    path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["-q", "search", str(path), "--out", str(run), "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    trials = loop.read_trials(run)
    assert sorted(t.index for t in trials) == list(range(6)) and len({t.worker for t in trials}) == 2
    assert all({"plan", "assemble", "race"} <= set(t.seconds) for t in trials)
    assert main(["-q", "search", "report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "assemble" in md and "race" in md and "candidates stopped after the first share" in md
