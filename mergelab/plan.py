"""Recipe + checkpoints -> an ordered list of per-tensor jobs, everything checked first.

`make_plan` opens every input's headers (no tensor data), resolves each output tensor's
sources, shapes and parameters, and raises before any work if anything is missing,
mismatched or out of range. Executing the plan (`execute.py`) can then only fail on I/O.

The steps, one module each: the recipe as slices of layer stacks (`plan_slices.py`), the checks
(`plan_checks.py`), one job per output tensor (`plan_jobs.py`); this module opens the inputs and
writes the output's metadata (config.json, the tokenizer's folder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.checkpoint import Checkpoint, TensorSource
from mergelab.errors import CheckpointError, PlanError, RecipeError
from mergelab.lora.adapter import load_adapter
from mergelab.lora.apply import AdaptedCheckpoint
from mergelab.methods import MergeMethod, get_method
from mergelab.plan_checks import check_architectures, check_parameters, check_slice
from mergelab.plan_jobs import TORCH_DTYPES, JobBuilder, Source, TensorJob
from mergelab.plan_slices import LayerSlice, normalise_slices, relayer
from mergelab.recipe import ModelRef, Recipe
from mergelab.vocabulary import Vocabulary, plan_vocabulary

__all__ = ["Plan", "Source", "TensorJob", "make_plan", "replan"]


@dataclass
class Plan:
    """A recipe made concrete: its inputs open (headers only), one job per output tensor, the output's config."""

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


def make_plan(recipe: Recipe, *, allow_pickle: bool = False, opened: dict[ModelRef, TensorSource] | None = None,
              vocabulary: Vocabulary | None = None, allow_crimes: bool = False) -> Plan:
    """Validate `recipe` against its method and its inputs; build every tensor job.

    `opened`: checkpoints already open (headers read), reused instead of opening them again;
    `vocabulary`: the output tokenizer already built for the same models and tokenizer settings;
    `allow_crimes`: merge models whose config.json names different architectures (mergekit's flag)."""
    method = get_method(recipe.merge_method)
    check_parameters(recipe, method)
    ckpts, keys = _open_checkpoints(recipe, allow_pickle, opened or {})
    index = {path: i for i, path in enumerate(ckpts)}
    checkpoints = list(ckpts.values())
    if not allow_crimes:
        check_architectures(ckpts, keys)
    slices = normalise_slices(recipe, ckpts)
    for s in slices:
        check_slice(s, method, ckpts)
    template_ref = slices[0].base or slices[0].sources[0].path
    template = ckpts[template_ref]
    if vocabulary is None and recipe.tokenizer_spec is not None:
        tokenizer_base = recipe.ref(recipe.base_model) if recipe.base_model else next(iter(ckpts))
        vocabulary = plan_vocabulary(recipe, list(ckpts), {r: c.config for r, c in ckpts.items()}, keys, tokenizer_base)
    builder = JobBuilder(recipe, method, ckpts, index, vocabulary, keys)
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
            raise CheckpointError(f"{key}: {exc}{hint}", arguments=exc.arguments) from None
        keys[ref] = key
    return ckpts, keys


def _output_config(template: TensorSource, slices: list[LayerSlice], recipe: Recipe, ckpts: dict[ModelRef, TensorSource]) -> dict:
    config = copy.deepcopy(template.config)
    if recipe.slices is not None:
        relayer(config, template, slices, ckpts)
    out = recipe.out_dtype or recipe.dtype
    if out:
        config["torch_dtype"] = out
        if "dtype" in config:
            config["dtype"] = out
    return config


def _tokenizer_dir(recipe: Recipe, template: TensorSource) -> Path:
    """The folder whose tokenizer files a merge without an output tokenizer copies (and a search evaluates with)."""
    spec = recipe.tokenizer_spec
    if spec is None or spec.source in ("base", "union"):
        return template.path
    path = recipe.resolve(spec.source)
    if not path.is_dir():
        raise RecipeError(f"{'tokenizer.source' if recipe.tokenizer else 'tokenizer_source'}: {path}: folder not found")
    return path
