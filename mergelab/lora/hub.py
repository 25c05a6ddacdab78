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
    2) each worker (`blackbox.WorkerPool`: in this process, or Ray actors) builds a
       `HubEvaluator` once (`hub_evaluator.py`): the base model with ONE live PEFT LoRA adapter
       injected on the pool's modules (rank r, lora_alpha r, so scale 1)
    3) ask/tell (`blackbox.ask_tell`): a candidate's A and B are written into the live adapter's
       lora_A / lora_B in place (no reload, no re-wrapping) and CE is computed; one line per step
       in `steps.jsonl`. Step 0 is always w = 0 (the job's first start point, pushed to the
       optimizer by the factory, as not every optimizer starts at its init). Steps 1..N
       (`optimizer.singles`, on by default) are each adapter alone at `high`:
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
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mergelab.blackbox.loop import Loss, ask_tell
from mergelab.blackbox.optimizer import make_optimizer
from mergelab.blackbox.pool import Done, Metrics, WorkerPool
from mergelab.errors import RecipeError
from mergelab.lora.adapter import LoraAdapter, save_adapter
from mergelab.lora.hub_evaluator import CE, PENALTY, HubEvaluator, compose_weights, load_pool
from mergelab.lora.hub_job import HubJob
from mergelab.writer import OutputFolder

log = logging.getLogger(__name__)

STEPS, WEIGHTS, REPORT = "steps.jsonl", "weights.json", "report.json"


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
    budget = budget if budget is not None else job.optimizer.budget
    if budget < 1:
        raise RecipeError(f"budget={budget}: must be at least 1", arguments=("budget",))
    folder = OutputFolder(out, overwrite)
    pool = load_pool(job.adapters)  # 1) fail before any model is loaded
    spec = job.workers
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
    """2-3) ask/tell from the job's start points over the workers; every step appended to `steps.jsonl` as it is told."""
    optimizer = hub_optimizer(job, count, budget)
    steps: list[Step] = []

    def record(done: Done, loss: Loss) -> None:
        r = done.result
        step = Step(done.index, done.genome["weights"], r.metrics[CE], r.metrics[PENALTY], loss.value,
                    r.seconds["eval"], done.worker)
        with open(run_dir / STEPS, "a") as fh:
            fh.write(json.dumps(asdict(step)) + "\n")
        steps.append(step)

    ask_tell(optimizer, pool, budget=budget, decode=lambda value: {"weights": [float(x) for x in value]},
             loss_of=lambda done: done.result.metrics[CE] + done.result.metrics[PENALTY], on_result=record,
             progress=progress, desc="lorahub")
    return steps


def hub_optimizer(job: HubJob, count: int, budget: int) -> Any:
    """The job's nevergrad optimizer over [low, high]^N, seeded, its first candidates the job's start points."""
    import nevergrad as ng
    import numpy as np

    opt, n = job.optimizer, len(job.adapters)
    space = ng.p.Array(init=np.zeros(n), lower=opt.low, upper=opt.high)
    space.random_state = np.random.RandomState(opt.seed)
    return make_optimizer(opt.name, opt.options, space, budget, count, str(job.path),
                          suggestions=[np.array(p) for p in job.starts])


def _report(pool: WorkerPool[HubEvaluator], best: Sequence[float], n: int) -> dict[str, Metrics]:
    """4) the composed weights, the base (w = 0) and the uniform composition (w_i = 1/N), scored."""
    report = {who: pool.call(HubEvaluator.scores, list(w)) for who, w in
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
