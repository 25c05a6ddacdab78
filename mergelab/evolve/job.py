"""Search jobs (`search/*.yaml`): a recipe template, what to search, the fitness, the optimizer.

    recipe: ../strategies/ties.yaml          # or the recipe inline; paths relative to the job
    search:
      - {model: ../zoo/experts/add, param: weight}                   # bounds from the method, or given
      - {model: ../zoo/experts/add, param: density, groups: 4}       # one value per layer group
      - {model: global, param: lambda, low: 0.5, high: 1.5}
    methods: [ties, dare_ties]               # optional: the merge method is searched too
    fitness:
      tasks: ../zoo/tasks
      normalize: gap                         # gap | experts | start | none
      terms: [{task: back, metric: nll, weight: 1.0, limit: 64}, {task: sort, metric: prob},
              {task: ../lm_eval/my_task, metric: lm-eval, lm_eval_metric: exact_match, expert: ../zoo/experts/back}]
    optimizer: {name: ParametrizedCMA, budget: 64, seed: 0, options: {scale: 2.0}}   # nevergrad registry name or family
    workers: {count: 2, device: cpu}
    splits: {fitness: "validation[0:100]", select: "validation[100:200]", report: test}

The short form names only the models and the skills; everything else takes the defaults
(`bench/search_quality.py` measures them against the hand-set merges and other settings):

    base_model: ../zoo/base
    models: [../zoo/experts/reverse, ../zoo/experts/sort, ../zoo/experts/back]
    fitness: {tasks: ../zoo/tasks, terms: [reverse, sort, back]}

It stands for a `task_arithmetic` template starting at the plain average (every weight 1/N),
a search of each model's weight per group of layers (`dimensions.DEFAULT_GROUPS`, in [0, `DEFAULT_HIGH`]),
terms scored by `prob` (the answer's probability: smooth like NLL, bounded like accuracy), each
skill measured between its expert and the base (`normalize: gap`, with several skills), and
NGOpt over 100 candidates: the most robust setting `bench/search_quality.py` measured (README,
"Does the default beat the hand-set merges?").

A data-flow job searches layer routes instead (`dataflow.py`: the genome, the recipe it becomes):

    dataflow: {models: [../zoo/experts/reverse, ../zoo/experts/sort], repeats: 2, min_layers: 2, max_layers: 8}
    base_model: ../zoo/base                  # optional: what normalize: gap measures from
    fitness: {tasks: ../zoo/tasks, terms: [reverse, sort]}

Either kind may declare several objectives (`objectives.py`): the search keeps their Pareto front
and a rule picks best.yaml from it:

    objectives: [{name: reverse, terms: [reverse]}, {name: sort, terms: [sort]}, {name: depth}]
    pick: {weights: {reverse: 1, sort: 1, depth: 0.25}}

Everything is checked before anything runs; each error is one line naming the key path. Loading
resolves the job once into what the search runs on (`Job`): the template, the search space
(`space.py`, from `dimensions.py`), the fitness with its terms, goal and normalisation
(`fitness_spec.py`), the optimizer and the workers' settings; nothing downstream reads the file's
schema (`schema.py`) again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.blackbox.optimizer import OptimizerSpec, check_optimizer
from mergelab.blackbox.spec import WorkerSpec, check_device, load_job_file
from mergelab.errors import RecipeError
from mergelab.evolve.dataflow import DataflowSpace, dataflow_space, default_optimizer
from mergelab.evolve.dimensions import default_search, dimensions
from mergelab.evolve.fitness import Fitness
from mergelab.evolve.fitness_spec import resolve_fitness
from mergelab.evolve.objectives import Objectives, resolve_objectives
from mergelab.evolve.schema import DataflowSpec, JobSpec
from mergelab.evolve.space import SearchSpace
from mergelab.methods import get_method
from mergelab.recipe import Recipe, load_recipe, parse_recipe
from mergelab.user_yaml import resolve_path, validated

DEFAULT_METHOD = "task_arithmetic"  # the short form's template


@dataclass(frozen=True)
class Job:
    """A validated search job, resolved: everything the loop, the workers and the report use."""

    path: Path
    template: Recipe
    space: SearchSpace | DataflowSpace  # parameter space or data-flow space: one engine, two genome kinds
    fitness: Fitness
    optimizer: OptimizerSpec
    workers: WorkerSpec
    objectives: Objectives | None = None  # several objectives (`objectives.py`); None: the fitness alone


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a search job; every error is a one-line `RecipeError` naming the key."""
    return load_job_file(path, "a search job must be a YAML mapping with 'recipe', 'search' and 'fitness' keys", parse_job)


def parse_job(data: dict, root: Path, label: str, path: Path | None = None) -> Job:
    """Validate a job given as a dict; paths are relative to `root`; `label` names it in errors."""
    spec = validated(JobSpec, data, label)
    if spec.dataflow is not None:
        return _dataflow_job(spec, spec.dataflow, root, label, path)
    template = _template(_recipe_source(spec, label), root, label)
    if template.models is None:
        raise RecipeError(f"{label}: recipe: the search supports `models:` templates; `slices:` is not supported yet")
    methods = _methods(spec, template, label)
    entries = spec.search if spec.search is not None else default_search(template)
    space = SearchSpace(template, dimensions(entries, template, methods, root, label), methods)
    check_optimizer(spec.optimizer, label)
    check_device(spec.workers, label)
    models = tuple(template.ref(m.model, m.adapter).path for m in template.models)
    base_ref = template.ref(template.base_model) if template.base_model else None
    base = (base_ref.adapter or base_ref.path) if base_ref else None
    fitness = resolve_fitness(spec.fitness, spec.splits, models, base, root, label)
    objectives = resolve_objectives(spec.objectives, spec.pick, fitness, None, label)
    return Job(path or root / "job.yaml", template, space, fitness, spec.optimizer, spec.workers, objectives)


def _dataflow_job(spec: JobSpec, flow: DataflowSpec, root: Path, label: str, path: Path | None) -> Job:
    """A data-flow job: the space from `dataflow:`, the template its start (model 0 itself);
    `base_model:` is only what `fitness.normalize: gap` measures from."""
    given = [k for k in ("recipe", "models", "search", "methods") if getattr(spec, k) is not None]
    if given:
        raise RecipeError(f"{label}: dataflow: searches layer routes, not a recipe's parameters; drop {', '.join(given)}")
    space = dataflow_space(flow, root, label)
    optimizer = default_optimizer(spec.optimizer)
    check_optimizer(optimizer, label)
    check_device(spec.workers, label)
    models = tuple(resolve_path(root, m) for m in space.models)
    base = resolve_path(root, spec.base_model) if spec.base_model is not None else None
    fitness = resolve_fitness(spec.fitness, spec.splits, models, base, root, label)
    objectives = resolve_objectives(spec.objectives, spec.pick, fitness, space.max_layers, label)
    return Job(path or root / "job.yaml", space.to_recipe(space.start()), space, fitness, optimizer, spec.workers,
               objectives)


def _recipe_source(spec: JobSpec, label: str) -> str | dict[str, Any]:
    """The template: `recipe:` as given, or the short form's task arithmetic over `models:` at the average."""
    if spec.recipe is not None:
        if spec.models is not None or spec.base_model is not None:
            raise RecipeError(f"{label}: give either recipe: or models: and base_model:, not both")
        return spec.recipe
    if spec.models is None or spec.base_model is None:
        raise RecipeError(f"{label}: give recipe: (a template recipe), or models: and base_model: (the short form)")
    weight = 1.0 / len(spec.models)
    return {"merge_method": DEFAULT_METHOD, "base_model": spec.base_model, "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": weight}} for m in spec.models]}


def _template(source: str | dict, root: Path, label: str) -> Recipe:
    """The recipe template: a path (relative to the job) or inline (paths relative to the job)."""
    if isinstance(source, str):
        return load_recipe(resolve_path(root, source))
    return parse_recipe(source, root, f"{label}: recipe")


def _methods(spec: JobSpec, template: Recipe, label: str) -> tuple[str, ...]:
    """The candidate methods (each must exist); the template's method alone when none are searched."""
    names = spec.methods or [template.merge_method]
    for i, name in enumerate(names):
        try:
            get_method(name)
        except RecipeError as exc:
            raise RecipeError(f"{label}: methods[{i}]: {str(exc).split(': ', 1)[1]}") from None
    if template.merge_method not in names:
        raise RecipeError(f"{label}: methods: must include the template's method '{template.merge_method}' (the start)")
    return tuple(dict.fromkeys(names))
