"""The search space: genome (nevergrad parametrization values) -> recipe.

A genome is a dict keyed like the recipe locations it fills (JSON-friendly, as logged):

    {"models[0].weight": 0.7, "models[1].density": [0.3, 0.5, 0.8], "global.lambda": 1.1, "method": "ties"}

One value is an `ng.p.Scalar`; one value per layer group is an `ng.p.Array` and becomes a
gradient list in the recipe (interpolated over the layers, as mergekit does); the merge method,
when searched, is an `ng.p.Choice`. Bounds come from the job (by default the method's `Param`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergelab.blackbox.pool import Genome
from mergelab.evolve.dimensions import Dimension
from mergelab.methods import get_method
from mergelab.methods.base import MergeMethod
from mergelab.recipe import Recipe, parse_recipe

METHOD = "method"


class SearchSpace:
    """Maps genomes to complete recipes: the template, the searched dimensions, the candidate methods
    (the template's alone when the method is not searched)."""

    def __init__(self, template: Recipe, dimensions: tuple[Dimension, ...], methods: tuple[str, ...]) -> None:
        self.template = template
        self.dimensions = dimensions
        self.methods = methods

    # ------------------------------------------------------------ nevergrad side
    def parametrization(self, seed: int | None = None) -> Any:
        """An `ng.p.Dict` over every dimension (+ the method), at the start values, seeded."""
        import nevergrad as ng

        params: dict[str, Any] = {}
        for d in self.dimensions:
            p = (ng.p.Scalar(init=d.start[0], lower=d.low, upper=d.high) if d.groups == 1
                 else ng.p.Array(init=np.array(d.start), lower=d.low, upper=d.high))
            params[d.key] = p.set_integer_casting() if d.param.kind is int else p
        if len(self.methods) > 1:
            params[METHOD] = ng.p.Choice(list(self.methods))
        space = ng.p.Dict(**params)
        space.value = self.to_ng(self.start())
        if seed is not None:
            space.random_state = np.random.RandomState(seed)
        return space

    def to_ng(self, genome: Genome) -> dict[str, Any]:
        """A genome as a value of `parametrization()` (arrays for grouped dimensions)."""
        out = {k: (np.array(v, dtype=float) if isinstance(v, list) else v) for k, v in genome.items()}
        if len(self.methods) <= 1:
            out.pop(METHOD, None)
        return out

    def from_ng(self, value: dict[str, Any]) -> Genome:
        """A parametrization value as a plain genome (floats, lists of floats, the method name)."""
        genome: Genome = {}
        for d in self.dimensions:
            v = value[d.key]
            values = [float(x) for x in np.atleast_1d(np.asarray(v, dtype=float))]
            values = [_cast(d, x) for x in values]
            genome[d.key] = values[0] if d.groups == 1 else values
        genome[METHOD] = str(value.get(METHOD, self.template.merge_method))
        return genome

    # ------------------------------------------------------------ recipe side
    def start(self) -> Genome:
        """The template's own values: the search starts from the template recipe."""
        genome: Genome = {d.key: (d.start[0] if d.groups == 1 else list(d.start)) for d in self.dimensions}
        genome[METHOD] = self.template.merge_method
        return genome

    def to_recipe(self, genome: Genome) -> Recipe:
        """The complete recipe of a genome: the template with the method and the searched values set."""
        method = get_method(genome.get(METHOD, self.template.merge_method))
        data = self.template.model_dump(mode="json", exclude_none=True, exclude={"root"})
        data["merge_method"] = method.name
        if method.name != self.template.merge_method:
            _drop_untaken(data, {p.name for p in method.params if not p.inert})
        for d in self.dimensions:
            if not takes(method, d.param.name):
                continue  # a parameter of another candidate method
            _settings(data, d)[d.param.name] = _setting(d, genome[d.key])
        return parse_recipe(data, self.template.root, "candidate recipe")


    def values(self, genome: Genome) -> dict[str, Any]:
        """What `trials.jsonl` shows of a candidate: the recipe's method and parameters."""
        data = self.to_recipe(genome).model_dump(mode="json", exclude_none=True, exclude={"root"})
        return {"merge_method": data["merge_method"], "parameters": data.get("parameters", {}),
                "models": [m.get("parameters", {}) for m in data.get("models", [])]}


def takes(method: MergeMethod, name: str) -> bool:
    """Whether `method` takes parameter `name` and uses it (mergekit-compatible inert ones do not count)."""
    p = method.param(name)
    return p is not None and not p.inert


def _cast(d: Dimension, x: float) -> float:
    """Clip into the bounds; round for integer parameters."""
    x = min(max(x, d.low), d.high)
    return int(round(x)) if d.param.kind is int else x


def _setting(d: Dimension, value: Any) -> Any:
    """A genome value as a recipe setting: a scalar, or a gradient list of one value per group."""
    values = value if isinstance(value, list) else [value]
    values = [_cast(d, float(v)) for v in values]
    return values[0] if d.groups == 1 else values


def _settings(data: dict, d: Dimension) -> dict[str, Any]:
    """The `parameters` mapping a dimension lives in (created when missing)."""
    owner = data if d.model is None else data["models"][d.model]
    return owner.setdefault("parameters", {})


def _drop_untaken(data: dict, taken: set[str]) -> None:
    """Remove the template's parameters that another method does not take."""
    owners = [data] + list(data.get("models") or [])
    for owner in owners:
        params = owner.get("parameters")
        if params:
            owner["parameters"] = {k: v for k, v in params.items() if k in taken}
