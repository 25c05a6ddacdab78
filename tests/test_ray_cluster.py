"""`mergelab search --address` on a real Ray cluster started with `ray start --head`, every
address on the loopback: the head's node address is 127.0.0.1, and so is the driver's (Ray
otherwise swaps 127.0.0.1 for the machine's interface address; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
makes its node-address lookup answer the loopback on Linux too, and keeps the cluster to this one
node). The head asks for a token (RAY_AUTH_MODE=token, the default for local clusters since Ray
2.59): a driver without it, or with another token, gets one line saying what to set and exit 2, in
well under Ray's 20 s of retries; with the head's token the search runs its candidates on the
cluster's worker.

The head runs in its own session and its own temp dir; teardown stops exactly that process group
(`ray stop` would stop every Ray process on the machine, other sessions' included).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from mergelab.blackbox import ray_pool
from mergelab.blackbox.pool import WorkerError, WorkerPool
from mergelab.evolve import loop
from tests.test_evolve_loop import catalog_job

slow = pytest.mark.slow  # the tests on a Ray head: 45-115 s together on 2 cores

RAY = Path(sys.executable).with_name("ray")
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's node address: 127.0.0.1, not the interface's
TOKEN = secrets.token_hex(32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**ray_auth: str) -> dict[str, str]:
    """This process's environment without any Ray setting, plus the loopback switch and `ray_auth`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **LOOPBACK, **ray_auth}


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the processes it started; then kill what is left of its group."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    try:
        os.killpg(head.pid, signal.SIGKILL)  # our own session (start_new_session): only what this test started
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def _head(**ray_auth: str) -> Iterator[str]:
    """A one-CPU head on 127.0.0.1 started with `ray_auth`; yields its address HOST:PORT."""
    temp = tempfile.mkdtemp(prefix="mlray", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    command = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
               "--dashboard-agent-listen-port", str(_free_port())]
    log = Path(temp) / "head.log"
    with log.open("wb") as out:
        head = subprocess.Popen(command, env=_env(**ray_auth), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def token_head() -> Iterator[str]:
    """A head that asks for TOKEN."""
    with _head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN) as address:
        yield address


def _search(job: Path, run: Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mergelab.cli", "-q", "search", str(job), "--out", str(run), "--workers", "1",
               "--address", address]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@slow
def test_a_driver_without_the_token_gets_one_line_and_exit_2(token_head: str, tmp_path: Path, zoo_dir: Path) -> None:
    job = catalog_job(tmp_path, zoo_dir, 3).path
    done = _search(job, tmp_path / "run", token_head, _env())
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr[-3000:]  # one line, no Ray log line
    assert done.stderr.startswith(f"mergelab: error: the Ray cluster at {token_head} requires a token and "
                                  "RAY_AUTH_MODE is not 'token' here: export RAY_AUTH_MODE=token and ")
    assert "RAY_AUTH_TOKEN_PATH" in done.stderr and "`ray get-auth-token`" in done.stderr
    assert not (tmp_path / "run" / loop.TRIALS).exists()


@slow
def test_a_driver_with_another_token_is_told_so(token_head: str, tmp_path: Path, zoo_dir: Path) -> None:
    job = catalog_job(tmp_path, zoo_dir, 3).path
    done = _search(job, tmp_path / "run", token_head, _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN[::-1]))
    assert done.returncode == 2 and done.stderr == (
        f"mergelab: error: the Ray cluster at {token_head} refused this machine's token "
        "(from RAY_AUTH_TOKEN): use the head's (`ray get-auth-token` on the head prints it)\n"), done.stderr[-3000:]


@slow
def test_with_the_token_the_candidates_run_on_the_cluster(token_head: str, tmp_path: Path, zoo_dir: Path) -> None:
    job = catalog_job(tmp_path, zoo_dir, 3).path
    done = _search(job, tmp_path / "run", token_head, _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN))
    assert done.returncode == 0, done.stderr[-3000:]
    trials = loop.read_trials(tmp_path / "run")
    # "w0" is the pool's first Ray actor (the in-process worker is "local"); the cluster has one CPU
    assert sorted(t.index for t in trials) == [0, 1, 2] and {t.worker for t in trials} == {"w0"}
    assert (tmp_path / "run" / loop.BEST).is_file()
    assert "Ray cluster" not in done.stderr and ".cc:" not in done.stderr, done.stderr  # Ray's Python and C++ logs


POOL = """import os, sys
from mergelab.blackbox.pool import WorkerError, WorkerPool
try:
    pool = WorkerPool(dict, 1, address=sys.argv[1])  # an actor holding a dict: joining and starting only
except WorkerError as exc:
    sys.exit(str(exc))
assert pool._backend.pids["w0"] != os.getpid()
pool.close()
"""


@slow
def test_without_token_authentication_on_both_sides_and_mixed(tmp_path: Path) -> None:
    """RAY_AUTH_MODE=disabled on the head and here: the worker starts. Token mode here only: this
    driver refuses the cluster's calls, its worker dies at once, and the error says to align the modes."""
    with _head(RAY_AUTH_MODE="disabled") as address:
        pool = [sys.executable, "-c", POOL, address]
        done = subprocess.run(pool, env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
        env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        done = subprocess.run(pool, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("a worker died while starting: "), done.stderr[-3000:]
    assert done.stderr.endswith("(RAY_AUTH_MODE is 'token' here: if the cluster was started without token "
                                "authentication, this machine refuses its calls; set the same RAY_AUTH_MODE on "
                                "every machine)\n"), done.stderr[-3000:]


# ---------------------------------------------------------------- no cluster needed (fast)
def test_nothing_listening_at_the_address_is_one_error_at_once() -> None:
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(WorkerError, match=rf"^no Ray cluster answers at {address} \(.*refused.*\): start one there"):
        WorkerPool(dict, 1, address=address)


def test_token_mode_without_a_readable_token_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray's own client would end the process here (a C++ check), so the pool says it first."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # something answers: the check goes on to the token
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(WorkerError, match=rf"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'} is missing or empty: give"):
            WorkerPool(dict, 1, address=address)
    finally:
        server.close()


class _FakeRay:
    """Records what `ray.init` is called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)


@pytest.mark.parametrize(("level", "to_driver", "ray_level"), [(logging.INFO, False, logging.ERROR),
                                                                (logging.DEBUG, True, logging.INFO)])
def test_ray_logs_reach_the_terminal_only_at_debug(level: int, to_driver: bool, ray_level: int) -> None:
    """At DEBUG (`mergelab --debug` sets the root logger's level) Ray logs and forwards its workers' output."""
    logger, fake = logging.getLogger("mergelab"), _FakeRay()
    before = logger.level
    logger.setLevel(level)
    try:
        ray_pool._init(fake, None, 2)
    finally:
        logger.setLevel(before)
    assert fake.calls == [{"num_cpus": 2, "include_dashboard": False, "log_to_driver": to_driver,
                           "logging_level": ray_level}]
