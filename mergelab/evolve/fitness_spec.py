"""`fitness:` and `splits:` of a job, checked and resolved once into a `Fitness`.

Every term's task exists with every split (a zoo task) or is an lm-eval task whose three split
ranges are disjoint document ranges; the goal follows from the metrics' directions (registry)
unless given; the normalisation is the gap to the experts when there are several skills; each
term's expert is given or the source model named like its task.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.blackbox.spec import SplitRange, parse_split
from mergelab.errors import MergelabError, RecipeError
from mergelab.evolve.fitness import USES, Fitness, Goal, Normalize, Racing, Term
from mergelab.evolve.schema import FitnessSpec, FitnessTerm, SplitSpec
from mergelab.metrics import get_metric
from mergelab.user_yaml import resolve_path


def resolve_fitness(fit: FitnessSpec, split_spec: SplitSpec, models: tuple[Path, ...], base: Path | None, root: Path,
                    label: str) -> Fitness:
    """The job's fitness over its source `models` (experts found by folder name) and `base` (None: none);
    every error is one line naming the key."""
    splits = _splits(split_spec, label)
    tasks = resolve_path(root, fit.tasks or ".")
    _check_terms(fit, tasks, splits, root, label)
    normalize = _normalize(fit)
    goal = _goal(fit, normalize)
    if goal is None:
        raise RecipeError(f"{label}: fitness.goal: the terms mix metrics where lower is better and where higher is "
                          "better; set goal and sign the weights")
    experts = _experts(fit, normalize, models, root, label)
    if base is None and normalize == "gap":
        raise RecipeError(f"{label}: fitness.normalize: gap measures each skill between the base model and its expert, "
                          "and the recipe has no base_model; use normalize: experts")
    terms = tuple(_term(t, expert, root) for t, expert in zip(fit.terms, experts))
    racing = Racing(fit.racing.first, fit.racing.keep, fit.racing.warmup) if fit.racing is not None else None
    return Fitness(terms, normalize, goal, tasks, base, splits, racing)


def _term(t: FitnessTerm, expert: Path | None, root: Path) -> Term:
    metric = get_metric(t.metric)
    lm_eval = None if metric.on_examples else lm_eval_task(t, root)
    return Term(t.task, metric, t.weight, t.limit, expert, lm_eval, t.lm_eval_metric)


def _splits(spec: SplitSpec, label: str) -> dict[str, SplitRange]:
    """The three splits, pairwise disjoint (fitting, selecting and reporting on the same data overfits)."""
    out = {k: parse_split(getattr(spec, k), f"{label}: splits.{k}") for k in USES}
    for i, a in enumerate(USES):
        for b in USES[i + 1:]:
            if out[a].overlaps(out[b]):
                raise RecipeError(f"{label}: splits.{b}: overlaps splits.{a}; the three splits must share no example")
    return out


def _check_terms(fit: FitnessSpec, tasks: Path, splits: dict[str, SplitRange], root: Path, label: str) -> None:
    zoo_terms = [(i, t) for i, t in enumerate(fit.terms) if get_metric(t.metric).on_examples]
    if zoo_terms and fit.tasks is None:
        raise RecipeError(f"{label}: fitness.tasks: required for terms scored on examples (the zoo's tasks folder)")
    if zoo_terms and not tasks.is_dir():
        raise RecipeError(f"{label}: fitness.tasks: {tasks}: folder not found (build the zoo: mergelab zoo build DIR)")
    known = sorted(p.name for p in tasks.iterdir() if p.is_dir()) if zoo_terms else []
    for i, term in zoo_terms:
        if term.task not in known:
            raise RecipeError(f"{label}: fitness.terms[{i}].task: unknown task '{term.task}' (in {tasks}: {', '.join(known) or 'none'})")
        for use, split in splits.items():
            if not (tasks / term.task / f"{split.name}.jsonl").is_file():
                raise RecipeError(f"{label}: splits.{use}: task '{term.task}' has no split '{split.name}'")
    for i, term in enumerate(fit.terms):
        if not get_metric(term.metric).on_examples:
            _check_lm_eval_term(term, splits, root, f"{label}: fitness.terms[{i}]")
        elif term.lm_eval_metric is not None:
            raise RecipeError(f"{label}: fitness.terms[{i}].lm_eval_metric: only for metric: lm-eval")


def _check_lm_eval_term(term: FitnessTerm, splits: dict[str, SplitRange], root: Path, where: str) -> None:
    """An lm-eval task has one evaluation split of its own: the three split ranges index its
    documents, so they must not overlap as ranges, and a range that starts later must end."""
    import lm_eval.tasks

    from mergelab.eval.lm_eval_bridge import _resolve

    try:
        name, folder = _resolve(lm_eval_task(term, root), None)
    except MergelabError as exc:
        raise RecipeError(f"{where}.task: {exc}", arguments=exc.arguments) from None
    manager = lm_eval.tasks.TaskManager(include_path=str(folder) if folder else None, include_defaults=folder is None)
    if name not in manager.all_tasks:
        raise RecipeError(f"{where}.task: unknown lm-eval task '{term.task}' (neither a task folder nor a task name)")
    ranges = {use: SplitRange("docs", s.start, s.end) for use, s in splits.items()}
    uses = list(ranges)
    for i, a in enumerate(uses):
        if ranges[a].start > 0 and ranges[a].end is None:
            raise RecipeError(f"{where}: splits.{a} starts at document {ranges[a].start} with no end; "
                              "an lm-eval term needs an end (e.g. test[200:400])")
        for b in uses[i + 1:]:
            if ranges[a].overlaps(ranges[b]):
                raise RecipeError(f"{where}: splits.{a} and splits.{b} overlap as document ranges of the lm-eval task "
                                  "(it has one evaluation split); give disjoint ranges, e.g. validation[0:100], "
                                  "validation[100:200], validation[200:400]")


def lm_eval_task(term: FitnessTerm, root: Path) -> str:
    """The lm-eval task of a term: a folder relative to the job when there is one, else the name."""
    folder = resolve_path(root, term.task)
    return str(folder) if folder.is_dir() else term.task


def _normalize(fit: FitnessSpec) -> Normalize:
    """As given, else the gap to the experts when there are several skills."""
    if fit.normalize is not None:
        return fit.normalize
    return "gap" if len({t.task for t in fit.terms}) > 1 else "none"


def _goal(fit: FitnessSpec, normalize: Normalize) -> Goal | None:
    """As given; minimize the gap left to the experts; else minimize when every metric is lower-is-better
    and maximize when every one is higher-is-better (the registry says which); None when mixed."""
    if fit.goal is not None:
        return fit.goal
    if normalize == "gap":
        return "minimize"
    lower = {get_metric(t.metric).lower_is_better for t in fit.terms}
    if len(lower) > 1:
        return None
    return "minimize" if lower == {True} else "maximize"


def _experts(fit: FitnessSpec, normalize: Normalize, models: tuple[Path, ...], root: Path, label: str) -> tuple[Path | None, ...]:
    """Per term, the expert it is normalised by: given, else the source model whose folder is named like the task."""
    out: list[Path | None] = []
    by_name = {path.name: path for path in models}
    for i, term in enumerate(fit.terms):
        path = resolve_path(root, term.expert) if term.expert else by_name.get(term.task)
        if term.expert and not path.is_dir():
            raise RecipeError(f"{label}: fitness.terms[{i}].expert: {path}: folder not found")
        if path is None and normalize in ("gap", "experts"):
            raise RecipeError(f"{label}: fitness.terms[{i}].expert: no source model is named '{term.task}'; "
                              "give expert: or normalize: start")
        out.append(path)
    return tuple(out)
