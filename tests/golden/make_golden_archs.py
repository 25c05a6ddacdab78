"""Regenerate mergekit's TIES and slerp merges of every architecture in `arch_models.ARCHS`.

Run with the mergekit venv (this script must not import mergelab):

    /work/mkvenv/bin/python tests/golden/make_golden_archs.py

For each arch and recipe (`arch_models.RECIPES`, and `slices_recipe` where there is one stack) it stores mergekit's tensors as
`archs/<arch>_<recipe>.safetensors`, or, where mergekit fails, its error in `archs/manifest.json`.
The inputs are not stored: `arch_models.build` makes them again from a seed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_models import ARCHS, RECIPES, SEQ2SEQ, build, golden_dir, slices_recipe  # noqa: E402


def run_mergekit(recipe: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))


def main() -> None:
    out_dir = golden_dir()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    import transformers

    manifest = {"mergekit_version": version("mergekit"), "transformers_version": transformers.__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            build(arch, Path(tmp) / arch)
            recipes = {**RECIPES, **({} if arch in SEQ2SEQ else {"slices": slices_recipe})}
            for method, recipe in recipes.items():
                case, out = f"{arch}_{method}", Path(tmp) / f"out_{arch}_{method}"
                try:
                    run_mergekit(recipe(str(Path(tmp) / arch)), out)
                except Exception as exc:  # recorded: where mergekit fails, the test checks only mergelab
                    manifest["cases"][case] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(case, "FAILED", manifest["cases"][case]["error"])
                    traceback.print_exc(limit=2)
                    continue
                merged: dict[str, torch.Tensor] = {}
                for shard in sorted(out.glob("*.safetensors")):
                    merged.update(load_file(str(shard)))
                save_file({k: v.contiguous() for k, v in merged.items()}, str(out_dir / f"{case}.safetensors"))
                manifest["cases"][case] = {"tensors": len(merged)}
                print(case, len(merged), "tensors")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
