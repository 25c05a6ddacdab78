"""The `mergelab` command: one group of subcommands, each a thin layer over the Python API.

Bad input raises `MergelabError`; it is printed on one line and the exit code is 2
(`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

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
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin checkpoints (loaded with weights_only=True)")
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from mergelab.merging import merge

    merge(
        args.recipe,
        args.out,
        device=args.device,
        seed=args.seed,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_merge,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergelab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MergelabError as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())  # one line, always
        print(f"mergelab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
