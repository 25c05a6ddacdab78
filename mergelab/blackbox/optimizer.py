"""The nevergrad optimizer of a job: a registry name plus options, seeded, with start points.

    optimizer: {name: ParametrizedCMA, budget: 100, seed: 0, options: {scale: 2.0, popsize: 8}}

`name` is any key of `ng.optimizers.registry`, or a family of `ng.families` (ParametrizedCMA,
DifferentialEvolution, ...). `options` configure it the way nevergrad's own presets are made:
a family is called with them (`ParametrizedCMA(scale=2.0, popsize=8)`), and a registry entry that
is a configured family (DiagonalCMA, TwoPointsDE, PSO, ...) is rebuilt with its configuration
updated by them. Every option a family takes can be set from the job, and nothing else; a plain
optimizer class (NGOpt, and CMA, which is a class choosing among CMA variants) takes none.

`make_optimizer(..., suggestions=[p0, p1])` pushes start points that are asked before the
optimizer's own (p0 first): LoraHub's w = 0 and its single-adapter probes.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from pydantic import Field

from mergelab.errors import RecipeError
from mergelab.user_yaml import Strict


class OptimizerSpec(Strict):
    """`optimizer:` of a job: a nevergrad registry name or family, the budget, the seed, the family's options."""

    name: str = "NGOpt"
    budget: int = Field(100, ge=1)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)  # the family's configuration


def check_optimizer(opt: OptimizerSpec, label: str) -> None:
    """The optimizer name and options must make an optimizer (one-line error naming the key)."""
    optimizer_family(opt.name, opt.options, label)


def optimizer_family(name: str, options: dict[str, Any], label: str) -> Any:
    """The registry entry `name`, re-configured with `options`: something to call with
    `(parametrization=, budget=, num_workers=)`. Every error is one line naming the key."""
    import nevergrad as ng

    registry = ng.optimizers.registry
    family = getattr(ng.families, name, None)
    if isinstance(family, type) and issubclass(family, ng.optimizers.base.ConfiguredOptimizer):
        return _configured(family, {}, options, name, label)
    if name not in registry:
        close = [n for n in registry if n.lower() == name.lower()]
        hint = f"did you mean {close[0]}?" if close else "e.g. NGOpt, CMA, DE, TwoPointsDE, PSO, OnePlusOne"
        raise RecipeError(f"{label}: optimizer.name: unknown nevergrad optimizer '{name}'; {hint}")
    entry = registry[name]
    if not options:
        return entry
    if not isinstance(entry, ng.optimizers.base.ConfiguredOptimizer):
        raise RecipeError(f"{label}: optimizer.options: {name} takes no options (it is not a configurable family); "
                          "use a family, e.g. ParametrizedCMA (scale, popsize, elitist) or DifferentialEvolution")
    return _configured(type(entry), entry.config(), options, name, label)


def _configured(family: type, config: dict[str, Any], options: dict[str, Any], name: str, label: str) -> Any:
    """`family(**config, **options)`, with an unknown or bad option named in one line."""
    takes = set(inspect.signature(family.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - takes)
    if unknown:
        raise RecipeError(f"{label}: optimizer.options: {name} takes no option '{unknown[0]}'; "
                          f"it takes: {', '.join(sorted(takes))}")
    try:
        return family(**{**config, **options})
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise RecipeError(f"{label}: optimizer.options: {exc}") from None


def make_optimizer(name: str, options: dict[str, Any], parametrization: Any, budget: int, workers: int,
                   label: str = "job", suggestions: Sequence[Any] = ()) -> Any:
    """The optimizer over `parametrization` (already seeded) for `budget` candidates and `workers`;
    its first candidates are `suggestions` (values of the parametrization), in that order."""
    optimizer = optimizer_family(name, options, label)(parametrization=parametrization, budget=budget, num_workers=workers)
    for point in reversed(suggestions):  # nevergrad asks the last suggestion first
        optimizer.suggest(point)
    return optimizer
