"""Per-tensor jobs: for each output tensor, its sources, shape, dtype and the method's
parameters resolved for that tensor (a gradient at its layer, a filter on its name).

Output tensor order follows the template model (the base, else the first model):
embeddings, then the layers slice by slice, then final norm and head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergelab.architecture import find_stacks, is_pre_weight, is_vocab_weight
from mergelab.checkpoint import TensorSource, tensor_nbytes
from mergelab.errors import PlanError
from mergelab.methods import MergeMethod
from mergelab.methods.base import Param
from mergelab.plan_slices import LayerSlice, SliceInput
from mergelab.recipe import ModelRef, Recipe
from mergelab.settings import Setting, evaluate
from mergelab.vocabulary import VocabJob, Vocabulary

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


class JobBuilder:
    """Every output tensor's job: its sources, shape, dtype and parameters resolved for that tensor."""

    def __init__(self, recipe: Recipe, method: MergeMethod, ckpts: dict[ModelRef, TensorSource], index: dict[ModelRef, int],
                 vocabulary: Vocabulary | None, keys: dict[ModelRef, str]) -> None:
        self.recipe, self.method, self.ckpts, self.index = recipe, method, ckpts, index
        self.vocabulary = vocabulary
        self.index_keys = {index[ref]: key for ref, key in keys.items()}
        self.out_dtype = TORCH_DTYPES.get(recipe.out_dtype or recipe.dtype or "")
        self.stacks = {p: find_stacks(c.tensors) for p, c in ckpts.items()}

    def build(self, slices: list[LayerSlice], template_ref: ModelRef) -> list[TensorJob]:
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

    def _layer_jobs(self, s: LayerSlice, template_ref: ModelRef, done: dict[str, int]) -> list[TensorJob]:
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

    def _job(self, out_name: str, names: list[str], s: LayerSlice, t: float) -> TensorJob:
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

    def _vocab_job(self, out_name: str, s: LayerSlice, sources: list[Source], infos: list) -> VocabJob | None:
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

    def _model_params(self, src: SliceInput, s: LayerSlice, tensor: str, t: float) -> dict[str, Any]:
        settings = [src.params, s.params, dict(self.recipe.parameters or {})]
        return {p.name: self._resolve(p, settings, tensor, t, f"{src.key}.parameters")
                for p in self.method.params if p.scope == "model"}

    def _global_params(self, s: LayerSlice, tensor: str, t: float) -> dict[str, Any]:
        settings = [s.params, dict(self.recipe.parameters or {})]
        return {p.name: self._resolve(p, settings, tensor, t, "parameters")
                for p in self.method.params if p.scope == "global"}
