"""The search layer on a toy evaluator (no model): the worker pool's results as they arrive, the
ask/tell loop and its worst-loss rule, a killed actor's candidate re-run on another worker, an
evaluator that cannot be built, the optimizer factory's start points."""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from mergelab.errors import RecipeError
from mergelab.blackbox.loop import WORST, ask_tell
from mergelab.blackbox.pool import LOCAL, Evaluation, WorkerPool


class Toy:
    """Loss (x - 0.3)^2 after `delay` seconds; with `die_on`, kills its own process on that x once."""

    def __init__(self, delay: float = 0.0, die_on: float | None = None, marker: str | None = None, fail: bool = False) -> None:
        if fail:
            raise RecipeError("toy.yaml: models[0]: folder not found")
        self.delay, self.die_on, self.marker = delay, die_on, marker

    def evaluate(self, genome: dict) -> Evaluation:
        x = genome["x"]
        if self.die_on is not None and x == self.die_on and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        return Evaluation({"loss": (x - 0.3) ** 2, "pid": os.getpid()})

    def double(self, v: float) -> float:
        return 2 * v


@pytest.fixture(scope="module")
def ray_local():
    """Ray on this machine, 2 CPUs, no dashboard; the toy evaluator pickled by value."""
    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _optimizer(budget: int, workers: int):
    import nevergrad as ng

    return ng.optimizers.registry["OnePlusOne"](parametrization=ng.p.Dict(x=ng.p.Scalar(init=0.0, lower=-1, upper=1)),
                                                budget=budget, num_workers=workers)


def _run(pool: WorkerPool, budget: int) -> list:
    out: list = []
    ask_tell(_optimizer(budget, pool.count), pool, budget=budget, decode=lambda v: {"x": float(v["x"])},
             loss_of=lambda d: d.result.metrics["loss"], on_result=lambda d, loss: out.append((d, loss.value)), progress=False)
    return out


def test_local_pool_runs_in_process_and_improves() -> None:
    with WorkerPool(Toy, 1) as pool:
        assert pool.call(Toy.double, 2.0) == 4.0
        done = _run(pool, 30)
    assert [d.index for d, _ in done] == list(range(30))
    assert {d.worker for d, _ in done} == {LOCAL} and {d.result.metrics["pid"] for d, _ in done} == {os.getpid()}
    assert min(loss for _, loss in done) < 0.09 / 4  # from x = 0 (loss 0.09) towards 0.3


def test_ray_pool_two_actors_share_the_work(ray_local) -> None:
    with WorkerPool(partial(Toy, 0.05), 2) as pool:
        done = _run(pool, 12)
        assert pool.call(Toy.double, 1.5) == 3.0
    assert sorted(d.index for d, _ in done) == list(range(12))
    assert len({d.worker for d, _ in done}) == 2 and os.getpid() not in {d.result.metrics["pid"] for d, _ in done}


def test_killed_actor_candidate_is_rerun_and_the_search_goes_on(ray_local, tmp_path: Path) -> None:
    marker = tmp_path / "died"
    with WorkerPool(partial(Toy, 0.05, 0.5, str(marker)), 2) as pool:
        pool.submit(0, {"x": 0.5})  # kills its worker the first time
        pool.submit(1, {"x": 0.1})
        done = sorted([pool.next_done(), pool.next_done()], key=lambda d: d.index)
        assert marker.exists() and [d.index for d in done] == [0, 1]
        dead_pid = int(marker.read_text())
        assert done[0].result.metrics["loss"] == pytest.approx(0.04) and done[0].result.metrics["pid"] != dead_pid
        assert len(pool._backend.pids) == 3  # two started, one replacement
        # and the ask/tell loop goes on on the replaced pool
        out = _run(pool, 6)
        assert len(out) == 6


def test_killing_an_actor_from_outside(ray_local) -> None:
    with WorkerPool(partial(Toy, 1.0), 2) as pool:
        pids = dict(pool._backend.pids)
        pool.submit(0, {"x": 0.2})
        pool.submit(1, {"x": 0.4})
        time.sleep(0.3)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        done = sorted([pool.next_done(), pool.next_done()], key=lambda d: d.index)
    assert [d.index for d in done] == [0, 1] and [round(d.result.metrics["loss"], 6) for d in done] == [0.01, 0.01]


def test_an_evaluator_that_cannot_be_built_fails_with_its_own_error(ray_local) -> None:
    with pytest.raises(RecipeError, match="toy.yaml: models"):
        WorkerPool(partial(Toy, fail=True), 2)
    with pytest.raises(RecipeError, match="toy.yaml: models"):
        WorkerPool(partial(Toy, fail=True), 1)


def test_ngopt_runs_its_whole_budget() -> None:
    """NGOpt switches to a meta-model after ~100 candidates; with numpy >= 2.4 nevergrad 1.0.12 crashes there."""
    import nevergrad as ng
    import numpy as np

    space = ng.p.Dict(**{f"x{i}": ng.p.Array(init=np.full(4, 0.5), lower=0, upper=1.5) for i in range(3)})
    optimizer = ng.optimizers.registry["NGOpt"](parametrization=space, budget=200, num_workers=2)
    with WorkerPool(Toy, 1) as pool:
        out: list = []
        ask_tell(optimizer, pool, budget=200, decode=lambda v: {"x": float(sum(a.sum() for a in v.values()) / 12)},
                 loss_of=lambda d: d.result.metrics["loss"], on_result=lambda d, loss: out.append(loss.value), progress=False)
    assert len(out) == 200 and min(out) < 1e-3


class Failing:
    """Every third candidate fails (an error), x > 0.5 has a NaN loss."""

    def __init__(self) -> None:
        self.n = 0

    def evaluate(self, genome: dict) -> Evaluation:
        self.n += 1
        if self.n % 3 == 0:
            return Evaluation({}, {}, "RuntimeError: boom")
        return Evaluation({"loss": float("nan") if genome["x"] > 0.5 else genome["x"] ** 2})


def test_failed_and_nan_candidates_are_told_worst_and_each_loss_is_computed_once() -> None:
    import nevergrad as ng

    calls: list[int] = []
    out: list = []

    def loss_of(d) -> float:
        calls.append(d.index)
        return d.result.metrics["loss"]

    optimizer = ng.optimizers.registry["RandomSearch"](parametrization=ng.p.Dict(x=ng.p.Scalar(init=0.0, lower=-1, upper=1)),
                                                      budget=12)
    with WorkerPool(Failing, 1) as pool:
        ask_tell(optimizer, pool, budget=12, decode=lambda v: {"x": float(v["x"])}, loss_of=loss_of,
                 on_result=lambda d, loss: out.append((d, loss)), progress=False, what="fitness")
    for d, loss in out:
        if d.result.error is not None:
            assert (loss.value, loss.error) == (WORST, "RuntimeError: boom")
        elif d.genome["x"] > 0.5:
            assert (loss.value, loss.error) == (WORST, "fitness is NaN")
        else:
            assert (loss.value, loss.error) == (d.genome["x"] ** 2, None)
    assert sum(d.result.error is not None for d, _ in out) == 4
    assert sorted(calls) == [d.index for d, _ in out if d.result.error is None]  # once each, failed ones never


def test_factory_pushes_start_points_asked_first_in_order() -> None:
    import nevergrad as ng
    import numpy as np

    from mergelab.blackbox.optimizer import make_optimizer

    space = ng.p.Array(init=np.zeros(3), lower=-1.5, upper=1.5)
    starts = [np.zeros(3), np.array([1.5, 0.0, 0.0]), np.array([0.0, 1.5, 0.0])]
    optimizer = make_optimizer("NGOpt", {}, space, 10, 1, suggestions=starts)
    asked = [optimizer.ask().value for _ in range(3)]
    assert all(np.array_equal(a, s) for a, s in zip(asked, starts, strict=True))
