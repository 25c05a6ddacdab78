"""Merge recipes in mergekit's YAML schema, validated before any tensor is read.

    merge_method: ties
    base_model: ../zoo/base
    models:
      - model: ../zoo/experts/add
        parameters: {weight: 0.6, density: [0.2, 0.8]}   # a gradient over the layers
    parameters: {normalize: true}
    dtype: bfloat16

A parameter value is a scalar, a gradient over the layers or a list of `{filter, value}`
entries (`settings.py`). Model paths are resolved relative to the recipe file (`user_yaml.py`).

Arithmetic is mergekit's by default: each method computes in the dtype mergekit computes it in,
which for most is the inputs' dtype after `dtype:` (a `dtype: bfloat16` TIES subtracts, trims,
weights and sums in bfloat16, its weights rounded to bfloat16; linear and slerp compute in
float32 and round their result to bfloat16), so the output is mergekit's bit for bit.
`arithmetic: float32` (or `mergelab merge --float32-arithmetic`) widens bfloat16 and float16
values to float32 for every step of every method and rounds once, at the output: the inputs are
still rounded to `dtype:` first and the output is still written in `out_dtype`/`dtype`, but task
vectors, weights, products, sums, norms and angles carry no intermediate half-precision rounding
(so a TIES-family trim may keep other entries: task-vector magnitudes equal in bfloat16 can differ
in float32). Linear and slerp results are mergekit's either way unless `out_dtype` is wider than
`dtype`; float32 and float64 recipes are unchanged.

Models whose vocabularies differ (a chat model with added tokens next to its base) need an output
tokenizer: `tokenizer_source: base | union | <model folder>`, or mergekit's block

    tokenizer:
      source: union                  # base | union (the default) | a model folder
      tokens:                        # optional: where the row of a token comes from
        <|im_start|>: {source: ../zoo/chat, force: true}     # that model's row, in every model
        <tool>: {source: {kind: model_token, model: ../zoo/base, token: "</s>"}}
        <pad>: {source: {kind: zero}}
      pad_to_multiple_of: 64

so that embeddings and LM heads are re-ordered by token before merging (`tokenizer.py`, `vocabulary.py`).

A model may carry a LoRA adapter, applied to it tensor by tensor while merging (no merged copy
on disk): `model: base+adapter` (mergekit's syntax) or an explicit `adapter:` key on a
`models[]` entry or slice source. `base+adapter` is split on the LAST '+' only when the part
after it is a folder holding `adapter_config.json` (relative to the recipe); otherwise the
string is one path, so folder names containing '+' keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mergelab.errors import RecipeError
from mergelab.settings import Setting, check_finite
from mergelab.user_yaml import Strict, describe_validation_error, read_yaml_mapping, resolve_path, validated


@dataclass(frozen=True)
class ModelRef:
    """A model a recipe names: a folder, optionally with a LoRA adapter applied on the fly."""

    path: Path
    adapter: Path | None = None

    def __str__(self) -> str:
        return f"{self.path}+{self.adapter}" if self.adapter is not None else str(self.path)


ADAPTER_CONFIG = "adapter_config.json"


class ModelSpec(Strict):
    model: str
    adapter: str | None = None
    parameters: dict[str, Setting] | None = None


class SliceSource(Strict):
    model: str
    adapter: str | None = None
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class Slice(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None


class ZeroToken(Strict):
    """A token's row is zeros."""

    kind: Literal["zero"]


class ModelToken(Strict):
    """A token's row is another token's row in one model: by text (`token`) or by row (`token_id`)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> "ModelToken":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class TokenSpec(Strict):
    """Where a token's row comes from in models that lack it (in every model with `force`)."""

    source: Union[ZeroToken, ModelToken, str, None] = None  # a str is a model of the recipe
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, value: Any) -> Any:
        """A mapping is read by its `kind` (so an error names that kind's keys, not every alternative's)."""
        if not isinstance(value, dict):
            return value
        kinds: dict[str, type[Strict]] = {"zero": ZeroToken, "model_token": ModelToken}
        if value.get("kind") not in kinds:
            raise ValueError(f"a mapping needs kind: zero or kind: model_token, got kind: {value.get('kind')!r}")
        try:
            return kinds[value["kind"]].model_validate(value)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None


class TokenizerSpec(Strict):
    """mergekit's `tokenizer:` block: the output vocabulary and how rows of tokens a model lacks are made."""

    source: str = "union"  # union | base | a model folder
    tokens: dict[str, TokenSpec] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(Strict):
    """A validated recipe. `root` is the folder relative paths are resolved against."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelSpec] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    arithmetic: Literal["mergekit", "float32"] | None = None  # None: mergekit's (see the module docstring)
    tokenizer_source: str | None = None  # union | base | a model folder (the `tokenizer:` block's `source` alone)
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    name: str | None = None
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve(self, path: str) -> Path:
        """A model path from the recipe: `~` expanded, relative ones against the recipe's folder."""
        return resolve_path(self.root, path)

    def ref(self, model: str, adapter: str | None = None) -> ModelRef:
        """The model a recipe entry names: `model` (maybe `base+adapter`) plus its `adapter:` key."""
        base, plus = split_adapter(model, self.root)
        if plus is not None and adapter is not None:
            raise RecipeError(f"model {model!r}: give the adapter once, either as base+adapter or with the 'adapter' key")
        adapter = adapter if adapter is not None else plus
        return ModelRef(self.resolve(base), self.resolve(adapter) if adapter is not None else None)

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output tokenizer asked for, by `tokenizer:` or `tokenizer_source:`; None: copy the template's files."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSpec(source=self.tokenizer_source) if self.tokenizer_source is not None else None

    def to_yaml(self, *, absolute_paths: bool = False) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude={"root"})
        if absolute_paths:
            data = _map_paths(data, lambda p: str(self.ref(p)))
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _map_paths(data: dict, fn: Any) -> dict:
    """Apply `fn` to every model path of a dumped recipe."""
    data = dict(data)
    for key in ("base_model", "tokenizer_source"):
        if key in data and not (key == "tokenizer_source" and data[key] in ("base", "union")):
            data[key] = fn(data[key])
    tokenizer = data.get("tokenizer") or {}
    if tokenizer.get("source", "union") not in ("base", "union"):
        tokenizer["source"] = fn(tokenizer["source"])
    for spec in (tokenizer.get("tokens") or {}).values():
        if isinstance(spec.get("source"), str):
            spec["source"] = fn(spec["source"])
        elif isinstance(spec.get("source"), dict) and "model" in spec["source"]:
            spec["source"]["model"] = fn(spec["source"]["model"])
    entries = list(data.get("models") or [])
    for s in data.get("slices") or []:
        if s.get("base_model"):
            s["base_model"] = fn(s["base_model"])
        entries += s["sources"]
    for entry in entries:
        for key in ("model", "adapter"):
            if key in entry:
                entry[key] = fn(entry[key])
    return data


def split_adapter(model: str, root: Path) -> tuple[str, str | None]:
    """`base+adapter` -> (base, adapter) when `adapter` is a PEFT adapter folder; else (model, None)."""
    if "+" not in model:
        return model, None
    base, adapter = model.rsplit("+", 1)
    folder = Path(os.path.expanduser(adapter))
    folder = folder if folder.is_absolute() else root / folder
    if base and (folder / ADAPTER_CONFIG).is_file():
        return base, adapter
    return model, None


def load_recipe(source: str | os.PathLike[str] | dict | Recipe) -> Recipe:
    """Read and validate a recipe from a YAML file, a dict (paths relative to cwd) or a Recipe."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return parse_recipe(source, Path.cwd(), "recipe")
    path = Path(source)
    data = read_yaml_mapping(path, "recipe", "a recipe must be a YAML mapping with a 'merge_method' key")
    return parse_recipe(data, path.resolve().parent, str(path))


def parse_recipe(data: dict, root: Path, label: str) -> Recipe:
    """Validate the schema (keys, types); `label` names the recipe in errors."""
    recipe = validated(Recipe, {**data, "root": root}, label)
    _check_structure(recipe, label)
    return recipe


def _check_structure(recipe: Recipe, label: str) -> None:
    if (recipe.models is None) == (recipe.slices is None):
        raise RecipeError(f"{label}: give exactly one of 'models' or 'slices'")
    if recipe.models is not None and not recipe.models and not recipe.base_model:
        raise RecipeError(f"{label}: models: the list is empty")
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        raise RecipeError(f"{label}: tokenizer_source: give either 'tokenizer_source' or a 'tokenizer' block (its 'source'), not both")
    for key, value in _iter_settings(recipe):
        check_finite(value, f"{label}: {key}")


def _iter_settings(recipe: Recipe):
    """Every (key path, setting) in the recipe."""
    for name, v in (recipe.parameters or {}).items():
        yield f"parameters.{name}", v
    for i, m in enumerate(recipe.models or []):
        for name, v in (m.parameters or {}).items():
            yield f"models[{i}].parameters.{name}", v
    for i, s in enumerate(recipe.slices or []):
        for name, v in (s.parameters or {}).items():
            yield f"slices[{i}].parameters.{name}", v
        for j, src in enumerate(s.sources):
            for name, v in (src.parameters or {}).items():
                yield f"slices[{i}].sources[{j}].parameters.{name}", v
