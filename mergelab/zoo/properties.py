"""Measure what the zoo's demonstrations rest on, and say loudly when a build misses it.

    weak base      the base's test accuracy on each expert skill (and the LoraHub target) is low
    strong experts each expert's test accuracy on its own skill is high
    interference   the best uniform merge of the experts keeps at most a share of their mean gain
    LoraHub        each pool adapter's accuracy on the held-out target, beside the base's
                   (recorded, not yet checked against a margin)

A skill's *gain* is its expert's accuracy minus the base's; a merge *keeps*
`mean_s(merge_s - base_s) / mean_s(expert_s - base_s)` of the mean gain, over the expert skills.
The uniform merges are the ones people set by hand: the plain average (`linear`), every task
vector at full strength (`task_arithmetic`, weight 1) and `ties` (weight 1, density 0.5).
Each is merged in memory by the same code as `mergelab merge` and scored on the test split.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mergelab.eval import load_model, load_task, load_tokenizer, score

log = logging.getLogger(__name__)

SPLIT = "test"


@dataclass(frozen=True)
class Targets:
    """The margins a build must meet (test accuracy)."""

    base_max: float = 0.3  # the base on each expert skill, at most
    expert_min: float = 0.8  # each expert on its own skill, at least
    kept_max: float = 0.75  # the best uniform merge keeps at most this share of the mean gain


def uniform_recipes(root: Path, experts: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The hand-set merges of the experts, as recipe dicts (absolute paths)."""
    models = [str(p.resolve()) for p in experts.values()]
    base = str((root / "base").resolve())
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
                   "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models]},
    }


@dataclass(frozen=True)
class Scoring:
    """One model to score on some skills: a folder (model or adapter), or a recipe merged in
    memory. Picklable, so a worker process of the build can run it."""

    who: str  # "base", "expert:<skill>", "uniform:<method>", "adapter:<skill>"
    root: str  # the zoo folder (holds tasks/)
    skills: tuple[str, ...]
    folder: str | None = None
    recipe: dict[str, Any] | None = None


def scorings(root: Path, experts: dict[str, Path], adapters: dict[str, Path],
             lorahub: tuple[str, ...] = ()) -> list[Scoring]:
    """What `measure` scores: the base, each expert and uniform merge on the expert skills, and
    each pool adapter on the LoraHub targets; the longest first, so workers finish together."""
    skills, top = tuple(experts), str(root)
    out = [Scoring(f"uniform:{name}", top, skills, recipe=data) for name, data in uniform_recipes(root, experts).items()]
    out += [Scoring(f"expert:{s}", top, skills, folder=str(p)) for s, p in experts.items()]
    out.append(Scoring("base", top, (*skills, *lorahub), folder=str(root / "base")))
    if lorahub:
        out += [Scoring(f"adapter:{s}", top, lorahub, folder=str(p)) for s, p in adapters.items()]
    return out


def run_scoring(item: Scoring) -> tuple[str, dict[str, float]]:
    """`(who, skill -> test accuracy)` for one item, on one thread (the same numbers in a build's
    worker process as in the build's own)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _model_of(item) as (model, tok):
            tasks = {s: load_task(item.root, s, SPLIT) for s in item.skills}
            return item.who, {s: round(score(model, tok, t, "accuracy").value, 4) for s, t in tasks.items()}
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _model_of(item: Scoring) -> Iterator[tuple[Any, Any]]:
    """The item's model, in eval mode, with its tokenizer (a merge's is the base's)."""
    if item.recipe is None:
        yield load_model(item.folder)
        return
    from mergelab.evolve.live import LiveMerger
    from mergelab.recipe import parse_recipe

    recipe = parse_recipe(item.recipe, Path(item.root), item.who)
    live = LiveMerger(recipe, "cpu")
    try:
        live.set_recipe(recipe)  # the live model holds the merge only once a recipe is set
        yield live.model, load_tokenizer(Path(item.root) / "base")
    finally:
        live.close()


def measure(root: Path, experts: dict[str, Path], adapters: dict[str, Path], targets: Targets,
            lorahub: tuple[str, ...] = (), map_fn: Callable[..., Iterable[Any]] = map) -> dict[str, Any]:
    """Score the base, the experts, the uniform merges (and the pool on the LoraHub targets),
    each item through `map_fn` (the build passes its worker pool's); returns the properties with
    their checks, for the manifest."""
    acc = dict(map_fn(run_scoring, scorings(root, experts, adapters, lorahub)))
    order = ["base", *[f"expert:{s}" for s in experts], *[f"uniform:{n}" for n in uniform_recipes(root, experts)],
             *[f"adapter:{s}" for s in adapters if lorahub]]
    return summarize({who: acc[who] for who in order}, list(experts), lorahub, targets)


def summarize(acc: dict[str, dict[str, float]], skills: list[str], lorahub: tuple[str, ...],
              targets: Targets) -> dict[str, Any]:
    """The properties of the scores in `acc` (who -> skill -> accuracy), each checked against `targets`."""
    base = acc["base"]
    own = {s: acc[f"expert:{s}"][s] for s in skills}
    gain = sum(own[s] - base[s] for s in skills) / len(skills)
    kept = {name.split(":", 1)[1]: round(sum(a[s] - base[s] for s in skills) / len(skills) / gain, 4) if gain > 0 else None
            for name, a in acc.items() if name.startswith("uniform:")}
    best_uniform = max((v for v in kept.values() if v is not None), default=None)
    misses = [f"base accuracy on {s} is {base[s]:.2f} (want <= {targets.base_max})" for s in skills if base[s] > targets.base_max]
    misses += [f"expert {s} scores {own[s]:.2f} on its skill (want >= {targets.expert_min})" for s in skills
               if own[s] < targets.expert_min]
    if best_uniform is None or best_uniform > targets.kept_max:
        misses.append(f"the best uniform merge keeps {best_uniform} of the experts' mean gain (want <= {targets.kept_max})")
    out: dict[str, Any] = {"split": SPLIT, "accuracy": acc, "mean_gain": round(gain, 4), "uniform_kept": kept,
                           "targets": asdict(targets), "misses": misses}
    if lorahub:
        out["lorahub"] = {t: {"base": base[t], "best_adapter": max(a[t] for n, a in acc.items() if n.startswith("adapter:"))}
                          for t in lorahub}
    return out


def report_misses(properties: dict[str, Any], where: Path) -> None:
    """Log every property the build missed, loudly: the demonstrations on this zoo will not hold."""
    for miss in properties.get("misses", []):
        log.warning("ZOO PROPERTY MISSED in %s: %s", where, miss)
