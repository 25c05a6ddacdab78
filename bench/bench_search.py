"""Candidates per minute of a search job: 1 and 2 workers, against the naive way.

    python bench/bench_search.py search/evolve_ties_zoo.yaml --candidates 40

The same random genomes of the job's space are evaluated (fitness split, the job's terms) by
    naive      `mergelab.merge` to a folder, `from_pretrained` with transformers, score
    1 worker   the in-process worker: the live model of `mergelab/evolve` (merge in memory)
    2 workers  two Ray actors, each with its own live model, results as they arrive
Start-up (Ray, reading the sources, building the live model) is timed apart from the candidates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def genomes(space, n: int, seed: int) -> list[dict]:
    param = space.parametrization(seed=seed)
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        child = param.spawn_child()
        child.set_standardized_data(rng.normal(size=param.dimension))
        out.append(space.from_ng(child.value))
    return out


def pooled(job, gs: list[dict], count: int) -> tuple[float, float, list[dict]]:
    from mergelab.blackbox.pool import WorkerPool
    from mergelab.evolve.evaluator import SearchEvaluator

    start = time.perf_counter()
    with WorkerPool(partial(SearchEvaluator, job, "cpu"), count) as pool:
        setup = time.perf_counter() - start
        start = time.perf_counter()
        results = []
        for i, g in enumerate(gs):
            if pool.free <= 0:
                results.append(pool.next_done().result)
            pool.submit(i, g)
        while pool.pending:
            results.append(pool.next_done().result)
        return setup, time.perf_counter() - start, results


def naive(job, gs: list[dict]) -> float:
    from transformers import AutoModelForCausalLM

    from mergelab.eval import load_tokenizer
    from mergelab.evolve.scoring import measure, term_data
    from mergelab.merging import merge

    space, terms = job.space, term_data(job.fitness, "fitness")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, g in enumerate(gs):
            recipe = Path(tmp) / f"c{i}.yaml"
            recipe.write_text(space.to_recipe(g).to_yaml(absolute_paths=True))
            out = merge(recipe, Path(tmp) / f"c{i}", progress=False)
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            measure(model, load_tokenizer(out), terms)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="search job YAML")
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--naive", type=int, default=10, help="candidates for the naive way (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import ray

    from mergelab.evolve.job import load_job

    torch.set_num_threads(1)  # as each worker; the 2-worker run uses both cores
    job = load_job(args.job)
    gs = genomes(job.space, args.candidates, args.seed)
    rows = []
    naive_s = naive(job, gs[: args.naive])
    rows.append(("naive: merge to disk, from_pretrained, score", None, args.naive * 60 / naive_s))
    setup1, s1, res = pooled(job, gs, 1)
    rows.append(("1 worker (in process, live model)", setup1, len(gs) * 60 / s1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    setup2, s2, _ = pooled(job, gs, 2)
    ray.shutdown()
    rows.append(("2 workers (Ray actors)", setup2, len(gs) * 60 / s2))
    split = {k: statistics.median(r.seconds[k] for r in res if r.error is None) for k in ("merge", "load", "eval")}
    print(f"job {args.job}: {args.candidates} candidates ({args.naive} naive), {sys.platform}, {torch.get_num_threads()} thread(s) each")
    print("| mode | start-up s | candidates / min | vs naive |\n|---|---|---|---|")
    base = rows[0][2]
    for name, setup, rate in rows:
        print(f"| {name} | {'-' if setup is None else f'{setup:.1f}'} | {rate:.0f} | {rate / base:.1f}x |")
    print("per candidate, 1 worker (median s): " + ", ".join(f"{k} {v:.4f}" for k, v in split.items()))


if __name__ == "__main__":
    main()
