"""Task data: JSONL files of `{"prompt": ..., "answer": ...}` examples, one split per file.

A zoo keeps them as `ZOO/tasks/<skill>/{train,validation,test}.jsonl`. Loading checks every
line and names the file and line number at fault, so a bad file fails on one line, early.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import DataError


@dataclass(frozen=True)
class Example:
    """One prompt and the exact answer expected right after it."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSplit:
    """The examples of one split of one task, with the names a `Score` reports."""

    name: str
    split: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int | None) -> TaskSplit:
        """The first `n` examples (all of them when `n` is None)."""
        return self if n is None else TaskSplit(self.name, self.split, self.examples[:n])


def read_jsonl(path: str | Path) -> tuple[Example, ...]:
    """Every example of a JSONL file; blank lines are skipped, anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                examples.append(_parse_line(line, path, lineno))
    if not examples:
        raise DataError(f"{path}: no examples (the split is empty)")
    return tuple(examples)


def _parse_line(line: str, path: Path, lineno: int) -> Example:
    """One JSONL line -> `Example`, or a `DataError` naming `path:lineno`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
        raise DataError(f"{path}:{lineno}: expected an object with string fields 'prompt' and 'answer'")
    return Example(row["prompt"], row["answer"])


def write_jsonl(path: str | Path, examples: list[dict[str, str]] | tuple[Example, ...]) -> None:
    """Write examples (dicts or `Example`s) as one JSON object per line."""
    rows = [e if isinstance(e, dict) else {"prompt": e.prompt, "answer": e.answer} for e in examples]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tasks_root(zoo_or_tasks_dir: str | Path) -> Path:
    """`ZOO/tasks` when given a zoo folder, else the folder itself (already a tasks folder)."""
    root = Path(zoo_or_tasks_dir)
    return root / "tasks" if (root / "tasks").is_dir() else root


def task_file(zoo_or_tasks_dir: str | Path, skill: str, split: str) -> Path:
    """Where a skill's split lives: `<tasks>/<skill>/<split>.jsonl`."""
    return tasks_root(zoo_or_tasks_dir) / skill / f"{split}.jsonl"


def load_task(
    zoo_or_tasks_dir: str | Path, skill: str, split: str = "test", limit: int | None = None
) -> TaskSplit:
    """The first `limit` examples (all when None) of `<tasks>/<skill>/<split>.jsonl`."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    path = task_file(zoo_or_tasks_dir, skill, split)
    if not path.parent.is_dir():
        known = sorted(p.name for p in tasks_root(zoo_or_tasks_dir).glob("*/") if p.is_dir())
        raise DataError(f"{path.parent}: no task {skill!r} here (known: {', '.join(known) or 'none'})")
    return TaskSplit(skill, split, read_jsonl(path)).head(limit)
