"""Find the members of a built zoo by reading its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError
from mergelab.zoo.build import MANIFEST, read_manifest


@dataclass(frozen=True)
class Zoo:
    """A complete zoo on disk: where its base, experts, adapters and task data are."""

    root: Path
    manifest: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    @property
    def skills(self) -> list[str]:
        return list(self.manifest["skills"])

    @property
    def experts(self) -> dict[str, Path]:
        return {skill: self.root / "experts" / skill for skill in self.manifest["experts"]}

    @property
    def adapters(self) -> dict[str, Path]:
        return {skill: self.root / "adapters" / skill for skill in self.manifest["adapters"]}

    @property
    def held_out(self) -> list[str]:
        return list(self.manifest["held_out"])


def open_zoo(dir: str | Path) -> Zoo:
    """The zoo in `dir`; an error when it has no manifest (not built, or not finished)."""
    manifest = read_manifest(dir)
    if manifest is None:
        raise CheckpointError(f"{dir}: not a complete zoo (no readable {MANIFEST}); run `mergelab zoo build {dir}`")
    return Zoo(Path(dir), manifest)
