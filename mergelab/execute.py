"""The streaming loop: for each planned tensor, read its sources -> merge -> sink.

Only the sources of the few tensors in flight are in memory (one piece per worker thread, plus
one read ahead), and a memory budget (`--memory`) bounds them: a tensor larger than its share is
merged in blocks of flat elements, each read from disk as a byte range (`Checkpoint.read_range`)
and written as a part of the output tensor. A method that needs a quantity of the whole tensor (a
top-k threshold, a norm) finds it first in passes over the blocks (`MergeMethod.block_stats`);
the result is the same, bit for bit, as merging the tensor whole. Peak memory is the budget plus
the runtime, whatever the size of the largest tensor, except for the methods that cannot be split
(`MergeMethod.blockwise`), which are warned about.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from mergelab.device import resolve_device
from mergelab.methods._cache import TensorCache
from mergelab.methods.base import MergeInputs
from mergelab.plan import Plan, Source, TensorJob
from mergelab.writer import Sink

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 10**9  # bytes of tensors in flight (`--memory`): the sources, temporaries and results being merged
BLOCK_ALIGN = 1 << 20  # elements: blocks of a tensor are multiples of this


@dataclass(frozen=True)
class ExecStats:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float


def read_sources(plan: Plan, job: TensorJob) -> dict[Source, torch.Tensor]:
    """Read each distinct source tensor of one job from disk (CPU)."""
    return {src: plan.checkpoints[src.model].read(src.name) for src in dict.fromkeys(job.sources)}


def read_block(plan: Plan, job: TensorJob, start: int, stop: int) -> dict[Source, torch.Tensor]:
    """Flat elements [start, stop) of each distinct source tensor of one job (CPU)."""
    return {src: plan.checkpoints[src.model].read_range(src.name, start, stop) for src in dict.fromkeys(job.sources)}


def merge_job(plan: Plan, job: TensorJob, tensors: dict[Source, torch.Tensor], device: torch.device, seed: int,
              cache: TensorCache | None = None, block: Block | None = None) -> torch.Tensor:
    """Run the plan's method for one job; returns the output tensor (job dtype, on `device`).

    `cache`: what earlier merges of the same sources left for this tensor (a search's; see `methods/_cache.py`).
    `block`: `tensors` are that block of flat elements (then so is the result), with the method's `block_stats`."""
    if not job.mergeable:
        return tensors[job.inputs[0]]
    on_device = {s: prepare(t, device, plan.load_dtype) for s, t in tensors.items()}
    if job.vocab is not None and plan.vocabulary is not None:  # embeddings/head rows in the output tokenizer's order
        on_device = plan.vocabulary.align(job.vocab, on_device)
    inputs = job_inputs(plan, job, on_device, device, seed, cache)
    if block is not None:
        inputs.offset, inputs.numel, inputs.stats = block.start, math.prod(job.shape), block.stats
    return plan.method.merge(inputs).to(job.dtype)


def job_inputs(plan: Plan, job: TensorJob, on_device: dict[Source, torch.Tensor], device: torch.device, seed: int,
               cache: TensorCache | None = None) -> MergeInputs:
    """The method's view of one job (`on_device`: its source tensors, or blocks of them, ready for the math)."""
    return MergeInputs(
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


def prepare(t: torch.Tensor, device: torch.device, load_dtype: torch.dtype | None) -> torch.Tensor:
    """A source tensor on `device`, rounded to the recipe's `dtype` (None: as stored)."""
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


@dataclass(frozen=True)
class Block:
    """Flat elements [start, stop) of a job's tensor, and what the method's `block_stats` found of the whole."""

    start: int
    stop: int
    stats: Any = None


@dataclass
class _Piece:
    """One unit of work in the loop: a whole job, its stats pass, or one block; `run` returns (tensor or None, bytes read)."""

    job: TensorJob
    run: Callable[[], tuple[torch.Tensor | None, int]]
    nbytes: int  # estimated memory while it runs
    part: bool = False  # a block: written as a part of the job's tensor
    last: bool = True  # the whole job, or its last block


def bytes_per_element(plan: Plan, job: TensorJob) -> int:
    """Estimated bytes a merge holds per element of the tensor: the sources as read and as computed on, the
    methods' full-size temporaries (magnitudes, keys, masks: about 8 per input) and the result."""
    read = sum(plan.checkpoints[s.model].info(s.name).dtype.itemsize for s in dict.fromkeys(job.sources))
    return read + 4 * len(job.inputs) + 2 * job.dtype.itemsize + 4


def block_elements(plan: Plan, job: TensorJob, budget: int, in_flight: int) -> int:
    """Elements per block so that `in_flight` blocks fit in `budget` bytes: a multiple of BLOCK_ALIGN (at least one),
    so blocks start where mergekit's 1M-element chunks do (slerp's norms) and on SIMD-vector boundaries."""
    per_block = budget // (in_flight * bytes_per_element(plan, job))
    return max(BLOCK_ALIGN, per_block // BLOCK_ALIGN * BLOCK_ALIGN)


def _blockwise(plan: Plan, job: TensorJob, sink: Sink) -> bool:
    """The job may run block by block: the sink takes parts, every source reads ranges, the method allows it."""
    if job.vocab is not None or not hasattr(sink, "write_part") or not all(plan.checkpoints[s.model].ranged(s.name) for s in job.sources):
        return False
    return not job.mergeable or plan.method.blockwise(list(job.params), job.options)


def _passes(plan: Plan, job: TensorJob) -> bool:
    """Merging the job in blocks takes passes over the whole tensor first (read again, and for TIES over
    bf16 a sort of the whole magnitudes anyway): done only for a tensor that does not fit the budget whole."""
    return job.mergeable and plan.method.block_passes(list(job.params), job.options)


def _pieces(plan: Plan, sink: Sink, dev: torch.device, seed: int, budget: int | None, in_flight: int) -> Iterator[_Piece]:
    """The loop's work, in write order: a job whole when it fits one block, or the budget if splitting it
    takes passes over it (or it cannot be split), else a stats pass (in one worker) and the blocks (each
    waiting for the stats)."""
    pool_stats = ThreadPoolExecutor(1, thread_name_prefix="mergelab-stats")  # passes never wait for the blocks' pool
    try:
        for job in plan.jobs:
            n = math.prod(job.shape)
            size = n * bytes_per_element(plan, job)
            step = block_elements(plan, job, budget, in_flight) if budget is not None else n
            if n <= step or not _blockwise(plan, job, sink) or (size <= budget and _passes(plan, job)):
                if budget is not None and size > budget:
                    log.warning("tensor '%s': %s needs it whole: ~%.1f GB in memory, beyond --memory %.1f GB",
                                job.name, plan.method.name if job.mergeable else "copying", size / 1e9, budget / 1e9)
                yield _Piece(job, partial(_run_whole, plan, job, dev, seed), size)
                continue
            stats = pool_stats.submit(_run_stats, plan, job, dev, seed, step, budget)
            for start in range(0, n, step):
                stop = min(start + step, n)
                yield _Piece(job, partial(_run_block, plan, job, dev, seed, start, stop, stats),
                             (stop - start) * bytes_per_element(plan, job), part=True, last=stop == n)
    finally:
        pool_stats.shutdown(wait=False, cancel_futures=True)


def _run_whole(plan: Plan, job: TensorJob, dev: torch.device, seed: int) -> tuple[torch.Tensor, int]:
    tensors = read_sources(plan, job)
    return merge_job(plan, job, tensors, dev, seed), sum(t.numel() * t.element_size() for t in tensors.values())


def _run_block(plan: Plan, job: TensorJob, dev: torch.device, seed: int, start: int, stop: int,
               stats: Future) -> tuple[torch.Tensor, int]:
    block = Block(start, stop, stats.result())
    tensors = read_block(plan, job, start, stop)
    return merge_job(plan, job, tensors, dev, seed, block=block), sum(t.numel() * t.element_size() for t in tensors.values())


def _run_stats(plan: Plan, job: TensorJob, dev: torch.device, seed: int, step: int, budget: int) -> Any:
    """The method's passes over the job's blocks (None for element-wise methods: no pass)."""
    if not job.mergeable:
        return None
    n = math.prod(job.shape)

    def blocks() -> Iterator[MergeInputs]:
        for start in range(0, n, step):
            tensors = read_block(plan, job, start, min(start + step, n))
            inputs = job_inputs(plan, job, {s: prepare(t, dev, plan.load_dtype) for s, t in tensors.items()}, dev, seed)
            inputs.offset, inputs.numel = start, n
            yield inputs

    header = job_inputs(plan, job, {s: torch.empty(0, device=dev) for s in job.sources}, dev, seed)
    header.numel = n
    return plan.method.block_stats(header, blocks, budget)


def execute(plan: Plan, sink: Sink, *, device: str | torch.device = "cpu", seed: int = 0, progress: bool = True,
            workers: int | None = None, memory: int | None = DEFAULT_MEMORY) -> ExecStats:
    """Merge every job of `plan` into `sink`, in plan order.

    Worker threads each read and merge one piece (file reads and torch ops release the GIL); results
    are written in order, with at most `workers + 1` pieces in memory. `memory` (bytes; None: no limit)
    bounds what they hold: a tensor larger than its share is merged in blocks of flat elements, when
    the sink takes parts and the method allows it (`MergeMethod.blockwise`; with passes over the
    tensor, `MergeMethod.block_passes`, only one larger than the whole budget); pieces run together
    while their estimates fit the budget, and one that exceeds it runs alone.
    """
    dev = resolve_device(device)
    n_workers = workers or default_workers(dev)
    in_flight = n_workers + 3  # running, read ahead, the one being written, and a stats pass
    start = time.perf_counter()
    read = written = 0
    bar = tqdm(total=len(plan.jobs), unit="tensor", disable=not progress, dynamic_ncols=True, desc="merging")
    pieces = _pieces(plan, sink, dev, seed, memory, in_flight)
    with single_threaded_ops(dev), ThreadPoolExecutor(n_workers, thread_name_prefix="mergelab") as pool:
        pending: deque[tuple[_Piece, Future]] = deque()
        held = next(pieces, None)
        try:
            while held is not None or pending:
                # top up while the pieces' estimates fit the budget together: a larger one runs alone
                while held is not None and _admit(held, [p for p, _ in pending], n_workers, memory):
                    pending.append((held, pool.submit(held.run)))
                    held = next(pieces, None)
                piece, future = pending.popleft()
                out, nbytes = future.result()
                if piece.part:
                    sink.write_part(piece.job.name, out)  # type: ignore[attr-defined]
                else:
                    sink.write(piece.job.name, out)
                del out
                read += nbytes
                if piece.last:
                    written += piece.job.nbytes
                    bar.update(1)
                bar.set_postfix_str(f"{read / 1e9 / max(time.perf_counter() - start, 1e-9):.2f} GB/s read", refresh=False)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pieces.close()
    bar.close()
    stats = ExecStats(len(plan.jobs), read, written, time.perf_counter() - start)
    log.info("merged %d tensors: read %.2f GB, wrote %.2f GB in %.1f s", stats.tensors, read / 1e9, written / 1e9, stats.seconds)
    return stats


def _admit(piece: _Piece, pending: list[_Piece], n_workers: int, budget: int | None) -> bool:
    """Start `piece` now: the pipeline is empty, or has room and the estimates of all fit the budget."""
    if not pending:
        return True
    fits = budget is None or piece.nbytes + sum(p.nbytes for p in pending) <= budget
    return len(pending) <= n_workers and fits
