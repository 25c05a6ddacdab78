"""Turn examples into padded token tensors, the one place that fixes the text format.

A scored (and trained) sequence is `tokenizer(prompt)` (which adds `<bos>` when the tokenizer
does) followed by the answer's tokens and `<eos>`. The `<eos>` counts as an answer token: it is
what tells a greedy decoder the answer is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.errors import CheckpointError
from mergelab.eval.data import Example


@dataclass(frozen=True)
class TeacherForced:
    """Right-padded prompt+answer sequences and which positions hold answer tokens."""

    input_ids: torch.Tensor  # (batch, time) long, padded with pad_token_id
    attention_mask: torch.Tensor  # (batch, time) long, 1 on real tokens
    answer_mask: torch.Tensor  # (batch, time) bool, True on answer tokens and the final <eos>


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """`(pad_token_id, eos_token_id)`, which every scorer needs; an error names what is missing."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one and save it")
    return (eos if pad is None else pad), eos


def encode_teacher_forced(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> TeacherForced:
    """Tokenize `prompt + answer + <eos>` for each example, marking the answer positions."""
    pad, eos = special_ids(tokenizer)
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    seqs = [[*p, *a, eos] for p, a in zip(prompts, answers)]
    width = max(len(seq) for seq in seqs)
    ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in seqs])  # (batch, time)
    positions = torch.arange(width)  # (time,)
    lengths = torch.tensor([len(seq) for seq in seqs])[:, None]  # (batch, 1)
    starts = torch.tensor([len(p) for p in prompts])[:, None]  # (batch, 1): first answer position
    attention = (positions < lengths).long()
    answer_mask = (positions >= starts) & (positions < lengths)
    return TeacherForced(ids, attention, answer_mask)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt tokens for batched generation: `(input_ids, attention_mask)`, (batch, time)."""
    pad, _ = special_ids(tokenizer)
    rows = tokenizer(list(prompts))["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        attention[i, width - len(r) :] = 1
    return ids, attention
