"""Training loops for the zoo: brief multi-skill pretraining, full fine-tunes and LoRA adapters.

One loop serves all three; what differs is which weights train (all, or only LoRA's) and which
tokens carry the loss (every token when pretraining, only the answer when fine-tuning).
Batches are drawn by a seeded `torch.Generator`, so a member's weights depend only on its seed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mergelab.eval.data import Example
from mergelab.eval.encode import encode_teacher_forced

log = logging.getLogger(__name__)

# One thread per training process: fixed, so float reductions (and the weights) do not depend on
# the machine; and a single thread does not stall when other processes share the cores, where
# several OpenMP threads spin-wait for each other (10-100x slower on a busy 2-core machine).
THREADS = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The shared architecture of every zoo model (experts are merged tensor by tensor)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class TrainSpec:
    """How long and how hard to train one member."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    answer_only: bool = True  # loss on answer tokens (fine-tuning) or on all tokens (pretraining)


def model_config(tokenizer: PreTrainedTokenizerBase, arch: Arch) -> LlamaConfig:
    """A small Llama config with the tokenizer's vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model, the same for the same seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def with_lora(base: torch.nn.Module, rank: int, seed: int) -> PeftModel:
    """A copy of `base` with fresh LoRA weights of `rank` on every linear layer (base frozen)."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )
    return get_peft_model(copy.deepcopy(base), config)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration of a build."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # tiny Adam moments turn denormal and slow CPU math 10x
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
        torch.set_flush_denormal(False)


def _lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    spec: TrainSpec,
    seed: int,
    desc: str = "train",
    progress: bool = True,
    weights: Sequence[float] | None = None,
) -> float:
    """Train `model` in place on `examples`; returns the mean loss of the last 10% of steps.

    Batches are drawn with replacement, uniformly or in proportion to `weights` (one per example).
    """
    enc = encode_teacher_forced(tokenizer, examples)
    targets = enc.answer_mask if spec.answer_only else enc.attention_mask.bool()
    labels = enc.input_ids.masked_fill(~targets, -100)  # (n, time); -100 = no loss
    lengths = enc.attention_mask.sum(1)  # (n,)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    gen = torch.Generator().manual_seed(seed)
    probs = torch.ones(len(examples)) if weights is None else torch.tensor(weights, dtype=torch.float)
    tail: list[float] = []
    model.train()
    quiet = not progress or not log.isEnabledFor(logging.INFO)
    for step in tqdm(range(spec.steps), desc=desc, disable=quiet, leave=False):
        idx = torch.multinomial(probs, spec.batch_size, replacement=True, generator=gen)  # (batch,)
        width = int(lengths[idx].max())  # trim the padding every row of this batch shares
        loss = model(
            input_ids=enc.input_ids[idx, :width],
            attention_mask=enc.attention_mask[idx, :width],
            labels=labels[idx, :width],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step >= spec.steps * 0.9:
            tail.append(loss.item())
    model.eval()
    return sum(tail) / max(1, len(tail))
