"""Extract a LoRA adapter from a fine-tune: the truncated SVD of (finetuned - base), per module.

For every 2-D weight W of the decoder layers (attention and MLP projections):

    Delta = W_ft - W_base  (out, in)  =  U S Vh
    B = U[:, :R] diag(S[:R])  (out, R),   A = Vh[:R]  (R, in),   scale 1 (lora_alpha = r)

which is the best rank-R approximation of Delta in Frobenius norm (Eckart-Young); the relative
error ||Delta - B A||_F / ||Delta||_F = sqrt(sum_{k>R} S_k^2 / sum_k S_k^2) is reported per module.
The same construction as mergekit's `mergekit-extract-lora`. Tensors outside the layers
(embeddings, head, norms) are not extracted; those that differ are named in a warning.
GPT-2-style models store Conv1D weights as (in, out): the adapter gets `fan_in_fan_out: true`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from mergelab.architecture import find_stack
from mergelab.checkpoint import Checkpoint
from mergelab.errors import CheckpointError, RecipeError
from mergelab.execute import resolve_device
from mergelab.lora.adapter import LoraAdapter, LoraModule, commit_adapter, unit_scale_config
from mergelab.lora.compose import truncated_svd
from mergelab.writer import OutputFolder

log = logging.getLogger(__name__)

CONV1D_MODEL_TYPES = ("gpt2",)  # architectures whose projection weights are stored (in, out)


def extract(base: str | os.PathLike[str], finetuned: str | os.PathLike[str], out: str | os.PathLike[str], *, rank: int,
            device: str = "cpu", overwrite: bool = False, progress: bool = True) -> dict[str, float]:
    """Write a PEFT adapter of rank `rank` to `out`; returns the relative error per module."""
    if rank < 1:
        raise RecipeError(f"--rank: must be a positive integer, got {rank}")
    folder = OutputFolder(out, overwrite)
    dev = resolve_device(device)
    b, ft = Checkpoint(base), Checkpoint(finetuned)
    try:
        names = _targets(b, ft)
        transposed = b.config.get("model_type") in CONV1D_MODEL_TYPES
        modules: dict[str, LoraModule] = {}
        errors: dict[str, float] = {}
        for name in tqdm(names, unit="module", disable=not progress, desc="extracting"):
            module, errors[module_name(name)] = _extract_one(b, ft, name, rank, transposed, dev)
            modules[module.name] = module
        _warn_untouched(b, ft, set(names))
    finally:
        b.close()
        ft.close()
    adapter = LoraAdapter(None, _config(modules, rank, transposed, Path(base)), modules)
    commit_adapter(adapter, folder)
    for name, err in errors.items():
        log.info("%s: relative error %.3e", name, err)
    log.info("rank %d: relative error mean %.3e, max %.3e over %d modules", rank,
             sum(errors.values()) / max(len(errors), 1), max(errors.values(), default=0.0), len(errors))
    return errors


def module_name(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def _targets(base: Checkpoint, ft: Checkpoint) -> list[str]:
    """The 2-D float weights of the decoder layers, checked to exist with equal shapes in both."""
    stack = find_stack(base.tensors)
    if stack is None:
        raise CheckpointError(f"{base.path}: no decoder layers found (tensor names like model.layers.N....)")
    names = [n for n, info in base.tensors.items()
             if n.startswith(stack.prefix + ".") and n.endswith(".weight") and len(info.shape) == 2 and info.dtype.is_floating_point]
    for n in names:
        if n not in ft:
            raise CheckpointError(f"{ft.path}: tensor '{n}' of the base is missing (a fine-tune of another model?)")
        if ft.info(n).shape != base.info(n).shape:
            raise CheckpointError(f"{ft.path}: tensor '{n}' is {list(ft.info(n).shape)}, the base's {list(base.info(n).shape)}")
    return names


def _extract_one(base: Checkpoint, ft: Checkpoint, name: str, rank: int, transposed: bool,
                 device: torch.device) -> tuple[LoraModule, float]:
    """One module's factors and the relative Frobenius error of its rank-`rank` approximation."""
    delta = ft.read(name).to(device, torch.float32) - base.read(name).to(device, torch.float32)
    delta = delta.T if transposed else delta  # (out, in)
    B, A = truncated_svd(delta, rank)  # (out, R), (R, in)
    total = delta.norm()
    error = float((delta - B @ A).norm() / total) if total > 0 else 0.0
    dtype = base.info(name).dtype
    return LoraModule(module_name(name), A.to("cpu", dtype).contiguous(), B.to("cpu", dtype).contiguous(), 1.0, transposed), error


def _warn_untouched(base: Checkpoint, ft: Checkpoint, extracted: set[str]) -> None:
    """Name the tensors the fine-tune changed that the adapter does not carry."""
    changed = [n for n in base.tensors if n not in extracted and n in ft and base.info(n).shape == ft.info(n).shape
               and not torch.equal(base.read(n), ft.read(n))]
    if changed:
        log.warning("%d changed tensors are not in the adapter (not low-rank targets): %s%s", len(changed),
                    ", ".join(changed[:5]), " ..." if len(changed) > 5 else "")


def _config(modules: dict[str, LoraModule], rank: int, transposed: bool, base: Path) -> dict:
    """PEFT's LoraConfig defaults, targeting the extracted modules by their leaf names (q_proj, ...)."""
    from peft import LoraConfig

    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    template = LoraConfig(r=rank, lora_alpha=rank, target_modules=leaves, fan_in_fan_out=transposed).to_dict()
    return unit_scale_config(template, modules, str(base.resolve()), targets=leaves)
