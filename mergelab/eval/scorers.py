"""Score a model held in memory on a task split: the causal scorers of `mergelab.metrics`.

Both work on any causal LM module called as `model(input_ids=, attention_mask=, position_ids=,
past_key_values=, use_cache=)` that returns an object with `.logits` (batch, time, vocab) and,
optionally, `.past_key_values` (used when present): a `transformers` model, a PEFT model, or
a test double. Nothing is read from disk and the model is not copied.

- `accuracy`: greedy decoding, batched with left padding; an answer is right when the decoded
  text up to `<eos>` equals the expected answer exactly.
- `nll`: mean negative log-likelihood (nats per token) of the answer tokens and the closing
  `<eos>`, given the prompt; one teacher-forced forward pass per batch. A smooth fitness
  signal: it moves with every weight change, where accuracy moves in steps of 1/n.
- `prob`: mean probability of the whole answer given the prompt (the same forward pass): the
  exact-match accuracy of sampling, smooth like NLL and bounded like accuracy.

`score` scores any metric of the registry on a task split, with the model's scorer (causal, or
seq2seq from `seq2seq.py`), timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from mergelab.errors import DataError
from mergelab.eval.data import Example, TaskSplit
from mergelab.eval.encode import encode_prompts, encode_teacher_forced, special_ids
from mergelab.metrics import get_metric

T = TypeVar("T")


@dataclass(frozen=True)
class Score:
    """One scored result: which task and split, which metric, its value, on how many examples, how fast."""

    task: str
    split: str
    metric: str
    value: float
    n: int
    seconds: float
    details: Mapping[str, float] = field(default_factory=dict)  # extra metrics (lm-eval's stderr, ...)

    def __str__(self) -> str:
        return f"{self.task}/{self.split} {self.metric}={self.value:.4f} (n={self.n}, {self.seconds:.3f}s)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "details": dict(self.details)}


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(items: Sequence[T], batch_size: int) -> list[Sequence[T]]:
    """Consecutive chunks of at most `batch_size` items."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


@torch.inference_mode()
def answer_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the summed log-probability of its answer tokens (the answer and `<eos>`),
    teacher-forced, and how many tokens that is: two (n,) float64 tensors."""
    sums, counts = [], []
    for chunk in _batches(examples, batch_size):
        enc = encode_teacher_forced(tokenizer, chunk)
        ids = enc.input_ids.to(_device(model))
        logits = model(input_ids=ids, attention_mask=enc.attention_mask.to(ids.device)).logits  # (b, t, v)
        # 1) position t predicts token t+1
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (b, t-1, v)
        picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, t-1)
        # 2) keep only the positions whose target is an answer token
        mask = enc.answer_mask[:, 1:].to(ids.device)  # (b, t-1)
        sums.append((picked.double() * mask).sum(-1).cpu())
        counts.append(mask.sum(-1).double().cpu())
    return torch.cat(sums), torch.cat(counts)


def answer_nll(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 256
) -> float:
    """Mean NLL in nats per answer token (the answer's tokens plus `<eos>`), teacher-forced."""
    sums, counts = answer_logprobs(model, tokenizer, examples, batch_size)
    return float(-sums.sum() / counts.sum())


def answer_prob(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 256
) -> float:
    """Mean probability of the whole answer (and `<eos>`) given the prompt, teacher-forced.

    The chance that sampling at temperature 1 gives exactly the expected answer: an exact-match
    accuracy made smooth. It moves with every weight change, like NLL, but it is bounded in
    [0, 1] and weighs an example by how nearly it is right, as accuracy does: a skill whose
    answers are already certain cannot dominate it, and one bad token costs the whole example."""
    sums, _ = answer_logprobs(model, tokenizer, examples, batch_size)
    return float(sums.exp().mean())


@torch.inference_mode()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy continuation of each prompt up to `<eos>` (or `max_new_tokens`), decoded to text."""
    out: list[str] = []
    for chunk in _batches(prompts, batch_size):
        out += _greedy_batch(model, tokenizer, chunk, max_new_tokens)
    return out


def _greedy_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """One left-padded batch; uses the model's KV cache when it returns one, else re-runs the prefix."""
    pad, eos = special_ids(tokenizer)
    ids, mask = (t.to(_device(model)) for t in encode_prompts(tokenizer, prompts))  # (b, t)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
    step_ids, cache, new = ids, None, []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, t): left padding shifts each row's positions
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions[:, -step_ids.shape[1] :],
            past_key_values=cache,
            use_cache=True,
        )
        token = torch.where(done, pad, out.logits[:, -1].argmax(-1))  # (b,)
        new.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        cache = getattr(out, "past_key_values", None)
        step_ids = token[:, None] if cache is not None else ids
    rows = torch.stack(new, dim=1).tolist()  # (b, generated)
    return [tokenizer.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True) for r in rows]


def exact_match_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy answer equals the expected answer exactly."""
    # An answer longer than the longest expected one (plus <eos>) cannot match: stop there.
    longest = max(len(a) for a in tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"])
    got = greedy_answers(model, tokenizer, [e.prompt for e in examples], longest + 1, batch_size)
    return sum(g == e.answer for g, e in zip(got, examples)) / len(examples)


def score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSplit,
    metric: str = "nll",
    batch_size: int = 256,
) -> Score:
    """Score an in-memory model on `task` with `metric` (a registry name scored on examples), timed."""
    entry = get_metric(metric)
    if not entry.on_examples:
        raise DataError(f"metric {metric!r} is not scored on a task's examples; use lm_eval_score")
    scorer = entry.scorer_for(model)
    if not task.examples:
        raise DataError(f"task {task.name!r} split {task.split!r} has no examples")
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        value = scorer(model, tokenizer, task.examples, batch_size)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return Score(task.name, task.split, metric, value, len(task), seconds)
