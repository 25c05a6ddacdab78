"""Compose N PEFT LoRA adapters with weights w_i into one PEFT adapter.

Adapter i updates module m by Delta_i = s_i * B_i @ A_i  (s_i its scale, A_i (r_i, in), B_i (out, r_i)).
Every rule writes factors whose scale is 1 (lora_alpha = r per module), so Delta = B @ A:

| method | rule | exact? | PEFT `add_weighted_adapter` |
|---|---|---|---|
| linear | A = sum_i w_i A_i,  B = sum_i w_i s_i B_i  (same rank required) | no | `linear`: differs, see below |
| cat | A = [w_1 s_1 A_1; ...; w_N s_N A_N] (rows),  B = [B_1, ..., B_N] (columns) | yes: B @ A = sum_i w_i Delta_i | `cat`: same factors |
| svd | Delta = sum_i w_i Delta_i, then rank-R truncated SVD | up to truncation | `svd`: same Delta |
| ties, dare_linear, dare_ties | Delta = mergelab's method on the updates Delta_i (base 0), then SVD | - | `*_svd`: see below |

`linear` is LoraHub's rule (Huang et al., arXiv:2307.13269: the composed A and B are the
weighted sums of the A's and of the B's). With equal scales s_i = s it is exactly LoraHub's
adapter (their config keeps alpha; we fold s into B). Its update, (sum_i w_i s_i B_i)(sum_i w_i A_i),
is not the weighted sum of the updates: cross terms B_i A_j appear, and one adapter of weight w
gives w^2 Delta. PEFT's `linear` splits each weight as square roots instead,
A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i, so one adapter of weight w
gives w Delta; for w_i s_i >= 0, PEFT's `linear` with weights w_i equals ours with weights
sqrt(w_i s_i) on unit-scale adapters (tested).

The SVD step (PEFT's, after kohya-ss's svd_merge_lora): Delta (out, in) = U S Vh,
B = U[:, :R] diag(S[:R]), A = Vh[:R]; R = `rank`, default the largest input rank (as PEFT).
The full-update rules reuse mergelab's merge methods (`ties`, `dare_*`: presets and steps in
`methods/task_arithmetic.py`) with the base set to zero, so their defaults are mergekit's
(TIES: sign elected from the weighted trimmed vectors, divided by the sum of agreeing weights;
DARE: survivors rescaled to keep the L1 norm) and `options` passes their parameters
(`sign_from`, `normalize`, `rescale_mode`, `lambda`, ...). PEFT's `ties_svd` elects the sign from
the unweighted trimmed updates (our `sign_from: trimmed`) and divides by the count of agreeing
entries (we divide by the sum of their weights): with all weights 1 the two agree (tested). PEFT's `dare_*_svd` divide survivors
by the density (`rescale_mode: probability`); the random masks differ (ours are seeded per tensor).
PEFT's `ties`, `dare_linear`, `dare_ties` (without `_svd`) prune A and B separately; we do not.

Modules present in only some adapters compose with a zero update from the others (as PEFT),
except for `linear`, which needs every adapter on every module with the same rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from mergelab.device import resolve_device
from mergelab.errors import CheckpointError, RecipeError
from mergelab.lora.adapter import LoraAdapter, LoraModule, commit_adapter, load_adapter, unit_scale_config
from mergelab.methods import get_method
from mergelab.methods.base import MergeInputs
from mergelab.writer import OutputFolder

log = logging.getLogger(__name__)

# composition rule -> the mergelab merge method applied to the full updates before the SVD
UPDATE_METHODS = {"svd": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties"}
METHODS = ("linear", "cat", *UPDATE_METHODS)


def compose(adapters: Sequence[str | os.PathLike[str]], weights: Sequence[float], out: str | os.PathLike[str], *,
            method: str = "svd", rank: int | None = None, density: float = 1.0, options: dict[str, Any] | None = None,
            seed: int = 0, device: str = "cpu", overwrite: bool = False) -> Path:
    """Compose adapter folders with `weights` by `method`; write a PEFT adapter folder to `out`."""
    folder = OutputFolder(out, overwrite)
    dev = resolve_device(device)
    loaded = [load_adapter(a) for a in adapters]
    result = combine(loaded, weights, method=method, rank=rank, density=density, options=options, seed=seed, device=dev)
    base = loaded[0].base_model
    if base and loaded[0].path is not None and (loaded[0].path / base).is_dir():  # a path relative to the input adapter
        result.config["base_model_name_or_path"] = os.path.relpath((loaded[0].path / base).resolve(), Path(out).resolve())
    return commit_adapter(result, folder)


def combine(adapters: Sequence[LoraAdapter], weights: Sequence[float], *, method: str = "svd", rank: int | None = None,
            density: float = 1.0, options: dict[str, Any] | None = None, seed: int = 0,
            device: str | torch.device = "cpu") -> LoraAdapter:
    """The composed adapter, in memory (see the module docstring for each rule's math)."""
    method = method.removesuffix("_svd") if method in ("ties_svd", "dare_linear_svd", "dare_ties_svd") else method
    _check_inputs(adapters, weights, method, rank)
    rule = _rule(method, rank, density, dict(options or {}), seed, torch.device(device))
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    modules = {}
    for name in names:
        parts = [a.modules.get(name) for a in adapters]
        if method == "linear" and any(p is None for p in parts):
            missing = adapters[[p is None for p in parts].index(True)].label()
            raise CheckpointError(f"{missing}: has no LoRA on module '{name}'; 'linear' needs the same target modules in every adapter")
        modules[name] = rule(name, parts, list(map(float, weights)))
    log.info("composed %d adapters by %s: %d modules", len(adapters), method, len(modules))
    return LoraAdapter(None, unit_scale_config(adapters[0].config, modules, adapters[0].base_model), modules, _full_tensors(adapters))


# ---------------------------------------------------------------- checks
def _check_inputs(adapters: Sequence[LoraAdapter], weights: Sequence[float], method: str, rank: int | None) -> None:
    if method not in METHODS:
        raise RecipeError(f"method={method!r}: unknown composition; choose one of {', '.join(METHODS)}", arguments=("method",))
    if not adapters:
        raise RecipeError("no adapters to compose")
    if len(weights) != len(adapters):
        raise RecipeError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if rank is not None and rank < 1:
        raise RecipeError(f"rank={rank}: must be a positive integer", arguments=("rank",))
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        found = ", ".join(f"{a.label()}: {a.base_model}" for a in adapters)
        raise CheckpointError(f"adapters were trained on different base models ({found}); "
                              "if they are the same model, make base_model_name_or_path agree in their adapter_config.json")
    first: dict[str, tuple[LoraAdapter, LoraModule]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            seen = first.setdefault(name, (a, m))
            if (m.weight_shape, m.kind, m.transposed) != (seen[1].weight_shape, seen[1].kind, seen[1].transposed):
                raise CheckpointError(f"{a.label()}: module '{name}' updates a {list(m.weight_shape)} {m.kind} weight, "
                                      f"{seen[0].label()} a {list(seen[1].weight_shape)} {seen[1].kind} one (different base models?)")
            if method == "linear" and m.rank != seen[1].rank:
                raise CheckpointError(f"{a.label()}: module '{name}' has rank {m.rank}, {seen[0].label()} rank {seen[1].rank}; "
                                      "'linear' needs equal ranks (use cat or svd)")


def _full_tensors(adapters: Sequence[LoraAdapter]) -> dict[str, torch.Tensor]:
    """Saved full modules (modules_to_save) carry over from the one adapter that has them."""
    full: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for a in adapters:
        for name, t in a.full.items():
            if name in full:
                raise CheckpointError(f"{a.label()}: '{name}' is a saved full module in {owner[name]} too; such modules cannot be composed")
            full[name], owner[name] = t, a.label()
    return full


# ---------------------------------------------------------------- rules
Rule = Callable[[str, list[LoraModule | None], list[float]], LoraModule]


def _rule(method: str, rank: int | None, density: float, options: dict[str, Any], seed: int, device: torch.device) -> Rule:
    if method == "linear":
        return linear_factors
    if method == "cat":
        return _cat
    merge = _update_merger(UPDATE_METHODS[method], density, options, seed, device)
    return lambda name, parts, weights: _svd_rule(name, parts, weights, merge, rank, device)


def _like(template: LoraModule, A: torch.Tensor, B: torch.Tensor) -> LoraModule:
    """A unit-scale module with `template`'s name and layout, in its dtype."""
    dtype = template.A.dtype
    return LoraModule(template.name, A.to("cpu", dtype).contiguous(), B.to("cpu", dtype).contiguous(), 1.0,
                      template.transposed, template.kind)


def linear_factors(name: str, parts: list[LoraModule | None], weights: list[float]) -> LoraModule:
    """LoraHub: A = sum_i w_i A_i, B = sum_i w_i s_i B_i."""
    mods = [p for p in parts if p is not None]
    A = sum(w * m.A.float() for w, m in zip(weights, mods))  # (r, in)
    B = sum(w * m.scale * m.B.float() for w, m in zip(weights, mods))  # (out, r)
    return _like(mods[0], A, B)  # type: ignore[arg-type]


def _cat(name: str, parts: list[LoraModule | None], weights: list[float]) -> LoraModule:
    """Exact: stack w_i s_i A_i as rows and B_i as columns, so B @ A = sum_i w_i s_i B_i A_i."""
    pairs = [(w, m) for w, m in zip(weights, parts) if m is not None]
    A = torch.cat([w * m.scale * m.A.float() for w, m in pairs], dim=0)  # (sum r_i, in)
    B = torch.cat([m.B.float() for _, m in pairs], dim=1)  # (out, sum r_i)
    return _like(pairs[0][1], A, B)


def _svd_rule(name: str, parts: list[LoraModule | None], weights: list[float],
              merge: Callable[[str, list[torch.Tensor], list[float]], torch.Tensor], rank: int | None, device: torch.device) -> LoraModule:
    """Merge the full updates, then keep the top `rank` singular directions."""
    template = next(p for p in parts if p is not None)
    out_in = (template.B.shape[0], template.A.shape[1])
    updates = [p.update().to(device) if p is not None else torch.zeros(out_in, device=device) for p in parts]  # (out, in) each
    delta = merge(name, updates, weights)  # (out, in)
    B, A = truncated_svd(delta, rank or max(p.rank for p in parts if p is not None))
    return _like(template, A, B)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in) ~= B @ A with B = U_R diag(S_R) (out, R), A = Vh_R (R, in), R <= min(out, in)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    R = min(rank, S.numel())
    return U[:, :R] * S[:R], Vh[:R]


def _update_merger(method_name: str, density: float, options: dict[str, Any], seed: int,
                   device: torch.device) -> Callable[[str, list[torch.Tensor], list[float]], torch.Tensor]:
    """mergelab's merge method `method_name` applied to updates as task vectors on a zero base."""
    method = get_method(method_name)
    opts = {p.name: p.default for p in method.params if p.scope == "global"}
    for key, value in options.items():
        param = method.param(key)
        if param is None or param.scope != "global":
            known = ", ".join(p.name for p in method.params if p.scope == "global")
            raise RecipeError(f"options.{key}: {method_name} takes no option '{key}'; it takes: {known}")
        opts[key] = param.check(value, f"options.{key}")
    density_param = method.param("density")
    if density_param is not None:
        try:
            density = density_param.check(density, "density")
        except RecipeError as exc:  # the same error, naming the argument
            raise RecipeError(str(exc), arguments=("density",)) from None

    def merge(name: str, updates: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        params = [{"weight": w, "density": density} for w in weights]
        inputs = MergeInputs(name, updates, torch.zeros_like(updates[0]), params, opts, seed=seed, generator_device=device)
        return method.merge(inputs)

    return merge
