"""Data-flow candidates assembled in memory from the source layers; only scaled tensors are new.

A `LiveAssembler` reads every source tensor once onto the device. For each candidate recipe (a
passthrough `slices` recipe, `dataflow.py`) it builds the recipe's plan (`make_plan`, the headers
already open: the same output config and the same per-tensor sources and `scale` that
`mergelab merge` would use), then a model of that config whose parameters *are* the source
tensors (shared storage, nothing allocated but the module objects): each output layer is its own
module, so attention caches see the output's layer numbers. A tensor with a `scale` other than 1
goes through the passthrough method once, when the candidate is assembled (`merge_job`, as
`mergelab merge` runs it): the candidate computes bit for bit what the written model computes. Those products
(a layer's output projections) are the candidate's only new memory, freed with it. Multiplying on
each call of the module instead (no memory at all) cost 0.17 s per forward pass of a 1.1B model
on 64 tokens, 70% of the pass, and a greedy evaluation makes one pass per generated token.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from mergelab.device import resolve_device
from mergelab.errors import PlanError
from mergelab.evolve.live import model_for
from mergelab.execute import merge_job, prepare
from mergelab.plan import Plan, Source, TensorJob, make_plan
from mergelab.recipe import ModelRef, Recipe


@dataclass(frozen=True)
class AssemblyTiming:
    """Seconds one data-flow candidate took: planning its recipe (`plan`), assembling its model
    from the source tensors (`assemble`); nothing is merged."""

    plan: float
    assemble: float

    def as_dict(self) -> dict[str, float]:
        return {"plan": self.plan, "assemble": self.assemble}


class LiveAssembler:
    """Holds the source tensors; `set_recipe` assembles a candidate from them into `model`."""

    def __init__(self, sources: Recipe, device: str | torch.device = "cpu", *, allow_pickle: bool = False) -> None:
        """`sources`: a recipe over every model the candidates may use (its tensors are read now)."""
        self.device = resolve_device(device)
        self.plan: Plan = make_plan(sources, allow_pickle=allow_pickle)
        self._opened = dict(zip(self.plan.model_keys, self.plan.checkpoints))
        self._tensors: dict[tuple[ModelRef, str], torch.Tensor] = {}
        for ref, ckpt in self._opened.items():  # every tensor of every model: a route may start or end with any
            for name in ckpt.tensors:
                self._read(ref, name)
        self.model: PreTrainedModel | None = None

    def set_recipe(self, recipe: Recipe) -> AssemblyTiming:
        """Assemble `recipe` (a passthrough recipe over the sources' models) into `self.model`."""
        start = time.perf_counter()
        plan = make_plan(recipe, opened=self._opened)
        planned = time.perf_counter()
        self.model = None  # the last candidate's modules go first
        self.model = self._assemble(plan)
        return AssemblyTiming(planned - start, time.perf_counter() - planned)

    @property
    def tokenizer_dir(self) -> Path:
        return self.plan.tokenizer_dir

    def close(self) -> None:
        self.model = None
        self._tensors.clear()
        self.plan.close()

    # ------------------------------------------------------------ assembly
    def _assemble(self, plan: Plan) -> PreTrainedModel:
        """A model of the plan's config whose tensors are the sources' (times their scale where one is set)."""
        if plan.method.name != "passthrough":
            raise PlanError(f"data-flow assembly takes passthrough recipes, not {plan.method.name}")
        if plan.load_dtype != self.plan.load_dtype:
            raise PlanError(f"data-flow assembly holds the sources in {self.plan.load_dtype}, the recipe asks {plan.load_dtype}")
        refs = list(plan.model_keys)  # the plan's model index -> the model
        unknown = [str(r.path) for r in refs if r not in self._opened]
        if unknown:
            raise PlanError(f"{unknown[0]}: not one of the data-flow sources ({', '.join(str(r.path) for r in self._opened)})")
        with _parameters_on_meta():
            model = model_for(plan, self.device)
        for job in plan.jobs:
            src = job.inputs[0]
            self._place(plan, model, job, src, self._tensors[(refs[src.model], src.name)])
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise PlanError(f"the recipe writes no tensor for {', '.join(left[:3])} of the assembled model")
        model.requires_grad_(False)
        return model.eval()

    def _place(self, plan: Plan, model: nn.Module, job: TensorJob, src: Source, tensor: torch.Tensor) -> None:
        """`job`'s output tensor in the model is `tensor` itself, or, with a scale other than 1, what
        the passthrough method makes of it (`merge_job`, as `mergelab merge` runs it: once)."""
        owner_name, _, name = job.name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            raise PlanError(f"tensor '{job.name}': the assembled {type(model).__name__} has no such tensor") from None
        if tensor.dtype != job.dtype:
            raise PlanError(f"tensor '{job.name}': the sources hold {tensor.dtype}, the recipe asks {job.dtype}; "
                            "data-flow assembly keeps the sources' dtype")
        if name in owner._buffers:
            owner._buffers[name] = tensor
            return
        if name not in owner._parameters:
            raise PlanError(f"tensor '{job.name}': the assembled {type(model).__name__} has no such tensor")
        scale = job.params[0].get("scale") if job.mergeable else None
        if scale is not None and scale != 1:  # x * 1 is x: the source itself
            with torch.no_grad():
                tensor = merge_job(plan, job, {src: tensor}, self.device, seed=0)
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def _read(self, ref: ModelRef, name: str) -> None:
        """One source tensor, read once onto the device (rounded to the sources' recipe `dtype`, if any)."""
        self._tensors[(ref, name)] = prepare(self._opened[ref].read(name), self.device, self.plan.load_dtype)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init); buffers
    (rotary frequencies, computed in `__init__`) are made for real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
