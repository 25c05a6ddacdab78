"""Checkpoint tensor names -> the names the installed transformers gives them in the model.

transformers 5 renames some checkpoint keys while loading (`transformers.conversion_mapping`):
GPT-NeoX's `embed_out` is the model's `lm_head`, Mixtral's `block_sparse_moe.` is `mlp.`. A
PEFT adapter addresses modules of the loaded model; PEFT converts the LoRA factors' keys itself
(`convert_peft_adapter_state_dict_for_transformers`) but not the names in `adapter_config.json`
(`modules_to_save`, `rank_pattern`) nor the full tensors saved for `modules_to_save`. Those are
renamed here with the plain renamings transformers registers for the architecture (its class
name, then its `model_type`); with transformers 4, or an architecture without renamings, names
stay as the checkpoint has them.
"""

from __future__ import annotations

from typing import Callable

Rename = Callable[[str], str]


def model_renamer(config: dict) -> Rename:
    """A function mapping a checkpoint tensor name to the loaded model's name for it."""
    renamings = _renamings(config)

    def rename(name: str) -> str:
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        return name

    return rename


def module_renamer(config: dict) -> Rename:
    """As `model_renamer`, for module names (`embed_out` -> `lm_head`)."""
    rename = model_renamer(config)
    return lambda module: rename(f"{module}.weight").removesuffix(".weight")


def _renamings(config: dict) -> list:
    return [t for t in _transforms(config) if _is_renaming(t)]


def _transforms(config: dict) -> list:
    """What transformers does to the checkpoint's keys on load: by class name, else by model_type."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: checkpoint names are the model's names
        return []
    keys = [*config.get("architectures", [])[:1], config.get("model_type")]
    for key in filter(None, keys):
        transforms = get_checkpoint_conversion_mapping(key)
        if transforms:
            return list(transforms)
    return []


def fused_blocks(config: dict, names: list[str]) -> list[str]:
    """The blocks (`model.layers.0.block_sparse_moe`) whose tensors transformers fuses at load time
    (Mixtral's per-expert w1/w3 -> `experts.gate_up_proj`): a PEFT adapter cannot address their
    modules one by one, and under transformers 5 not their router either (tested on Mixtral)."""
    fusing = [t for t in _transforms(config) if not _is_renaming(t)]
    blocks = {n.split(".experts.")[0] if ".experts." in n else n.rpartition(".")[0]
              for n in names for t in fusing if t.rename_source_key(n)[1] is not None}
    return sorted(blocks)


def _is_renaming(transform: object) -> bool:
    from transformers.core_model_loading import WeightRenaming

    return isinstance(transform, WeightRenaming)
