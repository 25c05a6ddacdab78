"""One error hierarchy for everything a user can get wrong.

Every message names the file, key or tensor at fault and, where there is one, the fix.
The CLI prints a `MergelabError` on one line and exits with code 2; anything else is a bug
and keeps its traceback.

A message that names an argument of the Python API writes it as a call would (`device='cuda:9'`,
`overwrite=True`, `rank=0`) and lists the argument in `arguments`; the CLI shows its own flag
in its place (`--device cuda:9`, `--overwrite`, `--rank 0`).
"""

from __future__ import annotations


class MergelabError(Exception):
    """Base of all user-facing errors (bad recipe, bad checkpoint, bad job); `arguments`: the Python
    arguments the message names, as `name=value`."""

    def __init__(self, message: str = "", *, arguments: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.arguments = arguments


class RecipeError(MergelabError, ValueError):
    """A recipe or job YAML is malformed, or asks for something impossible."""


class CheckpointError(MergelabError, ValueError):
    """A model folder or weight file is missing, corrupt, or does not match the others."""


class PlanError(MergelabError, ValueError):
    """The inputs cannot be merged as the recipe asks (missing tensor, shape mismatch, ...)."""


class OutputError(MergelabError, OSError):
    """The output location cannot be written (exists without overwrite=True, ...)."""


class DataError(MergelabError, ValueError):
    """A task or examples file is missing, empty or malformed."""
