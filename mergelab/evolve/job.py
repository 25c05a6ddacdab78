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
a search of each model's weight per group of layers (`DEFAULT_GROUPS`, in [0, `DEFAULT_HIGH`]),
terms scored by `prob` (the answer's probability: smooth like NLL, bounded like accuracy), each
skill measured between its expert and the base (`normalize: gap`, with several skills), and
NGOpt over 100 candidates: the most robust setting `bench/search_quality.py` measured (README,
"Does the default beat the hand-set merges?").

Everything is checked before anything runs; each error is one line naming the key path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergelab.errors import MergelabError, RecipeError
from mergelab.evolve.optimizer import optimizer_family
from mergelab.methods import get_method
from mergelab.methods.base import REQUIRED, MergeMethod, Param
from mergelab.recipe import (Conditional, Recipe, Setting, describe_validation_error, evaluate, load_recipe, parse_recipe,
                             read_yaml_mapping, resolve_path)

GLOBAL = "global"
DEFAULT_METHOD = "task_arithmetic"  # the short form's template
DEFAULT_GROUPS = 3  # the short form searches each model's weight per third of the stack
DEFAULT_HIGH = 1.5  # ... between 0 and this
SPLIT_RE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchEntry(_Strict):
    """One searched parameter: of one model (as the template names it) or global."""

    model: str = GLOBAL
    param: str
    groups: int = Field(1, ge=1)
    low: float | None = None
    high: float | None = None
    start: Union[float, list[float], None] = None


class FitnessTerm(_Strict):
    """A zoo skill scored by answer NLL, answer probability or exact match, or an lm-eval task (`metric: lm-eval`:
    `task` is an lm-eval task name or a local task folder, `lm_eval_metric` the metric it reports)."""

    task: str
    metric: Literal["nll", "prob", "accuracy", "lm-eval"] = "prob"
    lm_eval_metric: str | None = None
    weight: float = 1.0
    limit: int | None = Field(None, ge=1)
    expert: str | None = None  # the model this skill's score is normalised by (default: the template model named like the task)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"task": data} if isinstance(data, str) else data


class FitnessSpec(_Strict):
    tasks: str | None = None  # the zoo's tasks folder (for the nll, prob and accuracy terms)
    terms: list[FitnessTerm] = Field(min_length=1)  # a bare task name is a term with the defaults
    goal: Literal["minimize", "maximize"] | None = None
    normalize: Literal["gap", "experts", "start", "none"] | None = None


class OptimizerSpec(_Strict):
    name: str = "NGOpt"
    budget: int = Field(100, ge=1)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)  # the family's configuration (`evolve.optimizer`)


class WorkerSpec(_Strict):
    count: int = Field(1, ge=1)
    device: str = "cpu"
    address: str | None = None


class SplitSpec(_Strict):
    fitness: str = "validation[0:100]"
    select: str = "validation[100:200]"
    report: str = "test"


class JobSpec(_Strict):
    recipe: Union[str, dict[str, Any], None] = None
    models: list[str] | None = Field(None, min_length=2)  # the short form, instead of recipe
    base_model: str | None = None
    search: list[SearchEntry] | None = Field(None, min_length=1)  # default: every model's weight per layer group
    methods: list[str] | None = None
    fitness: FitnessSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    workers: WorkerSpec = WorkerSpec()
    splits: SplitSpec = SplitSpec()


@dataclass(frozen=True)
class SplitRange:
    """A task split, optionally a [start, end) range of its examples."""

    name: str
    start: int = 0
    end: int | None = None

    def overlaps(self, other: SplitRange) -> bool:
        if self.name != other.name:
            return False
        inf = float("inf")
        return max(self.start, other.start) < min(self.end if self.end is not None else inf,
                                                  other.end if other.end is not None else inf)


@dataclass(frozen=True)
class Dimension:
    """One searched quantity, resolved against the template: where it goes, its bounds and start."""

    key: str  # `global.lambda`, `models[0].density`: the genome key and the recipe location
    model: int | None  # index into the template's `models`, None for the top-level parameters
    param: Param
    groups: int
    low: float
    high: float
    start: tuple[float, ...]  # one value per group


@dataclass(frozen=True)
class Job:
    """A validated search job."""

    path: Path
    spec: JobSpec
    template: Recipe
    dimensions: tuple[Dimension, ...]
    methods: tuple[str, ...]  # the candidate methods; the template's alone when not searched
    tasks: Path
    experts: tuple[Path | None, ...]  # per fitness term, the model it is normalised by
    base: Path | None  # the template's base model (the other end of `normalize: gap`)
    splits: dict[str, SplitRange]


# ---------------------------------------------------------------- loading
def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a search job; every error is a one-line `RecipeError` naming the key."""
    path = Path(path)
    data = read_yaml_mapping(path, "job", "a search job must be a YAML mapping with 'recipe', 'search' and 'fitness' keys")
    return parse_job(data, path.resolve().parent, str(path), path)


def parse_job(data: dict, root: Path, label: str, path: Path | None = None) -> Job:
    """Validate a job given as a dict; paths are relative to `root`; `label` names it in errors."""
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{label}: {describe_validation_error(exc)}") from None
    template = _template(_recipe_source(spec, label), root, label)
    if template.models is None:
        raise RecipeError(f"{label}: recipe: the search supports `models:` templates; `slices:` is not supported yet")
    methods = _methods(spec, template, label)
    entries = spec.search if spec.search is not None else default_search(template)
    dims = tuple(_dimension(e, i, template, methods, root, label) for i, e in enumerate(entries))
    _check_unique(dims, label)
    check_optimizer(spec.optimizer, label)
    check_device(spec.workers, label)
    splits = _splits(spec.splits, label)
    tasks = resolve_path(root, spec.fitness.tasks or ".")
    _check_fitness(spec.fitness, tasks, splits, root, label)
    experts = _experts(spec.fitness, template, root, label)
    base_ref = template.ref(template.base_model) if template.base_model else None
    base = (base_ref.adapter or base_ref.path) if base_ref else None
    if base is None and normalize_of(spec.fitness) == "gap":
        raise RecipeError(f"{label}: fitness.normalize: gap measures each skill between the base model and its expert, "
                          "and the recipe has no base_model; use normalize: experts")
    return Job(path or root / "job.yaml", spec, template, dims, methods, tasks, experts, base, splits)


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


def default_search(template: Recipe) -> list[SearchEntry]:
    """Without `search:`, every model's weight, one value per group of layers, in [0, DEFAULT_HIGH]."""
    return [SearchEntry(model=m.model, param="weight", groups=DEFAULT_GROUPS, low=0.0, high=DEFAULT_HIGH)
            for m in template.models or []]


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


# ---------------------------------------------------------------- search entries
def _dimension(e: SearchEntry, i: int, template: Recipe, methods: tuple[str, ...], root: Path, label: str) -> Dimension:
    where = f"{label}: search[{i}]"
    model = _model_index(e.model, template, root, f"{where}.model")
    param = _param(e.param, [get_method(m) for m in methods], f"{where}.param")
    if model is not None and param.scope == "global":
        raise RecipeError(f"{where}.param: '{e.param}' is a global parameter; use model: {GLOBAL}")
    if param.kind not in (float, int):
        raise RecipeError(f"{where}.param: '{e.param}' is not numeric ({param.kind.__name__}); only numbers are searched")
    low = e.low if e.low is not None else param.low
    high = e.high if e.high is not None else param.high
    if low is None or high is None:
        raise RecipeError(f"{where}: '{e.param}' has no natural bounds; give low and high")
    if not low < high:
        raise RecipeError(f"{where}: low ({low:g}) must be below high ({high:g})")
    param.check(low, f"{where}.low")
    param.check(high, f"{where}.high")
    start = _start(e, template, model, param, where)
    for v in start:
        if not low <= v <= high:
            raise RecipeError(f"{where}.start: {v:g} is outside [{low:g}, {high:g}]")
    key = f"{GLOBAL if model is None else f'models[{model}]'}.{e.param}"
    return Dimension(key, model, param, e.groups, float(low), float(high), start)


def _model_index(name: str, template: Recipe, root: Path, where: str) -> int | None:
    """`global` -> None; else the index of the template model with this name (as written, or the same folder)."""
    if name == GLOBAL:
        return None
    models = template.models or []
    for i, m in enumerate(models):
        if m.model == name:
            return i
    for i, m in enumerate(models):
        if template.ref(m.model, m.adapter).path == resolve_path(root, name):
            return i
    known = ", ".join(m.model for m in models)
    raise RecipeError(f"{where}: '{name}' is not a model of the recipe (its models: {known}; or '{GLOBAL}')")


def _param(name: str, methods: list[MergeMethod], where: str) -> Param:
    """The parameter `name` as the first candidate method that uses it declares it."""
    for method in methods:
        p = method.param(name)
        if p is not None and not p.inert:
            return p
    takes = sorted({p.name for m in methods for p in m.params if p.kind in (float, int) and not p.inert})
    names = "/".join(m.name for m in methods)
    raise RecipeError(f"{where}: {names} takes no parameter '{name}'; numeric ones: {', '.join(takes) or 'none'}")


def _start(e: SearchEntry, template: Recipe, model: int | None, param: Param, where: str) -> tuple[float, ...]:
    """The start value per group: given, else the template's (model's own, then global), else the default."""
    setting: Setting | None = e.start
    if setting is None and model is not None:
        setting = ((template.models or [])[model].parameters or {}).get(param.name)
    if setting is None:
        setting = (template.parameters or {}).get(param.name)
    if setting is None and param.default is not REQUIRED and param.default is not None:
        setting = param.default
    if setting is None:
        raise RecipeError(f"{where}.start: the recipe sets no '{param.name}' here and it has no default; give start")
    if isinstance(setting, list) and any(isinstance(c, Conditional) for c in setting):
        raise RecipeError(f"{where}.start: the recipe's '{param.name}' is filtered per tensor; give start")
    if isinstance(setting, list) and len(setting) != e.groups:
        if e.start is not None:
            raise RecipeError(f"{where}.start: give {e.groups} values (one per group), got {len(setting)}")
    ts = [g / (e.groups - 1) if e.groups > 1 else 0.0 for g in range(e.groups)]
    return tuple(float(evaluate(setting, "", t)) for t in ts)


def _check_unique(dims: tuple[Dimension, ...], label: str) -> None:
    seen: set[str] = set()
    for i, d in enumerate(dims):
        if d.key in seen:
            raise RecipeError(f"{label}: search[{i}]: {d.key} is searched twice")
        seen.add(d.key)


# ---------------------------------------------------------------- optimizer, workers, splits, fitness
def check_optimizer(opt: OptimizerSpec, label: str) -> None:
    """The optimizer name and options must make an optimizer (one-line error naming the key)."""
    optimizer_family(opt.name, opt.options, label)


def check_device(workers: WorkerSpec, label: str) -> None:
    import torch

    try:
        torch.device(workers.device)
    except RuntimeError:
        raise RecipeError(f"{label}: workers.device: unknown device {workers.device!r}; use cpu, cuda or cuda:N") from None


def parse_split(text: str, where: str) -> SplitRange:
    """`validation`, `validation[0:100]`, `test[:50]` -> a SplitRange."""
    m = SPLIT_RE.match(text.strip())
    if not m:
        raise RecipeError(f"{where}: cannot read split {text!r}; write e.g. validation or validation[0:100]")
    start = int(m[2]) if m[2] else 0
    end = int(m[3]) if m[3] else None
    if end is not None and end <= start:
        raise RecipeError(f"{where}: the range of {text!r} is empty")
    return SplitRange(m[1], start, end)


def _splits(spec: SplitSpec, label: str) -> dict[str, SplitRange]:
    """The three splits, pairwise disjoint (fitting, selecting and reporting on the same data overfits)."""
    out = {k: parse_split(getattr(spec, k), f"{label}: splits.{k}") for k in ("fitness", "select", "report")}
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if out[a].overlaps(out[b]):
                raise RecipeError(f"{label}: splits.{b}: overlaps splits.{a}; the three splits must share no example")
    return out


def _check_fitness(fit: FitnessSpec, tasks: Path, splits: dict[str, SplitRange], root: Path, label: str) -> None:
    zoo_terms = [(i, t) for i, t in enumerate(fit.terms) if t.metric != "lm-eval"]
    if zoo_terms and fit.tasks is None:
        raise RecipeError(f"{label}: fitness.tasks: required for nll and accuracy terms (the zoo's tasks folder)")
    if zoo_terms and not tasks.is_dir():
        raise RecipeError(f"{label}: fitness.tasks: {tasks}: folder not found (build the zoo: mergelab zoo build DIR)")
    known = sorted(p.name for p in tasks.iterdir() if p.is_dir()) if zoo_terms else []
    for i, term in zoo_terms:
        if term.task not in known:
            raise RecipeError(f"{label}: fitness.terms[{i}].task: unknown task '{term.task}' (in {tasks}: {', '.join(known) or 'none'})")
        for use, split in splits.items():
            if not (tasks / term.task / f"{split.name}.jsonl").is_file():
                raise RecipeError(f"{label}: splits.{use}: task '{term.task}' has no split '{split.name}'")
    for i, term in enumerate(fit.terms):
        if term.metric == "lm-eval":
            _check_lm_eval_term(term, splits, root, f"{label}: fitness.terms[{i}]")
        elif term.lm_eval_metric is not None:
            raise RecipeError(f"{label}: fitness.terms[{i}].lm_eval_metric: only for metric: lm-eval")
    if goal_of(fit) is None:
        raise RecipeError(f"{label}: fitness.goal: the terms mix nll and accuracy; set goal and sign the weights")


def _check_lm_eval_term(term: FitnessTerm, splits: dict[str, SplitRange], root: Path, where: str) -> None:
    """An lm-eval task has one evaluation split of its own: the three split ranges index its
    documents, so they must not overlap as ranges, and a range that starts later must end."""
    import lm_eval.tasks

    from mergelab.eval.lm_eval_bridge import _resolve

    task = lm_eval_task(term, root)
    try:
        name, folder = _resolve(task, None)
    except MergelabError as exc:
        raise RecipeError(f"{where}.task: {exc}") from None
    manager = lm_eval.tasks.TaskManager(include_path=str(folder) if folder else None, include_defaults=folder is None)
    if name not in manager.all_tasks:
        raise RecipeError(f"{where}.task: unknown lm-eval task '{term.task}' (neither a task folder nor a task name)")
    ranges = {use: SplitRange("docs", s.start, s.end) for use, s in splits.items()}
    uses = list(ranges)
    for i, a in enumerate(uses):
        if ranges[a].start > 0 and ranges[a].end is None:
            raise RecipeError(f"{where}: splits.{a} starts at document {ranges[a].start} with no end; "
                              "an lm-eval term needs an end (e.g. test[200:400])")
        for b in uses[i + 1:]:
            if ranges[a].overlaps(ranges[b]):
                raise RecipeError(f"{where}: splits.{a} and splits.{b} overlap as document ranges of the lm-eval task "
                                  "(it has one evaluation split); give disjoint ranges, e.g. validation[0:100], "
                                  "validation[100:200], validation[200:400]")


def lm_eval_task(term: FitnessTerm, root: Path) -> str:
    """The lm-eval task of a term: a folder relative to the job when there is one, else the name."""
    folder = resolve_path(root, term.task)
    return str(folder) if folder.is_dir() else term.task


def goal_of(fit: FitnessSpec) -> Literal["minimize", "maximize"] | None:
    """The goal: as given; minimize the gap left to the experts; else minimize NLL terms and
    maximize accuracy; None when raw metrics are mixed."""
    if fit.goal is not None:
        return fit.goal
    if normalize_of(fit) == "gap":
        return "minimize"
    metrics = {"nll" if t.metric == "nll" else "score" for t in fit.terms}  # accuracy, lm-eval: higher is better
    if len(metrics) > 1:
        return None
    return "minimize" if metrics == {"nll"} else "maximize"


def normalize_of(fit: FitnessSpec) -> Literal["gap", "experts", "start", "none"]:
    """The normalisation: as given, else the gap to the experts when there are several skills."""
    if fit.normalize is not None:
        return fit.normalize
    return "gap" if len({t.task for t in fit.terms}) > 1 else "none"


def _experts(fit: FitnessSpec, template: Recipe, root: Path, label: str) -> tuple[Path | None, ...]:
    """Per term, the expert it is normalised by: given, else the template model whose folder is named like the task."""
    out: list[Path | None] = []
    by_name = {template.ref(m.model, m.adapter).path.name: template.ref(m.model, m.adapter).path for m in template.models or []}
    for i, term in enumerate(fit.terms):
        path = resolve_path(root, term.expert) if term.expert else by_name.get(term.task)
        if term.expert and not path.is_dir():
            raise RecipeError(f"{label}: fitness.terms[{i}].expert: {path}: folder not found")
        if path is None and normalize_of(fit) in ("gap", "experts"):
            raise RecipeError(f"{label}: fitness.terms[{i}].expert: no model of the recipe is named '{term.task}'; "
                              "give expert: or normalize: start")
        out.append(path)
    return tuple(out)
