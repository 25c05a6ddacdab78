"""Does the default search beat the merges people set by hand, on every zoo seed?

    python bench/search_quality.py                        # zoo seeds 0 1 2, search seeds 0 1 2, 100 candidates
    python bench/search_quality.py --reduced --zoo-seeds 0 --search-seeds 0 --budget 30   # a quick look
    python bench/search_quality.py --variants default,cma-prob-gap,nll-gap   # compare fitness/optimizer settings

For each zoo seed it builds (or reuses) the zoo in `--zoos`/seed-N and scores, on the test
split, the mean exact-match accuracy over the expert skills of:
    base, every expert, the uniform merges   as the zoo build measured them (zoo.json)
    default    `search/evolve.yaml` as it is (the short form: the models and the skills only)
    random     the same job searched by nevergrad's RandomSearch (same budget)
    cma-nll    plain CMA on expert-relative NLL (normalize: experts, metric: nll, optimizer CMA)
and any other `--variants` (VARIANTS below: the settings tried for the default). It prints
mean +- sd over zoo seeds (search rows: over zoo and search seeds), each zoo seed's mean, the
default's worst-seed margin over the best hand-set merge and over the best expert, and the
wall time. Searches run in parallel processes (`--jobs`), each on one thread.

LoraHub (`search/lorahub_mirror.yaml` as it is, on each zoo seed and `--draws` draws of its 5
examples: `validation[0:5]`, `[5:10]`, ...): the composed adapter's test accuracy on the target
beside the base's (zero-shot) and the uniform mix's, with the worst margin over both.
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
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "search" / "evolve.yaml"
LORAHUB_JOB = ROOT / "search" / "lorahub_mirror.yaml"


def _set(**fitness: Any) -> Callable[[dict], None]:
    """A variant that overrides fitness keys on every term (metric) or on the fitness (normalize)."""
    def apply(job: dict) -> None:
        for key, value in fitness.items():
            if key == "metric":
                job["fitness"]["terms"] = [{"task": t if isinstance(t, str) else t["task"], "metric": value}
                                           for t in job["fitness"]["terms"]]
            else:
                job["fitness"][key] = value
    return apply


def _optimizer(name: str, **options: Any) -> Callable[[dict], None]:
    def apply(job: dict) -> None:
        job.setdefault("optimizer", {}).update(name=name, options=options)
    return apply


def _chain(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def apply(job: dict) -> None:
        for f in fs:
            f(job)
    return apply


VARIANTS: dict[str, Callable[[dict], None]] = {
    "default": lambda job: None,  # NGOpt on `prob`, normalize: gap (mergelab/evolve/job.py)
    "random": _optimizer("RandomSearch"),
    "cma-nll": _chain(_set(metric="nll", normalize="experts"), _optimizer("CMA")),  # the baseline
    # what was tried for the default (README): fitness metric x normalisation, optimizer and step
    "cma-prob-gap": _chain(_set(metric="prob", normalize="gap"), _optimizer("CMA")),
    "nll-gap": _set(metric="nll", normalize="gap"),
    "acc-gap": _set(metric="accuracy", normalize="gap"),
    "cma-wide": _optimizer("ParametrizedCMA", scale=2.0),
    "de": _optimizer("TwoPointsDE"),
    # cheaper candidates: the default, with racing of the fitness split (mergelab/evolve/racing.py)
    "racing": _set(racing={"first": 0.25, "keep": 0.5, "warmup": 8}),
    "racing-third": _set(racing={"first": 0.25, "keep": 0.33, "warmup": 8}),
}


def _job_for(zoo: Path, variant: str, seed: int, budget: int, where: Path) -> Path:
    """The default job with the variant applied, written beside a `zoo` link so its paths resolve."""
    job = yaml.safe_load(DEFAULT_JOB.read_text())
    VARIANTS[variant](job)
    job.setdefault("optimizer", {}).update(budget=budget, seed=seed)
    job["workers"] = {"count": 1, "device": "cpu"}
    return _beside_zoo(where, zoo, job)


def run_one(zoo: str, variant: str, seed: int, budget: int) -> dict[str, Any]:
    """One search (one process, one thread): the best recipe's test accuracy per skill, and seconds."""
    import torch

    from mergelab.evolve.job import load_job
    from mergelab.evolve.loop import read_trials, run_search

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        job = load_job(_job_for(Path(zoo), variant, seed, budget, Path(tmp)))
        result = run_search(job, Path(tmp) / "run", progress=False)
        trials = read_trials(Path(tmp) / "run")
    best = result.report["best"]
    acc = {k.split("/")[0]: v for k, v in best.items() if k.endswith("/accuracy")}
    scoring = sum(sum(t.seconds.values()) for t in trials)  # merge + load + scoring of every candidate
    return {"zoo": zoo, "variant": variant, "seed": seed, "accuracy": acc, "seconds": time.perf_counter() - start,
            "candidates_per_minute": 60 * len(trials) / scoring,
            "stopped": sum("race" in t.seconds and "eval" not in t.seconds for t in trials)}


def run_lorahub_one(zoo: str, draw: int) -> dict[str, Any]:
    """The LoraHub job on one draw of 5 examples (one process, one thread): test accuracy of
    the composed adapter, the base and the uniform mix on the target."""
    import torch

    from mergelab.lora.hub import run_lorahub
    from mergelab.lora.hub_job import load_hub_job

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorahub-quality-") as tmp:
        data = yaml.safe_load(LORAHUB_JOB.read_text())
        data["examples"]["split"] = f"validation[{5 * draw}:{5 * draw + 5}]"
        path = _beside_zoo(Path(tmp), Path(zoo), data)
        result = run_lorahub(load_hub_job(path), Path(tmp) / "run", progress=False)
    acc = {who: next(v for k, v in m.items() if k.endswith("/accuracy")) for who, m in result.report.items()}
    return {"zoo": zoo, "draw": draw, "accuracy": acc, "seconds": time.perf_counter() - start}


def _beside_zoo(where: Path, zoo: Path, job: dict[str, Any]) -> Path:
    """Write `job` as `where/search/job.yaml` beside a `where/zoo` link, so its `../zoo` paths resolve."""
    (where / "search").mkdir(parents=True)
    (where / "zoo").symlink_to(zoo.resolve())
    path = where / "search" / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{_mean(values):.3f} +- {sd:.3f}"


def hand_set(zoo: Path) -> dict[str, float]:
    """Mean test accuracy over the expert skills of the base, each expert and the uniform merges (zoo.json)."""
    props = json.loads((zoo / "zoo.json").read_text())["properties"]
    skills = [k.split(":", 1)[1] for k in props["accuracy"] if k.startswith("expert:")]
    return {who: _mean([acc[s] for s in skills]) for who, acc in props["accuracy"].items()
            if who == "base" or who.startswith(("expert:", "uniform:"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", type=Path, default=ROOT / "bench" / "zoos", help="where the zoos are built (reused)")
    parser.add_argument("--zoo-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--variants", default="default,random,cma-nll", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--reduced", action="store_true", help="the reduced zoo (a quick look, not the README's numbers)")
    parser.add_argument("--draws", type=int, default=3, help="LoraHub example draws per zoo (0: no LoraHub rows)")
    parser.add_argument("--jobs", type=int, default=2, help="searches run at once (processes)")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")

    from mergelab.zoo import build_zoo

    wall = time.perf_counter()
    zoos = {s: build_zoo(args.zoos / f"seed-{s}{'-reduced' if args.reduced else ''}", seed=s, reduced=args.reduced)
            for s in args.zoo_seeds}
    built = time.perf_counter() - wall
    tasks = [(str(zoos[z]), v, s, args.budget) for z in args.zoo_seeds for v in variants for s in args.search_seeds]
    hub_tasks = [(str(zoos[z]), d) for z in args.zoo_seeds for d in range(args.draws)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        hubs = pool.map(run_lorahub_one, *zip(*hub_tasks)) if hub_tasks else []
        results = list(pool.map(run_one, *zip(*tasks))) if tasks else []
        hubs = list(hubs)
    searched = time.perf_counter() - wall - built
    if args.json:
        args.json.write_text(json.dumps({"search": results, "lorahub": hubs}, indent=2) + "\n")
    _print(args, zoos, variants, results, built, searched)
    if hubs:
        _print_lorahub(zoos, hubs)


def _print(args: argparse.Namespace, zoos: dict[int, Path], variants: list[str], results: list[dict],
           built: float, searched: float) -> None:
    fixed = {z: hand_set(p) for z, p in zoos.items()}
    rows: dict[str, dict[int, list[float]]] = {}
    for z, scores in fixed.items():
        for who, value in scores.items():
            rows.setdefault(who, {})[z] = [value]
    for r in results:
        z = next(s for s, p in zoos.items() if str(p) == r["zoo"])
        rows.setdefault(r["variant"], {}).setdefault(z, []).append(_mean(list(r["accuracy"].values())))
    seeds = list(zoos)
    print(f"mean test accuracy over the expert skills; zoo seeds {seeds}, search seeds {args.search_seeds}, "
          f"{args.budget} candidates{' (reduced zoo)' if args.reduced else ''}\n")
    print(f"| model | mean +- sd | {' | '.join(f'zoo {z}' for z in seeds)} |")
    print(f"|---|---|{'---|' * len(seeds)}")
    for who, per in rows.items():
        cells = " | ".join(f"{_mean(per[z]):.3f}" if z in per else "-" for z in seeds)
        print(f"| {who} | {_fmt([v for z in seeds for v in per.get(z, [])])} | {cells} |")
    if "default" in rows:
        print()
        for z in seeds:
            worst = min(rows["default"][z])
            uniform = max(rows[k][z][0] for k in rows if k.startswith("uniform:"))
            expert = max(rows[k][z][0] for k in rows if k.startswith("expert:"))
            print(f"zoo {z}: default's worst search seed {worst:.3f}: {worst - uniform:+.3f} over the best uniform merge "
                  f"({uniform:.3f}), {worst - expert:+.3f} over the best expert ({expert:.3f})")
    seconds = {v: _mean([r["seconds"] for r in results if r["variant"] == v]) for v in variants if results}
    print(f"\nwall: zoos {built:.0f} s (built or reused), searches {searched:.0f} s on {args.jobs} processes; "
          f"per search (mean): {', '.join(f'{v} {s:.0f} s' for v, s in seconds.items())}")
    rate = {v: [r["candidates_per_minute"] for r in results if r["variant"] == v] for v in variants if results}
    print("candidates per minute (merge and scoring, one core; mean +- sd over the searches): "
          + ", ".join(f"{v} {_mean(x):.0f} +- {statistics.stdev(x) if len(x) > 1 else 0:.0f}" for v, x in rate.items() if x))
    stopped = {v: _mean([r["stopped"] for r in results if r["variant"] == v]) for v in variants if results}
    if any(stopped.values()):
        print("candidates stopped after the first share (racing, mean per search): "
              + ", ".join(f"{v} {s:.1f}" for v, s in stopped.items() if s))


def _print_lorahub(zoos: dict[int, Path], hubs: list[dict]) -> None:
    """LoraHub rows: mean +- sd over zoo seeds and draws, each zoo seed's mean, the worst margins."""
    seeds = list(zoos)
    print(f"\nLoraHub ({LORAHUB_JOB.name}): test accuracy on the target; zoo seeds {seeds}, "
          f"{len(hubs) // len(seeds)} draws of 5 examples each\n")
    print(f"| row | mean +- sd | {' | '.join(f'zoo {z}' for z in seeds)} |")
    print(f"|---|---|{'---|' * len(seeds)}")
    per = {z: [h for h in hubs if h["zoo"] == str(p)] for z, p in zoos.items()}
    for who in ("composed", "uniform", "base"):
        cells = " | ".join(f"{_mean([h['accuracy'][who] for h in per[z]]):.3f}" for z in seeds)
        print(f"| {who} | {_fmt([h['accuracy'][who] for h in hubs])} | {cells} |")
    margins = [h["accuracy"]["composed"] - max(h["accuracy"]["base"], h["accuracy"]["uniform"]) for h in hubs]
    print(f"\nworst margin of the composed adapter over max(base, uniform), over every zoo seed and draw: {min(margins):+.3f}")


if __name__ == "__main__":
    sys.exit(main())
