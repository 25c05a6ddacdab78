"""The Ray backend of `WorkerPool`: one actor per worker, on this machine or a cluster.

Each actor builds its evaluator once; results are told as they arrive, so a slow candidate holds
back no other. An actor whose process dies (killed, out of memory, a lost node) is replaced and
its candidate goes back to the front of the queue for the next free worker; the search goes on.
An evaluator that cannot be built (a bad recipe, a missing file) fails the pool at once with its
own error. All Ray calls of mergelab are in this file.

Joining a cluster (`address` HOST:PORT) is checked first: nothing listening, or a head refusing this
machine's token (RAY_AUTH_MODE, RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token), is one `WorkerError` line
saying what to set, not Ray's 20 s of retries. Ray's own logs show only at DEBUG (`mergelab --debug`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from mergelab.blackbox.pool import Done, Evaluation, Evaluator, Genome, WorkerError

log = logging.getLogger(__name__)


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

    def evaluate(self, genome: Genome) -> Evaluation:
        return self.evaluator.evaluate(genome)

    def call(self, method: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        return method(self.evaluator, *args, **kwargs)


class RayBackend:
    """`count` actors; candidates go to free actors, results come back as they finish."""

    def __init__(self, factory: Callable[[], Evaluator], count: int, device: str, address: str | None,
                 max_deaths: int) -> None:
        import ray

        self.ray = ray
        self._owns_ray = not ray.is_initialized()  # then close() shuts it down, or its threads keep the process alive
        if self._owns_ray:
            _init(ray, address, count)
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
            raise WorkerError(f"a worker died while starting: {str(exc).splitlines()[0]}{_mode_hint()}") from None
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

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        actor = self._idle[0] if self._idle else next(iter(self._running.values()))[0]
        try:
            return self.ray.get(actor.call.remote(method, args, kwargs))
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


# ---------------------------------------------------------------- joining a cluster
GIVE_TOKEN = ("give this machine the cluster's token (`ray get-auth-token` on the head prints it) in "
              "~/.ray/auth_token, in a file named by RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN")


def _init(ray: Any, address: str | None, count: int) -> None:
    """Start Ray on this machine (`count` CPUs), or join the cluster at `address`; quiet unless DEBUG."""
    debug = log.isEnabledFor(logging.DEBUG)
    quiet = {"log_to_driver": debug, "logging_level": logging.INFO if debug else logging.ERROR}
    if not address:
        ray.init(num_cpus=count, include_dashboard=False, **quiet)
        return
    if "://" not in address and address != "auto":
        _check_join(ray, address)
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise _join_error(ray, address, exc) from exc


def _check_join(ray: Any, address: str) -> None:
    """Fail fast where Ray would retry for 20 s: nothing listening at `address`, or a refused token."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        raise WorkerError(f"the Ray address {address!r} is not HOST:PORT (the head's IP and the port of `ray start --head`)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise WorkerError(f"no Ray cluster answers at {address} ({exc}): start one there with `ray start --head "
                          f"--port {port}`, or give the head's IP:PORT") from None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and _token_source() is None:
        raise WorkerError(_token_advice(address))  # Ray's C++ client would end the process
    try:
        from ray._raylet import GcsClient  # the client ray.init itself makes first
    except ImportError:  # another Ray: ray.init's own error, mapped by _join_error
        return
    try:
        with _stderr_to_debug_log():  # Ray's C++ client logs the refusal once on fd 2
            GcsClient(address=address, cluster_id=None)
    except Exception as exc:  # noqa: BLE001 - anything but a refused token: ray.init tries and says
        if _refused(ray, exc):
            raise _join_error(ray, address, exc) from exc
        log.debug("probing the Ray cluster at %s: %s", address, exc)


def _refused(ray: Any, exc: BaseException) -> bool:
    """Whether Ray's token authentication is what failed, anywhere in `exc`'s chain."""
    return any(isinstance(c, getattr(ray.exceptions, "AuthenticationError", ())) for c in _chain(exc))


def _join_error(ray: Any, address: str, exc: BaseException) -> WorkerError:
    """One line for a failed join: what to set when the head wants a token, else Ray's first line."""
    if _refused(ray, exc):
        return WorkerError(_token_advice(address))
    innermost = list(_chain(exc))[-1]
    first = (str(innermost).strip().splitlines() or [type(innermost).__name__])[0][:300]
    return WorkerError(f"could not join the Ray cluster at {address}: {first}")


def _token_advice(address: str) -> str:
    """What to do about a token the head refused, from this machine's RAY_AUTH_* settings."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (f"the Ray cluster at {address} requires a token and RAY_AUTH_MODE is not 'token' here: export "
                f"RAY_AUTH_MODE=token and {GIVE_TOKEN}; or start the whole cluster with RAY_AUTH_MODE=disabled")
    source, named = _token_source(), os.environ.get("RAY_AUTH_TOKEN_PATH")
    if source is None:
        missing = f"RAY_AUTH_TOKEN_PATH={named} is missing or empty" if named else "this machine has no token"
        return f"cannot join the Ray cluster at {address}: RAY_AUTH_MODE is 'token' but {missing}: {GIVE_TOKEN}"
    return (f"the Ray cluster at {address} refused this machine's token (from {source}): use the head's "
            f"(`ray get-auth-token` on the head prints it)")


def _mode_hint() -> str:
    """A driver in token mode refuses a token-less cluster's calls: its actors die at once."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ""
    return (" (RAY_AUTH_MODE is 'token' here: if the cluster was started without token authentication, this "
            "machine refuses its calls; set the same RAY_AUTH_MODE on every machine)")


def _token_source() -> str | None:
    """Where Ray reads this machine's token, in Ray's order (None: nowhere)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named) if named else Path.home() / ".ray" / "auth_token"
    readable = path.is_file() and bool(path.read_text().strip())
    label = f"RAY_AUTH_TOKEN_PATH={named}" if named else "~/.ray/auth_token"
    return label if readable else None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then its cause (or context), and so on."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def _stderr_to_debug_log() -> Iterator[None]:
    """Send what is written on file descriptor 2 (C++ logs) to this module's DEBUG log instead."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines():
                log.debug("ray: %s", line)
