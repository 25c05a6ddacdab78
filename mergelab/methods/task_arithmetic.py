"""Generalized task arithmetic and its presets: task_arithmetic, ties, dare_*, breadcrumbs*,
della*. One implementation; each name users type is a row of `PRESETS` (which sparsifier, whether
signs are elected, the defaults, the paper), registered as a method, as in mergekit's registry, so
the presets cannot drift apart. A new preset is one row.

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
the keep-masks are made. They are mergekit's `GeneralizedTaskArithmeticMerge.merge_group`, op for
op, in the dtype it computes in: the inputs' (after the recipe's `dtype`), so bfloat16 and float16
recipes do bfloat16/float16 arithmetic, the weights rounded to that dtype too, unless the recipe
asks for `arithmetic: float32`. TIES as published elects the sign from the unweighted trimmed
vectors and averages without weights: `sign_from: trimmed` with equal weights gives exactly that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterator

import torch

from mergelab.methods import _sparsify
from mergelab.methods._common import CHUNK, compute_dtype
from mergelab.methods._select import TIE_BREAKS, Window, windows_over_blocks
from mergelab.methods.base import MergeInputs, MergeMethod, Param

log = logging.getLogger(__name__)

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
    if sparsify in ("magnitude", "magnitude_outliers"):
        params.append(Param("tie_break", str, "global", "mergekit", choices=TIE_BREAKS,
                            doc="equal magnitudes at the density cut: mergekit's (the ones its argsort puts first, found "
                                "without sorting where torch's CPU sort allows) or position (earlier entries first)"))
    if consensus:
        params.append(Param("sign_from", str, "global", "weighted", choices=("weighted", "trimmed"),
                            doc="elect the sign from the weighted (mergekit) or unweighted trimmed (TIES paper) task vectors"))
    return tuple(params)


class TaskArithmeticFamily(MergeMethod):
    """The generalized method; has no `name`, so it is registered only through its presets (below)."""

    base_policy = "required"
    sparsify: ClassVar[str | None] = None  # see `Preset`
    consensus: ClassVar[bool] = False
    preset: ClassVar[Preset]  # the row it was made from

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        assert base is not None
        dtype = compute_dtype(inputs)  # mergekit's: the inputs' own, unless the recipe widens half precision
        b = base.reshape(-1)  # (n,), as stored
        if not inputs.tensors:
            return b.to(dtype).reshape(base.shape)
        xs = [x.reshape(-1) for x in inputs.tensors]
        buffer = torch.empty(b.numel(), dtype=dtype, device=b.device) if self._needs_delta(inputs) else None
        if inputs.stats is not None:  # a block of a larger tensor: the windows were found over all its blocks
            sparse = [self._block_sparse(inputs, w, x, b, buffer) for w, x in zip(inputs.stats, xs)]
        else:
            sparse = [self._sparsify(inputs, i, xs[i], b, buffer) for i in range(len(xs))]
        del buffer
        # (models, 1): rounded to the arithmetic dtype, as mergekit's weight tensor
        weights = torch.tensor([float(p["weight"]) for p in inputs.params], dtype=dtype, device=b.device).unsqueeze(1)
        out = torch.empty(b.numel(), dtype=inputs.out_dtype or dtype, device=b.device)
        for start in range(0, b.numel(), CHUNK):
            stop = min(start + CHUNK, b.numel())
            out[start:stop] = self._combine(inputs.options, xs, sparse, weights, b[start:stop].to(dtype), start, stop)
        return out.reshape(base.shape)

    def _needs_delta(self, inputs: MergeInputs) -> bool:
        return self.sparsify is not None and any(float(p.get("density", 1.0)) < 1 for p in inputs.params)

    # ------------------------------------------------------------ in blocks of a larger tensor
    def blockwise(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        """Element-wise past the sparsifier; of those, the magnitude windows are found over blocks exactly.
        Not the random ones (their draws span the tensor) nor norm rescaling (a sum over the whole tensor
        in mergekit's order)."""
        if self.sparsify is None or all(float(p.get("density", 1.0)) >= 1 for p in params):
            return True
        norm_rescale = bool(options.get("rescale")) and options.get("rescale_mode") != "probability"
        return self.sparsify in ("magnitude", "magnitude_outliers") and not norm_rescale

    def block_passes(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        """Passes over the blocks for the magnitude windows, where a density is below 1."""
        return self.sparsify is not None and self.blockwise(params, options) and \
            any(float(p.get("density", 1.0)) < 1 for p in params)

    def block_stats(self, inputs: MergeInputs, blocks: Callable[[], Iterator[MergeInputs]], budget: int) -> Any:
        """Per input, the `_select.Window` of kept magnitudes (None: all kept), found in passes over the blocks."""
        if not self._needs_delta(inputs):
            return None
        n = inputs.whole
        windows = [self._window(p, n) for p in inputs.params]
        streams = [i for i, w in enumerate(windows) if w is not None]

        def key_blocks() -> Iterator[list[torch.Tensor]]:
            for block in blocks():
                b = block.base.reshape(-1)  # type: ignore[union-attr]
                dtype = compute_dtype(block)
                yield [_sparsify.order_keys(_magnitudes(block.tensors[i].reshape(-1), b, torch.empty_like(b, dtype=dtype)))
                       for i in streams]

        def on_sort(j: int) -> None:
            level = logging.WARNING if 14 * n > budget else logging.DEBUG
            log.log(level, "tensor '%s': model %d's density cut splits equal magnitudes; tie_break mergekit takes the whole "
                    "tensor's magnitudes to find the ones mergekit's sort keeps (~%.1f GB; --memory %.1f GB); "
                    "tie_break: position stays within --memory",
                    inputs.name, streams[j], 14 * n / 1e9, budget / 1e9)

        found = windows_over_blocks(key_blocks, n, [windows[i] for i in streams], inputs.options["tie_break"], on_sort,
                                    sort_keys=_sparsify.keys)
        out: list[Window | None] = [None] * len(windows)
        for i, window in zip(streams, found):
            out[i] = window
        return out

    def _window(self, p: dict[str, Any], n: int) -> tuple[int, int, bool] | None:
        density = float(p.get("density", 1.0))
        if self.sparsify == "magnitude":
            return _sparsify.magnitude_window(n, density)
        return _sparsify.outliers_window(n, density, float(p["gamma"]))

    def _block_sparse(self, inputs: MergeInputs, window: Window | None, x: torch.Tensor, b: torch.Tensor,
                      buffer: torch.Tensor | None) -> _sparsify.Sparse:
        if window is None:
            return _sparsify.Sparse()
        assert buffer is not None
        return _sparsify.Sparse(window.mask(_sparsify.order_keys(_magnitudes(x, b, buffer)), inputs.offset), 1.0)

    # 1)-2) task vector magnitudes (full size, into a reused buffer), then sparsify
    def _sparsify(self, inputs: MergeInputs, i: int, x: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor | None) -> _sparsify.Sparse:
        p = inputs.params[i]
        density = float(p.get("density", 1.0))
        if self.sparsify is None or density >= 1:
            return _sparsify.Sparse()
        assert buffer is not None
        magnitude = _magnitudes(x, b, buffer)  # (n,) = |delta|; all the sparsifiers and norms need only magnitudes
        memo = inputs.memo(i)  # a search's cache: what follows from |delta| or the seed alone (_cache.py)
        if self.sparsify == "magnitude":
            sparse = _sparsify.magnitude(magnitude, density, memo, inputs.options["tie_break"])
        elif self.sparsify == "magnitude_outliers":
            sparse = _sparsify.magnitude_outliers(magnitude, density, float(p["gamma"]), memo, inputs.options["tie_break"])
        elif self.sparsify == "random":
            sparse = _sparsify.random(magnitude, density, inputs.generator(i), memo)
        elif self.sparsify == "della_magprune":
            # DELLA ranks within rows, so it sees the tensor's own shape
            rows = magnitude.reshape(inputs.tensors[i].shape)
            sparse = _sparsify.della_magprune(rows, density, float(p["epsilon"]), inputs.generator(i), memo)
            scale = sparse.scale.reshape(-1) if isinstance(sparse.scale, torch.Tensor) else sparse.scale
            sparse = _sparsify.Sparse(sparse.keep.reshape(-1) if sparse.keep is not None else None, scale)
        else:  # pragma: no cover - presets are fixed in code
            raise AssertionError(self.sparsify)
        mode = inputs.options["rescale_mode"] if inputs.options.get("rescale") else None
        return _sparsify.rescale(magnitude, sparse, mode, memo=memo)

    # 3)-7) one chunk of the elementwise pass; `base` is the chunk of b in the arithmetic dtype
    def _combine(self, opts: dict, xs: list[torch.Tensor], sparse: list[_sparsify.Sparse], weights: torch.Tensor,
                 base: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        trimmed = torch.stack([_trimmed(x[start:stop], s, base, start, stop) for x, s in zip(xs, sparse)])  # (models, c)
        deltas = trimmed * weights  # 3) e_i = w_i d_i
        if self.consensus:
            # 4) elect the sign of the sum (>= 0 counts as +); a zero entry never agrees
            votes = deltas if opts.get("sign_from", "weighted") == "weighted" else trimmed
            majority = (votes.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1  # (c,)
            agree = deltas.sign() == majority  # (models, c)
            # 5) disjoint sum, and the sum of the agreeing weights
            mixed = (deltas * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)  # (1,)
            divisor[divisor.abs() < 1e-8] = 1
        if opts["normalize"]:  # 6)
            mixed /= divisor
        if opts["lambda"] != 1:  # 7)
            mixed *= opts["lambda"]
        return base + mixed


def _magnitudes(x: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """|x - b| into `buffer` (flat, in the arithmetic dtype), a cache-sized chunk at a time."""
    for start in range(0, b.numel(), CHUNK):
        chunk = buffer[start : start + CHUNK]
        chunk.copy_(x[start : start + CHUNK]).sub_(b[start : start + CHUNK]).abs_()
    return buffer


def _trimmed(x: torch.Tensor, s: _sparsify.Sparse, base: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """1)-2) one chunk of d = (x - b) * keep * scale, in `base`'s dtype (a new tensor)."""
    d = torch.sub(x, base)
    if s.keep is not None:
        d.mul_(s.keep[start:stop])
    if isinstance(s.scale, torch.Tensor):
        d.mul_(s.scale[start:stop])
    elif s.scale != 1.0:
        d.mul_(s.scale)
    return d


# ---------------------------------------------------------------- the presets
@dataclass(frozen=True)
class Preset:
    """One method of the family: its name, which steps are on, its defaults (mergekit's) and its source."""

    name: str
    sparsify: str | None  # 2) None | magnitude | random | magnitude_outliers | della_magprune (_sparsify.py)
    consensus: bool  # 4)-5) elect a sign per entry and sum the agreeing entries
    normalize: bool  # default of `normalize`
    rescale: bool  # default of `rescale`
    source: str

    @property
    def randomised(self) -> bool:
        return self.sparsify in ("random", "della_magprune")


PRESETS = (
    #      name                sparsify              consensus normalize rescale
    Preset("task_arithmetic",  None,                 False,    False,    False, "Ilharco et al., Editing Models with Task Arithmetic, arXiv:2212.04089"),
    Preset("ties",             "magnitude",          True,     True,     False, "Yadav et al., TIES-Merging, arXiv:2306.01708"),
    Preset("dare_linear",      "random",             False,    False,    True,  "Yu et al., Language Models are Super Mario (DARE), arXiv:2311.03099"),
    Preset("dare_ties",        "random",             True,     False,    True,  "DARE (arXiv:2311.03099) with TIES (arXiv:2306.01708)"),
    Preset("breadcrumbs",      "magnitude_outliers", False,    False,    False, "Davari and Belilovsky, Model Breadcrumbs, arXiv:2312.06795"),
    Preset("breadcrumbs_ties", "magnitude_outliers", True,     False,    False, "Breadcrumbs (arXiv:2312.06795) with TIES (arXiv:2306.01708)"),
    Preset("della",            "della_magprune",     True,     True,     True,  "Deep et al., DELLA-Merging, arXiv:2406.11617"),
    Preset("della_linear",     "della_magprune",     False,    False,    True,  "Deep et al., DELLA-Merging, arXiv:2406.11617"),
)


def _register(preset: Preset) -> type[TaskArithmeticFamily]:
    """The preset as a subclass of the family; defining it registers it under `preset.name`."""
    class_name = "".join(part.title() for part in preset.name.split("_"))
    doc = (f"{preset.name}: generalized task arithmetic, sparsifier {preset.sparsify}, sign consensus "
           f"{preset.consensus}. Source: {preset.source}.")
    return type(class_name, (TaskArithmeticFamily,), {
        "__module__": __name__, "__qualname__": class_name, "__doc__": doc, "preset": preset,
        "name": preset.name, "sparsify": preset.sparsify, "consensus": preset.consensus, "randomised": preset.randomised,
        "params": preset_params(sparsify=preset.sparsify, consensus=preset.consensus,
                                normalize=preset.normalize, rescale=preset.rescale),
    })


# each importable by its class name (Ties, DareTies, ...), as a class written out would be
globals().update({cls.__name__: cls for cls in map(_register, PRESETS)})
