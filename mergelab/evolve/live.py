"""In-memory merging of search candidates into one live model.

A `LiveMerger` builds the plan of the template recipe once (every header read, every shape
checked), reads every source tensor once onto the device, and keeps one live
`AutoModelForCausalLM` whose parameters are the merge's output tensors. For each candidate
recipe, `set_recipe` re-resolves the jobs' parameters (`plan.replan`: no header read again),
runs the same method code as `mergelab merge` (`execute.merge_job`) tensor by tensor, and copies
each result into the live model in place, so the model holds exactly what `mergelab merge`
would write (tested bit for bit). Tied weights (a head sharing the embedding) are one parameter
in the model and one tensor in the checkpoint: they are written once.

With `cache=True` (the default) the methods remember, per output tensor and input, what depends
only on the sources and the seed: the task vector's magnitude ranks (a new TIES or breadcrumbs
density is then one comparison, not a selection) and the random draws (DARE, DELLA); see
`mergelab/methods/_cache.py`. That costs 4 bytes per element of each expert beside the sources
(DELLA 8; task arithmetic nothing; `cache_nbytes`), made by the first candidate that needs
them; `cache=False` saves that memory and selects and draws again per candidate. Results are
the same bit for bit either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mergelab.device import resolve_device
from mergelab.errors import PlanError
from mergelab.execute import merge_job, prepare, single_threaded_ops
from mergelab.methods._cache import MergeCache, TensorCache
from mergelab.plan import Plan, Source, TensorJob, make_plan, replan
from mergelab.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateTiming:
    """Seconds one candidate took: re-planning + method code (merge), copying into the model (load)."""

    merge: float
    load: float

    def as_dict(self) -> dict[str, float]:
        return {"merge": self.merge, "load": self.load}


def model_for(plan: Plan, device: torch.device) -> PreTrainedModel:
    """A model of the plan's output config, in its output dtype, built on `device` (weights not set)."""
    config = dict(plan.config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    dtype = next((j.dtype for j in plan.jobs if j.dtype.is_floating_point), torch.float32)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


class LiveMerger:
    """Holds the source tensors and one live model; `set_recipe` merges a candidate into it."""

    def __init__(self, recipe: Recipe, device: str | torch.device = "cpu", *, allow_pickle: bool = False,
                 cache: bool = True) -> None:
        self.device = resolve_device(device)
        self.plan: Plan = make_plan(recipe, allow_pickle=allow_pickle)
        self._cache = MergeCache() if cache else None
        self._sources: dict[Source, torch.Tensor] = {}
        for job in self.plan.jobs:  # 1) every source tensor, read once, on the device
            for src in job.sources:
                self._source(src)
        self.model = self._build_model()  # 2) one live model ...
        self._targets = self._bind(self.plan.jobs)  # ... and where each output tensor goes in it

    # ------------------------------------------------------------ per candidate
    def set_recipe(self, recipe: Recipe, *, seed: int = 0) -> CandidateTiming:
        """Merge `recipe` (the template's models, other values or method) into the live model.

        On an error the model may hold a mix of two candidates until the next `set_recipe`."""
        start = time.perf_counter()
        plan = replan(self.plan, recipe)
        self._check_layout(plan.jobs)
        merge_s = time.perf_counter() - start
        load_s = 0.0
        # one thread per op on CPU, as `mergelab merge` runs them: reductions (rescale norms) then
        # add up in the same order, so large tensors come out the same too
        with torch.no_grad(), single_threaded_ops(self.device):
            for job in plan.jobs:
                t0 = time.perf_counter()
                tensors = {s: self._source(s) for s in job.sources}
                out = merge_job(plan, job, tensors, self.device, seed, self._tensor_cache(plan, job))
                t1 = time.perf_counter()
                self._targets[job.name].copy_(out)
                merge_s += t1 - t0
                load_s += time.perf_counter() - t1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return CandidateTiming(merge_s, load_s)

    def state(self) -> dict[str, torch.Tensor]:
        """The live model's tensors under the names `mergelab merge` writes them."""
        return {name: t.detach() for name, t in self._targets.items()}

    @property
    def cache_nbytes(self) -> int:
        """Bytes the cache holds on the device (0 without one)."""
        return self._cache.nbytes if self._cache is not None else 0

    def close(self) -> None:
        if self._cache is not None:
            self._cache.clear()
        self.plan.close()

    def _tensor_cache(self, plan: Plan, job: TensorJob) -> TensorCache | None:
        """The cache of this output tensor made from these sources (in this order, this dtype)."""
        if self._cache is None:
            return None
        return self._cache.tensor((job.name, job.inputs, job.base, plan.load_dtype))

    # ------------------------------------------------------------ setup
    def _source(self, src: Source) -> torch.Tensor:
        """One source tensor, read on first use, on the device, rounded to the recipe's `dtype`."""
        t = self._sources.get(src)
        if t is None:  # rounded once here: merge_job's own rounding then leaves it as it is
            t = self._sources[src] = prepare(self.plan.checkpoints[src.model].read(src.name), self.device, self.plan.load_dtype)
        return t

    def _build_model(self) -> PreTrainedModel:
        """An (uninitialised-weights) model of the output config, in the output dtype, on the device."""
        model = model_for(self.plan, self.device)
        model.requires_grad_(False)
        return model.eval()

    def _bind(self, jobs: list[TensorJob]) -> dict[str, torch.Tensor]:
        """Output tensor name -> the model's tensor it is written into; every model tensor covered."""
        state = self.model.state_dict(keep_vars=True)
        targets: dict[str, torch.Tensor] = {}
        for job in jobs:
            t = state.get(job.name)
            if t is None:
                raise PlanError(f"tensor '{job.name}': the live {type(self.model).__name__} has no such tensor")
            if tuple(t.shape) != job.shape or t.dtype != job.dtype:
                raise PlanError(f"tensor '{job.name}': the live model holds {tuple(t.shape)} {t.dtype}, the plan {job.shape} {job.dtype}")
            targets[job.name] = t.data
        written = {t.data_ptr() for t in targets.values()}
        missing = [n for n, t in state.items() if t.data_ptr() not in written]  # tied tensors share storage
        if missing:
            raise PlanError(f"the merge writes no tensor for {', '.join(missing[:3])} of the live model")
        return targets

    def _check_layout(self, jobs: list[TensorJob]) -> None:
        if [j.name for j in jobs] != list(self._targets):
            raise PlanError("the candidate recipe produces other tensors than the live model holds")
