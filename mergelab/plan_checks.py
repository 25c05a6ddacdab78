"""What a plan checks before any tensor is read: the recipe's parameters against its method,
the models' architectures against each other, each slice against the method and its inputs.
"""

from __future__ import annotations

import logging

from mergelab.checkpoint import TensorSource
from mergelab.errors import PlanError, RecipeError
from mergelab.methods import MergeMethod
from mergelab.plan_slices import LayerSlice, num_layers
from mergelab.recipe import ModelRef, Recipe
from mergelab.settings import Setting, scalars

log = logging.getLogger(__name__)


def check_parameters(recipe: Recipe, method: MergeMethod) -> None:
    """Every parameter named anywhere is one the method takes, at a scope where it applies, in range."""
    allowed = ", ".join(f"{p.name} ({'per model' if p.scope == 'model' else 'global'})" for p in method.params) or "none"

    def check(settings: dict[str, Setting] | None, where: str, per_model: bool) -> None:
        for name, setting in (settings or {}).items():
            param = method.param(name)
            if param is None:
                raise RecipeError(f"{where}.{name}: {method.name} takes no parameter '{name}'; it takes: {allowed}")
            if per_model and param.scope == "global":
                raise RecipeError(f"{where}.{name}: '{name}' is a global parameter of {method.name}; set it under the top-level 'parameters'")
            for value in scalars(setting):
                param.check(value, f"{where}.{name}")
            if param.inert:
                log.warning("%s.%s: %s accepts '%s' for mergekit compatibility but ignores it", where, name, method.name, name)

    check(recipe.parameters, "parameters", per_model=False)
    for i, m in enumerate(recipe.models or []):
        check(m.parameters, f"models[{i}].parameters", per_model=True)
    for i, s in enumerate(recipe.slices or []):
        check(s.parameters, f"slices[{i}].parameters", per_model=False)
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{i}].sources[{j}].parameters", per_model=True)
    for p in method.params:
        if p.scope == "global" and p.required and not _set_globally(recipe, p.name):
            raise RecipeError(f"parameters.{p.name}: {method.name} needs a value for '{p.name}'")


def _set_globally(recipe: Recipe, name: str) -> bool:
    if name in (recipe.parameters or {}):
        return True
    return any(name in (s.parameters or {}) for s in recipe.slices or [])


def check_architectures(ckpts: dict[ModelRef, TensorSource], keys: dict[ModelRef, str]) -> None:
    kinds = {(c.config.get("model_type"), tuple(c.config.get("architectures") or ())) for c in ckpts.values() if c.config}
    if len({k[0] for k in kinds}) > 1:
        found = ", ".join(f"{keys[ref]}={c.config.get('model_type')}" for ref, c in ckpts.items())
        raise PlanError(f"models have different architectures ({found}); pass allow_crimes=True to merge them anyway, "
                        "tensor by tensor", arguments=("allow_crimes",))


def check_slice(s: LayerSlice, method: MergeMethod, ckpts: dict[ModelRef, TensorSource]) -> None:
    paths = [src.path for src in s.sources]
    if method.base_policy == "required" and s.base is None:
        raise RecipeError(f"base_model: {method.name} needs a base model (the model the others' task vectors are taken from)")
    if s.base is not None and method.base_policy != "input" and s.base not in paths:
        raise RecipeError(f"{s.key}: the base model {s.base} must be one of the slice's sources")
    n_inputs = len(paths) - (1 if s.base is not None and method.base_policy != "input" else 0)
    if n_inputs < method.min_inputs:
        what = "models besides the base" if method.base_policy != "input" else "models"
        raise RecipeError(f"{s.key}: {method.name} needs at least {method.min_inputs} {what}, got {n_inputs}")
    if method.max_inputs is not None and n_inputs > method.max_inputs:
        what = "model besides the base" if method.base_policy != "input" else "model"
        raise RecipeError(f"{s.key}: {method.name} takes at most {method.max_inputs} {what}{'s' if method.max_inputs > 1 else ''} per slice, got {n_inputs}")
    lengths = {src.layers[1] - src.layers[0] for src in s.sources if src.layers}
    if len(lengths) > 1:
        raise RecipeError(f"{s.key}: all sources of a slice need the same number of layers in {s.stack}, got {sorted(lengths)}")
    for src in s.sources:
        have = num_layers(ckpts[src.path], s.stack) if s.stack else 0
        if src.layers and src.layers[1] > have:
            raise RecipeError(f"{src.key}.layer_range: {list(src.layers)} is past the {have} layers of {src.path}")
