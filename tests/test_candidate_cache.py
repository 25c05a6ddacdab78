"""The live merger's cache (`mergelab/methods/_cache.py`): candidates merged with it are bit for bit
those merged without it and those `mergelab merge` writes, over methods, densities, weights and seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergelab.evolve.live import LiveMerger
from mergelab.merging import merge
from mergelab.recipe import load_recipe
from tests.helpers import load_state, make_family, make_llama

EXPERTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("cache"), list(EXPERTS))


def candidate(fam: dict[str, Path], method: str, weights: list[float], densities: list[float | list[float]] | None = None,
              **options: object) -> dict:
    models = []
    for i, (name, w) in enumerate(zip(EXPERTS, weights)):
        params: dict = {"weight": w}
        if densities is not None:
            params["density"] = densities[i]
        models.append({"model": str(fam[name]), "parameters": params})
    out = {"merge_method": method, "base_model": str(fam["base"]), "models": models}
    if options:
        out["parameters"] = options
    return out


# every task-arithmetic preset over several densities (gradients, 1 = nothing dropped), weights and options
CANDIDATES = [
    ("ties", [0.7, 0.4, 1.1], [0.5, 0.3, 0.8], {}),
    ("ties", [0.2, -0.5, 0.9], [[0.1, 0.9], 1.0, 0.25], {"lambda": 1.3}),
    ("ties", [1.0, 1.0, 1.0], [0.05, 0.6, 0.95], {"rescale": True, "sign_from": "trimmed"}),
    ("dare_ties", [0.6, 0.9, 0.3], [0.4, 0.7, 0.2], {}),
    ("dare_ties", [0.6, 0.9, 0.3], [0.8, 0.1, 0.5], {"rescale_mode": "l2"}),
    ("task_arithmetic", [0.3, 0.8, -0.2], None, {}),
    ("task_arithmetic", [1.0, 0.5, 0.5], None, {"lambda": 0.6, "normalize": True}),
    ("breadcrumbs", [0.5, 0.5, 0.9], [0.6, 0.8, 0.3], {}),
    ("breadcrumbs_ties", [0.9, 0.2, 0.4], [0.3, 0.9, 0.7], {"rescale": True, "rescale_mode": "linf"}),
    ("della", [0.4, 0.8, 0.6], [0.5, 0.3, 0.7], {}),
    ("della_linear", [0.4, 0.8, 0.6], [0.6, 0.4, 0.2], {"epsilon": 0.1}),
    ("dare_linear", [0.5, 0.5, 0.5], [0.3, 0.3, 0.9], {"rescale_mode": "probability"}),
    ("ties", [0.7, 0.4, 1.1], [0.5, 0.3, 0.8], {}),  # the first again, from a full cache
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(bits(got[name]), bits(t)), f"{what}: {name}"


def test_cached_candidates_are_the_uncached_ones_and_the_merged_files(tmp_path: Path, fam: dict[str, Path]) -> None:
    start = load_recipe(candidate(fam, "ties", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]))
    cached, uncached = LiveMerger(start, cache=True), LiveMerger(start, cache=False)
    for i, (method, weights, densities, options) in enumerate(CANDIDATES):
        data = candidate(fam, method, weights, densities, **options)
        recipe = load_recipe(data)
        seed = i % 2
        cached.set_recipe(recipe, seed=seed)
        uncached.set_recipe(recipe, seed=seed)
        assert_bit_equal(cached.state(), uncached.state(), f"candidate {i} ({method})")
        if i % 3 == 0 or method.startswith(("dare", "della")):  # and what `mergelab merge` writes
            written = load_state(merge(data, tmp_path / f"out{i}", seed=seed, progress=False))
            assert_bit_equal(cached.state(), written, f"candidate {i} ({method}) vs mergelab merge")
    assert uncached.cache_nbytes == 0 and cached.cache_nbytes > 0
    cached.close()
    uncached.close()


def test_bfloat16_inputs_and_seeds(fam: dict[str, Path]) -> None:
    """Inputs rounded to bfloat16 first; random draws remembered for the latest seed only."""
    recipes = [load_recipe({**candidate(fam, m, [0.5, 0.8, 0.3], [0.3, 0.6, 0.4]), "dtype": "bfloat16"})
               for m in ("dare_ties", "ties")]
    cached, uncached = LiveMerger(recipes[0], cache=True), LiveMerger(recipes[0], cache=False)
    sizes = []
    for recipe, seed in ((recipes[0], 1), (recipes[0], 2), (recipes[1], 2), (recipes[0], 1)):
        cached.set_recipe(recipe, seed=seed)
        uncached.set_recipe(recipe, seed=seed)
        assert_bit_equal(cached.state(), uncached.state(), f"{recipe.merge_method} seed {seed}")
        sizes.append(cached.cache_nbytes)
    assert sizes[0] == sizes[1] < sizes[2] == sizes[3]  # a new seed replaces the draws; TIES adds ranks
    assert next(cached.model.parameters()).dtype == torch.bfloat16


def test_cache_size_for_ties(fam: dict[str, Path]) -> None:
    """TIES remembers the ranks of |delta| (int32): 4 bytes per element of each expert."""
    live = LiveMerger(load_recipe(candidate(fam, "ties", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])))
    live.set_recipe(load_recipe(candidate(fam, "ties", [0.3, 0.6, 0.9], [0.2, 0.4, 0.6])))
    elements = sum(t.numel() for t in live.state().values())
    assert live.cache_nbytes == 4 * elements * len(EXPERTS)
    live.close()


def test_large_tensors_with_rescale_match_merge_on_two_threads(tmp_path: Path) -> None:
    """Norms of tensors past torch's grain size (32K elements) add up per thread: the live merger
    runs ops on one thread, as `mergelab merge` does, so its rescaled candidates stay the same."""
    config = LlamaConfig(vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    fam = {"base": tmp_path / "base"}
    for i, name in enumerate(EXPERTS, start=1):
        fam[name] = make_llama(tmp_path / name, seed=i, perturb_from=tmp_path / "base", shard_size="1GB")
    data = candidate(fam, "dare_ties", [0.5, 0.8, 0.3], [0.3, 0.6, 0.4])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        live = LiveMerger(load_recipe(data))
        live.set_recipe(load_recipe(data), seed=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    written = load_state(merge(data, tmp_path / "out", seed=3, progress=False))
    assert max(t.numel() for t in written.values()) > 32768
    assert_bit_equal(live.state(), written, "dare_ties")
    live.close()
