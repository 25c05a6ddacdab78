"""Recipe + checkpoints -> an ordered list of per-tensor jobs, everything checked first.

`make_plan` opens every input's headers (no tensor data), resolves each output tensor's
sources, shapes and parameters, and raises before any work if anything is missing,
mismatched or out of range. Executing the plan (`execute.py`) can then only fail on I/O.

Output tensor order follows the template model (the base, else the first model):
embeddings, then the layers slice by slice, then final norm and head.

A `models:` recipe merges every layer stack of the template (T5's encoder and decoder, a
vision tower and a language model), each over all its layers with its own gradient, as
mergekit's modules; a `slices:` recipe addresses the layers of one stack, so it needs inputs
with exactly one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.architecture import (LAYER_COUNT_KEYS, describe_stacks, find_stacks, is_pre_weight, is_vocab_weight,
                                   layer_count_key)
from mergelab.checkpoint import Checkpoint, TensorSource, tensor_nbytes
from mergelab.errors import CheckpointError, PlanError, RecipeError
from mergelab.lora.adapter import load_adapter
from mergelab.lora.apply import AdaptedCheckpoint
from mergelab.methods import MergeMethod, get_method
from mergelab.methods.base import Param
from mergelab.recipe import ModelRef, Recipe
from mergelab.settings import Setting, evaluate, scalars
from mergelab.vocabulary import VocabJob, Vocabulary, plan_vocabulary

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
    vocab: VocabJob | None = None  # a vocabulary tensor whose inputs are re-ordered to the output tokenizer first

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
    checkpoints: list[TensorSource]
    jobs: list[TensorJob]
    config: dict  # the output config.json
    template: TensorSource  # config, tokenizer and generation config come from here ...
    tokenizer_dir: Path  # ... except the tokenizer, when `tokenizer_source` names a model
    load_dtype: torch.dtype | None = None  # inputs are rounded to the recipe's `dtype` first
    model_keys: dict[ModelRef, str] = field(default_factory=dict)  # model (+ adapter) -> its recipe key
    vocabulary: Vocabulary | None = None  # the output tokenizer (`tokenizer_source` / `tokenizer:`), else None

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
    stack: str | None  # the prefix of the layer stack the sources' layer ranges index


def make_plan(recipe: Recipe, *, allow_pickle: bool = False, opened: dict[ModelRef, TensorSource] | None = None,
              vocabulary: Vocabulary | None = None, allow_crimes: bool = False) -> Plan:
    """Validate `recipe` against its method and its inputs; build every tensor job.

    `opened`: checkpoints already open (headers read), reused instead of opening them again;
    `vocabulary`: the output tokenizer already built for the same models and tokenizer settings;
    `allow_crimes`: merge models whose config.json names different architectures (mergekit's flag)."""
    method = get_method(recipe.merge_method)
    _check_parameters(recipe, method)
    ckpts, keys = _open_checkpoints(recipe, allow_pickle, opened or {})
    index = {path: i for i, path in enumerate(ckpts)}
    checkpoints = list(ckpts.values())
    if not allow_crimes:
        _check_architectures(ckpts, keys)
    slices = _normalise_slices(recipe, method, ckpts)
    template_ref = slices[0].base or slices[0].sources[0].path
    template = ckpts[template_ref]
    if vocabulary is None and recipe.tokenizer_spec is not None:
        tokenizer_base = recipe.ref(recipe.base_model) if recipe.base_model else next(iter(ckpts))
        vocabulary = plan_vocabulary(recipe, list(ckpts), {r: c.config for r, c in ckpts.items()}, keys, tokenizer_base)
    builder = _JobBuilder(recipe, method, ckpts, index, vocabulary, keys)
    jobs = builder.build(slices, template_ref)
    config = _output_config(template, slices, recipe, ckpts)
    if vocabulary is not None:  # as mergekit: the output's vocab_size is the tokenizer's (padded)
        config["vocab_size"] = vocabulary.rows
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
        vocabulary=vocabulary,
    )


def replan(plan: Plan, recipe: Recipe) -> Plan:
    """The plan of `recipe`, a variant of `plan.recipe` over the same models (other parameter values,
    maybe another method): every job's parameters resolved again, no header read again.

    The search calls this once per candidate; closing the returned plan closes `plan`'s checkpoints."""
    opened = dict(zip(plan.model_keys, plan.checkpoints))
    same_tokenizer = recipe.tokenizer_spec == plan.recipe.tokenizer_spec and recipe.base_model == plan.recipe.base_model
    new = make_plan(recipe, opened=opened, vocabulary=plan.vocabulary if same_tokenizer else None)
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
def _open_checkpoints(recipe: Recipe, allow_pickle: bool, opened: dict[ModelRef, TensorSource]
                      ) -> tuple[dict[ModelRef, TensorSource], dict[ModelRef, str]]:
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
    ckpts: dict[ModelRef, TensorSource] = {}
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
            ckpts[ref] = bases[ref.path] if ref.adapter is None else AdaptedCheckpoint(bases[ref.path], load_adapter(ref.adapter))
        except CheckpointError as exc:
            hint = " (for base+adapter, the adapter folder must hold adapter_config.json)" if "+" in ref.path.name else ""
            raise CheckpointError(f"{key}: {exc}{hint}") from None
        keys[ref] = key
    return ckpts, keys


def _check_architectures(ckpts: dict[ModelRef, TensorSource], keys: dict[ModelRef, str]) -> None:
    kinds = {(c.config.get("model_type"), tuple(c.config.get("architectures") or ())) for c in ckpts.values() if c.config}
    if len({k[0] for k in kinds}) > 1:
        found = ", ".join(f"{keys[ref]}={c.config.get('model_type')}" for ref, c in ckpts.items())
        raise PlanError(f"models have different architectures ({found}); pass --allow-crimes to merge them anyway, "
                        "tensor by tensor")


# ---------------------------------------------------------------- slices
def _normalise_slices(recipe: Recipe, method: MergeMethod, ckpts: dict[ModelRef, TensorSource]) -> list[_Slice]:
    """The recipe as slices of layer stacks, each checked against the method and its inputs."""
    base = recipe.ref(recipe.base_model) if recipe.base_model else None
    slices = _model_slices(recipe, base, ckpts) if recipe.models is not None else _recipe_slices(recipe, base, ckpts)
    for s in slices:
        _check_slice(s, method, ckpts)
    return slices


def _model_slices(recipe: Recipe, base: ModelRef | None, ckpts: dict[ModelRef, TensorSource]) -> list[_Slice]:
    """`models:` becomes one slice per layer stack of the template (the base, else the first model),
    over all its layers, the base joining the models if not listed: mergekit's modules."""
    srcs = [_Src(recipe.ref(m.model, m.adapter), f"models[{i}]", None, dict(m.parameters or {}))
            for i, m in enumerate(recipe.models or [])]
    if base is not None and base not in {s.path for s in srcs}:
        srcs.append(_Src(base, "base_model", None, {}))
    stacks = find_stacks(ckpts[base or srcs[0].path].tensors)
    if not stacks:
        return [_Slice(tuple(srcs), base, {}, "models", None)]
    return [_Slice(tuple(replace(src, layers=(0, _num_layers(ckpts[src.path], prefix))) for src in srcs),
                   base, {}, "models", prefix) for prefix in stacks]


def _num_layers(ckpt: TensorSource, prefix: str) -> int:
    stack = find_stacks(ckpt.tensors).get(prefix)
    return stack.num_layers if stack else 0


def _recipe_slices(recipe: Recipe, base: ModelRef | None, ckpts: dict[ModelRef, TensorSource]) -> list[_Slice]:
    """`slices:` as written; each indexes the one layer stack of its sources."""
    slices = []
    for i, s in enumerate(recipe.slices or []):
        srcs = [_Src(recipe.ref(src.model, src.adapter), f"slices[{i}].sources[{j}]", src.layer_range, dict(src.parameters or {}))
                for j, src in enumerate(s.sources)]
        stacks = [_single_stack(src, ckpts[src.path]) for src in srcs]
        slice_base = recipe.ref(s.base_model) if s.base_model else base
        slices.append(_Slice(tuple(srcs), slice_base, dict(s.parameters or {}), f"slices[{i}]", stacks[0]))
    return slices


def _single_stack(src: _Src, ckpt: TensorSource) -> str | None:
    """The prefix of the one layer stack a slice source's layer_range indexes; an error if there are several."""
    stacks = find_stacks(ckpt.tensors)
    if len(stacks) > 1:
        raise RecipeError(f"{src.key}.layer_range: {src.path} has {len(stacks)} layer stacks ({describe_stacks(stacks)}) and a "
                          "layer_range indexes one, so slices cannot express this architecture (mergekit's 'modules:' syntax is "
                          "not supported); merge whole models with 'models:' instead")
    return next(iter(stacks), None)


def _check_slice(s: _Slice, method: MergeMethod, ckpts: dict[ModelRef, TensorSource]) -> None:
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
        have = _num_layers(ckpts[src.path], s.stack) if s.stack else 0
        if src.layers and src.layers[1] > have:
            raise RecipeError(f"{src.key}.layer_range: {list(src.layers)} is past the {have} layers of {src.path}")


# ---------------------------------------------------------------- jobs
class _JobBuilder:
    def __init__(self, recipe: Recipe, method: MergeMethod, ckpts: dict[ModelRef, TensorSource], index: dict[ModelRef, int],
                 vocabulary: Vocabulary | None, keys: dict[ModelRef, str]) -> None:
        self.recipe, self.method, self.ckpts, self.index = recipe, method, ckpts, index
        self.vocabulary = vocabulary
        self.index_keys = {index[ref]: key for ref, key in keys.items()}
        self.out_dtype = TORCH_DTYPES.get(recipe.out_dtype or recipe.dtype or "")
        self.stacks = {p: find_stacks(c.tensors) for p, c in ckpts.items()}

    def build(self, slices: list[_Slice], template_ref: ModelRef) -> list[TensorJob]:
        """Embeddings (from the first slice's sources), the slices' layers, then the rest (from the last slice's)."""
        template = self.ckpts[template_ref]
        in_stacks = tuple(f"{prefix}." for prefix in self.stacks[template_ref])
        outside = [n for n in template.tensors if not n.startswith(in_stacks)]
        pre = [n for n in outside if is_pre_weight(n)]
        post = [n for n in outside if not is_pre_weight(n)]
        jobs = [self._job(n, [n] * len(slices[0].sources), slices[0], 0.0) for n in pre]
        done: dict[str, int] = {}  # stack prefix -> output layers written so far
        for s in slices:
            jobs += self._layer_jobs(s, template_ref, done)
        jobs += [self._job(n, [n] * len(slices[-1].sources), slices[-1], 0.0) for n in post]
        return jobs

    def _layer_jobs(self, s: _Slice, template_ref: ModelRef, done: dict[str, int]) -> list[TensorJob]:
        """One slice's layers, numbered after its stack's earlier output layers; the gradient spans the slice."""
        if s.stack is None or s.sources[0].layers is None:
            return []
        first = s.sources[0].layers
        n = first[1] - first[0]
        tmpl_src = next((src for src in s.sources if src.path == template_ref), s.sources[0])
        suffixes = self.stacks[tmpl_src.path][s.stack].suffixes
        jobs = []
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0  # as mergekit: t = 1 for a one-layer slice
            out = f"{s.stack}.{done.get(s.stack, 0) + offset}"
            for suffix in suffixes[tmpl_src.layers[0] + offset]:
                names = [f"{s.stack}.{src.layers[0] + offset}.{suffix}" for src in s.sources]
                jobs.append(self._job(f"{out}.{suffix}", names, s, t))
        done[s.stack] = done.get(s.stack, 0) + n
        return jobs

    def _job(self, out_name: str, names: list[str], s: _Slice, t: float) -> TensorJob:
        infos = []
        for src, name in zip(s.sources, names):
            ckpt = self.ckpts[src.path]
            if name not in ckpt:
                raise PlanError(f"{src.key}: tensor '{name}' is missing from {src.path}")
            infos.append(ckpt.info(name))
        sources = [Source(self.index[src.path], name) for src, name in zip(s.sources, names)]
        vocab = self._vocab_job(out_name, s, sources, infos)
        shapes = {i.shape if vocab is None else i.shape[1:] for i in infos}
        if len(shapes) > 1:
            found = ", ".join(f"{src.key}: {list(i.shape)}" for src, i in zip(s.sources, infos))
            hint = ""
            if self.vocabulary is None and all(is_vocab_weight(name, i.shape, self.ckpts[src.path].config)
                                               for src, name, i in zip(s.sources, names, infos)):
                hint = ("; the models' vocabularies differ: set tokenizer_source (union, base or a model) or a tokenizer: block "
                        "to align their rows by token")
            raise PlanError(f"tensor '{out_name}': shapes differ between models ({found}){hint}")
        shape = infos[0].shape if vocab is None else (self.vocabulary.rows, *infos[0].shape[1:])  # type: ignore[union-attr]
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
        return TensorJob(out_name, shape, dtype, tuple(sources[i] for i in input_ids),
                         sources[base_i] if base_i is not None else None, params, options, vocab=vocab)

    def _vocab_job(self, out_name: str, s: _Slice, sources: list[Source], infos: list) -> VocabJob | None:
        """For a vocabulary tensor under an output tokenizer: its inputs to re-order by token (None if nothing moves)."""
        if self.vocabulary is None or not all(is_vocab_weight(i.name, i.shape, self.ckpts[src.path].config)
                                              for src, i in zip(s.sources, infos)):
            return None
        members = tuple(dict.fromkeys(sources))  # the slice's order, each input once (mergekit's)
        rows = {src.model: i.shape[0] for src, i in zip(sources, infos)}
        if self.vocabulary.is_identity([m.model for m in members], list(rows.values())):
            return None
        base = next((src for src, spec in zip(sources, s.sources) if spec.path == s.base), None)
        job = VocabJob(members, base)
        self.vocabulary.check(job, rows, out_name, self.index_keys)
        return job

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
def _output_config(template: TensorSource, slices: list[_Slice], recipe: Recipe, ckpts: dict[ModelRef, TensorSource]) -> dict:
    config = copy.deepcopy(template.config)
    if recipe.slices is not None:
        _relayer(config, template, slices, ckpts)
    out = recipe.out_dtype or recipe.dtype
    if out:
        config["torch_dtype"] = out
        if "dtype" in config:
            config["dtype"] = out
    return config


def _relayer(config: dict, template: TensorSource, slices: list[_Slice], ckpts: dict[ModelRef, TensorSource]) -> None:
    """A slices recipe's layer count into `config`, and per-layer lists (e.g. `layer_types`) after their layers."""
    ranges = [(s.sources[0].path, s.sources[0].layers) for s in slices if s.stack and s.sources[0].layers]
    if not ranges:
        return
    out_layers = sum(hi - lo for _, (lo, hi) in ranges)
    key = layer_count_key(config)
    if key is None:
        if config and out_layers != _num_layers(template, slices[0].stack or ""):
            raise RecipeError(f"slices: the output has {out_layers} layers, but {template.path}/config.json has no layer count "
                              f"({', '.join(LAYER_COUNT_KEYS)}) to hold them, so slices cannot express this architecture")
        return
    if out_layers == config[key]:
        return
    per_layer = {k: v for k, v in config.items() if isinstance(v, list) and len(v) == config[key]}
    for k in per_layer:
        config[k] = [ckpts[path].config.get(k, per_layer[k])[i] for path, (lo, hi) in ranges for i in range(lo, hi)]
    config[key] = out_layers


def _tokenizer_dir(recipe: Recipe, template: TensorSource) -> Path:
    """The folder whose tokenizer files a merge without an output tokenizer copies (and a search evaluates with)."""
    spec = recipe.tokenizer_spec
    if spec is None or spec.source in ("base", "union"):
        return template.path
    path = recipe.resolve(spec.source)
    if not path.is_dir():
        raise RecipeError(f"{'tokenizer.source' if recipe.tokenizer else 'tokenizer_source'}: {path}: folder not found")
    return path
