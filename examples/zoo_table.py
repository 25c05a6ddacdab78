"""Print a markdown table of how the zoo's base and experts score on every skill.

    python examples/zoo_table.py zoo            # after `mergelab zoo build zoo`

Each cell is test-split exact-match accuracy / mean answer NLL (nats per token); the expert
should lead on its own skill and trail on the others. `--adapters` adds the LoRA adapters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergelab.eval import load_model, load_task, score
from mergelab.zoo import open_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path, help="a built zoo folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="examples per skill (default: all)")
    parser.add_argument("--adapters", action="store_true", help="also score each LoRA adapter (merged into base)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="also score this model folder (e.g. a merge of the experts); repeatable")
    args = parser.parse_args()
    zoo = open_zoo(args.zoo)
    models = {"base": zoo.base} | {f"expert:{s}": p for s, p in zoo.experts.items()}
    if args.adapters:
        models |= {f"adapter:{s}": p for s, p in zoo.adapters.items()}
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--model {item!r}: expected NAME=DIR")
        models[name] = Path(folder)
    tasks = {skill: load_task(zoo.root, skill, args.split, args.limit) for skill in zoo.skills}
    print(f"| model | {' | '.join(tasks)} |")
    print(f"|---|{'---|' * len(tasks)}")
    for name, folder in models.items():
        model, tokenizer = load_model(folder)
        cells = []
        for task in tasks.values():
            acc = score(model, tokenizer, task, "accuracy").value
            nll = score(model, tokenizer, task, "nll").value
            cells.append(f"{acc:.2f} / {nll:.2f}")
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\naccuracy / NLL on the {args.split} split (n={len(next(iter(tasks.values())))} per skill)")


if __name__ == "__main__":
    main()
