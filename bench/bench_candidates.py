"""Time per search candidate, split into merge, load and eval, with and without the merge cache.

    python bench/bench_candidates.py [--zoo zoo] [--candidates 15] [--n 50] [--methods ties task_arithmetic dare_ties]

For each method, a recipe over the zoo's three experts (reverse, sort, back) with the base; the
same random candidates (weights in [0.2, 1.2], densities in [0.1, 0.9], per expert) go through
two live mergers (`mergelab.evolve.live.LiveMerger`), one with the cache and one without,
interleaved candidate by candidate so that both see the same machine load. Per candidate:

- `merge`: re-planning the recipe and the method code, tensor by tensor;
- `load` : copying each merged tensor into the live model;
- `eval` : answer NLL (`mergelab.eval.score`) on the first `--n` validation examples of each of
  the three skills.

The two models are checked to be bit for bit equal after every candidate. The first candidate
(which fills the cache: a sort per task vector for TIES, the draws for DARE) is timed apart;
the table gives medians over the others, in ms, and the bytes the cache holds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

SKILLS = ("reverse", "sort", "back")


def recipe(zoo: Path, method: str, rng: random.Random) -> dict:
    """One random candidate of `method` over the zoo's experts."""
    sparse = method != "task_arithmetic"
    models = []
    for skill in SKILLS:
        params = {"weight": round(rng.uniform(0.2, 1.2), 4)}
        if sparse:
            params["density"] = round(rng.uniform(0.1, 0.9), 4)
        models.append({"model": str(zoo / "experts" / skill), "parameters": params})
    return {"merge_method": method, "base_model": str(zoo / "base"), "models": models}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def run_method(zoo: Path, method: str, args: argparse.Namespace) -> dict[str, dict]:
    from mergelab.eval import load_task, load_tokenizer, score
    from mergelab.evolve.live import LiveMerger
    from mergelab.recipe import load_recipe

    rng = random.Random(args.seed)
    candidates = [load_recipe(recipe(zoo, method, rng)) for _ in range(args.candidates + 1)]
    lives = {"cache": LiveMerger(candidates[0], cache=True), "no cache": LiveMerger(candidates[0], cache=False)}
    tokenizer = load_tokenizer(lives["cache"].plan.tokenizer_dir)
    tasks = [load_task(zoo, skill, "validation", limit=args.n) for skill in SKILLS]
    rows = {name: {"merge": [], "load": [], "eval": []} for name in lives}
    first = {}
    for i, candidate in enumerate(candidates):
        for name, live in lives.items():
            timing = live.set_recipe(candidate, seed=args.seed)
            start = time.perf_counter()
            for task in tasks:
                score(live.model, tokenizer, task, "nll")
            eval_s = time.perf_counter() - start
            if i == 0:
                first[name] = timing.merge
                continue
            rows[name]["merge"].append(timing.merge)
            rows[name]["load"].append(timing.load)
            rows[name]["eval"].append(eval_s)
        if not same_bits(lives["cache"].state(), lives["no cache"].state()):
            raise SystemExit(f"{method}: candidate {i} differs with and without the cache")
    out = {}
    for name, live in lives.items():
        med = {k: statistics.median(v) * 1e3 for k, v in rows[name].items()}
        out[name] = {**med, "first": first[name] * 1e3, "cache_mb": live.cache_nbytes / 1e6}
        live.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--candidates", type=int, default=15, help="timed candidates per method (after the first)")
    parser.add_argument("--n", type=int, default=50, help="validation examples per skill")
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic", "dare_ties"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    zoo = args.zoo.resolve()
    if not (zoo / "base").is_dir() or zoo.with_name(zoo.name + ".partial").exists():
        raise SystemExit(f"{zoo}: no complete zoo (build one with `mergelab zoo build {args.zoo}`)")
    results = {method: run_method(zoo, method, args) for method in args.methods}
    from mergelab.eval import load_model

    params = sum(p.numel() for p in load_model(zoo / "base")[0].parameters())
    print(f"\n{zoo.name}: base + 3 experts ({params / 1e6:.2f}M parameters each), {args.n} validation examples x "
          f"{len(SKILLS)} skills (answer NLL), torch threads={torch.get_num_threads()}, median of {args.candidates} "
          f"candidates (ms)\n")
    print("| method | cache | merge | load | eval | total | (merge+load)/total | first merge | cache MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, by_cache in results.items():
        for name, r in by_cache.items():
            total = r["merge"] + r["load"] + r["eval"]
            print(f"| {method} | {name} | {r['merge']:.1f} | {r['load']:.2f} | {r['eval']:.1f} | {total:.1f} | "
                  f"{(r['merge'] + r['load']) / total:.0%} | {r['first']:.1f} | {r['cache_mb']:.1f} |")
    print("\nmerge time without / with the cache: " + ", ".join(
        f"{m} {r['no cache']['merge'] / r['cache']['merge']:.2f}x" for m, r in results.items()))


if __name__ == "__main__":
    main()
