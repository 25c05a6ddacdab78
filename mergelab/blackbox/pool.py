"""Where candidates are evaluated: in this process, or by Ray actors on this machine or a cluster.

What a worker holds and does is the caller's: a picklable zero-argument `factory` builds an
evaluator once per worker (the source tensors and the live model of the merge search, the base
model and live adapter of LoraHub), and `evaluator.evaluate(genome) -> Evaluation` scores one
candidate. Any other method of the evaluator runs on one worker with `call`, passed as the
method itself (not its name), so a renamed method is a NameError where it is called:

    pool = WorkerPool(factory, count=2)                    # 1 worker and no address: this process, no Ray
    pool.submit(0, genome); done = pool.next_done()        # Done(index, genome, result, worker)
    pool.call(SearchEvaluator.score, genome, "select")     # evaluator.score(genome, "select") on one worker
    pool.close()

With Ray (`count > 1`, an `address`, or `RAY_ADDRESS`) each worker is an actor (`ray_pool.py`,
which holds every Ray call of mergelab).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from mergelab.errors import MergelabError

Genome = dict[str, Any]  # one candidate, as the workers get it and the logs hold it (JSON-friendly)
Metrics = dict[str, float]  # "task/metric" -> value
LOCAL = "local"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Evaluation:
    """What a worker sends back for one candidate: its scores, how long each stage took (seconds),
    and the error that stopped it (then `metrics` may be empty)."""

    metrics: Metrics
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Evaluator(Protocol):
    def evaluate(self, genome: Genome) -> Evaluation: ...


E = TypeVar("E", bound=Evaluator)


@dataclass(frozen=True)
class Done:
    """One evaluated candidate: its index, genome, the evaluator's result and who evaluated it."""

    index: int
    genome: Genome
    result: Evaluation
    worker: str


class WorkerError(MergelabError):
    """The workers could not be started or keep dying."""


class WorkerPool(Generic[E]):
    """`count` workers, each holding one evaluator built by `factory`."""

    def __init__(self, factory: Callable[[], E], count: int = 1, *, device: str = "cpu",
                 address: str | None = None, max_deaths: int | None = None) -> None:
        self.count = count
        address = address or os.environ.get("RAY_ADDRESS") or None
        if count == 1 and address is None:
            self._backend: _Backend = _Local(factory)
        else:
            from mergelab.blackbox.ray_pool import RayBackend

            self._backend = RayBackend(factory, count, device, address, max_deaths if max_deaths is not None else 2 * count)

    @property
    def free(self) -> int:
        """How many more candidates can be submitted without waiting."""
        return self._backend.free

    @property
    def pending(self) -> int:
        return self._backend.pending

    def submit(self, index: int, genome: Genome) -> None:
        self._backend.submit(index, genome)

    def next_done(self) -> Done:
        """The next candidate to finish (blocks); a dead worker's candidate is re-run first."""
        return self._backend.next_done()

    def call(self, method: Callable[Concatenate[E, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`method(evaluator, *args, **kwargs)` on one worker (the first alive), waited for."""
        return self._backend.call(method, *args, **kwargs)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> WorkerPool[E]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Backend(Protocol):
    free: int
    pending: int

    def submit(self, index: int, genome: Genome) -> None: ...
    def next_done(self) -> Done: ...
    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


class _Local:
    """One evaluator in this process: `submit` queues, `next_done` evaluates."""

    def __init__(self, factory: Callable[[], Evaluator]) -> None:
        self.evaluator = factory()
        self._queue: collections.deque[tuple[int, Genome]] = collections.deque()

    @property
    def free(self) -> int:
        return 1 - len(self._queue)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, index: int, genome: Genome) -> None:
        self._queue.append((index, genome))

    def next_done(self) -> Done:
        index, genome = self._queue.popleft()
        return Done(index, genome, self.evaluator.evaluate(genome), LOCAL)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return method(self.evaluator, *args, **kwargs)

    def close(self) -> None:
        close = getattr(self.evaluator, "close", None)
        if close is not None:
            close()
