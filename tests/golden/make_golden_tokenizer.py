"""Regenerate the tokenizer golden outputs for `tests/test_tokenizer.py`.

Run with the mergekit venv (this script must not import mergelab):

    /work/mkvenv/bin/python tests/golden/make_golden_tokenizer.py

It builds the models of `tokenizer_models.py` (the test builds the same ones), runs every recipe of
CASES with mergekit and writes, under `tokenizer/`: the recipe (`<case>.yaml`, model paths
`models/<name>` relative to it), mergekit's merged tensors (`<case>.safetensors`) and its output
tokenizer (`<case>.tokenizer.json`: the vocabulary, the added tokens and config.json's vocab_size),
plus `manifest.json` with the mergekit version.

Every union case names a base_model: without one, mergekit takes "the first" of a Python set of the
models as the tokenizer's base, which changes from run to run (mergelab takes the first model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from make_golden import run_mergekit
from tokenizer_models import make_models, tokenizer_summary

HERE = Path(__file__).resolve().parent / "tokenizer"


def m(name: str) -> str:
    return f"models/{name}"


CASES: dict[str, dict] = {
    # qq: in chat and code, not in the base -> their mean in the base's rows; the <|im_*|> rows come from chat
    "union_ties": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("chat"), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m("code"), "parameters": {"weight": 0.4, "density": 0.7}}],
        "tokenizer_source": "union",
    },
    "union_linear": {
        "merge_method": "linear",
        "base_model": m("base"),
        "models": [{"model": m("base"), "parameters": {"weight": 0.5}},
                   {"model": m("chat"), "parameters": {"weight": 0.3}},
                   {"model": m("code"), "parameters": {"weight": 0.2}}],
        "tokenizer_source": "union",
    },
    # chat's rows re-ordered to the base's vocabulary, its extra tokens dropped
    "base_slerp": {
        "merge_method": "slerp",
        "base_model": m("base"),
        "models": [{"model": m("base")}, {"model": m("chat")}],
        "parameters": {"t": [0.2, 0.8]},
        "tokenizer_source": "base",
    },
    # code's vocabulary (letters reversed): every other model's rows permuted; code's padding rows dropped
    "model_task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": m("base"),
        "models": [{"model": m("chat"), "parameters": {"weight": 0.7}},
                   {"model": m("code"), "parameters": {"weight": 0.5}}],
        "tokenizer_source": m("code"),
    },
    # a model's rows, not the base's, for a token the base lacks
    "tokens_block": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("chat"), "parameters": {"weight": 0.5, "density": 0.6}},
                   {"model": m("code"), "parameters": {"weight": 0.5, "density": 0.6}}],
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<|im_end|>": {"source": {"kind": "model_token", "model": m("base"), "token": "</s>"}},
                "<|im_start|>": {"source": {"kind": "zero"}, "force": True},
                "hello": {"source": m("code"), "force": True},
                "<tool>": {"source": {"kind": "model_token", "model": m("chat"), "token_id": 5}},
                "qq": {"source": {"kind": "zero"}},
            },
            "pad_to_multiple_of": 16,
        },
    },
    # the block's default source is union
    "tokens_block_defaults": {
        "merge_method": "task_arithmetic",
        "base_model": m("base"),
        "models": [{"model": m("chat"), "parameters": {"weight": 1.0}}],
        "tokenizer": {"pad_to_multiple_of": 8},
    },
}
CASES["union_linear_bf16"] = {**CASES["union_linear"], "dtype": "bfloat16"}  # the means of rows computed in bfloat16


def _absolute(data: dict, root: Path) -> dict:
    """Every model path of a recipe made absolute (mergekit resolves them against the working directory)."""
    def fix(value: object) -> object:
        if isinstance(value, str) and value.startswith("models/"):
            return str((root / value).resolve())
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(data)  # type: ignore[return-value]


def main() -> None:
    import mergekit  # noqa: F401  (fail early outside the mergekit venv)
    from importlib.metadata import version

    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    manifest = {"mergekit_version": version("mergekit"), "cases": sorted(CASES)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_models(work / "models")
        for case, recipe in CASES.items():
            recipe = {**recipe, "dtype": recipe.get("dtype", "float32")}
            text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
            (HERE / f"{case}.yaml").write_text(text)
            (work / f"{case}.yaml").write_text(yaml.safe_dump(_absolute(recipe, work), sort_keys=False))
            out = work / f"out_{case}"
            run_mergekit(work / f"{case}.yaml", out)
            merged: dict[str, torch.Tensor] = {}
            for shard in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(shard)))
            save_file({k: v.contiguous() for k, v in merged.items()}, str(HERE / f"{case}.safetensors"))
            summary = tokenizer_summary(out)
            (HERE / f"{case}.tokenizer.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
            print(f"{case}: {len(merged)} tensors, vocab {len(summary['vocab'])}, vocab_size {summary['vocab_size']}")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
