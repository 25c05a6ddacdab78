"""Every architecture of the matrix, merged and loaded: tiny random models built from configs
(Llama, Mistral, Qwen2, Gemma2, GPT-NeoX, Mixtral, T5), each merged with linear and with slerp over
a layer gradient, and, where there is one stack of layers, stacked with a passthrough `slices`
recipe. Each output loads with `from_pretrained` with no missing, unexpected or mismatched keys
and runs a forward pass. The slices over Qwen2 and Gemma2 are the case mergekit 0.1.5 fails on:
their config's `layer_types` must follow the new layer count, layer by layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, Gemma2Config, GPTNeoXConfig, MixtralConfig,
                          PretrainedConfig, Qwen2Config)

from mergelab.merging import merge
from tests.helpers import HIDDEN, VOCAB, llama_config, load_state, mistral_config, t5_config

SMALL = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: llama_config(4),
    "mistral": lambda: mistral_config(4),
    # sliding attention on layers 2-3 only: layer_types is not one value repeated
    "qwen2": lambda: Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2, **SMALL),
    "gemma2": lambda: Gemma2Config(num_hidden_layers=4, head_dim=8, sliding_window=16, **SMALL),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=64),
    "mixtral": lambda: MixtralConfig(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "t5": lambda: t5_config(3),
}
ONE_STACK = [a for a in CONFIGS if a != "t5"]


def _auto(arch: str) -> type:
    return AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """arch -> (base, fine-tune) folders: a random model and a copy with noise on every weight."""
    root = tmp_path_factory.mktemp("archs")
    built: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in built:
            torch.manual_seed(0)
            model = _auto(arch).from_config(CONFIGS[arch]())
            model.save_pretrained(root / arch / "base")
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / arch / "tuned")
            built[arch] = (root / arch / "base", root / arch / "tuned")
        return built[arch]

    return get


def load_and_run(arch: str, folder: Path) -> torch.Tensor:
    """Load with no key left over either way; the logits of a short input."""
    model, info = _auto(arch).from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.arange(10).reshape(2, 5) % VOCAB
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :3]) if arch == "t5" else model(input_ids=ids)
    assert torch.isfinite(out.logits).all()
    return out.logits


RECIPES = {
    "linear": lambda base, tuned: {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.3}},
                                                                         {"model": str(tuned), "parameters": {"weight": 0.7}}]},
    "slerp": lambda base, tuned: {"merge_method": "slerp", "base_model": str(base),
                                  "models": [{"model": str(base)}, {"model": str(tuned)}], "parameters": {"t": [0.1, 0.9]}},
}


@pytest.mark.parametrize("method", RECIPES)
@pytest.mark.parametrize("arch", CONFIGS)
def test_merge_loads_and_runs(arch: str, method: str, models: Callable, tmp_path: Path) -> None:
    base, tuned = models(arch)
    out = merge(RECIPES[method](base, tuned), tmp_path / "out", progress=False)
    ours, a, b = load_state(out), load_state(base), load_state(tuned)
    assert ours.keys() == a.keys()
    moved = [n for n in ours if ours[n].is_floating_point() and not torch.equal(ours[n], a[n]) and not torch.equal(ours[n], b[n])]
    assert len(moved) > len(ours) // 2  # the merge is neither input
    load_and_run(arch, out)


@pytest.mark.parametrize("arch", ONE_STACK)
def test_layer_stacking_loads_and_runs(arch: str, models: Callable, tmp_path: Path) -> None:
    """Layers [0, 2) of the base then [1, n) of the fine-tune: n + 1 layers, per-layer config lists in that order."""
    base, tuned = models(arch)
    config = json.loads((base / "config.json").read_text())
    n = config["num_hidden_layers"]
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tuned), "layer_range": [1, n]}]}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    got = json.loads((out / "config.json").read_text())
    assert got["num_hidden_layers"] == n + 1
    if "layer_types" in config:
        assert got["layer_types"] == config["layer_types"][0:2] + config["layer_types"][1:n]
    ours, b = load_state(out), load_state(tuned)
    layer = next(k for k in b if ".layers.1." in k)
    assert torch.equal(ours[layer.replace(".layers.1.", ".layers.2.")], b[layer])  # output layer 2 is the tuned's layer 1
    load_and_run(arch, out)
