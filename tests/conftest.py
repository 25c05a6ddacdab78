"""Shared pytest fixtures: tiny random-weight checkpoints and the reduced zoo, built in the test run."""

from __future__ import annotations

import os

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- the reduced zoo
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory):
    """The reduced zoo, built once per test session (about a minute on 2 cores).

    Set MERGELAB_TEST_ZOO=/some/dir to keep it between sessions: a complete zoo there is reused.
    """
    from mergelab.zoo import build_zoo

    where = os.environ.get("MERGELAB_TEST_ZOO")
    target = where if where else tmp_path_factory.mktemp("zoo") / "zoo"
    return build_zoo(target, seed=0, reduced=True, overwrite=True)  # a stale cached zoo (older plan) is rebuilt
