"""Search jobs: validation with one-line errors naming the key, and genome <-> recipe round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mergelab.errors import RecipeError
from mergelab.blackbox.spec import parse_split
from mergelab.evolve.job import load_job, parse_job
from mergelab.plan import make_plan
from tests.helpers import make_family


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`models/{base,add,sort}` (tiny Llamas) and `tasks/{add,sort}/{train,validation,test}.jsonl`."""
    root = tmp_path_factory.mktemp("evolve")
    make_family(root / "models", ["add", "sort"])
    for skill in ("add", "sort"):
        for split in ("train", "validation", "test"):
            f = root / "tasks" / skill / f"{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return root


JOB = {
    "recipe": {
        "merge_method": "ties",
        "base_model": "models/base",
        "models": [{"model": "models/add", "parameters": {"weight": 0.6, "density": [0.2, 0.8]}},
                   {"model": "models/sort", "parameters": {"weight": 0.4, "density": 0.7}}],
        "parameters": {"lambda": 1.0},
    },
    "search": [
        {"model": "models/add", "param": "weight", "low": 0.0, "high": 1.5},
        {"model": "models/add", "param": "density", "groups": 3},
        {"model": "models/sort", "param": "density"},
        {"param": "lambda", "low": 0.5, "high": 2.0},
    ],
    "fitness": {"tasks": "tasks", "terms": [{"task": "add", "metric": "nll", "limit": 8}, {"task": "sort", "metric": "nll"}]},
    "optimizer": {"name": "CMA", "budget": 8, "seed": 1},
}


def job_with(world: Path, edit: dict | None = None, **top: object):
    data = copy.deepcopy(JOB)
    data.update(top)
    for path, value in (edit or {}).items():
        *keys, last = path.split(".")
        node = data
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = value
    return parse_job(data, world, "job.yaml")


def test_valid_job_resolves_bounds_starts_and_defaults(world: Path) -> None:
    job = job_with(world)
    dims = {d.key: d for d in job.space.dimensions}
    assert list(dims) == ["models[0].weight", "models[0].density", "models[1].density", "global.lambda"]
    assert (dims["models[0].weight"].low, dims["models[0].weight"].high, dims["models[0].weight"].start) == (0.0, 1.5, (0.6,))
    # bounds from the method's Param; the template's gradient [0.2, 0.8] read at 3 group positions
    assert (dims["models[0].density"].low, dims["models[0].density"].high) == (0.0, 1.0)
    assert dims["models[0].density"].start == pytest.approx((0.2, 0.5, 0.8))
    assert dims["models[1].density"].start == (0.7,)
    assert tuple(t.expert for t in job.fitness.terms) == (world / "models" / "add", world / "models" / "sort")
    assert job.fitness.splits["fitness"] == parse_split("validation[0:100]", "x")
    assert job.space.methods == ("ties",)


def test_job_file_with_recipe_path(world: Path) -> None:
    recipe = world / "template.yaml"
    recipe.write_text(yaml.safe_dump(JOB["recipe"]))
    job_file = world / "job.yaml"
    job_file.write_text(yaml.safe_dump({**JOB, "recipe": "template.yaml"}))
    assert load_job(job_file).template.merge_method == "ties"


@pytest.mark.parametrize("edit, top, message", [
    ({"optimizer.name": "CMAES2"}, {}, "optimizer.name: unknown nevergrad optimizer 'CMAES2'"),
    ({"optimizer.name": "cma"}, {}, "did you mean CMA?"),
    ({"search.0.low": 1.2, "search.0.high": 0.1}, {}, "search[0]: low (1.2) must be below high (0.1)"),
    ({"search.1.param": "t"}, {}, "search[1].param: ties takes no parameter 't'"),
    ({"search.3.param": "normalize"}, {}, "search[3].param: 'normalize' is not numeric"),
    ({"search.0.model": "models/nope"}, {}, "search[0].model: 'models/nope' is not a model of the recipe"),
    ({"search.0.low": None}, {}, "search[0]: 'weight' has no natural bounds; give low and high"),
    ({"search.2.start": 1.5}, {}, "search[2].start: 1.5 is outside [0, 1]"),
    ({"search.3.model": "models/add"}, {}, "search[3].param: 'lambda' is a global parameter"),
    ({"fitness.terms.1.task": "sortt"}, {}, "fitness.terms[1].task: unknown task 'sortt'"),
    ({}, {"splits": {"fitness": "validation", "select": "validation[10:20]"}}, "splits.select: overlaps splits.fitness"),
    ({}, {"splits": {"report": "holdout"}}, "splits.report: task 'add' has no split 'holdout'"),
    ({}, {"methods": ["ties", "tiez"]}, "methods[1]: unknown method 'tiez'"),
    ({}, {"optimiser": {"name": "CMA"}}, "optimiser: unknown key"),
    ({"optimizer.budget": 0}, {}, "optimizer.budget: Input should be greater than or equal to 1"),
    ({}, {"optimizer": {"name": "NGOpt", "options": {"scale": 2.0}}}, "optimizer.options: NGOpt takes no options"),
    ({}, {"optimizer": {"name": "ParametrizedCMA", "options": {"sigma": 2.0}}},
     "optimizer.options: ParametrizedCMA takes no option 'sigma'; it takes: algorithm, diagonal"),
    ({}, {"models": ["models/add", "models/sort"]}, "give either recipe: or models: and base_model:, not both"),
])
def test_bad_jobs_give_one_line_errors_naming_the_key(world: Path, edit: dict, top: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        job_with(world, edit, **top)
    text = str(err.value)
    assert "\n" not in text and text.startswith("job.yaml: ") and message in text


def test_normalising_by_experts_needs_an_expert(world: Path) -> None:
    with pytest.raises(RecipeError, match=r"fitness.terms\[0\].expert: no source model is named 'add'"):
        job_with(world, {"recipe.models.0.model": "models/base", "search.0.model": "models/base",
                         "search.1.model": "models/base"})


def test_short_form_names_only_models_and_skills(world: Path) -> None:
    """models + base_model + bare skill names: task arithmetic from the average, every model's
    weight per layer group searched in [0, DEFAULT_HIGH], terms with the default metric."""
    from mergelab.evolve import dimensions
    from mergelab.evolve import job as job_module

    data = {"base_model": "models/base", "models": ["models/add", "models/sort"], "fitness": {"tasks": "tasks", "terms": ["add", "sort"]}}
    job = parse_job(data, world, "short.yaml")
    assert job.template.merge_method == job_module.DEFAULT_METHOD
    assert [m.parameters for m in job.template.models] == [{"weight": 0.5}, {"weight": 0.5}]
    assert [(d.key, d.groups, d.low, d.high, d.start) for d in job.space.dimensions] == [
        (f"models[{i}].weight", dimensions.DEFAULT_GROUPS, 0.0, dimensions.DEFAULT_HIGH, (0.5,) * dimensions.DEFAULT_GROUPS)
        for i in range(2)]
    assert [(t.task, t.metric.name) for t in job.fitness.terms] == [("add", "prob"), ("sort", "prob")]
    assert tuple(t.expert for t in job.fitness.terms) == (world / "models" / "add", world / "models" / "sort")
    assert (job.fitness.normalize, job.fitness.goal) == ("gap", "minimize")
    with pytest.raises(RecipeError, match=r"^short.yaml: give recipe: \(a template recipe\), or models: and base_model:"):
        parse_job({**data, "base_model": None}, world, "short.yaml")


def test_optimizer_options_configure_a_nevergrad_family(world: Path) -> None:
    from mergelab.blackbox.optimizer import make_optimizer

    job = job_with(world, optimizer={"name": "ParametrizedCMA", "budget": 8, "seed": 0, "options": {"scale": 0.5, "popsize": 6}})
    opt = make_optimizer(job.optimizer.name, job.optimizer.options, job.space.parametrization(seed=0), 8, 1)
    assert opt._config.scale == 0.5 and opt._config.popsize == 6  # nevergrad's own configured CMA
    twin = job_with(world, optimizer={"name": "TwoPointsDE", "budget": 8, "options": {"popsize": 12}})
    assert make_optimizer("TwoPointsDE", twin.optimizer.options, twin.space.parametrization(), 8, 1).llambda == 12


# ---------------------------------------------------------------- genome <-> recipe
def test_start_genome_is_the_template(world: Path) -> None:
    space = job_with(world).space
    recipe = space.to_recipe(space.start())
    assert recipe.models[0].parameters["density"] == pytest.approx([0.2, 0.5, 0.8])
    assert recipe.models[1].parameters == {"weight": 0.4, "density": 0.7}
    assert recipe.parameters == {"lambda": 1.0}
    make_plan(recipe).close()  # a complete, valid recipe


def test_sampled_genomes_round_trip_through_recipes(world: Path) -> None:
    space = job_with(world).space
    param = space.parametrization(seed=0)
    for _ in range(5):
        genome = space.from_ng(param.sample().value)
        recipe = space.to_recipe(genome)
        assert recipe.merge_method == genome["method"] == "ties"
        assert recipe.models[0].parameters["weight"] == genome["models[0].weight"]
        assert recipe.models[0].parameters["density"] == genome["models[0].density"]
        assert recipe.models[1].parameters["density"] == genome["models[1].density"]
        assert recipe.parameters["lambda"] == genome["global.lambda"]
        assert isinstance(recipe.models[0].parameters["density"], list) and len(recipe.models[0].parameters["density"]) == 3
        assert 0.5 <= recipe.parameters["lambda"] <= 2.0
        # and back through nevergrad's own value
        child = param.spawn_child()
        child.value = space.to_ng(genome)
        assert space.from_ng(child.value) == genome


def test_start_parametrization_value_is_the_start_genome(world: Path) -> None:
    space = job_with(world).space
    assert space.from_ng(space.parametrization().value) == space.start()


def test_method_choice_drops_parameters_the_other_method_lacks(world: Path) -> None:
    job = job_with(world, methods=["ties", "task_arithmetic", "dare_ties"])
    space = job.space
    genome = {**space.start(), "method": "task_arithmetic"}
    recipe = space.to_recipe(genome)
    assert recipe.merge_method == "task_arithmetic"
    assert recipe.models[1].parameters == {"weight": 0.4}  # density dropped: task_arithmetic has none
    make_plan(recipe).close()
    methods = {space.from_ng(space.parametrization(seed=s).sample().value)["method"] for s in range(12)}
    assert methods <= set(job.space.methods) and len(methods) > 1


def test_fitness_normalisations_by_hand(world: Path) -> None:
    """gap: (m - expert) / (base - expert); experts: m / expert; summed over the terms (weights 1)."""
    from mergelab.errors import DataError
    from mergelab.evolve.fitness import make_reference

    metrics = {"add/nll": 0.6, "sort/nll": 0.07}
    experts, base = {"add/nll": 0.4, "sort/nll": 0.02}, {"add/nll": 0.8, "sort/nll": 0.12}
    gap = job_with(world, {"fitness.normalize": "gap"})
    assert gap.fitness.base == world / "models" / "base"
    assert gap.fitness.loss(metrics, make_reference("gap", experts, base)) == pytest.approx(0.2 / 0.4 + 0.05 / 0.1)
    ratio = job_with(world, {"fitness.normalize": "experts"})
    assert ratio.fitness.loss(metrics, make_reference("experts", experts)) == pytest.approx(0.6 / 0.4 + 0.07 / 0.02)
    # accuracy under gap is still a loss: the share of the expert's gain lost, 0 at the expert
    acc = job_with(world, {"fitness.normalize": "gap",
                           "fitness.terms": [{"task": "add", "metric": "accuracy"}, {"task": "sort", "metric": "nll"}]})
    ref = make_reference("gap", {"add/accuracy": 0.9, "sort/nll": 0.02}, {"add/accuracy": 0.1, "sort/nll": 0.12})
    assert acc.fitness.loss({"add/accuracy": 0.7, "sort/nll": 0.02}, ref) == pytest.approx(0.25)
    with pytest.raises(DataError, match="add/nll: the expert .* is no better than the base"):
        gap.fitness.check_gap(make_reference("gap", {"add/nll": 0.9, "sort/nll": 0.02}, {"add/nll": 0.8, "sort/nll": 0.12}), "job.yaml")
    with pytest.raises(DataError, match="add/accuracy: the expert .* is no better than the base"):  # higher is better
        acc.fitness.check_gap(make_reference("gap", {"add/accuracy": 0.1, "sort/nll": 0.02}, {"add/accuracy": 0.9, "sort/nll": 0.12}), "j")
    with pytest.raises(RecipeError, match="normalize: gap .* has no base_model"):
        job_with(world, {"fitness.normalize": "gap", "recipe.merge_method": "linear", "recipe.base_model": None,
                         "search": JOB["search"][:1]})


def test_goal_follows_the_registry_directions(world: Path) -> None:
    """Without normalisation the goal is minimize for lower-is-better metrics, maximize for higher;
    mixed directions need an explicit goal; an unknown metric is a one-line error."""
    def goal(*metrics: str) -> str:
        terms = [{"task": t, "metric": m} for t, m in zip(("add", "sort"), metrics)]
        return job_with(world, {"fitness.terms": terms, "fitness.normalize": "none"}).fitness.goal

    assert (goal("nll", "nll"), goal("prob", "accuracy")) == ("minimize", "maximize")
    with pytest.raises(RecipeError, match="fitness.goal: the terms mix metrics where lower is better"):
        goal("nll", "accuracy")
    with pytest.raises(RecipeError, match=r"^job.yaml: fitness.terms\[0\].metric: unknown metric 'bleu'; choose one of: "
                                          r"accuracy, nll, prob, lm-eval$"):
        goal("bleu", "nll")
