"""Every recipe in `strategies/` runs as written against a fixture zoo, and its output loads in
transformers and gives finite logits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergelab.merging import merge
from mergelab.methods import method_names
from tests.helpers import load_state, make_llama

STRATEGIES = Path(__file__).resolve().parent.parent / "strategies"
RECIPES = sorted(STRATEGIES.glob("*.yaml"))


def test_one_strategy_per_method() -> None:
    assert len(RECIPES) >= 13
    methods = {p.stem: yaml.safe_load(p.read_text())["merge_method"] for p in RECIPES}
    assert all(stem == method for stem, method in methods.items())  # named after its method
    assert sorted(methods.values()) == method_names()


def test_strategies_have_a_header() -> None:
    for path in RECIPES:
        header = path.read_text().split("merge_method:")[0]
        assert header.startswith("# ") and header.count("\n# ") >= 3, path.name
        assert "When:" in header and "Key parameters:" in header, path.name


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`root/zoo/{base,experts/<skill>}` for every skill the strategies name; `root/strategies/`."""
    root = tmp_path_factory.mktemp("catalog")
    skills = sorted({m for p in RECIPES for m in re.findall(r"\.\./zoo/experts/(\w+)", p.read_text())})
    base = make_llama(root / "zoo" / "base")
    for i, skill in enumerate(skills, start=1):
        make_llama(root / "zoo" / "experts" / skill, seed=i, perturb_from=base, scale=0.02)
    shutil.copytree(STRATEGIES, root / "strategies")
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_strategy_runs_and_loads(recipe: Path, layout: Path) -> None:
    out = merge(layout / "strategies" / recipe.name, layout / "out" / recipe.stem, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((out / "config.json").read_text())
    assert len(model.model.layers) == config["num_hidden_layers"]
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 10, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    merged, base = load_state(out), load_state(layout / "zoo" / "base")
    assert any(not torch.equal(merged[k], base[k]) for k in base if k in merged)  # it did something
