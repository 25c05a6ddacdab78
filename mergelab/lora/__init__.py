"""LoRA adapters: PEFT adapter IO, adapters applied to a base while merging, composition, extraction.

    from mergelab import lora
    lora.compose(["adapters/add", "adapters/sort"], [0.7, 0.3], "out/mix", method="svd", rank=8)
    lora.extract("base", "finetuned", "out/adapter", rank=16)   # -> relative error per module (options: ExtractOptions)

In recipes, `model: base+adapter` (or an `adapter:` key) applies an adapter while streaming
(`apply.AdaptedCheckpoint`). LoraHub (`mergelab lorahub`) is `hub_job.py` (the job, resolved) ->
`hub_evaluator.py` (the live adapter each worker holds) -> `hub.py` (the run, on `mergelab.blackbox`).
"""

from __future__ import annotations

# Eager (this package needs torch anyway): a lazy `__getattr__` would let the submodules
# `compose` and `extract` shadow the functions of the same name once imported.
from mergelab.lora.adapter import LoraAdapter, LoraModule, load_adapter, save_adapter
from mergelab.lora.apply import AdaptedCheckpoint
from mergelab.lora.compose import combine, compose
from mergelab.lora.extract import extract

__all__ = ["compose", "combine", "extract", "load_adapter", "save_adapter", "LoraAdapter", "LoraModule", "AdaptedCheckpoint"]
