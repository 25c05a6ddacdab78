"""What every search job file shares: the strict schema base, reading and validating the file,
the workers' settings and the split ranges.

    spec = validated(JobSpec, data, "job.yaml")           # one-line RecipeError naming the key
    job = load_job_file(path, "search", parse_job)         # parse_job(data, root, label, path)
    parse_split("validation[0:100]", "splits.fitness")     # -> SplitRange("validation", 0, 100)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergelab.errors import RecipeError
from mergelab.recipe import describe_validation_error, read_yaml_mapping

S = TypeVar("S", bound=BaseModel)
J = TypeVar("J")
SPLIT_RE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


class Strict(BaseModel):
    """The base of every job schema: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerSpec(Strict):
    count: int = Field(1, ge=1)
    device: str = "cpu"
    address: str | None = None


# ---------------------------------------------------------------- job files
def load_job_file(path: str | os.PathLike[str], shape: str, parse: Callable[[dict, Path, str, Path], J]) -> J:
    """Read the YAML mapping in `path` and `parse(data, folder, label, path)` it; paths in the job
    are relative to its folder; `shape` says what the mapping must hold when it is not one."""
    path = Path(path)
    data = read_yaml_mapping(path, "job", shape)
    return parse(data, path.resolve().parent, str(path), path)


def validated(schema: type[S], data: Any, label: str) -> S:
    """`data` checked against `schema`; the first error as one line naming the key (an unknown
    top-level key lists the allowed ones)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{label}: {describe_validation_error(exc, tuple(schema.model_fields))}") from None


def check_device(workers: WorkerSpec, label: str) -> None:
    """`workers.device` must name a torch device."""
    import torch

    try:
        torch.device(workers.device)
    except RuntimeError:
        raise RecipeError(f"{label}: workers.device: unknown device {workers.device!r}; use cpu, cuda or cuda:N") from None


# ---------------------------------------------------------------- split ranges
@dataclass(frozen=True)
class SplitRange:
    """A task split, optionally a [start, end) range of its examples."""

    name: str
    start: int = 0
    end: int | None = None

    def overlaps(self, other: SplitRange) -> bool:
        if self.name != other.name:
            return False
        inf = float("inf")
        return max(self.start, other.start) < min(self.end if self.end is not None else inf,
                                                  other.end if other.end is not None else inf)


def parse_split(text: str, where: str) -> SplitRange:
    """`validation`, `validation[0:100]`, `test[:50]` -> a SplitRange."""
    m = SPLIT_RE.match(text.strip())
    if not m:
        raise RecipeError(f"{where}: cannot read split {text!r}; write e.g. validation or validation[0:100]")
    start = int(m[2]) if m[2] else 0
    end = int(m[3]) if m[3] else None
    if end is not None and end <= start:
        raise RecipeError(f"{where}: the range of {text!r} is empty")
    return SplitRange(m[1], start, end)
