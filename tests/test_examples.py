"""The walkthroughs in examples/ and the jobs in search/ run as written, on the reduced zoo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergelab.evolve.job import load_job
from mergelab.merging import merge

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RECIPES = sorted((REPO / "examples").glob("*.yaml"))
SEARCH_JOBS = sorted(p for p in (REPO / "search").glob("*.yaml") if not p.name.startswith("lorahub_"))  # LoraHub jobs: tests/test_lorahub.py


def place(files: list[Path], folder: str, tmp_path: Path, zoo_dir: Path) -> Path:
    """Copy `files` into tmp/<folder>/ beside tmp/zoo -> the test zoo, as they sit in the repo."""
    (tmp_path / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    dest = tmp_path / folder
    dest.mkdir()
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def test_there_are_examples() -> None:
    assert len(EXAMPLE_RECIPES) >= 2 and (REPO / "examples" / "quickstart.sh").is_file()


def test_example_recipes_merge_and_score(tmp_path: Path, zoo_dir: Path) -> None:
    folder = place(EXAMPLE_RECIPES, "examples", tmp_path, zoo_dir)
    outputs = []
    for recipe in EXAMPLE_RECIPES:
        out = merge(folder / recipe.name, tmp_path / "out" / recipe.stem, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
        outputs.append(f"{recipe.stem}={out}")
    # the table script of the quickstart, with the merges as extra rows
    args = [sys.executable, str(REPO / "examples" / "zoo_table.py"), str(zoo_dir), "--limit", "5"]
    for item in outputs:
        args += ["--model", item]
    table = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "| expert:back |" in table and all(f"| {o.split('=')[0]} |" in table for o in outputs)


@pytest.mark.parametrize("job", SEARCH_JOBS, ids=[j.name for j in SEARCH_JOBS])
def test_search_jobs_validate_against_the_zoo(tmp_path: Path, zoo_dir: Path, job: Path) -> None:
    folder = place([job], "search", tmp_path, zoo_dir)
    loaded = load_job(folder / job.name)
    assert loaded.space.dimensions and loaded.optimizer.budget > 0


def test_the_default_job_runs_as_written(tmp_path: Path, zoo_dir: Path) -> None:
    """search/evolve.yaml (models and skills only): a few candidates on small splits; the start is
    the plain average of the experts and the report scores it beside the best."""
    import yaml

    from mergelab.evolve.loop import read_trials, run_search

    folder = place([REPO / "search" / "evolve.yaml"], "search", tmp_path, zoo_dir)
    data = yaml.safe_load((folder / "evolve.yaml").read_text())
    data["optimizer"] = {"budget": 5}
    data["splits"] = {"fitness": "validation[0:16]", "select": "validation[16:32]", "report": "test[0:16]"}
    (folder / "evolve.yaml").write_text(yaml.safe_dump(data))
    job = load_job(folder / "evolve.yaml")
    assert [t.metric.name for t in job.fitness.terms] == ["prob"] * 3 and len(job.space.dimensions) == 3
    assert job.optimizer.name == "NGOpt" and job.fitness.normalize == "gap"
    result = run_search(job, tmp_path / "run", progress=False)
    assert len(read_trials(tmp_path / "run")) == 5 and result.best_yaml.is_file()
    assert {"best", "start", "uniform"} <= set(result.report) and result.report["start"] == result.report["uniform"]
