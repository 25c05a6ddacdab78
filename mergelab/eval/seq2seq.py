"""The scorers of `mergelab.metrics` for a seq2seq (encoder-decoder) model held in memory.

The prompt is the encoder's input and `answer + <eos>` the decoder's labels (teacher-forced, as
the model's own label loss reads them); accuracy decodes greedily up to `<eos>`. Each scorer
is the seq2seq counterpart of the causal one of the same metric in `scorers.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.eval.data import Example
from mergelab.eval.encode import special_ids


def encode_seq2seq(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Prompts as encoder input, `answer + <eos>` as decoder labels (padding is -100: not scored)."""
    _, eos = special_ids(tokenizer)
    enc = tokenizer([e.prompt for e in examples], padding=True, return_tensors="pt")
    answers = [[*a, eos] for a in tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]]
    width = max(len(a) for a in answers)
    labels = torch.tensor([a + [-100] * (width - len(a)) for a in answers])  # (batch, answer time)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _batches(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
             batch_size: int) -> Iterator[tuple[Sequence[Example], dict[str, torch.Tensor]]]:
    """Consecutive chunks of `examples`, each with its `encode_seq2seq` tensors on the model's device."""
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        yield chunk, {k: v.to(device) for k, v in encode_seq2seq(tokenizer, chunk).items()}


@torch.inference_mode()
def seq2seq_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                batch_size: int = 256) -> float:
    """Mean NLL per answer token of a seq2seq model (the model's own label loss, pooled over batches)."""
    total, count = 0.0, 0
    for _, batch in _batches(model, tokenizer, examples, batch_size):
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n  # the loss is the mean over the n answer tokens
        count += n
    return total / count


@torch.inference_mode()
def seq2seq_prob(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                 batch_size: int = 256) -> float:
    """Mean probability of the whole answer (and `<eos>`) given the prompt, teacher-forced."""
    probs: list[torch.Tensor] = []
    for _, batch in _batches(model, tokenizer, examples, batch_size):
        labels = batch["labels"]  # (b, t)
        logprobs = torch.log_softmax(model(**batch).logits.float(), dim=-1)  # (b, t, v)
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (b, t)
        probs.append((picked.double() * (labels != -100)).sum(-1).exp().cpu())  # (b,)
    return float(torch.cat(probs).mean())


@torch.inference_mode()
def seq2seq_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                     batch_size: int = 256) -> float:
    """Fraction of greedy decodings (up to <eos>) equal to the expected answer."""
    right = 0
    for chunk, batch in _batches(model, tokenizer, examples, batch_size):
        longest = batch["labels"].shape[1]  # the longest answer and its <eos>
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=longest, do_sample=False, num_beams=1)
        got = tokenizer.batch_decode(out, skip_special_tokens=True)
        right += sum(g == e.answer for g, e in zip(got, chunk))
    return right / len(examples)
