"""mergelab: merge language models, search merge recipes by evolution, compose LoRA adapters.

The merge flow is `recipe -> plan -> execute -> writer`; see `mergelab.merge`. The two searches
(`evolve/`: merge recipes, `lora/hub*`: LoraHub weights) both run on `blackbox/` (optimizer,
worker pool, ask/tell) and score with the metric registry (`metrics.py`, scorers in `eval/`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergelab.errors import MergelabError

__version__ = "0.1.0"

__all__ = ["MergelabError", "merge", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.merging import merge


def __getattr__(name: str) -> Any:
    # Lazy: `import mergelab` stays cheap (no torch import) until the API is used.
    if name == "merge":
        from mergelab.merging import merge

        return merge
    raise AttributeError(name)
