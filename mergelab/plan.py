"""Recipe + checkpoints -> an ordered list of per-tensor jobs, everything checked first.

`make_plan` opens every input's headers (no tensor data), resolves each output tensor's
sources, shapes and parameters, and raises before any work if anything is missing,
mismatched or out of range. Executing the plan (`execute.py`) can then only fail on I/O.

Output tensor order follows the template model (the base, else the first model):
embeddings, then the layers slice by slice, then final norm and head.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.architecture import Stack, find_stack, is_pre_weight, layer_count_key
from mergelab.checkpoint import Checkpoint, tensor_nbytes
from mergelab.errors import CheckpointError, PlanError, RecipeError
from mergelab.methods import MergeMethod, get_method
from mergelab.methods.base import Param
from mergelab.recipe import ModelRef, Recipe, Setting, evaluate, scalars

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Source:
    """One input tensor: which checkpoint (index into `Plan.checkpoints`) and its name there."""

    model: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the output
    inputs: tuple[Source, ...]  # what the method sees as `tensors`
    base: Source | None
    params: tuple[dict[str, Any], ...]  # per input, resolved for this tensor
    options: dict[str, Any]  # global parameters, resolved for this tensor
    mergeable: bool = True  # False for integer buffers: copied from the first source

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.inputs + ((self.base,) if self.base is not None else ())

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: list[Checkpoint]
    jobs: list[TensorJob]
    config: dict  # the output config.json
    template: Checkpoint  # config, tokenizer and generation config come from here ...
    tokenizer_dir: Path  # ... except the tokenizer, when `tokenizer_source` names a model
    load_dtype: torch.dtype | None = None  # inputs are rounded to the recipe's `dtype` first
    model_keys: dict[ModelRef, str] = field(default_factory=dict)  # model (+ adapter) -> its recipe key

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


# One slice source after normalisation: a model, its layer range, its own parameters.
@dataclass(frozen=True)
class _Src:
    path: ModelRef
    key: str  # recipe key path, for errors
    layers: tuple[int, int] | None
    params: dict[str, Setting]


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Src, ...]
    base: ModelRef | None
    params: dict[str, Setting]
    key: str


def make_plan(recipe: Recipe, *, allow_pickle: bool = False, opened: dict[ModelRef, Checkpoint] | None = None) -> Plan:
    """Validate `recipe` against its method and its inputs; build every tensor job.

    `opened`: checkpoints already open (headers read), reused instead of opening them again."""
    method = get_method(recipe.merge_method)
    _check_parameters(recipe, method)
    ckpts, keys = _open_checkpoints(recipe, allow_pickle, opened or {})
    index = {path: i for i, path in enumerate(ckpts)}
    checkpoints = list(ckpts.values())
    _check_architectures(ckpts, keys)
    slices = _normalise_slices(recipe, method, ckpts)
    template_ref = slices[0].base or slices[0].sources[0].path
    template = ckpts[template_ref]
    stack = find_stack(template.tensors)
    builder = _JobBuilder(recipe, method, ckpts, index)
    jobs = builder.build(slices, template_ref, stack)
    out_layers = sum((s.sources[0].layers[1] - s.sources[0].layers[0]) for s in slices if s.sources[0].layers)
    config = _output_config(template, stack, slices, out_layers, recipe, ckpts)
    return Plan(
        recipe=recipe,
        method=method,
        checkpoints=checkpoints,
        jobs=jobs,
        config=config,
        template=template,
        tokenizer_dir=_tokenizer_dir(recipe, template),
        load_dtype=TORCH_DTYPES[recipe.dtype] if recipe.dtype else None,
        model_keys={p: k for p, k in keys.items()},
    )


def replan(plan: Plan, recipe: Recipe) -> Plan:
    """The plan of `recipe`, a variant of `plan.recipe` over the same models (other parameter values,
    maybe another method): every job's parameters resolved again, no header read again.

    The search calls this once per candidate; closing the returned plan closes `plan`'s checkpoints."""
    opened = dict(zip(plan.model_keys, plan.checkpoints))
    new = make_plan(recipe, opened=opened)
    if len(new.checkpoints) != len(plan.checkpoints) or any(a is not b for a, b in zip(new.checkpoints, plan.checkpoints)):
        raise PlanError("the changed recipe names other models than the plan it replaces")
    return new


# ---------------------------------------------------------------- recipe vs method
def _check_parameters(recipe: Recipe, method: MergeMethod) -> None:
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


# ---------------------------------------------------------------- checkpoints
def _open_checkpoints(recipe: Recipe, allow_pickle: bool, opened: dict[ModelRef, Checkpoint]
                      ) -> tuple[dict[ModelRef, Checkpoint], dict[ModelRef, str]]:
    """Open every referenced model once (headers only), in recipe order, unless already in `opened`;
    a model with an adapter becomes an `AdaptedCheckpoint` over the same base `Checkpoint`."""
    refs: list[tuple[str, ModelRef]] = []
    if recipe.base_model:
        refs.append(("base_model", recipe.ref(recipe.base_model)))
    refs += [(f"models[{i}].model", recipe.ref(m.model, m.adapter)) for i, m in enumerate(recipe.models or [])]
    for i, s in enumerate(recipe.slices or []):
        if s.base_model:
            refs.append((f"slices[{i}].base_model", recipe.ref(s.base_model)))
        refs += [(f"slices[{i}].sources[{j}].model", recipe.ref(src.model, src.adapter)) for j, src in enumerate(s.sources)]
    bases: dict[Path, Checkpoint] = {}
    ckpts: dict[ModelRef, Checkpoint] = {}
    keys: dict[ModelRef, str] = {}
    for key, ref in refs:
        if ref in ckpts:
            continue
        if ref in opened:
            ckpts[ref], keys[ref] = opened[ref], key
            continue
        try:
            if ref.path not in bases:
                bases[ref.path] = Checkpoint(ref.path, allow_pickle=allow_pickle)
            ckpts[ref] = bases[ref.path] if ref.adapter is None else _adapted(bases[ref.path], ref.adapter)
        except CheckpointError as exc:
            hint = " (for base+adapter, the adapter folder must hold adapter_config.json)" if "+" in ref.path.name else ""
            raise CheckpointError(f"{key}: {exc}{hint}") from None
        keys[ref] = key
    return ckpts, keys


def _adapted(base: Checkpoint, adapter: Path) -> Checkpoint:
    from mergelab.lora.adapter import load_adapter
    from mergelab.lora.apply import AdaptedCheckpoint

    return AdaptedCheckpoint(base, load_adapter(adapter))


def _check_architectures(ckpts: dict[ModelRef, Checkpoint], keys: dict[ModelRef, str]) -> None:
    kinds = {(c.config.get("model_type"), tuple(c.config.get("architectures") or ())) for c in ckpts.values() if c.config}
    if len({k[0] for k in kinds}) > 1:
        found = ", ".join(f"{keys[ref]}={c.config.get('model_type')}" for ref, c in ckpts.items())
        raise PlanError(f"models have different architectures ({found}); they cannot be merged tensor by tensor")


# ---------------------------------------------------------------- slices
def _normalise_slices(recipe: Recipe, method: MergeMethod, ckpts: dict[ModelRef, Checkpoint]) -> list[_Slice]:
    """`models:` becomes one slice over all layers (the base joining if not listed), as in mergekit."""
    base = recipe.ref(recipe.base_model) if recipe.base_model else None
    if recipe.models is not None:
        refs = [recipe.ref(m.model, m.adapter) for m in recipe.models]
        srcs = [_Src(ref, f"models[{i}]", _all_layers(ckpts[ref]), dict(m.parameters or {}))
                for i, (ref, m) in enumerate(zip(refs, recipe.models))]
        if base is not None and base not in {s.path for s in srcs}:
            srcs.append(_Src(base, "base_model", _all_layers(ckpts[base]), {}))
        slices = [_Slice(tuple(srcs), base, {}, "models")]
    else:
        slices = []
        for i, s in enumerate(recipe.slices or []):
            srcs = [_Src(recipe.ref(src.model, src.adapter), f"slices[{i}].sources[{j}]", src.layer_range, dict(src.parameters or {}))
                    for j, src in enumerate(s.sources)]
            slice_base = recipe.ref(s.base_model) if s.base_model else base
            slices.append(_Slice(tuple(srcs), slice_base, dict(s.parameters or {}), f"slices[{i}]"))
    for s in slices:
        _check_slice(s, method, ckpts)
    return slices


def _all_layers(ckpt: Checkpoint) -> tuple[int, int] | None:
    stack = find_stack(ckpt.tensors)
    return (0, stack.num_layers) if stack else None


def _check_slice(s: _Slice, method: MergeMethod, ckpts: dict[ModelRef, Checkpoint]) -> None:
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
        raise RecipeError(f"{s.key}: all sources of a slice need the same number of layers, got {sorted(lengths)}")
    for src in s.sources:
        stack = find_stack(ckpts[src.path].tensors)
        if src.layers and (stack is None or src.layers[1] > stack.num_layers):
            have = stack.num_layers if stack else 0
            raise RecipeError(f"{src.key}.layer_range: {list(src.layers)} is past the {have} layers of {src.path}")


# ---------------------------------------------------------------- jobs
class _JobBuilder:
    def __init__(self, recipe: Recipe, method: MergeMethod, ckpts: dict[ModelRef, Checkpoint], index: dict[ModelRef, int]) -> None:
        self.recipe, self.method, self.ckpts, self.index = recipe, method, ckpts, index
        self.out_dtype = TORCH_DTYPES.get(recipe.out_dtype or recipe.dtype or "")
        self.stacks = {p: find_stack(c.tensors) for p, c in ckpts.items()}

    def build(self, slices: list[_Slice], template_ref: ModelRef, stack: Stack | None) -> list[TensorJob]:
        template = self.ckpts[template_ref]
        outside = [n for n in template.tensors if stack is None or not n.startswith(stack.prefix + ".")]
        pre = [n for n in outside if is_pre_weight(n)]
        post = [n for n in outside if not is_pre_weight(n)]
        jobs = [self._job(n, [n] * len(slices[0].sources), slices[0], 0.0) for n in pre]
        out_layer = 0
        for s in slices:
            if stack is None or s.sources[0].layers is None:
                continue
            first = s.sources[0].layers
            n = first[1] - first[0]
            tmpl_src = next((src for src in s.sources if src.path == template_ref), s.sources[0])
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                for suffix in self.stacks[tmpl_src.path].suffixes[tmpl_src.layers[0] + offset]:
                    names = [f"{self.stacks[src.path].prefix}.{src.layers[0] + offset}.{suffix}" for src in s.sources]
                    jobs.append(self._job(f"{stack.prefix}.{out_layer}.{suffix}", names, s, t))
                out_layer += 1
        jobs += [self._job(n, [n] * len(slices[-1].sources), slices[-1], 0.0) for n in post]
        return jobs

    def _job(self, out_name: str, names: list[str], s: _Slice, t: float) -> TensorJob:
        infos = []
        for src, name in zip(s.sources, names):
            ckpt = self.ckpts[src.path]
            if name not in ckpt:
                raise PlanError(f"{src.key}: tensor '{name}' is missing from {src.path}")
            infos.append(ckpt.info(name))
        shapes = {i.shape for i in infos}
        if len(shapes) > 1:
            found = ", ".join(f"{src.key}: {list(i.shape)}" for src, i in zip(s.sources, infos))
            raise PlanError(f"tensor '{out_name}': shapes differ between models ({found})")
        sources = [Source(self.index[src.path], name) for src, name in zip(s.sources, names)]
        floating = infos[0].dtype.is_floating_point
        dtype = self.out_dtype if (self.out_dtype and floating) else infos[0].dtype
        if not floating:  # integer buffers are not merged
            return TensorJob(out_name, infos[0].shape, dtype, (sources[0],), None, ({},), {}, mergeable=False)
        base_i = None
        if s.base is not None and self.method.base_policy != "input":
            base_i = next(i for i, src in enumerate(s.sources) if src.path == s.base)
        input_ids = [i for i in range(len(sources)) if i != base_i]
        params = tuple(self._model_params(s.sources[i], s, names[i], t) for i in input_ids)
        options = self._global_params(s, out_name, t)
        return TensorJob(out_name, infos[0].shape, dtype, tuple(sources[i] for i in input_ids),
                         sources[base_i] if base_i is not None else None, params, options)

    def _resolve(self, p: Param, settings: list[dict[str, Setting]], tensor: str, t: float, who: str) -> Any:
        for scope in settings:
            if p.name in scope:
                value = evaluate(scope[p.name], tensor, t)
                if value is not None:
                    return p.check(value, f"{who}.{p.name}") if p.kind is not bool else value
        if p.required:
            raise PlanError(f"{who}: no value of '{p.name}' applies to tensor '{tensor}' (add one without a filter, or a top-level default)")
        return p.default

    def _model_params(self, src: _Src, s: _Slice, tensor: str, t: float) -> dict[str, Any]:
        settings = [src.params, s.params, dict(self.recipe.parameters or {})]
        return {p.name: self._resolve(p, settings, tensor, t, f"{src.key}.parameters")
                for p in self.method.params if p.scope == "model"}

    def _global_params(self, s: _Slice, tensor: str, t: float) -> dict[str, Any]:
        settings = [s.params, dict(self.recipe.parameters or {})]
        return {p.name: self._resolve(p, settings, tensor, t, "parameters")
                for p in self.method.params if p.scope == "global"}


# ---------------------------------------------------------------- output metadata
def _output_config(template: Checkpoint, stack: Stack | None, slices: list[_Slice], out_layers: int,
                   recipe: Recipe, ckpts: dict[ModelRef, Checkpoint]) -> dict:
    config = copy.deepcopy(template.config)
    key = layer_count_key(config)
    if key and stack is not None and out_layers != config[key]:
        # per-layer lists (e.g. `layer_types`) follow their layers
        per_layer = {k: v for k, v in config.items() if isinstance(v, list) and len(v) == config[key]}
        for k in per_layer:
            config[k] = [ckpts[s.sources[0].path].config.get(k, per_layer[k])[i]
                         for s in slices if s.sources[0].layers for i in range(*s.sources[0].layers)]
        config[key] = out_layers
    out = recipe.out_dtype or recipe.dtype
    if out:
        config["torch_dtype"] = out
        if "dtype" in config:
            config["dtype"] = out
    return config


def _tokenizer_dir(recipe: Recipe, template: Checkpoint) -> Path:
    if recipe.tokenizer_source in (None, "base"):
        return template.path
    path = recipe.resolve(recipe.tokenizer_source)
    if not path.is_dir():
        raise RecipeError(f"tokenizer_source: {path}: folder not found")
    return path
