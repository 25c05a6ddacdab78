"""The streaming loop: for each planned tensor, read its sources -> merge -> sink.

Only the sources of the few tensors in flight are in memory (one job per worker thread, plus
one read ahead); peak memory is a few tensors, never a shard.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import torch
from tqdm import tqdm

from mergelab.errors import RecipeError
from mergelab.methods._cache import TensorCache
from mergelab.methods.base import MergeInputs
from mergelab.plan import Plan, Source, TensorJob
from mergelab.writer import Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecStats:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, checked to exist: `cpu`, `cuda`, `cuda:1`, `mps`."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"--device: unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RecipeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def read_sources(plan: Plan, job: TensorJob) -> dict[Source, torch.Tensor]:
    """Read each distinct source tensor of one job from disk (CPU)."""
    return {src: plan.checkpoints[src.model].read(src.name) for src in dict.fromkeys(job.sources)}


def merge_job(plan: Plan, job: TensorJob, tensors: dict[Source, torch.Tensor], device: torch.device, seed: int,
              cache: TensorCache | None = None) -> torch.Tensor:
    """Run the plan's method for one job; returns the output tensor (job dtype, on `device`).

    `cache`: what earlier merges of the same sources left for this tensor (a search's; see `methods/_cache.py`)."""
    if not job.mergeable:
        return tensors[job.inputs[0]]
    on_device = {s: _prepare(t, device, plan.load_dtype) for s, t in tensors.items()}
    if job.vocab is not None and plan.vocabulary is not None:  # embeddings/head rows in the output tokenizer's order
        on_device = plan.vocabulary.align(job.vocab, on_device)
    inputs = MergeInputs(
        name=job.name,
        tensors=[on_device[s] for s in job.inputs],
        base=on_device[job.base] if job.base is not None else None,
        params=list(job.params),
        options=job.options,
        seed=seed,
        out_dtype=job.dtype,
        generator_device=device,
        cache=cache,
        float32_arithmetic=plan.recipe.arithmetic == "float32",
    )
    return plan.method.merge(inputs).to(job.dtype)


def _prepare(t: torch.Tensor, device: torch.device, load_dtype: torch.dtype | None) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    # mergekit rounds inputs to the recipe's `dtype` before merging; so do we
    return t.to(load_dtype) if load_dtype is not None and t.is_floating_point() else t


@contextmanager
def single_threaded_ops(device: torch.device):
    """On CPU we parallelise over tensors (one job per worker thread), so each op runs on one
    thread: torch's own pool spinning against our workers, or any other load, made element-wise
    merges over 10x slower on a 2-core machine."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers(device: torch.device) -> int:
    """Jobs in flight at once: one per core (at most 4) on CPU; on GPU one, with one read ahead."""
    return max(1, min(4, os.cpu_count() or 1)) if device.type == "cpu" else 1


def execute(plan: Plan, sink: Sink, *, device: str | torch.device = "cpu", seed: int = 0, progress: bool = True,
            workers: int | None = None) -> ExecStats:
    """Merge every job of `plan` into `sink`, in plan order.

    Worker threads each read and merge one job (file reads and torch ops release the GIL);
    results are written in order, with at most `workers + 1` jobs in memory.
    """
    dev = resolve_device(device)
    n_workers = workers or default_workers(dev)
    start = time.perf_counter()
    read = written = 0
    bar = tqdm(total=len(plan.jobs), unit="tensor", disable=not progress, dynamic_ncols=True, desc="merging")

    def run(job: TensorJob) -> tuple[torch.Tensor, int]:
        tensors = read_sources(plan, job)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return merge_job(plan, job, tensors, dev, seed), nbytes

    jobs = iter(plan.jobs)
    with single_threaded_ops(dev), ThreadPoolExecutor(n_workers, thread_name_prefix="mergelab") as pool:
        pending: deque[tuple[TensorJob, Future]] = deque((job, pool.submit(run, job)) for job in islice(jobs, n_workers + 1))
        try:
            while pending:
                job, future = pending.popleft()
                out, nbytes = future.result()
                sink.write(job.name, out)
                del out
                read += nbytes
                written += job.nbytes
                pending.extend((j, pool.submit(run, j)) for j in islice(jobs, 1))
                bar.set_postfix_str(f"{read / 1e9 / max(time.perf_counter() - start, 1e-9):.2f} GB/s read", refresh=False)
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    bar.close()
    stats = ExecStats(len(plan.jobs), read, written, time.perf_counter() - start)
    log.info("merged %d tensors: read %.2f GB, wrote %.2f GB in %.1f s", stats.tensors, read / 1e9, written / 1e9, stats.seconds)
    return stats
