"""The `mergelab` command: one group of subcommands, each a thin layer over the Python API.

Bad input raises `MergelabError`; it is printed on one line, with the Python arguments it names
spelled as this command's flags (`device='cuda:9'` -> `--device cuda:9`), and the exit code is 2
(`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from mergelab.cli_errors import as_flags, flags
from mergelab.cli_extract import add_extract_lora
from mergelab.cli_mergekit import add_mergekit_flags, apply_mergekit_flags
from mergelab.errors import MergelabError

log = logging.getLogger("mergelab")


# ---------------------------------------------------------------- merge
def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="run a merge recipe (mergekit YAML schema) into OUT")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("out", help="output model folder (written as OUT.partial/, renamed at the end)")
    p.add_argument("--device", default="cpu", help="torch device for the math: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed for randomised methods (DARE, DELLA)")
    p.add_argument("--shard-size", default="5GB", help="max shard size, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--memory", default="1GB",
                   help="memory for the tensors being merged, e.g. 1GB (default), 4GB, or 'none' for no limit; larger "
                        "tensors are merged in blocks, with the same result (the process adds its runtime, ~0.4 GB on CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin checkpoints (loaded with weights_only=True)")
    p.add_argument("--float32-arithmetic", action="store_true",
                   help="compute bfloat16/float16 merges in float32 and round once at the output (the recipe key "
                        "'arithmetic: float32'); default: mergekit's arithmetic, bit for bit")
    add_mergekit_flags(p)
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from mergelab.merging import merge

    mergekit_options = apply_mergekit_flags(args)
    merge(
        args.recipe,
        args.out,
        device=args.device,
        seed=args.seed,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        float32_arithmetic=args.float32_arithmetic,
        **mergekit_options,
        memory=None if args.memory.lower() == "none" else args.memory,
    )
    return 0


# ---------------------------------------------------------------- zoo
def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the tiny trained model zoo (base, experts, LoRA adapters, tasks)")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    b = zsub.add_parser("build", help="train the zoo into DIR (reuses a complete one; minutes on CPU)")
    b.add_argument("dir", help="zoo folder (built as DIR.partial/, renamed at the end)")
    b.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and batch order (default 0)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="smaller, faster zoo (what the test suite uses)")
    size.add_argument("--deep", action="store_true", help="eight narrower layers, for data-flow (layer routing) search")
    b.add_argument("--overwrite", action="store_true", help="replace DIR if it holds a zoo built with other settings")
    b.add_argument("--workers", type=int, default=None, help="processes training experts/adapters (default 2)")
    b.set_defaults(func=_run_zoo_build)


def _run_zoo_build(args: argparse.Namespace) -> int:
    from mergelab.zoo import build_zoo

    out = build_zoo(args.dir, seed=args.seed, reduced=args.reduced, overwrite=args.overwrite, workers=args.workers,
                    deep=args.deep)
    print(out)
    return 0


# ---------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    from mergelab.metrics import METRICS  # the registry (imports no model library)

    p = sub.add_parser("eval", help="score a model folder on a zoo skill, a JSONL file or an lm-eval task")
    p.add_argument("model", help="model folder (HF model, or PEFT adapter whose base it names)")
    p.add_argument("--task", required=True, help="zoo skill, JSONL file, lm-eval task name or local lm-eval task folder")
    p.add_argument("--split", default="test", help="split of a zoo skill (default test; lm-eval uses its task's split)")
    p.add_argument("--metric", choices=tuple(METRICS), default=None,
                   help="accuracy (default for zoo skills and files), nll, prob, or lm-eval (default for other tasks)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--zoo", default=None, help="zoo folder holding the task data (default: the zoo MODEL sits in)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (default 256)")
    p.add_argument("--json", action="store_true", help="print the score as one JSON object")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from mergelab.eval.run import evaluate

    result = evaluate(
        args.model, args.task, split=args.split, metric=args.metric, limit=args.limit, zoo=args.zoo,
        batch_size=args.batch_size,
    )  # fmt: skip
    print(json.dumps(result.to_dict()) if args.json else result)
    return 0


# ---------------------------------------------------------------- lora compose (extract-lora: cli_extract.py)
def _add_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapter tools")
    group = p.add_subparsers(dest="lora_command", required=True)
    c = group.add_parser("compose", help="combine PEFT LoRA adapters with weights into one adapter folder OUT")
    c.add_argument("out", help="output adapter folder")
    c.add_argument("--adapter", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="an adapter folder and its weight (default 1); repeat for each adapter")
    c.add_argument("--method", default="svd", help="linear | cat | svd | ties | dare_linear | dare_ties (default svd)")
    c.add_argument("--rank", type=int, default=None, help="rank after the SVD (svd, ties, dare_*); default the largest input rank")
    c.add_argument("--density", type=float, default=1.0, help="fraction kept by ties / dare_* (default 1)")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the merge method on the updates, e.g. sign_from=trimmed, rescale_mode=probability")
    c.add_argument("--seed", type=int, default=0, help="seed for dare_*")
    c.add_argument("--device", default="cpu", help="torch device for the math (cpu, cuda, ...)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.set_defaults(func=_run_lora_compose)


def _run_lora_compose(args: argparse.Namespace) -> int:
    from mergelab.lora.compose import compose

    pairs = [_adapter_weight(a) for a in args.adapter]
    out = compose([p for p, _ in pairs], [w for _, w in pairs], args.out, method=args.method, rank=args.rank,
                  density=args.density, options=dict(_option(o) for o in args.option), seed=args.seed,
                  device=args.device, overwrite=args.overwrite)
    log.info("wrote %s", out)
    return 0


def _adapter_weight(text: str) -> tuple[str, float]:
    """`path:0.5` -> (path, 0.5); a path alone has weight 1."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _option(text: str) -> tuple[str, object]:
    """`key=value`, the value read as YAML (numbers, true/false, strings)."""
    import yaml

    from mergelab.errors import RecipeError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"--option {text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


# ---------------------------------------------------------------- search
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="evolve a merge recipe (search/*.yaml job), or `search report RUN`, `search pick RUN TRIAL`",
                       description="mergelab search JOB.yaml [--out RUN] [--resume] ...  |  mergelab search report RUN  |  "
                                   "mergelab search pick RUN TRIAL (several objectives: best.yaml <- that front member)")
    p.add_argument("job", help="search job YAML file, or the word `report` or `pick` followed by a run folder")
    p.add_argument("run", nargs="?", help="with `report` or `pick`: the run folder")
    p.add_argument("trial", nargs="?", help="with `pick`: the trial index of a front member (search report lists them)")
    p.add_argument("--out", default=None, help="run folder (default runs/<job name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: told trials are replayed, not re-evaluated")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default the job's workers.count)")
    p.add_argument("--device", default=None, help="torch device of each worker (default the job's workers.device)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default $RAY_ADDRESS; none: local)")
    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mergelab.errors import RecipeError

    if args.job == "report":
        from mergelab.evolve.report import write_report

        if args.run is None:
            raise RecipeError("search report: give the run folder: mergelab search report RUN")
        for path in write_report(args.run):
            print(path)
        if (Path(args.run) / "front.png").is_file():
            print(Path(args.run) / "front.png")
        return 0
    if args.job == "pick":
        from mergelab.evolve.front import pick

        if args.run is None or args.trial is None or not args.trial.isdigit():
            raise RecipeError("search pick: give the run folder and a trial index: mergelab search pick RUN TRIAL")
        print(pick(args.run, int(args.trial)))
        return 0
    if args.run is not None:
        raise RecipeError(f"search: unexpected argument {args.run!r}; the run folder is given with --out")
    from mergelab.evolve.job import load_job
    from mergelab.evolve.loop import run_search

    job = load_job(args.job)
    out = Path(args.out) if args.out else Path("runs") / Path(args.job).stem
    result = run_search(job, out, resume=args.resume, device=args.device, workers=args.workers, address=args.address,
                        progress=not args.quiet)
    print(result.best_yaml)
    return 0


# ---------------------------------------------------------------- lorahub
def _add_lorahub(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lorahub", help="compose a pool of LoRA adapters for a task from a few examples (LoraHub)")
    p.add_argument("job", help="LoraHub job YAML file (search/lorahub_*.yaml)")
    p.add_argument("out", help="output folder: the composed PEFT adapter, weights.json, steps.jsonl, report.json")
    p.add_argument("--budget", type=int, default=None, help="number of weight vectors tried (default the job's optimizer.budget)")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default the job's workers.count)")
    p.add_argument("--device", default=None, help="torch device of each worker (default the job's workers.device)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default $RAY_ADDRESS; none: local)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_run_lorahub)


def _run_lorahub(args: argparse.Namespace) -> int:
    from mergelab.lora.hub import run_lorahub
    from mergelab.lora.hub_job import load_hub_job

    result = run_lorahub(load_hub_job(args.job), args.out, overwrite=args.overwrite, device=args.device,
                         workers=args.workers, address=args.address, budget=args.budget, progress=not args.quiet)
    print(result.out)
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_merge, _add_zoo, _add_eval, _add_lora, add_extract_lora, _add_search, _add_lorahub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergelab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; `argv` None means this process's command line (then a merge ends the process itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    code = _run(args, parser)
    if argv is None and args.command == "merge":
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: with torch loaded, freeing every module's
    objects took 1.1-1.5 s on the 2-core machine, after the model was already written and renamed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        return int(args.func(args) or 0)
    except MergelabError as exc:
        if args.debug:
            raise
        print(f"mergelab: error: {as_flags(exc, flags(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
