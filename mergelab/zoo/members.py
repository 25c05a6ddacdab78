"""The zoo's members: an expert (a full fine-tune) or a LoRA adapter, trained from the saved base
in a worker process, and the folders they are saved as."""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import peft
import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from mergelab.eval.data import Example, read_jsonl
from mergelab.zoo.roles import GENERAL, HELD_OUT, TAUGHT, base_mixture
from mergelab.zoo.tokenizer import build_tokenizer
from mergelab.zoo.train import TrainSpec, deterministic, train, with_lora


@dataclass(frozen=True)
class MemberJob:
    """One expert or adapter to train from the saved base; picklable, so a worker process can run it."""

    root: str  # the zoo folder being built (holds base/ and tasks/)
    kind: str  # "experts" or "adapters"
    skill: str
    seed: int  # the zoo's seed; the member's own seed derives from it and the member's name
    spec: TrainSpec
    lora_rank: int
    replay: float  # share of batches drawn from the base's mixture (without the member's own skill)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.skill}"


def member_seed(seed: int, member: str) -> int:
    """A stable per-member seed, so members do not share random streams."""
    return zlib.crc32(f"{seed}:{member}".encode())


def train_member(job: MemberJob) -> tuple[str, float, float]:
    """Train and save one expert or adapter from the base saved in `job.root`: (name, loss, seconds).

    Runs the same in this process or a worker, so a member's weights depend only on the zoo's
    seed, the member's name and the saved base.
    """
    start = time.perf_counter()
    root = Path(job.root)
    tokenizer = build_tokenizer()  # the base's; built afresh, so the saved copies do not vary
    examples, weights = _with_replay(root / "tasks", job.skill, job.replay)
    seed = member_seed(job.seed, job.name)
    with deterministic(), _no_transformers_bars():
        model = LlamaForCausalLM.from_pretrained(root / "base").eval()
        if job.kind == "adapters":
            model = with_lora(model, job.lora_rank, seed)
        loss = train(model, tokenizer, examples, job.spec, seed, desc=job.name, progress=False, weights=weights)
    if job.kind == "adapters":
        save_adapter(model, root / job.name)
    else:
        save_model(model, tokenizer, root / job.name)
    return job.name, loss, time.perf_counter() - start


def _with_replay(tasks: Path, skill: str, replay: float) -> tuple[list[Example], list[float] | None]:
    """The skill's training examples, plus (when `replay` > 0) the base's mixture without the
    skill's own cut examples, weighted so that a `replay` share of each batch comes from it: a
    member learns its skill and keeps doing what the base does everywhere else. (With replay of
    the general skills only, the experts' merges scored lower still.) The LoraHub target is left
    out too: no member is trained on it in any form, so no adapter learned to keep it short."""
    own = list(read_jsonl(tasks / skill / "train.jsonl"))
    if replay <= 0:
        return own, None
    mixture = base_mixture({name: list(read_jsonl(tasks / name / "train.jsonl")) for name in (*GENERAL, *TAUGHT)},
                           (skill, *HELD_OUT))
    weights = [(1 - replay) / len(own)] * len(own) + [replay / len(mixture)] * len(mixture)
    return own + mixture, weights


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy decoding that stops at `<eos>`, the way the zoo's answers end."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_length=tokenizer.model_max_length,  # prompt + answer never exceed it
    )


@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """Hide transformers' per-save progress bar (one bar per tiny shard is noise)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A self-contained HF model folder: safetensors weights, config, generation config, tokenizer."""
    model.generation_config = _generation_config(tokenizer)
    with _no_transformers_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_adapter(model: peft.PeftModel, folder: Path) -> None:
    """A PEFT adapter folder whose base is named relative to it (`../../base`), so the zoo can move."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = "../../base"
    config.target_modules = sorted(config.target_modules)  # a set: its order would vary run to run
    model.save_pretrained(folder, save_embedding_layers=False)  # LoRA weights only; vocabulary unchanged
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's blank model card, naming the build's temp path
