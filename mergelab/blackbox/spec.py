"""What every search job file shares, on top of what every user YAML shares (`mergelab.user_yaml`:
the strict schema base, reading and validating the file): the job file's reading, the workers'
settings and the split ranges.

    job = load_job_file(path, "search", parse_job)         # parse_job(data, root, label, path)
    parse_split("validation[0:100]", "splits.fitness")     # -> SplitRange("validation", 0, 100)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from pydantic import Field

from mergelab.errors import RecipeError
from mergelab.user_yaml import Strict, read_yaml_mapping

J = TypeVar("J")
SPLIT_RE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


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
