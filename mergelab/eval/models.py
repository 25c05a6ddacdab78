"""Load a model folder (a full HF model, or a PEFT adapter on its base) with its tokenizer.

Only the CLI and scripts need this: the scorers take models already in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mergelab.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`; an error when there is none."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer here (none of {', '.join(TOKENIZER_FILES)}); "
            "save one with tokenizer.save_pretrained(folder)"
        )
    return AutoTokenizer.from_pretrained(folder)


def load_model(folder: str | Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` from a model folder, in eval mode, on the CPU.

    A PEFT adapter folder is loaded onto its base (`base_model_name_or_path`, relative paths
    taken from the adapter folder) and merged into it, so every evaluator sees a plain model;
    the tokenizer comes from the adapter folder when it has one, else from the base.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json or adapter_config.json)")
    tokenizer = load_tokenizer(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def _load_adapter(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A LoRA adapter merged into its base model."""
    from peft import PeftModel

    config_file = folder / "adapter_config.json"
    try:
        base_name = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{config_file}: unreadable, or no base_model_name_or_path") from None
    base_dir = folder / base_name
    if not (base_dir / "config.json").is_file():
        raise CheckpointError(f"{config_file}: base model {base_name!r} not found (looked in {base_dir})")
    tokenizer = load_tokenizer(folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, folder).merge_and_unload().eval(), tokenizer
