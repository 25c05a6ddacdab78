"""Evaluation speed: scoring 200 examples of one zoo skill on a zoo model held in memory.

    python bench/bench_eval.py [--zoo zoo] [--model experts/back] [--skill back] [--n 200] [--repeats 5]

Builds the zoo first if `--zoo` holds none (full build, minutes). Times, after one warm-up
call each, the median of `--repeats` calls of:

- `nll`      : mean answer NLL, one teacher-forced forward pass (the search's fitness signal);
- `accuracy` : greedy decoding with a KV cache, exact match;
- `lm-eval`  : the same exact match through lm-eval's HFLM wrapper and a local task YAML.

and prints a markdown table (seconds, examples per second, the scores).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mergelab.eval import Score, lm_eval_score, load_model, load_task, score, zoo_task_folder
from mergelab.zoo import build_zoo


def median_seconds(run: Callable[[], Score], repeats: int) -> tuple[float, Score]:
    """Median wall time of `repeats` calls after one warm-up call, and the last result."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--model", default="experts/back", help="model folder inside the zoo")
    parser.add_argument("--skill", default="back")
    parser.add_argument("--n", type=int, default=200, help="examples scored per call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    build_zoo(args.zoo)
    model, tok = load_model(args.zoo / args.model)
    task = load_task(args.zoo, args.skill, "test", limit=args.n)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = zoo_task_folder(args.zoo, args.skill, tmp)
        for name, run in (
            ("nll", lambda: score(model, tok, task, "nll")),
            ("accuracy", lambda: score(model, tok, task, "accuracy")),
            ("lm-eval", lambda: lm_eval_score(model, tok, folder, limit=args.n)),
        ):
            seconds, result = median_seconds(run, args.repeats)
            rows.append((name, seconds, result))
    print(f"\n{args.model} ({params / 1e6:.2f}M parameters) on {args.n} `{args.skill}` test examples, "
          f"torch threads={torch.get_num_threads()}, median of {args.repeats}\n")  # fmt: skip
    print("| scorer | seconds | examples/s | score |")
    print("|---|---|---|---|")
    for name, seconds, result in rows:
        print(f"| {name} | {seconds:.3f} | {args.n / seconds:,.0f} | {result.metric}={result.value:.4f} |")


if __name__ == "__main__":
    main()
