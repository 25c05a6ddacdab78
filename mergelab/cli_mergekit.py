"""mergekit-yaml's flags on `mergelab merge`, so a command line written for mergekit runs as it is.

Each flag of mergekit 0.1.5's `mergekit-yaml --help` either maps to what mergelab does, or is
accepted with the reason it changes nothing here (shown in `mergelab merge --help`); a flag
neither knows is still an error.

    --cuda, --gpu-rich           --device cuda (unless --device was given)
    --random-seed N              --seed N
    --out-shard-size SIZE        --shard-size, in mergekit's units: bytes, K/M/B = 10^3/10^6/10^9
                                 (its help says parameters; its writer counts bytes)
    -j, --num-threads N          N worker threads, each merging one tensor
    --allow-crimes               merge models whose config.json names different architectures
    --no-copy-tokenizer          write no tokenizer files (unless the recipe builds an output tokenizer)
    --no-write-model-card        write no README.md and no mergekit_config.yml
    --quiet, -v / -vv            no progress bars / debug logs
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from mergelab.errors import RecipeError

log = logging.getLogger(__name__)

# accepted, no effect here: flag -> why (boolean flags also take their --no- form)
NO_EFFECT_SWITCHES = {
    "lazy-unpickle": "safetensors are read tensor by tensor already; pickled .bin checkpoints need --allow-pickle",
    "low-cpu-memory": "merges stream a few tensors at a time; the math runs on --device",
    "read-to-gpu": "tensors are read to the CPU and moved to --device for the math",
    "multi-gpu": "one device does the math (--device)",
    "clone-tensors": "each output tensor is written once, as it is merged",
    "async-write": "each tensor is streamed into its shard as it is merged",
    "trust-remote-code": "no model code runs: weights, config.json and tokenizer files are read as data",
    "safe-serialization": "the output is always safetensors",
}
NO_EFFECT_VALUES = {
    "transformers-cache": "models are local folders; nothing is downloaded",
    "lora-merge-cache": "adapters are applied tensor by tensor as they are read; nothing is cached",
    "lora-merge-dtype": "adapters are applied tensor by tensor in float32 (float64 weights: float64), cast to the stored dtype",
    "write-threads": "each tensor is streamed into its shard as it is merged",
}
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def add_mergekit_flags(parser: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags, in their own help section; every default is 'not given'."""
    g = parser.add_argument_group("mergekit-yaml flags", "accepted so that mergekit command lines run as they are")
    quiet = argparse.SUPPRESS
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=quiet, help="--device cuda")
    g.add_argument("--gpu-rich", action="store_true", default=quiet, help="--device cuda")
    g.add_argument("--random-seed", type=int, default=quiet, metavar="N", help="--seed N")
    g.add_argument("--out-shard-size", default=quiet, metavar="SIZE",
                   help="--shard-size in mergekit's units: bytes, with K/M/B = 10^3/10^6/10^9 (default 5B)")
    g.add_argument("-j", "--num-threads", type=int, default=quiet, metavar="N", help="worker threads, each merging one tensor")
    g.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=quiet,
                   help="merge models whose config.json names different architectures (tensor shapes must still match)")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=quiet,
                   help="copy the base's (or first model's) tokenizer files (the default)")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=quiet,
                   help="write README.md and mergekit_config.yml (the default)")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=quiet, help="as mergelab -q: no progress bars")
    g.add_argument("-v", action="count", default=quiet, dest="verbosity", help="-vv: debug logs (info is the default)")
    g.add_argument("--unsafe-truncate-embeddings", action=argparse.BooleanOptionalAction, default=quiet,
                   help="not supported: align vocabularies by token with tokenizer_source instead")
    for flag, why in NO_EFFECT_SWITCHES.items():
        g.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=quiet, help=f"no effect: {why}")
    for flag, why in NO_EFFECT_VALUES.items():
        g.add_argument(f"--{flag}", default=quiet, metavar="X", help=f"no effect: {why}")


def apply_mergekit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Fold the mergekit flags given into mergelab's own (`args` updated in place); returns the
    further keyword arguments of `merge()` they ask for."""
    given = vars(args)
    if given.get("cuda") or given.get("gpu_rich"):
        args.device = "cuda" if args.device == "cpu" else args.device
    if "random_seed" in given:
        args.seed = args.random_seed
    if "out_shard_size" in given:
        args.shard_size = parse_kmb(args.out_shard_size)
    if given.get("unsafe_truncate_embeddings"):
        raise RecipeError("--unsafe-truncate-embeddings: not supported; align the models' vocabularies by token with "
                          "tokenizer_source: base (or union) in the recipe")
    if given.get("safe_serialization") is False:
        log.warning("--no-safe-serialization: mergelab writes safetensors only")
    if given.get("verbosity", 0) >= 2:
        logging.getLogger().setLevel(logging.DEBUG)
    return {key: given[flag] for flag, key in (("num_threads", "workers"), ("allow_crimes", "allow_crimes"),
                                               ("copy_tokenizer", "copy_tokenizer"), ("write_model_card", "write_model_card"))
            if flag in given}


def parse_kmb(text: str) -> int:
    """mergekit's size: '5B' -> 5_000_000_000, '500M', '64K', '1000' (bytes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMbB]?)\s*", text)
    if not m or int(m[1]) <= 0:
        raise RecipeError(f"--out-shard-size: cannot read {text!r}; use e.g. 5B, 500M, 64K (bytes, as mergekit)")
    return int(m[1]) * _SUFFIXES[m[2].upper()]
