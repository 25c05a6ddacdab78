"""The schema of a merge-search job file (`search/*.yaml`), as users write it (pydantic).

`job.py` validates a file against it and resolves it once into what the search runs on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field, model_validator

from mergelab.blackbox.optimizer import OptimizerSpec
from mergelab.blackbox.spec import WorkerSpec
from mergelab.metrics import metric_name
from mergelab.user_yaml import Strict

GLOBAL = "global"


class SearchEntry(Strict):
    """One searched parameter: of one model (as the template names it) or global."""

    model: str = GLOBAL
    param: str
    groups: int = Field(1, ge=1)
    low: float | None = None
    high: float | None = None
    start: Union[float, list[float], None] = None


class FitnessTerm(Strict):
    """A zoo skill scored by a metric of the registry (`mergelab.metrics`: nll, prob, accuracy),
    or an lm-eval task (`metric: lm-eval`: `task` is an lm-eval task name or a local task folder,
    `lm_eval_metric` the metric it reports)."""

    task: str
    metric: Annotated[str, AfterValidator(metric_name)] = "prob"
    lm_eval_metric: str | None = None
    weight: float = 1.0
    limit: int | None = Field(None, ge=1)
    expert: str | None = None  # the model this skill's score is normalised by (default: the template model named like the task)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"task": data} if isinstance(data, str) else data


class RacingSpec(Strict):
    """Racing (`fitness.racing`): score each candidate on the first `first` share of every term's
    fitness examples, and on all of them only when that partial loss is within the best `keep`
    share of the partial losses seen so far (the first `warmup` candidates always go on)."""

    first: float = Field(0.25, gt=0, lt=1)
    keep: float = Field(0.5, gt=0, le=1)
    warmup: int = Field(8, ge=1)


class FitnessSpec(Strict):
    tasks: str | None = None  # the zoo's tasks folder (for the terms scored on examples)
    terms: list[FitnessTerm] = Field(min_length=1)  # a bare task name is a term with the defaults
    goal: Literal["minimize", "maximize"] | None = None
    normalize: Literal["gap", "experts", "start", "none"] | None = None
    racing: RacingSpec | None = None  # successive halving of the fitness split (`evolve/racing.py`)


class SplitSpec(Strict):
    fitness: str = "validation[0:100]"
    select: str = "validation[100:200]"
    report: str = "test"


class DataflowSpec(Strict):
    """Data-flow (layer routing) search: which layers of which models a token passes through, in
    what order, each with what scale (`dataflow.py`)."""

    models: list[str] = Field(min_length=1)  # the source models; their layers, concatenated, are one pass of slots
    repeats: int = Field(2, ge=1)  # the slots: that pass `repeats` times (the paper's r)
    min_layers: int = Field(1, ge=1)  # the depth of every candidate stays within these bounds (repaired)
    max_layers: int | None = Field(None, ge=1)  # default: one pass (the models' layers added up)
    scale: tuple[float, float] = (0.5, 1.5)  # the bounds of each included layer's scale
    # the tensors a layer's scale multiplies (name filters); default: the layer's output projections, by architecture
    scale_tensors: list[str] | None = Field(None, min_length=1)


class ObjectiveSpec(Strict):
    """One of several objectives (`objectives.py`): the fitness over some of its terms, or `depth`."""

    name: str
    terms: list[str] | None = None  # task names or task/metric keys of fitness.terms; none for depth


class PickSpec(Strict):
    """How best.yaml is chosen from the front: weights per objective (default 1 each)."""

    weights: dict[str, float] | None = None


class JobSpec(Strict):
    recipe: Union[str, dict[str, Any], None] = None
    models: list[str] | None = Field(None, min_length=2)  # the short form, instead of recipe
    base_model: str | None = None
    search: list[SearchEntry] | None = Field(None, min_length=1)  # default: every model's weight per layer group
    methods: list[str] | None = None
    fitness: FitnessSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    workers: WorkerSpec = WorkerSpec()
    splits: SplitSpec = SplitSpec()
    dataflow: DataflowSpec | None = None  # a data-flow search instead of recipe:/models: and search:
    objectives: list[ObjectiveSpec] | None = None  # several objectives: the search keeps their Pareto front
    pick: PickSpec | None = None  # with objectives: how best.yaml is chosen from the front
