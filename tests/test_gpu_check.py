"""bench/gpu_check.sh --small: the GPU check's script runs end to end (here on the CPU) and prints its table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_small(tmp_path: Path) -> None:  # ~15 s on 2 cores: 7 merges of small shapes, each a fresh process
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORKDIR": str(tmp_path / "work")}
    env.pop("MERGEKIT", None)
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--small", "--budget", "300"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.strip() in res.stdout and (tmp_path / "out" / "log.txt").is_file()
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert rows[0] == "| case | wall s | peak RSS GB | x I/O floor | x mergekit --gpu-rich |"
    assert all(row.count("|") == 6 for row in rows)
    cases = [row.split("|")[1].strip() for row in rows[2:]]
    gpu = torch.cuda.is_available()
    assert cases[0].startswith("I/O floor") and "ties mergelab --device cpu" in cases and "linear mergelab --device cpu" in cases
    assert ("ties mergelab --device cuda" in cases) == gpu
    assert len(cases) == (8 if gpu else 7)
    assert all(float(row.split("|")[2]) > 0 for row in rows[2:])
    for check in ("ties: mergelab --device", "linear: mergelab --device", "dare_ties: seed 1 twice on"):
        assert any(line.startswith(f"- {check}") and line.endswith("bit-identical, every tensor") for line in report.splitlines())
    assert "DIFFERS" not in report
    assert ("no CUDA device: GPU cases skipped" in report) != gpu
    assert not any((tmp_path / "work").glob("outs"))  # merge outputs removed, fixtures kept (WORKDIR given)
