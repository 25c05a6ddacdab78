"""The ask/tell loop every search of mergelab runs (nevergrad's interface over a `WorkerPool`).

    1) ask the optimizer for candidates while a worker is free (`decode` makes the genome)
    2) the next finished candidate: its loss, computed once (`loss_of`), or WORST when it failed
       or is not finite, so every optimizer can take it
    3) tell the optimizer, hand the candidate and its loss to `on_result` (the caller's log)

With several objectives (`objectives_of`), the optimizer is told the vector of their losses
(nevergrad's multi-objective mode); a failed candidate is WORST in each, and the scalar loss is
still computed for the log. Failures are told only once a candidate has succeeded: nevergrad
takes the bounds of its hypervolume from the first vectors it is told, and a first WORST would
fix them at 1e9, where the volumes of real candidates differ below float precision.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tqdm import tqdm

from mergelab.blackbox.pool import Done, Genome, WorkerPool

WORST = 1e9  # the loss of a failed candidate: finite, so every optimizer can take it


@dataclass(frozen=True)
class Loss:
    """The loss told for a candidate, and why it is WORST when it is (None: it is its own)."""

    value: float
    error: str | None = None
    values: dict[str, float] | None = None  # several objectives: each one's loss, as told


def told_losses(done: Done, loss: Loss, names: tuple[str, ...], objectives_of: Callable[[Done], Mapping[str, float]]) -> Loss:
    """`loss` with each objective's loss: WORST in every one when the candidate failed, or when one
    is not finite (then that is the error: "objective depth is NaN")."""
    if loss.error is None:
        values = dict(objectives_of(done))
        bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
        if not bad:
            return Loss(loss.value, None, values)
        name, v = bad[0]
        loss = Loss(WORST, f"objective {name} is {'NaN' if math.isnan(v) else v}")
    return Loss(loss.value, loss.error, {k: WORST for k in names})


def told_loss(done: Done, loss_of: Callable[[Done], float], what: str = "loss") -> Loss:
    """The loss of a finished candidate: WORST with the evaluator's error, or when `loss_of` is not
    finite (`what` names it in the error: "fitness is NaN")."""
    if done.result.error is not None:
        return Loss(WORST, done.result.error)
    value = loss_of(done)
    if not math.isfinite(value):
        return Loss(WORST, f"{what} is {'NaN' if math.isnan(value) else value}")
    return Loss(value)


def ask_tell(optimizer: Any, pool: WorkerPool, *, budget: int, decode: Callable[[Any], Genome],
             loss_of: Callable[[Done], float], on_result: Callable[[Done, Loss], None], first_index: int = 0,
             progress: bool = True, desc: str = "search", total: int | None = None, what: str = "loss",
             objectives: tuple[str, ...] = (), objectives_of: Callable[[Done], Mapping[str, float]] | None = None) -> None:
    """Evaluate `budget` candidates of `optimizer` on `pool`; each is told as soon as it is back.

    `decode` turns a candidate's value into the genome the workers get; `loss_of` turns a finished
    candidate into its loss (`told_loss` applies the worst-loss rule); `on_result` logs. With
    `objectives` (their names) `objectives_of` gives each one's loss, and their vector is told."""
    asked: dict[int, Any] = {}
    held: list[tuple[Any, list[float]]] = []  # several objectives: failures before the first success
    bounded = optimizer.num_tell > 0
    index, done = first_index, 0
    total = total if total is not None else budget
    bar = tqdm(total=total, initial=total - budget, disable=not progress, desc=desc, unit="candidate")
    best = float("inf")
    try:
        while done < budget:
            while pool.free > 0 and done + len(asked) < budget:  # 1)
                candidate = optimizer.ask()
                asked[index] = candidate
                pool.submit(index, decode(candidate.value))
                index += 1
            finished = pool.next_done()  # 2)
            loss = told_loss(finished, loss_of, what)
            if objectives and objectives_of is not None:
                loss = told_losses(finished, loss, objectives, objectives_of)
            vector = list(loss.values.values()) if loss.values else None
            candidate = asked.pop(finished.index)
            if vector is not None and loss.error is not None and not bounded:
                held.append((candidate, vector))  # 3) once a candidate has succeeded
            else:
                tell(optimizer, candidate, loss.value if vector is None else vector)  # 3)
                if vector is not None and not bounded:
                    bounded = True
                    for c, v in held:
                        tell(optimizer, c, v)
                    held.clear()
            on_result(finished, loss)
            done += 1
            best = min(best, loss.value)
            bar.set_postfix_str(f"best {best:.4g}", refresh=False)
            bar.update(1)
        for c, v in held:  # every candidate failed
            tell(optimizer, c, v)
    finally:
        bar.close()


def tell(optimizer: Any, candidate: Any, loss: float | list[float]) -> None:
    """Tell a scalar loss, or several objectives' losses (nevergrad scores the vector by the
    hypervolume it adds, infinite for a point worse than its first points in every objective; its
    warnings about that are its own bookkeeping, not the user's problem)."""
    if not isinstance(loss, list):
        optimizer.tell(candidate, loss)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(Updating fitness with inf|Clipping very high value inf)")
        optimizer.tell(candidate, loss)
