"""Where candidates are evaluated: in this process, or by Ray actors on this machine or a cluster.

Every search in mergelab is the same loop (`ask_tell`): ask the nevergrad optimizer for a
candidate, hand it to a free worker, tell the optimizer its loss when it comes back. What a
worker holds and does is the caller's: a picklable zero-argument `factory` builds an evaluator
object once per worker (the source tensors and the live model of the recipe search, the base
model and live adapter of LoraHub), and `evaluate(genome) -> dict` scores one candidate.

    pool = WorkerPool(factory, count=2)            # 1 worker and no address: in this process, no Ray
    ask_tell(optimizer, pool, budget=64, decode=..., loss_of=..., on_result=...)
    pool.call("score", genome, "select")           # any other method of the evaluator, on one worker
    pool.close()

With Ray (`count > 1`, an `address`, or `RAY_ADDRESS`), each worker is an actor that builds its
evaluator once; results are told as they arrive, so a slow candidate holds back no other. An
actor whose process dies (killed, out of memory, a lost node) is replaced and its candidate goes
back to the front of the queue for the next free worker; the search goes on. An evaluator that
cannot be built (a bad recipe, a missing file) fails the pool at once with its own error.
All Ray calls of mergelab are in this file.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tqdm import tqdm

from mergelab.errors import MergelabError

log = logging.getLogger(__name__)

Genome = dict[str, Any]
Result = dict[str, Any]
LOCAL = "local"


class Evaluator(Protocol):
    def evaluate(self, genome: Genome) -> Result: ...


@dataclass(frozen=True)
class Done:
    """One evaluated candidate: its index, genome, the evaluator's result and who evaluated it."""

    index: int
    genome: Genome
    result: Result
    worker: str


class WorkerError(MergelabError):
    """The workers could not be started or keep dying."""


# ---------------------------------------------------------------- the pool
class WorkerPool:
    """`count` workers, each holding one evaluator built by `factory`."""

    def __init__(self, factory: Callable[[], Evaluator], count: int = 1, *, device: str = "cpu",
                 address: str | None = None, max_deaths: int | None = None) -> None:
        self.count = count
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._backend: _Backend = (_Local(factory) if count == 1 and address is None
                                   else _Ray(factory, count, device, address, max_deaths if max_deaths is not None else 2 * count))

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

    def call(self, method: str, *args: Any) -> Any:
        """`evaluator.method(*args)` on one worker (the first alive), waited for."""
        return self._backend.call(method, *args)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Backend(Protocol):
    free: int
    pending: int

    def submit(self, index: int, genome: Genome) -> None: ...
    def next_done(self) -> Done: ...
    def call(self, method: str, *args: Any) -> Any: ...
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

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.evaluator, method)(*args)

    def close(self) -> None:
        close = getattr(self.evaluator, "close", None)
        if close is not None:
            close()


class _Actor:
    """The Ray actor: builds the evaluator once, then evaluates what it is sent (one at a time)."""

    def __init__(self, factory: Callable[[], Evaluator], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # one core per worker: more threads only contend
        self._error: BaseException | None = None
        try:
            self.evaluator = factory()
        except Exception as exc:  # noqa: BLE001 - reported by ready(), with its own type and message
            self._error = exc

    def ready(self) -> int:
        if self._error is not None:
            raise self._error
        return os.getpid()

    def evaluate(self, genome: Genome) -> Result:
        return self.evaluator.evaluate(genome)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.evaluator, method)(*args)


class _Ray:
    """`count` actors; candidates go to free actors, results come back as they finish."""

    def __init__(self, factory: Callable[[], Evaluator], count: int, device: str, address: str | None,
                 max_deaths: int) -> None:
        import ray

        self.ray = ray
        self._owns_ray = not ray.is_initialized()  # then close() shuts it down, or its threads keep the process alive
        if self._owns_ray:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=count, include_dashboard=False, log_to_driver=False)
        self._factory, self._max_deaths = factory, max_deaths
        self._gpus = _gpus_per_worker(ray, device, count)
        self._deaths = 0
        self._serial = 0
        self._idle: collections.deque[Any] = collections.deque()
        self._names: dict[Any, str] = {}
        self._queue: collections.deque[tuple[int, Genome]] = collections.deque()
        self._running: dict[Any, tuple[Any, int, Genome]] = {}  # object ref -> (actor, index, genome)
        self.pids: dict[str, int] = {}  # worker name -> its process id
        self._start([self._new_actor() for _ in range(count)])

    # ------------------------------------------------------------ actors
    def _new_actor(self) -> Any:
        name = f"w{self._serial}"
        self._serial += 1
        options = {"num_cpus": 1, "num_gpus": self._gpus, "max_restarts": 0}
        actor = self.ray.remote(_Actor).options(**options).remote(self._factory, 1)
        self._names[actor] = name
        return actor

    def _start(self, actors: list[Any]) -> None:
        """Wait until the actors have built their evaluators, then make them idle; an evaluator's
        own error is raised as is."""
        try:
            pids = self.ray.get([a.ready.remote() for a in actors])
        except self.ray.exceptions.RayTaskError as exc:
            self._kill(actors)
            raise _cause(exc) from None
        except self.ray.exceptions.RayActorError as exc:
            self._kill(actors)
            raise WorkerError(f"a worker died while starting: {str(exc).splitlines()[0]}") from None
        self.pids.update({self._names[a]: pid for a, pid in zip(actors, pids)})
        self._idle.extend(actors)

    def _kill(self, actors: list[Any]) -> None:
        for a in actors:
            self.ray.kill(a, no_restart=True)

    # ------------------------------------------------------------ candidates
    @property
    def free(self) -> int:
        return len(self._idle) - len(self._queue)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._running)

    def submit(self, index: int, genome: Genome) -> None:
        self._queue.append((index, genome))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.popleft()
            index, genome = self._queue.popleft()
            self._running[actor.evaluate.remote(genome)] = (actor, index, genome)

    def next_done(self) -> Done:
        while True:
            if not self._running:
                raise WorkerError("no candidate is running")
            [ref], _ = self.ray.wait(list(self._running), num_returns=1)
            actor, index, genome = self._running.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                self._replace(actor, index, genome, exc)
                continue
            except self.ray.exceptions.RayTaskError as exc:
                self._idle.append(actor)
                self._dispatch()
                raise _cause(exc) from None
            self._idle.append(actor)
            self._dispatch()
            return Done(index, genome, result, self._names[actor])

    def _replace(self, actor: Any, index: int, genome: Genome, exc: BaseException) -> None:
        """A dead worker: its candidate goes first in the queue, a new worker takes its place."""
        self._deaths += 1
        name = self._names.pop(actor)
        log.warning("worker %s died while evaluating candidate %d (%s); re-running it on another worker",
                    name, index, str(exc).splitlines()[0][:200])
        if self._deaths > self._max_deaths:
            raise WorkerError(f"{self._deaths} workers died (the last on candidate {index}); giving up")
        self._queue.appendleft((index, genome))
        self._start([self._new_actor()])
        self._dispatch()

    def call(self, method: str, *args: Any) -> Any:
        actor = self._idle[0] if self._idle else next(iter(self._running.values()))[0]
        try:
            return self.ray.get(actor.call.remote(method, *args))
        except self.ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None

    def close(self) -> None:
        self._kill(list(self._names))
        self._names.clear()
        if self._owns_ray:
            self.ray.shutdown()


def _cause(exc: Any) -> BaseException:
    """The evaluator's own exception inside a Ray task error (its type and message), when there is one."""
    return exc.cause if isinstance(exc.cause, BaseException) else exc


def _gpus_per_worker(ray: Any, device: str, count: int) -> float:
    """A CUDA device: the cluster's GPUs shared evenly (several workers may share one GPU)."""
    if not device.startswith("cuda"):
        return 0.0
    total = ray.cluster_resources().get("GPU", 0)
    if not total:
        raise WorkerError(f"workers.device is {device} but the Ray cluster has no GPU")
    return min(1.0, total / count)


# ---------------------------------------------------------------- the loop
def ask_tell(optimizer: Any, pool: WorkerPool, *, budget: int, decode: Callable[[Any], Genome],
             loss_of: Callable[[Done], float], on_result: Callable[[Done, float], None], first_index: int = 0,
             progress: bool = True, desc: str = "search", total: int | None = None) -> None:
    """Evaluate `budget` candidates of `optimizer` on `pool`; each is told as soon as it is back.

    `decode` turns a candidate's value into the genome the workers get; `loss_of` turns a result
    into the loss told (finite: failed candidates must get a worst value); `on_result` logs."""
    asked: dict[int, Any] = {}
    index, done = first_index, 0
    total = total if total is not None else budget
    bar = tqdm(total=total, initial=total - budget, disable=not progress, desc=desc, unit="candidate")
    best = float("inf")
    try:
        while done < budget:
            while pool.free > 0 and done + len(asked) < budget:
                candidate = optimizer.ask()
                asked[index] = candidate
                pool.submit(index, decode(candidate.value))
                index += 1
            finished = pool.next_done()
            loss = loss_of(finished)
            optimizer.tell(asked.pop(finished.index), loss)
            on_result(finished, loss)
            done += 1
            best = min(best, loss)
            bar.set_postfix_str(f"best {best:.4g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
