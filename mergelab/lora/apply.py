"""A base model with a LoRA adapter applied on the fly: `BASE+ADAPTER` in a recipe.

`AdaptedCheckpoint` is a tensor source (`checkpoint.TensorSource`) over a base `Checkpoint`:
its `read(name)` returns

    W + scale * B @ A      (transposed for fan_in_fan_out / embeddings; see adapter.py)

for every weight the adapter targets, computed in float32 (float64 for float64 weights) and
cast back to the stored dtype; full tensors the adapter saves (`modules_to_save`) replace the
base's; everything else is the base's tensor. No merged copy is written to disk: the plan and
executor stream it like any other checkpoint. The result equals PEFT's `merge_and_unload()`.
Everything is checked when it is opened, before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mergelab.checkpoint import Checkpoint, TensorInfo
from mergelab.errors import CheckpointError
from mergelab.lora.adapter import LoraAdapter, LoraModule
from mergelab.methods import work_dtype


class AdaptedCheckpoint:
    """`base` with `adapter` merged into it tensor by tensor; its index, config and folder are the base's."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        self._updates = _check_against_base(base, adapter)  # base tensor name -> module
        self._bias_updates = {f"{m.name}.bias": m for m in adapter.modules.values() if m.bias is not None}

    @property
    def path(self) -> Path:
        return self.base.path  # config, tokenizer and generation config are the base's

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read(self, name: str) -> torch.Tensor:
        """The base tensor with the adapter's update added (or its replacement)."""
        info = self.info(name)
        full = self.adapter.full.get(name)  # e.g. modules_to_save, or the base layer saved with an embedding LoRA
        weight = full.to(info.dtype).clone() if full is not None else self.base.read(name)
        module = self._updates.get(name)
        if module is not None:
            return _add(weight, lambda dtype: module.weight_update(dtype))
        module = self._bias_updates.get(name)
        if module is not None:
            return _add(weight, lambda dtype: module.bias.to(dtype) * module.scale)  # type: ignore[union-attr]
        return weight

    def ranged(self, name: str) -> bool:
        return not self._changes(name) and self.base.ranged(name)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor; a tensor the adapter changes is made whole first."""
        if self._changes(name):
            return self.read(name).reshape(-1)[start:stop].clone()
        return self.base.read_range(name, start, stop)

    def _changes(self, name: str) -> bool:
        return name in self.adapter.full or name in self._updates or name in self._bias_updates

    def close(self) -> None:
        self.base.close()

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({str(self.base.path)!r} + {self.adapter.label()!r})"


def _add(weight: torch.Tensor, update: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    work = work_dtype(weight)
    return (weight.to(work) + update(work)).to(weight.dtype)


def _check_against_base(base: Checkpoint, adapter: LoraAdapter) -> dict[str, LoraModule]:
    """Every targeted tensor exists in the base with the shape the factors imply."""
    where = adapter.label()
    updates: dict[str, LoraModule] = {}
    for module in adapter.modules.values():
        info = _base_tensor(base, module.target, where, f"module '{module.name}'")
        if info.shape != module.weight_shape:
            raise CheckpointError(
                f"{where}: module '{module.name}': the update has shape {list(module.weight_shape)} "
                f"but '{module.target}' in {base.path} is {list(info.shape)} (an adapter for another base model?)")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where}: module '{module.name}': '{module.target}' in {base.path} is not a float tensor")
        if module.bias is not None:
            bias = _base_tensor(base, f"{module.name}.bias", where, f"module '{module.name}' (lora_bias)")
            if bias.shape != (module.B.shape[0],):
                raise CheckpointError(f"{where}: module '{module.name}': lora_B.bias has {module.B.shape[0]} entries, the base bias {list(bias.shape)}")
        updates[module.target] = module
    for name, tensor in adapter.full.items():
        info = _base_tensor(base, name, where, "saved module")
        if info.shape != tuple(tensor.shape):
            raise CheckpointError(f"{where}: saved tensor '{name}' has shape {list(tensor.shape)} but the base's is {list(info.shape)}")
    return updates


def _base_tensor(base: Checkpoint, name: str, where: str, what: str) -> TensorInfo:
    if name not in base:
        raise CheckpointError(f"{where}: {what} needs tensor '{name}', which {base.path} does not have (an adapter for another base model?)")
    return base.info(name)
