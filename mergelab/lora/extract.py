"""Extract a LoRA adapter from a fine-tune: the truncated SVD of (finetuned - base), per module.

For every LoRA target (which modules: `extract_plan.py`), with W stored (out, in):

    Delta = W_ft - W_base  (out, in)  =  U S Vh                       (float32)
    R = min(max_rank, #{k : S_k > sv_epsilon})                        (mergekit's --max-rank, --sv-epsilon)
    A = sqrt(S_R) Vh_R  (R, in),   B = U_R sqrt(S_R)  (out, R)         (distribute_scale, the default)
    A = S_R Vh_R,                  B = U_R                             (distribute_scale off)
    lora_alpha = r per module, so PEFT's update is B @ A

which is the best rank-R approximation of Delta in Frobenius norm (Eckart-Young): the error
||Delta - B A||_F = sqrt(sum_{k>R} S_k^2), and no entry is off by more than S_{R+1}. The
error is measured on the stored factors and reported per module (relative to ||Delta||_F).
The same construction, factor for factor, as mergekit 0.1.5's `mergekit-extract-lora`, which
subtracts in the checkpoint dtype: over bfloat16 checkpoints mergelab subtracts in float32.
Embedding tables (W (vocab, dim)) and GPT-2's Conv1D (W (in, out)) are decomposed transposed.
A module with no singular value above `sv_epsilon` gets no factors. Changed biases of the
targets travel as `lora_B.bias` (`lora_bias: true`) when every target has a bias; else they are
named in a warning, with every other change the adapter does not carry. Names are those of the
model the installed transformers builds (`renames.py`: GPT-NeoX's `embed_out` is `lm_head`);
blocks transformers fuses on load (Mixtral's experts) are refused, to be left out with `-e`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mergelab.checkpoint import Checkpoint
from mergelab.device import resolve_device
from mergelab.errors import RecipeError
from mergelab.lora.adapter import LoraAdapter, LoraModule, commit_adapter, unit_scale_config
from mergelab.lora.extract_plan import ExtractionPlan, ExtractOptions, Kind, module_names, plan_extraction
from mergelab.lora.renames import fused_blocks, module_renamer
from mergelab.writer import OutputFolder

log = logging.getLogger(__name__)

CONV1D_MODEL_TYPES = ("gpt2",)  # architectures whose projection weights are stored (in, out)


def extract(base: str | os.PathLike[str], finetuned: str | os.PathLike[str], out: str | os.PathLike[str], *,
            rank: int | None = None, options: ExtractOptions | None = None, device: str = "cpu",
            overwrite: bool = False, progress: bool = True) -> dict[str, float]:
    """Write a PEFT adapter to `out` (`rank` sets `options.max_rank`); returns the relative error per LoRA module."""
    options = replace(options or ExtractOptions(), **({"max_rank": rank} if rank is not None else {}))
    _check(options)
    folder = OutputFolder(out, overwrite)
    dev = resolve_device(device)
    b, ft = Checkpoint(base), Checkpoint(finetuned)
    try:
        plan = plan_extraction(b, ft, options)
        _check_unfused(plan, ft)
        if not plan.lora and not plan.full:
            raise RecipeError(f"{finetuned}: nothing to extract (no module differs from the base, or the include/exclude patterns leave none)")
        transposed = b.config.get("model_type") in CONV1D_MODEL_TYPES
        modules, errors = _factorize(b, ft, plan, options, transposed, dev, progress)
        adapter = _adapter(plan, modules, ft, transposed, Path(base))
    finally:
        b.close()
        ft.close()
    commit_adapter(adapter, folder)
    _report(plan, modules, errors)
    return errors


def _check(options: ExtractOptions) -> None:
    if options.max_rank < 1:
        raise RecipeError(f"max_rank={options.max_rank}: must be a positive integer", arguments=("max_rank",))
    if options.sv_epsilon < 0:
        raise RecipeError(f"sv_epsilon={options.sv_epsilon}: must be >= 0", arguments=("sv_epsilon",))


def _check_unfused(plan: ExtractionPlan, ft: Checkpoint) -> None:
    """Refuse modules in blocks that transformers fuses on load (MoE experts): PEFT cannot address them."""
    blocks = fused_blocks(ft.config, list(ft.tensors))
    hit = next((m for m in [*plan.lora, *plan.full] for blk in blocks if m.startswith(f"{blk}.")), None)
    if hit is not None:
        leaf = blocks[0].rpartition(".")[2]
        raise RecipeError(f"{ft.path}: '{hit}' is in a block transformers fuses on load ({blocks[0]}: experts stacked into one "
                          f"tensor), which a PEFT adapter cannot address; leave those blocks out with -e '{leaf}'")


def _factorize(base: Checkpoint, ft: Checkpoint, plan: ExtractionPlan, options: ExtractOptions, transposed: bool,
               device: torch.device, progress: bool) -> tuple[dict[str, LoraModule], dict[str, float]]:
    """Every LoRA target's factors (those with rank >= 1) and relative errors, biases attached."""
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    for name, kind in tqdm(plan.lora.items(), unit="module", disable=not progress, desc="extracting"):
        module, errors[name] = _extract_one(base, ft, name, kind, options, transposed or kind == "embedding", device)
        if module is not None:
            modules[name] = module
    _attach_biases(base, ft, modules, plan)
    return modules, errors


def _extract_one(base: Checkpoint, ft: Checkpoint, module: str, kind: Kind, options: ExtractOptions, transposed: bool,
                 device: torch.device) -> tuple[LoraModule | None, float]:
    """One module's factors (None when no singular value passes the threshold) and its relative error."""
    name = f"{module}.weight"
    delta = ft.read(name).to(device, torch.float32) - base.read(name).to(device, torch.float32)
    delta = delta.T if transposed else delta  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    R = min(options.max_rank, S.numel(), int((S > options.sv_epsilon).sum()))
    total = float(delta.norm())
    if R == 0:
        return None, 1.0 if total > 0 else 0.0
    scale_a, scale_b = (S[:R].sqrt(), S[:R].sqrt()) if options.distribute_scale else (S[:R], torch.ones_like(S[:R]))
    dtype = ft.info(name).dtype
    A = (scale_a[:, None] * Vh[:R]).to("cpu", dtype).contiguous()  # (R, in)
    B = (U[:, :R] * scale_b).to("cpu", dtype).contiguous()  # (out, R)
    error = float((delta - B.to(device, torch.float32) @ A.to(device, torch.float32)).norm()) / total if total > 0 else 0.0
    return LoraModule(module, A, B, 1.0, transposed, kind), error


def _attach_biases(base: Checkpoint, ft: Checkpoint, modules: dict[str, LoraModule], plan: ExtractionPlan) -> None:
    """Bias deltas as `lora_B.bias` when every target has a bias (PEFT adds lora_B.bias to each base bias)."""
    biased = {m: f"{m}.bias" for m in modules if f"{m}.bias" in ft}
    changed = [m for m, b in biased.items() if not torch.equal(ft.read(b), base.read(b))]
    if not changed:
        return
    if len(biased) < len(modules) or any(m.kind == "embedding" for m in modules.values()):
        plan.dropped.extend(f"{m}.bias" for m in changed)
        return
    for m, b in biased.items():
        modules[m].bias = (ft.read(b).float() - base.read(b).float()).to(ft.info(b).dtype)


def _params(ckpt: Checkpoint, module: str) -> list[str]:
    return [n.rpartition(".")[2] for n in ckpt.tensors if n.rpartition(".")[0] == module]


def _adapter(plan: ExtractionPlan, modules: dict[str, LoraModule], ft: Checkpoint, transposed: bool, base: Path) -> LoraAdapter:
    """The adapter under the names of the model transformers loads (`renames.py`), with PEFT's
    LoraConfig defaults, the factored modules as targets and the full ones in modules_to_save."""
    from peft import LoraConfig

    rename = module_renamer(ft.config)
    targets = [rename(t) for t in module_names(ft, list(modules))] if modules else []
    full = {f"{rename(m)}.{p}": ft.read(f"{m}.{p}") for m in plan.full for p in _params(ft, m)}
    modules = {rename(n): replace(m, name=rename(n)) for n, m in modules.items()}
    rank = max((m.rank for m in modules.values()), default=1)
    lora_bias = any(m.bias is not None for m in modules.values())
    template = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, fan_in_fan_out=transposed,
                          modules_to_save=[rename(m) for m in plan.full] or None, lora_bias=lora_bias).to_dict()
    config = unit_scale_config(template, modules, str(base.resolve()), targets=targets)
    return LoraAdapter(None, config, modules, full)


def _report(plan: ExtractionPlan, modules: dict[str, LoraModule], errors: dict[str, float]) -> None:
    for name, err in errors.items():
        log.debug("%s: rank %d, relative error %.3e", name, modules[name].rank if name in modules else 0, err)
    if errors:
        ranks = [m.rank for m in modules.values()]
        log.info("%d LoRA modules (rank %d-%d), relative error mean %.3e, max %.3e; %d modules saved in full", len(modules),
                 min(ranks, default=0), max(ranks, default=0), sum(errors.values()) / len(errors), max(errors.values()), len(plan.full))
    if plan.resized:
        log.warning("the fine-tune's vocabulary differs from the base's: resize the base's embeddings before loading (%s)",
                    ", ".join(plan.resized))
    if plan.dropped:
        log.warning("%d changed modules are not in the adapter (excluded or not decomposable): %s%s", len(plan.dropped),
                    ", ".join(plan.dropped[:5]), " ..." if len(plan.dropped) > 5 else "")
