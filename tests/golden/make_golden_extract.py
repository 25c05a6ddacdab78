"""Regenerate mergekit-extract-lora's adapters for `tests/test_extract_lora.py`.

Run with the mergekit venv (this script must not import mergelab):

    /work/mkvenv/bin/python tests/golden/make_golden_extract.py

It extracts from the stored Llama-shaped inputs (`inputs/a` over `inputs/base`, config
`config.json`) with each case's command-line arguments and stores the adapter's tensors and config
under `extract/<case>/`, with `extract/cases.json` (arguments and mergekit version).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "rank4": ["--max-rank", "4"],
    "epsilon_embed": ["--max-rank", "12", "--sv-epsilon", "0.15", "--embed-lora", "--no-distribute-scale",
                      "-e", r"layers\.3\."],
}


def main() -> None:
    out_root = HERE / "extract"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir()
    script = Path(sys.executable).parent / "mergekit-extract-lora"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("base", "a"):
            (work / name).mkdir()
            shutil.copy(HERE / "inputs" / f"{name}.safetensors", work / name / "model.safetensors")
            shutil.copy(HERE / "config.json", work / name / "config.json")
        for case, args in CASES.items():
            out = work / f"out_{case}"
            # mergekit writes the adapter, then fails to look the base up on the hub for its model card
            subprocess.run([str(script), "--model", "a", "--base-model", "base", "--out-path", str(out), *args],
                           cwd=work, capture_output=True)
            (out_root / case).mkdir()
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(out / file, out_root / case / file)
            print(case, json.loads((out / "adapter_config.json").read_text())["r"])
    (out_root / "cases.json").write_text(json.dumps({"mergekit_version": version("mergekit"), "cases": CASES}, indent=2) + "\n")


if __name__ == "__main__":
    main()
