"""`mergelab extract-lora`: a PEFT LoRA adapter from the SVD of FINETUNED - BASE.

Takes mergekit-extract-lora's (0.1.5) options under their names, so its command lines run:

    mergelab extract-lora BASE FINETUNED OUT --max-rank 32
    mergelab extract-lora --base-model BASE --model FINETUNED --out-path OUT --sv-epsilon 1e-3 -e 'layers\\.0\\.'

--max-rank (alias --rank, default 128 as mergekit), --sv-epsilon, --[no-]distribute-scale,
--[no-]embed-lora, --save-module, -i/--include-regex, -e/--exclude-regex, --skip-undecomposable:
see `mergelab/lora/extract.py` and `extract_plan.py` for what each does.
"""

from __future__ import annotations

import argparse
import logging

from mergelab.errors import RecipeError

log = logging.getLogger("mergelab")


def add_extract_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from the SVD of FINETUNED - BASE")
    p.add_argument("base", nargs="?", help="base model folder (or --base-model)")
    p.add_argument("finetuned", nargs="?", help="fine-tuned model folder, same architecture (or --model)")
    p.add_argument("out", nargs="?", help="output adapter folder (or --out-path)")
    p.add_argument("--base-model", dest="base_opt", help="as BASE (mergekit's spelling)")
    p.add_argument("--model", dest="finetuned_opt", help="as FINETUNED (mergekit's spelling)")
    p.add_argument("--out-path", dest="out_opt", help="as OUT (mergekit's spelling)")
    p.add_argument("--max-rank", "--rank", dest="max_rank", type=int, default=128, help="rank of every module, at most (default 128)")
    p.add_argument("--sv-epsilon", type=float, default=0.0, help="also drop singular values <= this (absolute; default 0: none)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split the singular values as sqrt(S) between A and B (default); --no-distribute-scale puts S in A")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="embeddings and the LM head as LoRA (default: saved in full, modules_to_save)")
    p.add_argument("--save-module", dest="save_modules", action="append", default=[], metavar="NAME",
                   help="save this module (full name or last part, e.g. lm_head) at full rank; repeatable")
    p.add_argument("-i", "--include-regex", dest="include", action="append", default=[], metavar="REGEX",
                   help="only modules whose name matches (re.search); repeatable")
    p.add_argument("-e", "--exclude-regex", dest="exclude", action="append", default=[], metavar="REGEX",
                   help="never modules whose name matches (re.search); repeatable")
    p.add_argument("--skip-undecomposable", action="store_true", help="leave out changed norms instead of saving them in full")
    p.add_argument("--device", default="cpu", help="torch device for the SVDs (cpu, cuda, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_extract_lora)


def run_extract_lora(args: argparse.Namespace) -> int:
    from mergelab.lora.extract import extract
    from mergelab.lora.extract_plan import ExtractOptions

    base, finetuned, out = (_one(args, name) for name in ("base", "finetuned", "out"))
    options = ExtractOptions(max_rank=args.max_rank, sv_epsilon=args.sv_epsilon, distribute_scale=args.distribute_scale,
                             embed_lora=args.embed_lora, save_modules=tuple(args.save_modules), include=tuple(args.include),
                             exclude=tuple(args.exclude), skip_undecomposable=args.skip_undecomposable)
    errors = extract(base, finetuned, out, options=options, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    worst = max(errors, key=lambda name: errors[name], default=None)
    if worst is not None:
        log.info("wrote %s: %d modules, worst relative error %.3e (%s)", out, len(errors), errors[worst], worst)
    return 0


def _one(args: argparse.Namespace, name: str) -> str:
    """A path given as the positional argument or as mergekit's option, not both."""
    flags = {"base": "--base-model", "finetuned": "--model", "out": "--out-path"}
    positional, option = getattr(args, name), getattr(args, f"{name}_opt")
    if positional and option:
        raise RecipeError(f"extract-lora: {name.upper()} given twice (positional and {flags[name]})")
    if not (positional or option):
        raise RecipeError(f"extract-lora: {name.upper()} is missing (positional, or {flags[name]})")
    return positional or option
