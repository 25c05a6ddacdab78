"""A recipe's parameter values and what each is worth for one tensor (mergekit's rule).

A setting is a scalar, a list of numbers (a gradient, interpolated over the layers; a list of
booleans or strings steps through its values instead), or a list of `{filter, value}` entries
(the first whose filter is a substring of the tensor name wins; no filter matches everything).

    evaluate([0.2, 0.8], "model.layers.3.mlp.up_proj.weight", t=0.5)   # -> 0.5
"""

from __future__ import annotations

import math
from typing import Any, Union

from pydantic import BaseModel, ConfigDict

from mergelab.errors import RecipeError


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: "Setting"


# list[float] before list[bool]: [1, 0] stays numeric; [true, false] stays boolean (an exact match wins)
Setting = Union[bool, int, float, str, list[float], list[bool], list[str], list[Conditional]]
Conditional.model_rebuild()


def check_finite(value: Setting, where: str) -> None:
    """No NaN or infinity anywhere in a setting; `where` names its key in the error."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: value must be finite, got {value}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v.value if isinstance(v, Conditional) else v, f"{where}[{i}]")


def scalars(setting: Setting) -> list[Any]:
    """Every scalar a setting can evaluate to (gradient points, filtered values)."""
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            out += scalars(item.value) if isinstance(item, Conditional) else [item]
        return out
    return [setting]


def evaluate(setting: Setting | None, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor at layer position t in [0, 1] (mergekit's rule)."""
    if setting is None or not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, Conditional) for e in setting):
        if any(isinstance(e, (bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]  # booleans and strings step, as in mergekit
        # a gradient: piecewise-linear interpolation between evenly spaced points
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return evaluate(cond.value, tensor_name, t)
    return None
