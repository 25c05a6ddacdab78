"""`mergelab search report RUN`: a run folder's trials as a plot and a markdown summary.

    RUN/fitness.png   fitness of every trial (failed ones marked) and the best so far, per trial
    RUN/report.md     the run in numbers: trials, failures, time per candidate split into merge,
                      load and evaluate (medians), the best candidate's values, and the
                      report-split scores of the best recipe beside the start recipe and each
                      source model (from `report.json`, written when the search finished), with
                      each metric's mean and which way is better (the metric registry)

    RUN/front.png     with several objectives: every trial's losses, the front (the non-dominated
                      trials on the fitness split) marked, and the recipe best.yaml holds; one
                      panel per pair of objectives; report.md lists the front's members with
                      their losses (and select-split losses from `front.json`)

Works on a run that is still going or was interrupted (no `report.json` yet): the table of
scores is then left out.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mergelab.errors import DataError
from mergelab.evolve.front import front_of, read_front, vector
from mergelab.evolve.loop import BEST, TRIALS, Trial, read_trials
from mergelab.metrics import METRICS

PLOT = "fitness.png"
FRONT_PLOT = "front.png"
SUMMARY = "report.md"


STAGES = ("merge", "load", "plan", "assemble", "race", "eval")  # a candidate's seconds, in the order they run


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `fitness.png` and `report.md` into the run folder; returns their paths."""
    run_dir = Path(run_dir)
    trials = read_trials(run_dir)
    if not trials:
        raise DataError(f"{run_dir / TRIALS}: no trials (is {run_dir} a search run folder?)")
    trials.sort(key=lambda t: t.index)
    report_json = run_dir / "report.json"
    scores = json.loads(report_json.read_text()) if report_json.is_file() else None
    plot = run_dir / PLOT
    _plot(trials, plot, run_dir.name)
    summary = run_dir / SUMMARY
    text = _markdown(run_dir, trials, scores)
    names = objective_names(trials)
    if names:
        front = read_front(run_dir)
        _plot_front(trials, names, front, run_dir / FRONT_PLOT, run_dir.name)
        text += "\n" + "\n".join(_front_markdown(run_dir, trials, names, front)) + "\n"
    summary.write_text(text)
    return plot, summary


def objective_names(trials: list[Trial]) -> tuple[str, ...]:
    """The objectives of a run with several (in the order its trials hold them), else ()."""
    return next((tuple(t.losses) for t in trials if t.losses), ())


def _plot(trials: list[Trial], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in trials if t.error is None]
    failed = [t for t in trials if t.error is not None]
    best, running = [], float("inf")
    for t in trials:
        running = min(running, t.loss) if t.error is None else running
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.scatter([t.index for t in ok], [t.loss for t in ok], s=12, alpha=0.6, label="trial")
    ax.plot([t.index for t in trials], best, color="C3", drawstyle="steps-post", label="best so far")
    if failed:
        floor = max((t.loss for t in ok), default=0.0)
        ax.scatter([t.index for t in failed], [floor] * len(failed), marker="x", color="k", label="failed (worst)")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness loss (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(run_dir: Path, trials: list[Trial], scores: dict[str, dict[str, float]] | None) -> str:
    ok = [t for t in trials if t.error is None]
    lines = [f"# Search run `{run_dir.name}`", ""]
    lines.append(f"{len(trials)} trials, {len(trials) - len(ok)} failed, on {len({t.worker for t in trials})} worker(s).")
    if ok:
        best = min(ok, key=lambda t: t.loss)
        first = min(ok, key=lambda t: t.index)
        lines.append(f"Best fitness loss {best.loss:.4g} (trial {best.index}); the first trial's {first.loss:.4g}.")
        lines += ["", "Seconds per candidate (median): " + ", ".join(
            f"{k} {statistics.median(t.seconds[k] for t in ok if k in t.seconds):.4f}" for k in STAGES
            if any(k in t.seconds for t in ok))]
        raced = [t for t in ok if "race" in t.seconds]
        if raced:
            stopped = sum("eval" not in t.seconds for t in raced)
            lines.append(f"Racing: {stopped} of {len(raced)} candidates stopped after the first share of the fitness split.")
        lines += ["", "## Best trial's values", "", "```json", json.dumps(best.values, indent=1), "```"]
    if (run_dir / BEST).is_file():
        lines += ["", f"The recipe selected on the select split: `{BEST}` (`mergelab merge {run_dir / BEST} OUT`)."]
    if scores:
        lines += ["", "## Report split", "", *_table(scores)]
    errors = sorted({t.error for t in trials if t.error})
    if errors:
        lines += ["", "## Failures", ""] + [f"- {e}" for e in errors[:10]]
    return "\n".join(lines) + "\n"


def _table(scores: dict[str, dict[str, Any]]) -> list[str]:
    """Rows: who (best, start, each source); columns: each metric, and their mean per metric kind."""
    keys = list(next(iter(scores.values())))
    kinds = sorted({k.split("/")[-1] for k in keys})
    head = ["model", *keys, *(f"mean {k}{_direction(k)}" for k in kinds)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for who, metrics in scores.items():
        means = [statistics.mean(v for k, v in metrics.items() if k.endswith("/" + kind)) for kind in kinds]
        cells = [who, *(f"{metrics.get(k, float('nan')):.4f}" for k in keys), *(f"{m:.4f}" for m in means)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _direction(kind: str) -> str:
    """` (lower is better)` or ` (higher is better)`, as the metric registry says; empty for other keys."""
    metric = METRICS.get(kind)
    return "" if metric is None else f" ({'lower' if metric.lower_is_better else 'higher'} is better)"



# ---------------------------------------------------------------- several objectives
def _plot_front(trials: list[Trial], names: tuple[str, ...], front_json: dict | None, path: Path, title: str) -> None:
    """One panel per pair of objectives: every trial, the front, and the recipe best.yaml holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in trials if t.error is None and t.losses]
    front = front_of(trials, names)
    picked = next((t for t in ok if front_json and t.index == front_json["picked"]), None)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), dpi=110, squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter([t.losses[a] for t in ok], [t.losses[b] for t in ok], s=12, alpha=0.4, color="C0", label="trial")
        line = sorted(front, key=lambda t: (t.losses[a], t.losses[b]))  # with two objectives, a staircase
        ax.plot([t.losses[a] for t in line], [t.losses[b] for t in line], "o-" if len(names) == 2 else "o", color="C3",
                ms=5, drawstyle="steps-post", label="front" if len(names) == 2 else "front (all objectives)")
        if picked is not None:
            ax.scatter([picked.losses[a]], [picked.losses[b]], marker="*", s=180, color="gold", edgecolor="k",
                       zorder=5, label=f"best.yaml (trial {picked.index})")
        ax.set_xlabel(f"{a} (lower is better)")
        ax.set_ylabel(f"{b} (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: {len(front)} non-dominated of {len(ok)} trials (fitness split)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _front_markdown(run_dir: Path, trials: list[Trial], names: tuple[str, ...], front_json: dict | None) -> list[str]:
    """The front's members: trial, each objective on the fitness split (and the select split when
    re-scored), and what each recipe is."""
    front = front_of(trials, names)
    select = {m["trial"]: m["select"] for m in front_json["members"]} if front_json else {}
    lines = ["## Pareto front", "",
             f"{len(front)} non-dominated trials of {sum(t.error is None for t in trials)} on the fitness split "
             f"(objectives: {', '.join(names)}; lower is better), plotted in `{FRONT_PLOT}`."]
    if front_json:
        weights = ", ".join(f"{k} {v:g}" for k, v in front_json["weights"].items())
        unit = f", depth in units of {front_json['depth_unit']:g} layers" if "depth" in front_json["weights"] else ""
        lines.append(f"The pick rule (the weighted sum: weights {weights}{unit}) chose trial "
                     f"{front_json['rule']} on the select split; `{BEST}` holds trial {front_json['picked']}. "
                     f"Another: `mergelab search pick {run_dir} TRIAL`.")
    head = ["trial", *names, *(f"{n} (select)" for n in names), "recipe"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in front:
        sel = select.get(t.index)
        mark = " (best.yaml)" if front_json and t.index == front_json["picked"] else ""
        cells = [f"{t.index}{mark}", *(f"{v:.4f}" for v in vector(t.losses, names)),
                 *((f"{sel[n]:.4f}" if sel else "-") for n in names), f"`{_recipe_summary(t.values)}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _recipe_summary(values: dict[str, Any]) -> str:
    """A data-flow route as model:layer*scale, in order; a parameter recipe's values as compact JSON."""
    if "layers" in values:
        return " ".join(f"{Path(m).name}:{i}x{s:.2f}" for m, i, s in values["layers"])
    return json.dumps(values, separators=(",", ":"))
