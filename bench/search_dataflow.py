"""Parameter search, data-flow search, and parameter then data-flow, at equal candidate budget.

    python bench/search_dataflow.py                       # zoo seeds 0 1 2, 100 candidates per row
    python bench/search_dataflow.py --reduced --zoo-seeds 0 --budget 20   # a quick look
    python bench/search_dataflow.py --deep                # the deep zoo (8 layers), in bench/zoos-deep/seed-N

On each zoo seed (built or reused in `--zoos`/seed-N, as `bench/search_quality.py` does):
    parameter           `search/evolve.yaml` as it is (the default search), `--budget` candidates
    data-flow           `search/dataflow.yaml` as it is, `--budget` candidates
    parameter+data-flow `search/evolve.yaml` with half the budget, then `search/dataflow.yaml` with
                        its best.yaml as the first source (the start: that merge itself) and the
                        other half
It prints mean +- sd over the zoo seeds (and `--search-seeds`) of the mean test accuracy over the
expert skills, beside the best hand-set merge and the best expert (zoo.json), with the found
model's depth, how many distinct layer routes the data-flow search tried, the seconds per search (one process, one thread each; `--jobs` at once), and
the median seconds per candidate: merge + load (parameter) or plan + assemble (data-flow), eval,
and candidates per minute (merging or assembling, and scoring, one core). `--rows` adds what
else was tried: `data-flow+racing` (fitness.racing: first 0.25, keep 0.5, warmup 8) and
`upscale` (`--budget` parameter candidates, then `--budget` data-flow candidates over that merge
alone, its layers repeatable); `--optimizer` sets the data-flow searches' optimizer.
`search/dataflow.yaml`'s depth bound is set for the 4-layer zoo (max_layers 8: twice a source's
depth); on a zoo of other depth it is scaled to the same ratio (16 on the deep zoo), repeats kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from search_quality import _beside_zoo, _fmt, _mean, hand_set

from mergelab.evolve.report import STAGES

ROOT = Path(__file__).resolve().parents[1]
PARAM_JOB = ROOT / "search" / "evolve.yaml"
FLOW_JOB = ROOT / "search" / "dataflow.yaml"
FLOW_JOB_DEPTH = 4  # the depth of the zoo models search/dataflow.yaml's max_layers is set for
ROWS = ("parameter", "data-flow", "parameter+data-flow")  # the comparison at equal budget (the default)
MORE = ("data-flow+racing", "upscale")  # what else was tried (--rows)


def _search(template: Path, where: Path, zoo: Path, budget: int, seed: int, first_source: Path | None = None,
            only_source: bool = False, racing: bool = False, optimizer: str | None = None):
    """Run one job of `template` (beside a link to `zoo`) with `budget` candidates; the result and its trials.

    Data-flow jobs: `first_source` goes first among the models (alone with `only_source`, the
    experts then named in the fitness terms), `racing` sets fitness.racing, `optimizer` the name."""
    from mergelab.evolve.job import load_job
    from mergelab.evolve.loop import read_trials, run_search

    data = yaml.safe_load(template.read_text())
    data.setdefault("optimizer", {}).update(budget=budget, seed=seed)
    data["workers"] = {"count": 1, "device": "cpu"}
    if "dataflow" in data:
        data["dataflow"]["max_layers"] = data["dataflow"]["max_layers"] * zoo_depth(zoo) // FLOW_JOB_DEPTH
        if optimizer is not None:
            data["optimizer"]["name"] = optimizer
        if racing:
            data["fitness"]["racing"] = {"first": 0.25, "keep": 0.5, "warmup": 8}
    if first_source is not None:
        data["dataflow"]["models"] = [str(first_source)] + ([] if only_source else data["dataflow"]["models"])
    if only_source:
        data["fitness"]["terms"] = [{"task": t, "expert": f"../zoo/experts/{t}"} for t in data["fitness"]["terms"]]
    result = run_search(load_job(_beside_zoo(where, zoo, data)), where / "run", progress=False)
    return result, read_trials(where / "run")


def zoo_depth(zoo: Path) -> int:
    """The layers of the zoo's models (zoo.json's plan)."""
    return json.loads((zoo / "zoo.json").read_text())["plan"]["arch"]["num_hidden_layers"]


def run_one(zoo: str, row: str, seed: int, budget: int, optimizer: str | None = None) -> dict[str, Any]:
    """One row on one zoo (one process, one thread): test accuracy per skill, depth, seconds."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    trials = []
    with tempfile.TemporaryDirectory(prefix="search-dataflow-") as tmp:
        tmp_path = Path(tmp)
        if row == "parameter":
            result, trials = _search(PARAM_JOB, tmp_path / "p", Path(zoo), budget, seed)
        elif row in ("data-flow", "data-flow+racing"):
            result, trials = _search(FLOW_JOB, tmp_path / "f", Path(zoo), budget, seed, racing=row.endswith("racing"),
                                     optimizer=optimizer)
        elif row == "upscale":  # depth up-scaling: the parameter search's merge alone, its layers repeatable
            first, _ = _search(PARAM_JOB, tmp_path / "p", Path(zoo), budget, seed)
            result, trials = _search(FLOW_JOB, tmp_path / "f", Path(zoo), budget, seed, first.best_yaml, only_source=True,
                                     optimizer=optimizer)
        else:
            first, _ = _search(PARAM_JOB, tmp_path / "p", Path(zoo), budget // 2, seed)
            result, trials = _search(FLOW_JOB, tmp_path / "f", Path(zoo), budget - budget // 2, seed, first.best_yaml,
                                     optimizer=optimizer)
        recipe = yaml.safe_load(result.best_yaml.read_text())
        depth = len(recipe["slices"]) if "slices" in recipe else None
    acc = {k.split("/")[0]: v for k, v in result.report["best"].items() if k.endswith("/accuracy")}
    seconds = {k: statistics.median(t.seconds[k] for t in trials if k in t.seconds)
               for k in STAGES if any(k in t.seconds for t in trials)}
    routes = len({json.dumps(t.values.get("layers")) for t in trials}) if row != "parameter" else None
    per_minute = 60 * len(trials) / sum(sum(t.seconds.values()) for t in trials)  # merge or assembly, and scoring
    return {"zoo": zoo, "row": row, "seed": seed, "accuracy": acc, "depth": depth, "routes": routes,
            "candidate_seconds": seconds, "per_minute": per_minute, "seconds": time.perf_counter() - start,
            "stopped": sum("race" in t.seconds and "eval" not in t.seconds for t in trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", type=Path, help="where the zoos are built (reused; default bench/zoos or bench/zoos-deep)")
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=int, default=100, help="candidates per row (split in half for parameter+data-flow)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="the reduced zoo (a quick look, not the README's numbers)")
    size.add_argument("--deep", action="store_true", help="the deep zoo (8 layers; default --zoos: bench/zoos-deep)")
    parser.add_argument("--jobs", type=int, default=2, help="searches run at once (processes)")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS + MORE)}")
    parser.add_argument("--optimizer", help="the data-flow searches' optimizer (default: the job's, TwoPointsDE)")
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS + MORE]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS + MORE)}")

    from mergelab.zoo import build_zoo

    args.zoos = args.zoos or ROOT / "bench" / ("zoos-deep" if args.deep else "zoos")
    wall = time.perf_counter()
    zoos = {s: build_zoo(args.zoos / f"seed-{s}{'-reduced' if args.reduced else ''}", seed=s, reduced=args.reduced,
                         deep=args.deep) for s in args.zoo_seeds}
    built = time.perf_counter() - wall
    tasks = [(str(zoos[z]), row, s, args.budget, args.optimizer) for z in args.zoo_seeds for row in args.rows
             for s in args.search_seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_one, *zip(*tasks)))
    searched = time.perf_counter() - wall - built
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    _print(args, zoos, results, built, searched)


def _rate(values: list[float]) -> str:
    """Candidates per minute: the mean, and the range over the searches."""
    return f"{_mean(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _print(args: argparse.Namespace, zoos: dict[int, Path], results: list[dict], built: float, searched: float) -> None:
    seeds = list(zoos)
    fixed = {z: hand_set(p) for z, p in zoos.items()}
    print(f"mean test accuracy over the expert skills; zoo seeds {seeds}, search seeds {args.search_seeds}, "
          f"{args.budget} candidates per row{' (reduced zoo)' if args.reduced else ' (deep zoo)' if args.deep else ''}\n")
    print(f"| row | mean +- sd | {' | '.join(f'zoo {z}' for z in seeds)} | depth | routes tried | s per search | "
          "s per candidate (median) | candidates per minute |")
    print(f"|---|---|{'---|' * len(seeds)}---|---|---|---|---|")
    layers = zoo_depth(zoos[seeds[0]])
    for label, prefix in (("best uniform merge", "uniform:"), ("best expert", "expert:")):
        per = {z: max(v for k, v in fixed[z].items() if k.startswith(prefix)) for z in seeds}
        print(f"| {label} | {_fmt(list(per.values()))} | {' | '.join(f'{per[z]:.3f}' for z in seeds)} | {layers} | - | - | - | - |")
    for row in args.rows:
        mine = [r for r in results if r["row"] == row]
        per = {z: [_mean(list(r["accuracy"].values())) for r in mine if r["zoo"] == str(p)] for z, p in zoos.items()}
        depths = [r["depth"] for r in mine if r["depth"] is not None]
        depth = f"{_mean(depths):.1f} ({min(depths)}-{max(depths)})" if depths else str(layers)
        cand = {k: _mean([r["candidate_seconds"][k] for r in mine if k in r["candidate_seconds"]])
                for k in STAGES if any(k in r["candidate_seconds"] for r in mine)}
        routes = [r["routes"] for r in mine if r.get("routes") is not None]
        tried = f"{min(routes)}-{max(routes)}" if routes else "-"
        print(f"| {row} | {_fmt([v for vs in per.values() for v in vs])} | "
              f"{' | '.join(f'{_mean(per[z]):.3f}' for z in seeds)} | {depth} | {tried} | {_mean([r['seconds'] for r in mine]):.0f} | "
              f"{', '.join(f'{k} {v:.3f}' for k, v in cand.items())} | {_rate([r['per_minute'] for r in mine])} |")
    raced = [r["stopped"] for r in results if r["row"].endswith("racing")]
    if raced:
        print(f"\ncandidates racing stopped after the first share, per search: {min(raced)}-{max(raced)}")
    print(f"\nwall: zoos {built:.0f} s (built or reused), searches {searched:.0f} s on {args.jobs} processes")


if __name__ == "__main__":
    sys.exit(main())
