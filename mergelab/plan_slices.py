"""A recipe as slices of layer stacks: which layers of which model become which output layers.

A `models:` recipe merges every layer stack of the template (T5's encoder and decoder, a
vision tower and a language model), each over all its layers with its own gradient, as
mergekit's modules; a `slices:` recipe addresses the layers of one stack, so it needs inputs
with exactly one. A slices recipe can change the layer count: `relayer` writes it (and every
per-layer list, e.g. `layer_types`) into the output config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mergelab.architecture import LAYER_COUNT_KEYS, describe_stacks, find_stacks, layer_count_key
from mergelab.checkpoint import TensorSource
from mergelab.errors import RecipeError
from mergelab.recipe import ModelRef, Recipe
from mergelab.settings import Setting


@dataclass(frozen=True)
class SliceInput:
    """One slice source after normalisation: a model, its layer range, its own parameters."""

    path: ModelRef
    key: str  # recipe key path, for errors
    layers: tuple[int, int] | None
    params: dict[str, Setting]


@dataclass(frozen=True)
class LayerSlice:
    """As many layers of one layer stack from each source (all of them for `models:`), merged into its next output layers."""

    sources: tuple[SliceInput, ...]
    base: ModelRef | None
    params: dict[str, Setting]
    key: str
    stack: str | None  # the prefix of the layer stack the sources' layer ranges index


def normalise_slices(recipe: Recipe, ckpts: dict[ModelRef, TensorSource]) -> list[LayerSlice]:
    """The recipe as slices of layer stacks (checked against the method by `plan_checks.check_slice`)."""
    base = recipe.ref(recipe.base_model) if recipe.base_model else None
    return _model_slices(recipe, base, ckpts) if recipe.models is not None else _recipe_slices(recipe, base, ckpts)


def _model_slices(recipe: Recipe, base: ModelRef | None, ckpts: dict[ModelRef, TensorSource]) -> list[LayerSlice]:
    """`models:` becomes one slice per layer stack of the template (the base, else the first model),
    over all its layers, the base joining the models if not listed: mergekit's modules."""
    srcs = [SliceInput(recipe.ref(m.model, m.adapter), f"models[{i}]", None, dict(m.parameters or {}))
            for i, m in enumerate(recipe.models or [])]
    if base is not None and base not in {s.path for s in srcs}:
        srcs.append(SliceInput(base, "base_model", None, {}))
    stacks = find_stacks(ckpts[base or srcs[0].path].tensors)
    if not stacks:
        return [LayerSlice(tuple(srcs), base, {}, "models", None)]
    return [LayerSlice(tuple(replace(src, layers=(0, num_layers(ckpts[src.path], prefix))) for src in srcs),
                   base, {}, "models", prefix) for prefix in stacks]


def num_layers(ckpt: TensorSource, prefix: str) -> int:
    stack = find_stacks(ckpt.tensors).get(prefix)
    return stack.num_layers if stack else 0


def _recipe_slices(recipe: Recipe, base: ModelRef | None, ckpts: dict[ModelRef, TensorSource]) -> list[LayerSlice]:
    """`slices:` as written; each indexes the one layer stack of its sources."""
    slices = []
    for i, s in enumerate(recipe.slices or []):
        srcs = [SliceInput(recipe.ref(src.model, src.adapter), f"slices[{i}].sources[{j}]", src.layer_range, dict(src.parameters or {}))
                for j, src in enumerate(s.sources)]
        stacks = [_single_stack(src, ckpts[src.path]) for src in srcs]
        slice_base = recipe.ref(s.base_model) if s.base_model else base
        slices.append(LayerSlice(tuple(srcs), slice_base, dict(s.parameters or {}), f"slices[{i}]", stacks[0]))
    return slices


def _single_stack(src: SliceInput, ckpt: TensorSource) -> str | None:
    """The prefix of the one layer stack a slice source's layer_range indexes; an error if there are several."""
    stacks = find_stacks(ckpt.tensors)
    if len(stacks) > 1:
        raise RecipeError(f"{src.key}.layer_range: {src.path} has {len(stacks)} layer stacks ({describe_stacks(stacks)}) and a "
                          "layer_range indexes one, so slices cannot express this architecture (mergekit's 'modules:' syntax is "
                          "not supported); merge whole models with 'models:' instead")
    return next(iter(stacks), None)


def relayer(config: dict, template: TensorSource, slices: list[LayerSlice], ckpts: dict[ModelRef, TensorSource]) -> None:
    """A slices recipe's layer count into `config`, and per-layer lists (e.g. `layer_types`) after their layers."""
    ranges = [(s.sources[0].path, s.sources[0].layers) for s in slices if s.stack and s.sources[0].layers]
    if not ranges:
        return
    out_layers = sum(hi - lo for _, (lo, hi) in ranges)
    key = layer_count_key(config)
    if key is None:
        if config and out_layers != num_layers(template, slices[0].stack or ""):
            raise RecipeError(f"slices: the output has {out_layers} layers, but {template.path}/config.json has no layer count "
                              f"({', '.join(LAYER_COUNT_KEYS)}) to hold them, so slices cannot express this architecture")
        return
    if out_layers == config[key]:
        return
    per_layer = {k: v for k, v in config.items() if isinstance(v, list) and len(v) == config[key]}
    for k in per_layer:
        config[k] = [ckpts[path].config.get(k, per_layer[k])[i] for path, (lo, hi) in ranges for i in range(lo, hi)]
    config[key] = out_layers
