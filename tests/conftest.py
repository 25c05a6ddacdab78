"""Shared pytest fixtures: tiny random-weight checkpoints and the reduced zoo, built in the test run."""

from __future__ import annotations

import os

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
