"""What every YAML file a user writes shares (recipes, search jobs, LoraHub jobs): the strict
schema base, reading the file, validation errors on one line, and paths relative to the file.

    data = read_yaml_mapping(path, "recipe", "a recipe must be a YAML mapping")   # RecipeError naming the file
    spec = validated(JobSpec, data, "job.yaml")                                    # ... naming the key
    resolve_path(path.parent, "../zoo/base")                                       # against the file's folder
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergelab.errors import RecipeError

S = TypeVar("S", bound=BaseModel)


class Strict(BaseModel):
    """The base of every schema a user writes: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml_mapping(path: Path, kind: str, shape: str) -> dict:
    """The YAML mapping in `path` (a recipe or a job); one-line `RecipeError`s naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: {kind} file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read {kind} ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {shape}")
    return data


def validated(schema: type[S], data: Any, label: str) -> S:
    """`data` checked against `schema`; the first error as one line naming the key (an unknown
    top-level key lists the allowed ones: the fields a user writes, not the excluded ones)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        top_keys = tuple(k for k, f in schema.model_fields.items() if not f.exclude)
        raise RecipeError(f"{label}: {describe_validation_error(exc, top_keys)}") from None


def describe_validation_error(exc: ValidationError, top_keys: tuple[str, ...] = ()) -> str:
    """The first pydantic error as `key.path[i]: message`; an unknown top-level key lists `top_keys`."""
    err = exc.errors()[0]
    # pydantic puts union/validator branch names in `loc`; they are not keys the user wrote
    keys = [p for p in err["loc"] if not str(p).startswith(("list[", "function-", "tuple[", "dict[", "str", "float", "int", "bool", "none"))]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in keys).lstrip(".")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        if len(err["loc"]) == 1 and top_keys:
            msg += f" (allowed: {', '.join(top_keys)})"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "literal_error":
        msg = f"must be one of {err['ctx']['expected']}"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our validators' own messages
    return f"{loc}: {msg}" if loc else msg


def resolve_path(root: Path, path: str) -> Path:
    """`~` expanded; a relative path is taken against `root` (the YAML file's folder)."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (root / p).resolve()
