"""Which module of a fine-tune becomes what in an extracted adapter (`mergelab extract-lora`).

The tensors of the two checkpoints are grouped by module (`model.layers.0.self_attn.q_proj`
holds `.weight` and maybe `.bias`) and each module goes to one of three places, following
mergekit's `mergekit-extract-lora` (0.1.5):

| module | default | with `embed_lora` |
|---|---|---|
| 2-D weight in the layers (projections) | LoRA (truncated SVD of the delta) | same |
| input embeddings (`embed_tokens`, `wte`, `wpe`, T5 `shared`, `relative_attention_bias`) | saved in full (`modules_to_save`) | LoRA on the embedding (`lora_embedding_A/B`) |
| LM head (`lm_head`, `embed_out`) | saved in full | LoRA |
| anything else (norms: 1-D weights) | saved in full | same; dropped with `skip_undecomposable` |
| named by `save_modules` (full name or its last part) | saved in full | same |

`include` / `exclude` are regular expressions searched in the module name (`re.search`, as
mergekit); with `include`, only matching modules are LoRA targets or saved norms; `exclude` also
keeps embeddings and the head out of `modules_to_save`. A fine-tune whose vocabulary was
resized saves its embeddings and head in full (as mergekit).

Unlike mergekit, a module is saved in full only when the fine-tune changed it (mergekit saves
every embedding and norm, changed or not): the adapter is smaller and applies to the same model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergelab.architecture import is_pre_weight, is_vocab_weight, parse_layer
from mergelab.checkpoint import Checkpoint
from mergelab.errors import CheckpointError

Kind = Literal["linear", "embedding"]
_EMBEDDING_MARKERS = ("relative_attention_bias", "shared")
_HEAD_LEAVES = ("lm_head", "embed_out", "output")


@dataclass(frozen=True)
class ExtractOptions:
    """The choices of `mergekit-extract-lora`, under its names."""

    max_rank: int = 128  # --max-rank: rank of every module, at most
    sv_epsilon: float = 0.0  # --sv-epsilon: also drop singular values <= this (absolute)
    distribute_scale: bool = True  # A = sqrt(S) Vh, B = U sqrt(S); False: A = S Vh, B = U
    embed_lora: bool = False  # embeddings and head as LoRA instead of modules_to_save
    save_modules: tuple[str, ...] = ()  # saved at full rank
    include: tuple[str, ...] = ()  # regexes: only these modules
    exclude: tuple[str, ...] = ()  # regexes: never these modules
    skip_undecomposable: bool = False  # drop changed norms instead of saving them


@dataclass
class ExtractionPlan:
    """Module name -> LoRA kind; modules saved in full; changed tensors carried by neither."""

    lora: dict[str, Kind] = field(default_factory=dict)
    full: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # full modules whose vocabulary differs from the base


def plan_extraction(base: Checkpoint, ft: Checkpoint, options: ExtractOptions) -> ExtractionPlan:
    """Place every module of the fine-tune (see the module docstring)."""
    plan = ExtractionPlan()
    for module, params in _modules(ft).items():
        _check_in_base(base, ft, module, params)
        where = _place(module, base, ft, params, options)
        changed = where == "lora" or _changed(base, ft, module, params)
        if where == "lora":
            plan.lora[module] = "embedding" if _is_embedding(module, ft) else "linear"
        elif where == "full" and changed:
            plan.full.append(module)
            if _shape(base, module) != _shape(ft, module):
                plan.resized.append(module)
        elif changed:
            plan.dropped.append(module)
    _drop_parents(plan, _modules(ft))
    return plan


def _drop_parents(plan: ExtractionPlan, modules: dict[str, list[str]]) -> None:
    """A module that holds other modules cannot be saved in full from its own tensors: PEFT saves and
    loads a module_to_save whole, children (and tied weights) included. BERT's `cls.predictions`
    (its bias, around `transform` and the decoder tied to the embeddings) is the case: dropped, named."""
    parents = [m for m in plan.full if any(o.startswith(f"{m}.") for o in modules)]
    plan.full = [m for m in plan.full if m not in parents]
    plan.dropped.extend(parents)


def module_names(ft: Checkpoint, names: list[str]) -> list[str]:
    """PEFT `target_modules` for `names`: their last parts where every module of the fine-tune with
    that last part is in `names` (short configs, as mergekit), else the full names."""
    chosen = set(names)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    everyone = {m for m in _modules(ft) if m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if everyone <= chosen else sorted(chosen)


def _modules(ckpt: Checkpoint) -> dict[str, list[str]]:
    """Module name -> its parameter names (`weight`, `bias`), in checkpoint order."""
    out: dict[str, list[str]] = {}
    for name in ckpt.tensors:
        module, _, param = name.rpartition(".")
        out.setdefault(module, []).append(param)
    return out


def _place(module: str, base: Checkpoint, ft: Checkpoint, params: list[str],
           options: ExtractOptions) -> Literal["lora", "full", "drop"]:
    """Where one module goes; the rules of the module docstring, in mergekit's order."""
    if module in options.save_modules or module.rsplit(".", 1)[-1] in options.save_modules:
        return "full"
    excluded = any(re.search(r, module) for r in options.exclude)
    if _is_embedding(module, ft) or _is_head(module, ft):
        resized = _shape(base, module) != _shape(ft, module)
        if not options.embed_lora or resized:
            return "drop" if excluded else "full"
    if excluded or (options.include and not any(re.search(r, module) for r in options.include)):
        return "drop"
    info = ft.info(f"{module}.weight") if "weight" in params else None
    if info is not None and len(info.shape) == 2 and info.dtype.is_floating_point:
        return "lora"
    return "drop" if options.skip_undecomposable else "full"


def _is_embedding(module: str, ft: Checkpoint) -> bool:
    """A 2-D input table (token, position or relative-position embeddings), looked up by index."""
    leaf = module.rsplit(".", 1)[-1]
    if len(_shape(ft, module) or ()) != 2 or leaf in _HEAD_LEAVES:
        return False
    return (parse_layer(module) is None and is_pre_weight(module)) or any(m in leaf for m in _EMBEDDING_MARKERS)


def _is_head(module: str, ft: Checkpoint) -> bool:
    """The output projection onto the vocabulary (`lm_head`, GPT-NeoX's `embed_out`)."""
    shape = _shape(ft, module)
    return shape is not None and not _is_embedding(module, ft) and is_vocab_weight(f"{module}.weight", shape, ft.config)


def _shape(ckpt: Checkpoint, module: str) -> tuple[int, ...] | None:
    name = f"{module}.weight"
    return tuple(ckpt.info(name).shape) if name in ckpt else None


def _check_in_base(base: Checkpoint, ft: Checkpoint, module: str, params: list[str]) -> None:
    """Every tensor of the fine-tune is in the base with its shape (vocabulary tables may grow)."""
    for p in params:
        name = f"{module}.{p}"
        if name not in base:
            raise CheckpointError(f"{base.path}: tensor '{name}' of the fine-tune is missing (a fine-tune of another model?)")
        grows = _is_embedding(module, ft) or _is_head(module, ft)
        if ft.info(name).shape != base.info(name).shape and not grows:
            raise CheckpointError(f"{ft.path}: tensor '{name}' is {list(ft.info(name).shape)}, the base's {list(base.info(name).shape)}")


def _changed(base: Checkpoint, ft: Checkpoint, module: str, params: list[str]) -> bool:
    names = [f"{module}.{p}" for p in params]
    return any(base.info(n).shape != ft.info(n).shape or not torch.equal(base.read(n), ft.read(n)) for n in names)
