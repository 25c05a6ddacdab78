"""Generalized task arithmetic: the one implementation behind task_arithmetic, ties, dare_*,
breadcrumbs*, della*. Each of those files is a preset of this class (which parts are on, and
the defaults), as in mergekit, so they cannot drift apart.

For base b, inputs x_i with weights w_i (all per tensor):

1) task vectors     d_i = x_i - b
2) sparsify         d_i <- d_i * keep_i * scale_i                 (see _sparsify.py)
3) weight           e_i = w_i * d_i
4) elect sign       s = sign(sum_i e_i)   (>= 0 counts as +)       [consensus methods only]
                    paper variant (`sign_from: trimmed`): s = sign(sum_i d_i)
   agree            a_i = [sign(e_i) == s]   (a zero entry never agrees)
5) disjoint sum     m = sum_i a_i e_i,   divisor = sum_i a_i w_i (0 -> 1)
   (no consensus)   m = sum_i e_i,       divisor = sum_i w_i     (|.| < 1e-8 -> 1)
6) normalize        m <- m / divisor     [if normalize]
7) scale            out = b + lambda * m

Steps 3-7 are elementwise and run over cache-sized chunks, so no full-size temporaries beyond
the keep-masks are made. This matches mergekit's `GeneralizedTaskArithmeticMerge` (the same
steps, in float32); TIES as published elects the sign from the unweighted trimmed vectors and
averages without weights: `sign_from: trimmed` with equal weights gives exactly that.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch

from mergelab.methods import _sparsify
from mergelab.methods.base import MergeInputs, MergeMethod, Param

CHUNK = 1 << 18  # elements per step of the elementwise pass (~1 MB of float32)

WEIGHT = Param("weight", float, "model", doc="scale of this model's task vector")
DENSITY = Param("density", float, "model", 1.0, 0.0, 1.0, doc="fraction of the task vector kept")
GAMMA = Param("gamma", float, "model", 0.01, 0.0, 1.0, doc="fraction of largest magnitudes dropped as outliers")
EPSILON = Param("epsilon", float, "model", 0.15, 0.0, 1.0, doc="DELLA: keep probabilities span density +- epsilon")


def preset_params(*, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """The parameters of a preset: per-model ones for its parts, global ones with its defaults."""
    # mergekit accepts density and rescale for every preset; where they do nothing we still
    # accept them (recipes must keep running) and the plan warns that they are ignored.
    params = [WEIGHT, DENSITY if sparsify is not None else replace(DENSITY, inert=True)]
    if sparsify == "magnitude_outliers":
        params.append(GAMMA)
    if sparsify == "della_magprune":
        params.append(EPSILON)
    params += [
        Param("normalize", bool, "global", normalize, doc="divide by the sum of (agreeing) weights"),
        Param("lambda", float, "global", 1.0, doc="scale of the merged task vector"),
        Param("int8_mask", bool, "global", False, doc="accepted for mergekit compatibility; masks are always compact here"),
    ]
    params.append(Param("rescale", bool, "global", rescale, inert=sparsify is None, doc="rescale the survivors of sparsification"))
    if sparsify is not None:
        params.append(Param("rescale_mode", str, "global", "l1", choices=_sparsify.RESCALE_MODES,
                            doc="l1/l2/linf: keep that norm of the task vector (mergekit); probability: divide by keep probability (papers)"))
    if consensus:
        params.append(Param("sign_from", str, "global", "weighted", choices=("weighted", "trimmed"),
                            doc="elect the sign from the weighted (mergekit) or unweighted trimmed (TIES paper) task vectors"))
    return tuple(params)


class TaskArithmeticFamily(MergeMethod):
    """Base of the presets; has no `name`, so it is not itself a registered method."""

    base_policy = "required"
    sparsify: ClassVar[str | None] = None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: ClassVar[bool] = False

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        assert base is not None
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        b = base.reshape(-1).to(work)
        if not inputs.tensors:
            return b.reshape(base.shape)
        sparse = [self._sparsify(inputs, i, b, work) for i in range(len(inputs.tensors))]
        weights = [float(p["weight"]) for p in inputs.params]
        out = torch.empty_like(b)
        for start in range(0, b.numel(), CHUNK):
            stop = min(start + CHUNK, b.numel())
            out[start:stop] = self._combine(inputs, sparse, weights, b, start, stop, work)
        return out.reshape(base.shape)

    # 2) sparsify one task vector (full size, once)
    def _sparsify(self, inputs: MergeInputs, i: int, b: torch.Tensor, work: torch.dtype) -> _sparsify.Sparse:
        if self.sparsify is None:
            return _sparsify.Sparse()
        p = inputs.params[i]
        density = float(p.get("density", 1.0))
        if density >= 1:
            return _sparsify.Sparse()
        delta = inputs.tensors[i].reshape(-1).to(work) - b  # (n,)
        if self.sparsify == "magnitude":
            sparse = _sparsify.magnitude(delta, density)
        elif self.sparsify == "magnitude_outliers":
            sparse = _sparsify.magnitude_outliers(delta, density, float(p["gamma"]))
        elif self.sparsify == "random":
            sparse = _sparsify.random(delta, density, inputs.generator(i))
        elif self.sparsify == "della_magprune":
            # DELLA ranks within rows, so it sees the tensor's own shape
            shaped = delta.reshape(inputs.tensors[i].shape)
            sparse = _sparsify.della_magprune(shaped, density, float(p["epsilon"]), inputs.generator(i))
            sparse = _sparsify.Sparse(sparse.keep.reshape(-1), sparse.scale if isinstance(sparse.scale, float) else sparse.scale.reshape(-1))
        else:  # pragma: no cover - presets are fixed in code
            raise AssertionError(self.sparsify)
        mode = inputs.options["rescale_mode"] if inputs.options.get("rescale") else None
        return _sparsify.rescale(delta, sparse, mode)

    # 3)-7) one chunk of the elementwise pass
    def _combine(self, inputs: MergeInputs, sparse: list[_sparsify.Sparse], weights: list[float],
                 b: torch.Tensor, start: int, stop: int, work: torch.dtype) -> torch.Tensor:
        opts = inputs.options
        base = b[start:stop]
        deltas = []  # trimmed task vectors d_i, chunk
        for x, s in zip(inputs.tensors, sparse):
            d = x.reshape(-1)[start:stop].to(work) - base
            if s.keep is not None:
                d *= s.keep[start:stop]
            scale = s.scale
            if isinstance(scale, torch.Tensor):
                d *= scale[start:stop]
            elif scale != 1.0:
                d *= scale
            deltas.append(d)
        weighted = [d * w for d, w in zip(deltas, weights)]
        if self.consensus:
            elect = torch.stack(weighted if opts.get("sign_from", "weighted") == "weighted" else deltas).sum(0)
            positive = elect >= 0
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for e, w in zip(weighted, weights):
                agree = torch.where(positive, e > 0, e < 0)
                mixed += e * agree
                divisor += agree * w
            divisor[divisor == 0] = 1
        else:
            mixed = torch.stack(weighted).sum(0)
            total = sum(weights)
            divisor = total if abs(total) >= 1e-8 else 1.0
        if opts["normalize"]:
            mixed /= divisor
        if opts["lambda"] != 1:
            mixed *= opts["lambda"]
        return base + mixed
