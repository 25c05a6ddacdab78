"""LoraHub: compose a pool of LoRA adapters for a new task from a few examples, without gradients.

Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
arXiv:2307.13269 (https://github.com/sail-sg/lorahub).

Adapters i = 1..N on one base, all of rank r on the same modules, with scales s_i, and weights
w in [low, high]^N give one adapter by `compose.py`'s `linear` rule (LoraHub's):

    A = sum_i w_i A_i   (r, in)        B = sum_i w_i s_i B_i   (out, r)        scale 1

and the weights minimise, by a nevergrad optimizer (any registry name, default NGOpt) from w = 0
(where A = B = 0: the base model itself),

    total(w) = CE(w) + l1 * mean_i |w_i|

where CE is the mean cross-entropy over the answer tokens of the few examples (every answer
token and the closing <eos>, given the prompt; the scorers' `answer_nll`). A causal LM reads
prompt + answer teacher-forced; a seq2seq model encodes the prompt and decodes the answer as labels.

The flow (`run_lorahub`):
    1) the pool is loaded and checked: one base, the same modules and one rank per module
    2) each worker (`evolve.workers.WorkerPool`: in this process, or Ray actors) builds a
       `HubEvaluator` once: the base model with ONE live PEFT LoRA adapter injected on the
       pool's modules (rank r, lora_alpha r, so scale 1)
    3) ask/tell: a candidate's A and B are written into the live adapter's lora_A / lora_B in
       place (no reload, no re-wrapping) and CE is computed; one line per step in `steps.jsonl`.
       Step 0 is always w = 0 (suggested to the optimizer, as not every optimizer starts at its
       init). Steps 1..N (`optimizer.singles`, on by default) are each adapter alone at `high`:
       the loss is flat near w = 0 (an adapter's update grows with w_i^2) and a useful adapter
       may act only past a threshold (on the zoo, `back` turns `mirror` on between 1.2 and 1.4),
       so a search from 0 alone can settle in the basin of "a bit of everything" while one
       adapter at full strength has a loss 100x lower; these N probes, out of the same budget,
       give the optimizer a foothold in each single-adapter basin
    4) the best step's weights are composed into a PEFT adapter folder (`PeftModel.from_pretrained`
       loads it), `weights.json`, and `report.json`: the report split scored for the composed
       adapter, the base (w = 0) and the uniform composition (w_i = 1/N)
Everything is written into `OUT.partial/` and renamed to `OUT` only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, inject_adapter_in_model
from transformers import PreTrainedTokenizerBase

from mergelab.errors import CheckpointError, RecipeError
from mergelab.eval import Example, load_tokenizer, score
from mergelab.evolve.optimizer import make_optimizer
from mergelab.evolve.workers import Done, WorkerPool, ask_tell
from mergelab.execute import resolve_device
from mergelab.lora.adapter import LoraAdapter, load_adapter, save_adapter, unit_scale_config
from mergelab.lora.compose import linear_factors as linear_rule
from mergelab.lora.compose import combine
from mergelab.lora.hub_job import HubJob
from mergelab.metrics import get_metric
from mergelab.writer import OutputFolder

log = logging.getLogger(__name__)

LIVE = "lorahub"  # the name of the live adapter injected into the base
WORST = 1e9  # the loss told for a NaN or infinite CE: finite, so every optimizer can take it
STEPS, WEIGHTS, REPORT = "steps.jsonl", "weights.json", "report.json"
Metrics = dict[str, float]


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


# ---------------------------------------------------------------- the base and the loss (the registry's nll, causal or seq2seq)
def load_base(base: Path) -> torch.nn.Module:
    """The base model, as a seq2seq LM when its config is encoder-decoder, else a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(base, dtype=torch.float32).eval()


def answer_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                batch_size: int = 256) -> float:
    """Mean CE (nats per answer token, <eos> included) of the answers given the prompts: the
    registry's `nll` with the model's scorer (causal or seq2seq)."""
    return get_metric("nll").scorer_for(model)(model, tokenizer, examples, batch_size)


# ---------------------------------------------------------------- the evaluator (one per worker)
class HubEvaluator:
    """What each worker holds: the base with the live adapter, the pool, the examples.

    Built once per worker by `functools.partial(HubEvaluator, job, device)`."""

    def __init__(self, job: HubJob, device: str = "cpu") -> None:
        self.job = job
        self.tokenizer = load_tokenizer(job.base)
        self.model = load_base(job.base)
        self.live = LiveAdapter(self.model, load_pool(job.adapters), job.base)
        self.model.to(resolve_device(device))

    def evaluate(self, genome: dict[str, Any]) -> dict[str, Any]:
        """{"loss": CE on the examples, "penalty": l1 * mean |w|, "seconds"} of one weight vector."""
        start = time.perf_counter()
        weights = genome["weights"]
        self.live.set_weights(weights)
        loss = answer_loss(self.model, self.tokenizer, self.job.examples)
        penalty = self.job.spec.l1 * sum(abs(w) for w in weights) / len(weights)
        return {"loss": loss, "penalty": penalty, "seconds": time.perf_counter() - start}

    def scores(self, weights: Sequence[float]) -> Metrics:
        """The report split's metrics with `weights` composed, and the CE on the examples."""
        self.live.set_weights(weights)
        out = {"examples/nll": answer_loss(self.model, self.tokenizer, self.job.examples)}
        task = self.job.report
        if task is not None:
            for metric in self.job.metrics:
                out[f"{task.name}/{metric}"] = score(self.model, self.tokenizer, task, metric).value
        return out


# ---------------------------------------------------------------- the driver
@dataclass(frozen=True)
class Step:
    """One evaluated weight vector, as one line of `steps.jsonl`."""

    step: int
    weights: list[float]
    loss: float
    penalty: float
    total: float
    seconds: float
    worker: str


@dataclass(frozen=True)
class HubResult:
    out: Path
    best: Step
    weights: dict[str, float]  # adapter folder -> weight
    report: dict[str, Metrics]  # composed / base / uniform -> scores


def run_lorahub(job: HubJob, out: str | os.PathLike[str], *, overwrite: bool = False, device: str | None = None,
                workers: int | None = None, address: str | None = None, budget: int | None = None,
                progress: bool = True) -> HubResult:
    """Search the weights of `job`'s pool and write the composed adapter and its logs to `out`.

    `device`, `workers`, `address` and `budget` override the job's settings."""
    budget = budget if budget is not None else job.spec.optimizer.budget
    if budget < 1:
        raise RecipeError(f"--budget: must be at least 1, got {budget}")
    folder = OutputFolder(out, overwrite)
    pool = load_pool(job.adapters)  # 1) fail before any model is loaded
    spec = job.spec.workers
    device, count = device or spec.device, workers or spec.count
    partial_dir = folder.create()
    try:
        with WorkerPool(partial(HubEvaluator, job, device), count, device=device, address=address or spec.address) as workers_pool:
            steps = _search(job, workers_pool, partial_dir, count, budget, progress)
            best = min(steps, key=lambda s: (s.total, s.step))
            report = _report(workers_pool, best.weights, len(pool))
        weights = _write(job, pool, best, report, partial_dir)
        return HubResult(folder.commit(), best, weights, report)
    except BaseException:
        folder.discard()
        raise


def _search(job: HubJob, pool: WorkerPool, run_dir: Path, count: int, budget: int, progress: bool) -> list[Step]:
    """2-3) ask/tell from w = 0 over the workers; every step appended to `steps.jsonl` as it is told."""
    optimizer = _optimizer(job, count, budget)
    steps: list[Step] = []

    def record(done: Done, total: float) -> None:
        r = done.result
        step = Step(done.index, done.genome["weights"], r["loss"], r["penalty"], total, r["seconds"], done.worker)
        with open(run_dir / STEPS, "a") as fh:
            fh.write(json.dumps(asdict(step)) + "\n")
        steps.append(step)

    ask_tell(optimizer, pool, budget=budget, decode=lambda value: {"weights": [float(x) for x in value]},
             loss_of=_total, on_result=record, progress=progress, desc="lorahub")
    return steps


def _optimizer(job: HubJob, count: int, budget: int) -> Any:
    """The job's nevergrad optimizer over [low, high]^N, seeded; its first candidate is w = 0,
    then (with `singles`) each adapter alone at `high`."""
    import nevergrad as ng
    import numpy as np

    opt, n = job.spec.optimizer, len(job.adapters)
    space = ng.p.Array(init=np.zeros(n), lower=opt.low, upper=opt.high)
    space.random_state = np.random.RandomState(opt.seed)
    optimizer = make_optimizer(opt.name, opt.options, space, budget, count, str(job.path))
    starts = [np.zeros(n)]
    if opt.singles:  # each adapter alone at full strength: a foothold in every single-adapter basin
        starts += [np.where(np.arange(n) == i, opt.high, 0.0) for i in range(n)]
    for point in reversed(starts):  # nevergrad asks the last suggestion first
        optimizer.suggest(point)
    return optimizer


def _total(done: Done) -> float:
    """The loss told: CE + penalty, or WORST when CE is not finite."""
    total = done.result["loss"] + done.result["penalty"]
    return total if math.isfinite(total) else WORST


def _report(pool: WorkerPool, best: Sequence[float], n: int) -> dict[str, Metrics]:
    """4) the composed weights, the base (w = 0) and the uniform composition (w_i = 1/N), scored."""
    report = {who: pool.call("scores", list(w)) for who, w in
              (("composed", best), ("base", [0.0] * n), ("uniform", [1.0 / n] * n))}
    for who, metrics in report.items():
        log.info("report %-9s %s", who, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return report


def _write(job: HubJob, pool: list[LoraAdapter], best: Step, report: dict[str, Metrics], run_dir: Path) -> dict[str, float]:
    """4) the composed adapter, `weights.json` and `report.json` into the run folder."""
    save_adapter(compose_weights(pool, best.weights, job.base), run_dir)
    weights = {str(p): w for p, w in zip(job.adapters, best.weights)}
    (run_dir / WEIGHTS).write_text(json.dumps(weights, indent=2) + "\n")
    split = f"{job.report.name}/{job.report.split}" if job.report else None
    (run_dir / REPORT).write_text(json.dumps({"split": split, "n": len(job.report) if job.report else 0,
                                              "best_step": best.step, **report}, indent=2) + "\n")
    return weights
