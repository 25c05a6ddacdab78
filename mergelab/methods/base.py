"""The contract every merge method fulfils, and the registry that finds them by name.

A method is one file in this package defining one subclass of `MergeMethod` with a `name` (a family
of presets, like `task_arithmetic.py`, defines one per row of its table). Defining the class registers it; `get_method(name)` imports the package's modules on first use,
so adding a method never touches a list elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch

from mergelab.errors import RecipeError
from mergelab.methods._cache import NO_MEMO, Memo, TensorCache

REQUIRED: Any = object()  # sentinel: a parameter with no default

Scope = Literal["global", "model"]
BasePolicy = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class Param:
    """One parameter a method takes, with its type, default and bounds.

    scope "global": one value for the merge (top-level or slice `parameters`);
    scope "model": one value per input model (its own `parameters`, falling back to the
    global ones). The search reads `low`/`high` as the natural search bounds.
    """

    name: str
    kind: type  # float, int, bool or str
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""
    inert: bool = False  # accepted for mergekit compatibility, but has no effect in this method

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Coerce and range-check one scalar value; `where` is the YAML key path for errors."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if self.choices and value not in self.choices:
                raise RecipeError(f"{where}: '{self.name}' must be one of {', '.join(self.choices)}, got {value!r}")
            return str(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: '{self.name}' must be a number, got {value!r}")
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{where}: '{self.name}' must be a whole number, got {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise RecipeError(f"{where}: '{self.name}' = {value} is out of range [{_fmt(self.low, '-inf')}, {_fmt(self.high, 'inf')}]")
        return self.kind(value)


def _fmt(bound: float | None, unbounded: str) -> str:
    return unbounded if bound is None else f"{bound:g}"


@dataclass
class MergeInputs:
    """Everything a method sees for one output tensor.

    `tensors` are the non-base inputs (or all inputs, for methods whose base policy is "input")
    in recipe order, as stored (any float dtype), on the compute device; `base` likewise.
    `params[i]` holds input i's per-model parameters; `options` the global ones.
    `cache` (a search's, see `_cache.py`) remembers what depends only on the sources between merges.
    `float32_arithmetic`: the recipe's `arithmetic: float32` (widen half precision; see `_common.compute_dtype`).
    """

    name: str
    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    params: list[dict[str, Any]]
    options: dict[str, Any]
    seed: int = 0
    out_dtype: torch.dtype | None = None  # methods that build the output chunk by chunk may write it in this dtype
    generator_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: TensorCache | None = None
    float32_arithmetic: bool = False
    # a block of a larger tensor (see `MergeMethod.blockwise`): `tensors` and `base` are the flat elements
    # [offset, offset + their numel) of tensors of `numel` elements; `stats` what `block_stats` found
    offset: int = 0
    numel: int | None = None
    stats: Any = None

    @property
    def whole(self) -> int:
        """Elements of the whole tensor (these inputs' own numel unless they are a block)."""
        return self.numel if self.numel is not None else self.tensors[0].numel() if self.tensors else 0

    def memo(self, index: int) -> Memo:
        """Input `index`'s memo in `cache`; without a cache `NO_MEMO` (computes every time)."""
        return NO_MEMO if self.cache is None else self.cache.memo(index, self.seed)

    def generator(self, index: int) -> torch.Generator:
        """A fresh RNG for input `index` of this tensor: reproducible, independent of job order."""
        g = torch.Generator(device=self.generator_device)
        g.manual_seed(_stable_hash(f"{self.seed}|{self.name}|{index}"))
        return g


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode()) ^ (zlib.adler32(text.encode()) << 32)


class MergeMethod:
    """Base class: subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str]
    base_policy: ClassVar[BasePolicy] = "required"
    """required: `base_model` is needed and passed apart from `tensors`; optional: likewise when
    given; input: the base model (if any) is just one more input in `tensors`."""
    min_inputs: ClassVar[int] = 1  # counted in `tensors`
    max_inputs: ClassVar[int | None] = None
    params: ClassVar[tuple[Param, ...]] = ()
    randomised: ClassVar[bool] = False

    _registry: ClassVar[dict[str, type[MergeMethod]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if name in MergeMethod._registry and MergeMethod._registry[name] is not cls:
                raise RuntimeError(f"merge method '{name}' is defined twice")
            MergeMethod._registry[name] = cls

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    elementwise: ClassVar[bool] = False
    """True when each output element depends only on the inputs' elements at the same position."""

    def blockwise(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        """Whether a large tensor may be merged in blocks of flat elements (bounded memory) with these
        parameters: `merge` of a block, given `block_stats`, is that block of the whole merge, bit for bit."""
        return self.elementwise

    def block_passes(self, params: list[dict[str, Any]], options: dict[str, Any]) -> bool:
        """Whether merging in blocks first takes passes over the whole tensor (`block_stats` reads every block
        again): then a tensor is split only when it does not fit the memory budget whole."""
        return False

    def block_stats(self, inputs: MergeInputs, blocks: Callable[[], Iterator[MergeInputs]], budget: int) -> Any:
        """What the merge of one block needs to know of the whole tensor (a threshold, a norm), found in
        passes over `blocks()` (each call one pass, in order); `inputs` has the parameters and no tensors.
        `budget`: bytes a pass may hold. None for element-wise methods."""
        return None

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """Return the merged tensor on the inputs' device, in the dtype mergekit's method returns (for most
        the inputs' dtype; see `_common.compute_dtype`); the caller casts it to the output dtype."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"


def _discover() -> None:
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{__package__}.{module.name}")


def method_names() -> list[str]:
    _discover()
    return sorted(MergeMethod._registry)


def get_method(name: str) -> MergeMethod:
    """The method registered under `name`, or a RecipeError listing the known ones."""
    if name not in MergeMethod._registry:
        _discover()
    try:
        return MergeMethod._registry[name]()
    except KeyError:
        raise RecipeError(f"merge_method: unknown method '{name}'; choose one of: {', '.join(method_names())}") from None
