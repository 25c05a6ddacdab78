"""The searched quantities of a job: its `search:` entries resolved against the template recipe.

Each entry names a parameter of one model (as the template names it, or its folder) or a global
one; its bounds come from the entry or the method's `Param`, its start from the entry, the
template (the model's own setting, then the global one) or the parameter's default, one value
per group of layers. Without `search:`, every model's weight is searched per third of the stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import RecipeError
from mergelab.evolve.schema import GLOBAL, SearchEntry
from mergelab.methods import get_method
from mergelab.methods.base import REQUIRED, MergeMethod, Param
from mergelab.recipe import Recipe
from mergelab.settings import Conditional, Setting, evaluate
from mergelab.user_yaml import resolve_path

DEFAULT_GROUPS = 3  # the short form searches each model's weight per third of the stack
DEFAULT_HIGH = 1.5  # ... between 0 and this


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


def default_search(template: Recipe) -> list[SearchEntry]:
    """Without `search:`, every model's weight, one value per group of layers, in [0, DEFAULT_HIGH]."""
    return [SearchEntry(model=m.model, param="weight", groups=DEFAULT_GROUPS, low=0.0, high=DEFAULT_HIGH)
            for m in template.models or []]


def dimensions(entries: list[SearchEntry], template: Recipe, methods: tuple[str, ...], root: Path,
               label: str) -> tuple[Dimension, ...]:
    """Every entry resolved (bounds, start), each searched once."""
    dims = tuple(_dimension(e, i, template, methods, root, label) for i, e in enumerate(entries))
    seen: set[str] = set()
    for i, d in enumerate(dims):
        if d.key in seen:
            raise RecipeError(f"{label}: search[{i}]: {d.key} is searched twice")
        seen.add(d.key)
    return dims


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
