"""Layer stacks of other shapes than a decoder's `model.layers.N`: T5's two stacks of nested
blocks (`encoder.block.N.layer.M...`), where N is the layer and M a sub-layer. A gradient must
follow N over each stack's own depth (mergekit's modules); a slices recipe, which indexes one
stack, must be refused in one line instead of writing a model that does not load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import T5ForConditionalGeneration

from mergelab.architecture import find_stacks, parse_layer
from mergelab.cli import main
from mergelab.merging import merge
from tests.helpers import load_state, make_family


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random T5 (encoder 3 blocks, decoder 2) and a perturbed copy."""
    return make_family(tmp_path_factory.mktemp("t5"), ["a"], arch="t5", layers=3, scale=0.05)


def hand_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two tensors as flat vectors, in float64 (the linear branch when nearly colinear)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out.reshape(v0.shape)


def test_the_block_is_the_layer_not_the_sub_layer() -> None:
    parsed = parse_layer("encoder.block.2.layer.1.DenseReluDense.wo.weight")
    assert parsed is not None and (parsed.prefix, parsed.index, parsed.suffix) == ("encoder.block", 2, "layer.1.DenseReluDense.wo.weight")
    parsed = parse_layer("model.layers.7.mlp.layer.3.weight")  # any nesting: the outermost index wins
    assert parsed is not None and (parsed.prefix, parsed.index) == ("model.layers", 7)


def test_t5_has_two_stacks_of_their_own_depth(t5: dict[str, Path]) -> None:
    from mergelab.checkpoint import Checkpoint

    stacks = find_stacks(Checkpoint(t5["base"]).tensors)
    assert {p: s.num_layers for p, s in stacks.items()} == {"encoder.block": 3, "decoder.block": 2}


def test_t5_slerp_gradient_follows_each_stacks_blocks(tmp_path: Path, t5: dict[str, Path]) -> None:
    recipe = {"merge_method": "slerp", "base_model": str(t5["base"]),
              "models": [{"model": str(t5["base"])}, {"model": str(t5["a"])}], "parameters": {"t": [0.0, 1.0]}}
    out = merge(recipe, tmp_path / "out", progress=False)
    base, a, got = load_state(t5["base"]), load_state(t5["a"]), load_state(out)
    assert got.keys() == base.keys()
    depth = {"encoder.block": 3, "decoder.block": 2}
    for name, tensor in got.items():
        parsed = parse_layer(name)
        # t = block / (depth - 1) over the block's own stack; t = 0 outside the stacks
        t = parsed.index / (depth[parsed.prefix] - 1) if parsed else 0.0
        torch.testing.assert_close(tensor.double(), hand_slerp(t, base[name], a[name]), rtol=0, atol=1e-6, msg=name)
    # the sub-layer index plays no part: block 0's second sub-layer is the base, block 2's the other model
    wo = "encoder.block.{}.layer.1.DenseReluDense.wo.weight"
    assert torch.equal(got[wo.format(0)], base[wo.format(0)])
    torch.testing.assert_close(got[wo.format(2)], a[wo.format(2)], rtol=0, atol=1e-6)


def test_t5_ties_output_loads_without_missing_keys_and_runs(tmp_path: Path, t5: dict[str, Path]) -> None:
    recipe = {"merge_method": "ties", "base_model": str(t5["base"]),
              "models": [{"model": str(t5["a"]), "parameters": {"weight": 1.0, "density": [0.3, 0.9]}}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    model, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model(input_ids=torch.arange(10).reshape(2, 5), decoder_input_ids=torch.arange(8).reshape(2, 4)).logits
    assert logits.shape == (2, 4, 64) and torch.isfinite(logits).all()


def _run(tmp_path: Path, recipe: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # drop what building the models printed
    code = main(["--quiet", "merge", str(path), str(tmp_path / "out")])
    return code, capsys.readouterr().err


def test_t5_slices_are_refused_in_one_line(tmp_path: Path, t5: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(t5["base"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(t5["a"]), "layer_range": [1, 2]}]}]}
    code, err = _run(tmp_path, recipe, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "slices[0].sources[0].layer_range" in err and "encoder.block (3 layers)" in err and "models:" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_slices_without_a_layer_count_in_the_config_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fam = make_family(tmp_path / "m", [])
    config_path = fam["base"] / "config.json"
    config = json.loads(config_path.read_text())
    del config["num_hidden_layers"]
    config_path.write_text(json.dumps(config))
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(fam["base"]), "layer_range": [0, 2]}]}]}
    code, err = _run(tmp_path, recipe, capsys)
    assert code == 2 and err.count("\n") == 1 and "slices: the output has 2 layers" in err, err
    assert not (tmp_path / "out").exists()
