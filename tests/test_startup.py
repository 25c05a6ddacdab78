"""Start-up of `mergelab merge`: the merge path imports only what a merge needs (no transformers,
PEFT, nevergrad, Ray, lm-eval), and the command line ends the process itself once the model is
written (skipping the interpreter's teardown) with the right exit code. Each check runs in a fresh
process, since this test process has those packages loaded already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import load_state, make_family

HEAVY = ("transformers", "peft", "nevergrad", "ray", "lm_eval", "matplotlib")

PROBE = """
import json, sys
from mergelab.cli import main
code = main(["--quiet", "merge", sys.argv[1], sys.argv[2]])
print(json.dumps({"code": code, "loaded": [m for m in sys.argv[3:] if m in sys.modules]}))
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    fam = make_family(root / "m", ["a", "b"])
    text = {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "bfloat16",
            "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(fam["b"]), "parameters": {"weight": 0.4, "density": 0.7}}]}
    path = root / "ties.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def test_plain_merge_imports_no_heavy_package(recipe: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, str(recipe), str(tmp_path / "out"), *HEAVY],
                         capture_output=True, text=True, check=True)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, res.stderr
    assert "model.embed_tokens.weight" in load_state(tmp_path / "out")


def test_command_line_exits_with_the_merge_written(recipe: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mergelab.cli", "--quiet", "merge", str(recipe), str(tmp_path / "out")]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out.partial").exists()
    assert load_state(tmp_path / "out")["lm_head.weight"].dtype.is_floating_point
    again = subprocess.run(cmd, capture_output=True, text=True)  # OUT exists: a one-line error, exit 2
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
