"""What each LoraHub worker holds: the base model with ONE live PEFT LoRA adapter, the pool, the examples.

The live adapter is injected once on the pool's modules (rank r, lora_alpha r, so scale 1); a
candidate's weights w give A = sum_i w_i A_i and B = sum_i w_i s_i B_i (`compose.py`'s `linear`
rule, LoraHub's), written into its lora_A / lora_B in place (no reload, no re-wrapping), and the
CE of the examples' answers is the candidate's loss (`answer_loss`: the registry's `nll`, for a
causal or a seq2seq base).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftConfig, inject_adapter_in_model
from transformers import PreTrainedTokenizerBase

from mergelab.blackbox.pool import Evaluation, Genome, Metrics
from mergelab.device import resolve_device
from mergelab.errors import CheckpointError
from mergelab.eval import Example, load_tokenizer, score
from mergelab.lora.adapter import LoraAdapter, load_adapter, unit_scale_config
from mergelab.lora.compose import combine
from mergelab.lora.compose import linear_factors as linear_rule
from mergelab.lora.hub_job import HubJob
from mergelab.metrics import get_metric

LIVE = "lorahub"  # the name of the live adapter injected into the base
CE, PENALTY = "loss", "penalty"  # an evaluation's metrics


# ---------------------------------------------------------------- the pool
def load_pool(paths: Sequence[Path]) -> list[LoraAdapter]:
    """The adapters, checked to compose by `linear`: one base, the same modules, one rank per module."""
    pool = [load_adapter_checked(p) for p in paths]
    for a in pool[1:]:
        for name, m in a.modules.items():
            ref = pool[0].modules.get(name)
            if ref is not None and ref.rank != m.rank:
                raise CheckpointError(f"{a.label()}: module '{name}' has rank {m.rank}, {pool[0].label()} rank {ref.rank}; "
                                      "LoraHub sums the A's and the B's, so every adapter needs the same rank")
    combine(pool, [1.0 / len(pool)] * len(pool), method="linear")  # raises on other bases, modules or shapes
    return pool


def load_adapter_checked(path: Path) -> LoraAdapter:
    """One adapter of the pool: plain LoRA factors only (no bias, no saved full modules)."""
    adapter = load_adapter(path)
    if adapter.full:
        raise CheckpointError(f"{path}: saves full modules ({', '.join(adapter.full)}); LoraHub weighs LoRA factors only")
    if any(m.bias is not None for m in adapter.modules.values()):
        raise CheckpointError(f"{path}: has LoRA biases (lora_bias: true); LoraHub weighs A and B only")
    return adapter


def compose_weights(pool: Sequence[LoraAdapter], weights: Sequence[float], base: Path) -> LoraAdapter:
    """The composed adapter of `weights`, its config naming `base` (absolute) as its base model."""
    composed = combine(pool, weights, method="linear")
    composed.config["base_model_name_or_path"] = str(base)
    return composed


# ---------------------------------------------------------------- the live adapter
class LiveAdapter:
    """One PEFT LoRA adapter injected into `model` once; `set_weights` writes a composition into it."""

    def __init__(self, model: torch.nn.Module, pool: Sequence[LoraAdapter], base: Path) -> None:
        self.pool = list(pool)
        template = self.pool[0]
        check_fits(model, template, base)
        config = PeftConfig.from_peft_type(**unit_scale_config(template.config, template.modules, str(base)))
        inject_adapter_in_model(config, model, adapter_name=LIVE)
        self.slots = {name: _factors(model.get_submodule(name), m.kind) for name, m in template.modules.items()}

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> None:
        """A = sum w_i A_i, B = sum w_i s_i B_i (`compose`'s linear rule), copied into lora_A, lora_B."""
        w = [float(x) for x in weights]
        for name, (A, B) in self.slots.items():
            m = linear_rule(name, [a.modules[name] for a in self.pool], w)
            A.copy_(m.A)  # (r, in)
            B.copy_(m.B)  # (out, r)


def _factors(layer: torch.nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The live adapter's A and B parameters of one PEFT LoRA layer."""
    if kind == "embedding":
        return layer.lora_embedding_A[LIVE], layer.lora_embedding_B[LIVE]
    return layer.lora_A[LIVE].weight, layer.lora_B[LIVE].weight


def check_fits(model: torch.nn.Module, adapter: LoraAdapter, base: Path) -> None:
    """Every adapted module exists in the base model with the weight shape the adapter updates."""
    for name, m in adapter.modules.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise CheckpointError(f"{adapter.label()}: module '{name}' is not in the base model {base}; "
                                  "was the adapter trained on another base?") from None
        if tuple(weight.shape) != m.weight_shape:
            raise CheckpointError(f"{adapter.label()}: module '{name}' updates a {list(m.weight_shape)} weight, "
                                  f"the base model {base} has {list(weight.shape)}; was the adapter trained on another base?")


# ---------------------------------------------------------------- the base and the loss
def load_base(base: Path) -> torch.nn.Module:
    """The base model, as a seq2seq LM when its config is encoder-decoder, else a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(base, dtype=torch.float32).eval()


def answer_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                batch_size: int = 256) -> float:
    """Mean CE (nats per answer token, <eos> included) of the answers given the prompts."""
    if is_seq2seq(model):
        return seq2seq_nll(model, tokenizer, examples, batch_size)
    return answer_nll(model, tokenizer, examples, batch_size)


def answer_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                batch_size: int = 256) -> float:
    """Mean CE (nats per answer token, <eos> included) of the answers given the prompts: the
    registry's `nll` with the model's scorer (causal or seq2seq)."""
    return get_metric("nll").scorer_for(model)(model, tokenizer, examples, batch_size)


# ---------------------------------------------------------------- the evaluator (one per worker)
class HubEvaluator:
    """The base with the live adapter, the pool, the examples.

    Built once per worker by `functools.partial(HubEvaluator, job, device)`."""

    def __init__(self, job: HubJob, device: str = "cpu") -> None:
        self.job = job
        self.tokenizer = load_tokenizer(job.base)
        self.model = load_base(job.base)
        self.live = LiveAdapter(self.model, load_pool(job.adapters), job.base)
        self.model.to(resolve_device(device))

    def evaluate(self, genome: Genome) -> Evaluation:
        """CE on the examples and the penalty l1 * mean |w| of one weight vector, and its seconds."""
        start = time.perf_counter()
        weights = genome["weights"]
        self.live.set_weights(weights)
        loss = answer_loss(self.model, self.tokenizer, self.job.examples)
        return Evaluation({CE: loss, PENALTY: self.job.penalty(weights)}, {"eval": time.perf_counter() - start})

    def scores(self, weights: Sequence[float]) -> Metrics:
        """The report split's metrics with `weights` composed, and the CE on the examples."""
        self.live.set_weights(weights)
        out = {"examples/nll": answer_loss(self.model, self.tokenizer, self.job.examples)}
        task = self.job.report
        if task is not None:
            for metric in self.job.metrics:
                out[f"{task.name}/{metric.name}"] = score(self.model, self.tokenizer, task, metric.name).value
        return out
