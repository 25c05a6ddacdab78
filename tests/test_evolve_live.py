"""The live merger holds, bit for bit, what `mergelab merge` writes for the same recipe, for a
sequence of candidates (other values, another method, a seeded random method, tied weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.merging import merge
from mergelab.evolve.live import LiveMerger
from mergelab.plan import make_plan, replan
from mergelab.recipe import load_recipe
from tests.helpers import load_state, make_family


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("live"), ["a", "b"])


def ties(fam: dict[str, Path], wa: float, da: list[float] | float, db: float, lam: float = 1.0, **extra: object) -> dict:
    return {"merge_method": "ties", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["a"]), "parameters": {"weight": wa, "density": da}},
                       {"model": str(fam["b"]), "parameters": {"weight": 0.5, "density": db}}],
            "parameters": {"lambda": lam}, **extra}


def assert_same_as_merge(live: LiveMerger, recipe: dict, out: Path, seed: int = 0) -> None:
    written = load_state(merge(recipe, out, seed=seed, progress=False))
    state = live.state()
    assert set(written) == set(state)
    for name, tensor in written.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_candidates_equal_the_merged_files(tmp_path: Path, llama: dict[str, Path]) -> None:
    live = LiveMerger(load_recipe(ties(llama, 0.6, 0.5, 0.7)))
    # the live model starts with nothing merged: each candidate below overwrites every tensor
    for i, recipe in enumerate([ties(llama, 0.9, [0.2, 0.9], 0.3, lam=1.3),
                                ties(llama, 0.1, 0.8, 1.0, lam=0.7),
                                {**ties(llama, 0.5, 0.5, 0.5), "merge_method": "task_arithmetic",
                                 "models": [{"model": str(llama["a"]), "parameters": {"weight": 0.3}},
                                            {"model": str(llama["b"]), "parameters": {"weight": 0.8}}]}]):
        timing = live.set_recipe(load_recipe(recipe))
        assert timing.merge > 0 and timing.load > 0
        assert_same_as_merge(live, recipe, tmp_path / f"out{i}")
    live.close()


def test_seeded_random_method_and_bfloat16_inputs(tmp_path: Path, llama: dict[str, Path]) -> None:
    recipe = {**ties(llama, 0.7, 0.4, 0.6), "merge_method": "dare_ties", "dtype": "bfloat16"}
    live = LiveMerger(load_recipe(recipe))
    live.set_recipe(load_recipe(recipe), seed=5)
    assert_same_as_merge(live, recipe, tmp_path / "dare", seed=5)
    assert next(live.model.parameters()).dtype == torch.bfloat16


def test_tied_head_is_written_once(tmp_path: Path) -> None:
    fam = make_family(tmp_path / "gpt2", ["a"], arch="gpt2")
    recipe = {"merge_method": "linear", "models": [{"model": str(fam["base"]), "parameters": {"weight": 0.3}},
                                                   {"model": str(fam["a"]), "parameters": {"weight": 0.7}}]}
    live = LiveMerger(load_recipe(recipe))
    live.set_recipe(load_recipe(recipe))
    assert_same_as_merge(live, recipe, tmp_path / "out")
    model = live.model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # and the live model computes what the merged folder computes
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_replan_reads_no_header_again(llama: dict[str, Path]) -> None:
    plan = make_plan(load_recipe(ties(llama, 0.6, 0.5, 0.7)))
    new = replan(plan, load_recipe(ties(llama, 0.2, [0.1, 0.9], 0.7)))
    assert all(a is b for a, b in zip(new.checkpoints, plan.checkpoints))
    first_layer = next(j for j in new.jobs if ".layers.0." in j.name)
    last_layer = next(j for j in new.jobs if ".layers.3." in j.name)
    assert first_layer.params[0]["density"] == pytest.approx(0.1) and last_layer.params[0]["density"] == pytest.approx(0.9)
    assert new.jobs[0].params[0]["weight"] == 0.2
    plan.close()
