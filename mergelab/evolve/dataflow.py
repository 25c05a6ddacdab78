"""The data-flow (layer routing) search space: genome <-> a passthrough `slices` recipe.

After Sakana AI's data-flow-space merging (Akiba et al., "Evolutionary Optimization of Model
Merging Recipes", arXiv 2403.13187, section 3.2): the layers of all source models, concatenated
(model 0's layers, then model 1's, ...), repeated `repeats` times, are the *slots*; a token
passes through the included slots in slot order. Per slot the genome holds

    include[i] in [0, 1]   the slot is included when above 0.5 (the paper: an indicator per slot)
    scale[i]   in [lo, hi] what the included layer's residual contribution is multiplied by

The paper scales the hidden state between layers of different models (a factor per pair of
models); here each included layer's own output projections (`scale_tensors`; by default found by
architecture: attention `o_proj` and MLP `down_proj` for Llama-family models, `c_proj` for GPT-2) are multiplied by its scale, so the layer adds `scale` times its
update to the residual stream. That form is a passthrough recipe's per-tensor `scale` (mergekit's
too), so the result is a plain recipe anyone can merge, and it corrects the same shift.

Depth bounds are kept by *repair*, not a penalty: a genome with more than `max_layers` slots
above the threshold keeps the `max_layers` highest genes, one with fewer than `min_layers` adds
the highest excluded ones. Every genome is then a valid model (no evaluation wasted on an
infeasible one, no flat penalty plateau for the optimizer), and the map is deterministic, so a
logged genome reproduces its recipe.

The recipe is one slice per included slot (`layer_range: [i, i+1]`); as every `slices:` recipe
(mergekit's rule), the embeddings come from the first slice's model and the final norm and head
from the last slice's model: the ends of the stack stay with the layers they were trained with.
The search starts from model 0 itself (its layers once, in order, every scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mergelab.architecture import find_stacks
from mergelab.blackbox.optimizer import OptimizerSpec
from mergelab.blackbox.pool import Genome
from mergelab.checkpoint import Checkpoint
from mergelab.errors import MergelabError, RecipeError
from mergelab.evolve.schema import DataflowSpec
from mergelab.plan import make_plan
from mergelab.recipe import Recipe, load_recipe, parse_recipe
from mergelab.user_yaml import resolve_path

INCLUDE = "include"
SCALE = "scale"
THRESHOLD = 0.5  # a slot is included when its gene is above this
ON, OFF = 0.75, 0.25  # the start's genes: included / excluded, a step from the threshold


@dataclass(frozen=True)
class Slot:
    """One position of the slot sequence: layer `layer` of source model `model` (an index)."""

    model: int
    layer: int


@dataclass(frozen=True)
class DataflowSpace:
    """Maps data-flow genomes (`{"include": [...], "scale": [...]}`, one value per slot) to recipes."""

    models: tuple[str, ...]  # as the job names them (relative to `root`)
    layers: tuple[int, ...]  # each model's layer count
    repeats: int
    min_layers: int
    max_layers: int
    scale_low: float
    scale_high: float
    scale_tensors: tuple[str, ...]
    root: Path

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(Slot(m, i) for _ in range(self.repeats) for m, n in enumerate(self.layers) for i in range(n))

    @property
    def dimensions(self) -> tuple[Slot, ...]:
        """The searched positions (two genes each)."""
        return self.slots

    # ------------------------------------------------------------ nevergrad side
    def parametrization(self, seed: int | None = None) -> Any:
        """An `ng.p.Dict` of two arrays (include, scale), at the start, seeded."""
        import nevergrad as ng

        start = self.start()
        space = ng.p.Dict(**{INCLUDE: ng.p.Array(init=np.array(start[INCLUDE]), lower=0.0, upper=1.0),
                             SCALE: ng.p.Array(init=np.array(start[SCALE]), lower=self.scale_low, upper=self.scale_high)})
        if seed is not None:
            space.random_state = np.random.RandomState(seed)
        return space

    def to_ng(self, genome: Genome) -> dict[str, Any]:
        return {k: np.array(genome[k], dtype=float) for k in (INCLUDE, SCALE)}

    def from_ng(self, value: dict[str, Any]) -> Genome:
        return {k: [float(x) for x in np.asarray(value[k], dtype=float)] for k in (INCLUDE, SCALE)}

    # ------------------------------------------------------------ recipe side
    def start(self) -> Genome:
        """Model 0 itself: its layers once, in order, at scale 1 (clipped into the bounds)."""
        first = [s.model == 0 and i < self.layers[0] for i, s in enumerate(self.slots)]
        one = min(max(1.0, self.scale_low), self.scale_high)
        return {INCLUDE: [ON if f else OFF for f in first], SCALE: [one] * len(first)}

    def chosen(self, genome: Genome) -> list[int]:
        """The included slots, in slot order, repaired into [min_layers, max_layers]."""
        genes = genome[INCLUDE]
        if len(genes) != len(self.slots) or len(genome[SCALE]) != len(self.slots):
            raise RecipeError(f"data-flow genome: expected {len(self.slots)} include and scale values, got "
                              f"{len(genes)} and {len(genome[SCALE])}")
        above = sum(g > THRESHOLD for g in genes)
        depth = min(max(above, self.min_layers), self.max_layers)
        ranked = sorted(range(len(genes)), key=lambda i: (-genes[i], i))  # the highest genes first
        return sorted(ranked[:depth])

    def route(self, genome: Genome) -> list[tuple[Slot, float]]:
        """The candidate's layers in order: (slot, scale), the scale clipped into its bounds."""
        slots = self.slots
        return [(slots[i], min(max(float(genome[SCALE][i]), self.scale_low), self.scale_high)) for i in self.chosen(genome)]

    def to_recipe(self, genome: Genome) -> Recipe:
        """A passthrough `slices` recipe: one single-layer slice per included slot, with its scale."""
        slices = [{"sources": [{"model": self.models[slot.model], "layer_range": [slot.layer, slot.layer + 1],
                                "parameters": {"scale": [{"filter": t, "value": scale} for t in self.scale_tensors]}}]}
                  for slot, scale in self.route(genome)]
        return parse_recipe({"merge_method": "passthrough", "slices": slices}, self.root, "candidate recipe")

    def every_layer(self) -> Recipe:
        """Every model's layers once, unscaled: the recipe whose plan opens and reads every source."""
        slices = [{"sources": [{"model": m, "layer_range": [0, n]}]} for m, n in zip(self.models, self.layers)]
        return parse_recipe({"merge_method": "passthrough", "slices": slices}, self.root, "data-flow sources")

    def values(self, genome: Genome) -> dict[str, Any]:
        """What `trials.jsonl` shows of a candidate: its layers as [model, layer, scale]."""
        return {"merge_method": "passthrough", "depth": len(self.chosen(genome)),
                "layers": [[self.models[s.model], s.layer, scale] for s, scale in self.route(genome)]}


# ---------------------------------------------------------------- the job's section, checked
def dataflow_space(spec: DataflowSpec, root: Path, label: str) -> DataflowSpace:
    """The `dataflow:` section checked against the models' headers; errors name the key."""
    where = f"{label}: dataflow"
    layers, layer = _layer_counts(spec, root, where)
    scale_tensors = _scale_tensors(spec, layer, where)
    total = spec.repeats * sum(layers)
    high = spec.max_layers if spec.max_layers is not None else sum(layers)
    if not spec.min_layers <= high <= total:
        raise RecipeError(f"{where}: need min_layers ({spec.min_layers}) <= max_layers ({high}) <= the slots "
                          f"({total} = {spec.repeats} repeats x {sum(layers)} layers)")
    low_s, high_s = spec.scale
    if not 0.0 <= low_s < high_s:
        raise RecipeError(f"{where}.scale: give [low, high] with 0 <= low < high, got {list(spec.scale)}")
    return DataflowSpace(tuple(spec.models), tuple(layers), spec.repeats, spec.min_layers, high, float(low_s),
                         float(high_s), scale_tensors, root)


def is_recipe(name: str) -> bool:
    """A source given as a recipe file (a parameter search's best.yaml): merged before the search."""
    return Path(name).suffix in (".yaml", ".yml")


def _layer_counts(spec: DataflowSpec, root: Path, where: str) -> tuple[list[int], dict[str, tuple[int, ...]]]:
    """Each model's layer count, and a layer's tensors (suffix -> shape): every layer of every
    model must hold the tensors of model 0's layer 0."""
    counts: list[int] = []
    reference: dict[str, tuple[int, ...]] | None = None
    for i, name in enumerate(spec.models):
        path = resolve_path(root, name)
        shapes = _tensor_shapes(path, f"{where}.models[{i}]")
        stacks = find_stacks(shapes)
        if len(stacks) != 1:
            raise RecipeError(f"{where}.models[{i}]: {path} has {len(stacks)} layer stacks; data-flow search routes one")
        stack = next(iter(stacks.values()))
        for layer, suffixes in stack.suffixes.items():
            layer_shapes = {s: shapes[f"{stack.prefix}.{layer}.{s}"] for s in suffixes}
            reference = reference or layer_shapes
            if layer_shapes != reference:
                raise RecipeError(f"{where}.models[{i}]: layer {layer} of {path} holds other tensors or shapes than "
                                  "layer 0 of models[0]; only layers of one shape can be routed")
        counts.append(stack.num_layers)
    return counts, reference or {}


def _tensor_shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a model folder's tensors, or of the model a recipe file would write (its plan)."""
    if is_recipe(path.name):
        if not path.is_file():
            raise RecipeError(f"{where}: {path}: recipe file not found")
        try:
            plan = make_plan(load_recipe(path))
        except MergelabError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        plan.close()
        return {job.name: tuple(job.shape) for job in plan.jobs}
    if not path.is_dir():
        raise RecipeError(f"{where}: {path}: folder not found")
    ckpt = Checkpoint(path)
    try:
        return {name: tuple(info.shape) for name, info in ckpt.tensors.items()}
    finally:
        ckpt.close()


# A layer's output projections (what it adds to the residual stream), by architecture family:
# Llama / Mistral / Qwen / Gemma, GPT-2, GPT-NeoX, OPT / Phi.
OUTPUT_PROJECTIONS = (("o_proj", "down_proj"), ("attn.c_proj", "mlp.c_proj"), ("attention.dense", "dense_4h_to_h"),
                      ("out_proj", "fc2"))


def _scale_tensors(spec: DataflowSpec, layer: dict[str, tuple[int, ...]], where: str) -> tuple[str, ...]:
    """The name filters a slot's scale applies to: given (each must match), or the first family of
    `OUTPUT_PROJECTIONS` whose every filter matches a tensor of the layer."""
    if spec.scale_tensors is None:
        found = next((f for f in OUTPUT_PROJECTIONS if all(any(part in s for s in layer) for part in f)), None)
        if found is None:
            raise RecipeError(f"{where}.scale_tensors: no known output projections in a layer (it holds: "
                              f"{', '.join(sorted(layer))}); name the tensors each slot's scale multiplies")
        return found
    for j, part in enumerate(spec.scale_tensors):
        if not any(part in s for s in layer):
            raise RecipeError(f"{where}.scale_tensors[{j}]: '{part}' matches no tensor of a layer "
                              f"(a layer holds: {', '.join(sorted(layer))})")
    return tuple(spec.scale_tensors)


# ---------------------------------------------------------------- parameter search, then data-flow
SOURCES = "sources"  # in the run folder: each recipe source, merged
STAMP = "mergelab_source.yml"  # in each: the recipe it was merged from (absolute paths)


def with_merged_sources(space: DataflowSpace, run_dir: Path, progress: bool = False) -> DataflowSpace:
    """The space over model folders: each recipe source (e.g. a parameter search's best.yaml) is
    merged once into `run_dir/sources/<i>-<name>/` and kept while its recipe is unchanged, so a
    resumed search routes the same layers and the found recipe names a folder anyone can merge from."""
    if not any(is_recipe(m) for m in space.models):
        return space
    from mergelab.merging import merge  # the merge engine, only for this step

    models: list[str] = []
    for i, name in enumerate(space.models):
        if not is_recipe(name):
            models.append(name)
            continue
        path = resolve_path(space.root, name)
        recipe = load_recipe(path)
        out = (run_dir / SOURCES / f"{i}-{path.stem}").resolve()
        text = recipe.to_yaml(absolute_paths=True)
        if not ((out / STAMP).is_file() and (out / STAMP).read_text() == text):
            merge(recipe, out, overwrite=True, progress=progress)
            (out / STAMP).write_text(text)
        models.append(str(out))
    return replace(space, models=tuple(models))


# ---------------------------------------------------------------- the default optimizer
# NGOpt, at this budget and dimension (2 genes per slot), picks a local method whose steps seldom
# carry an include gene across the threshold: on the zoo it tried 5 routes in 50 candidates after
# a parameter search and 39-41 in 100 alone, mostly moving scales. TwoPointsDE's crossover and
# mutation tried 47 of 50 and 91-93 of 100 (bench/search_dataflow.py; README, "Data-flow search").
DEFAULT_OPTIMIZER = "TwoPointsDE"


def default_optimizer(opt: OptimizerSpec) -> OptimizerSpec:
    """The job's optimizer; DEFAULT_OPTIMIZER where the job names none."""
    return opt if "name" in opt.model_fields_set else opt.model_copy(update={"name": DEFAULT_OPTIMIZER})
