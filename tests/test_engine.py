"""End to end: `mergelab merge` on tiny sharded Llama / Mistral / GPT-2 checkpoints, loaded back
with transformers; per-layer gradients and filters; slices; and every kind of bad input, which
must give a one-line error, exit code 2, and no output folder."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mergelab.checkpoint import Checkpoint
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.merging import merge
from tests.helpers import load_state, make_family, make_model


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"), ["a", "b"])


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> int:
    return main(["--quiet", *map(str, args)])


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed merge"
    assert not out.with_name(out.name + ".partial").exists()


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_ties_merge_loads_and_runs_in_transformers(tmp_path: Path, arch: str) -> None:
    fam = make_family(tmp_path / "m", ["a", "b"], arch=arch)
    recipe = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(fam["b"]), "parameters": {"weight": 0.4, "density": 0.7}}],
    }
    out = tmp_path / "out"
    assert run_cli("merge", write_recipe(tmp_path, recipe), out, "--shard-size", "40KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(load_state(fam["base"]))
    y = logits(out)
    assert y.shape == (2, 6, 64) and torch.isfinite(y).all()
    # the merge moved away from the base, but not far
    assert not torch.equal(y, logits(fam["base"]))
    for f in ("config.json", "mergekit_config.yml", "README.md"):
        assert (out / f).is_file()


def test_linear_values_and_single_file_output(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = {"merge_method": "linear", "models": [
        {"model": str(family["a"]), "parameters": {"weight": 3.0}},
        {"model": str(family["b"]), "parameters": {"weight": 1.0}}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    a, b, got = load_state(family["a"]), load_state(family["b"]), load_state(out)
    for name in a:
        torch.testing.assert_close(got[name], (3 * a[name] + b[name]) / 4, rtol=1e-6, atol=1e-7)


def test_gradient_and_filter_resolved_per_layer(tmp_path: Path, family: dict[str, Path]) -> None:
    # weight of a goes 0 -> 1 over the 4 layers (t = i/3), b the reverse; mlp tensors: all a
    recipe = {"merge_method": "linear", "models": [
        {"model": str(family["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": [0.0, 1.0]}]}},
        {"model": str(family["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": [1.0, 0.0]}]}}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    a, b, got = load_state(family["a"]), load_state(family["b"]), load_state(out)
    for i in range(4):
        t = i / 3
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(got[q], t * a[q] + (1 - t) * b[q], rtol=1e-6, atol=1e-7)
        up = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(got[up], a[up])
    # tensors outside the layers see t = 0 (as mergekit)
    torch.testing.assert_close(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_passthrough_slices_stack_layers_and_update_config(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(family["b"]), "layer_range": [1, 4]}]}]}
    out = merge(recipe, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    a, b, got = load_state(family["a"]), load_state(family["b"]), load_state(out)
    torch.testing.assert_close(got["model.layers.2.mlp.down_proj.weight"], a["model.layers.2.mlp.down_proj.weight"])
    torch.testing.assert_close(got["model.layers.3.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(got["model.layers.5.input_layernorm.weight"], b["model.layers.3.input_layernorm.weight"])
    torch.testing.assert_close(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    torch.testing.assert_close(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.isfinite(logits(out)).all()


def test_out_dtype_and_relative_paths(tmp_path: Path, family: dict[str, Path]) -> None:
    folder = tmp_path / "recipes"
    shutil.copytree(family["a"].parent, tmp_path / "models")
    folder.mkdir()
    recipe = {"merge_method": "task_arithmetic", "base_model": "../models/base",
              "models": [{"model": "../models/a", "parameters": {"weight": 0.5}}], "out_dtype": "bfloat16"}
    out = tmp_path / "out"
    assert run_cli("merge", write_recipe(folder, recipe), out) == 0
    state = load_state(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_float32_arithmetic_flag_is_the_recipe_key(tmp_path: Path, family: dict[str, Path]) -> None:
    """`--float32-arithmetic` = `arithmetic: float32` (written into the output's recipe); it changes a
    bfloat16 TIES merge (mergekit's default computes it in bfloat16)."""
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "bfloat16",
              "models": [{"model": str(family[k]), "parameters": {"weight": 0.6, "density": 0.5}} for k in ("a", "b")]}
    assert run_cli("merge", write_recipe(tmp_path, recipe), tmp_path / "flag", "--float32-arithmetic") == 0
    assert yaml.safe_load((tmp_path / "flag" / "mergekit_config.yml").read_text())["arithmetic"] == "float32"
    flag, key = load_state(tmp_path / "flag"), load_state(merge({**recipe, "arithmetic": "float32"}, tmp_path / "key", progress=False))
    default = load_state(merge(recipe, tmp_path / "default", progress=False))
    assert all(torch.equal(flag[k], key[k]) and flag[k].dtype == torch.bfloat16 for k in flag)
    assert any(not torch.equal(flag[k], default[k]) for k in flag)


def test_dare_is_reproducible_from_seed(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = {"merge_method": "dare_ties", "base_model": str(family["base"]),
              "models": [{"model": str(family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("a", "b")]}
    runs = {name: load_state(merge(recipe, tmp_path / name, seed=seed, progress=False))
            for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2))}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(runs["s1"][k], runs["s1_again"][k]) for k in runs["s1"])
    assert not torch.equal(runs["s1"][q], runs["s2"][q])


def test_tokenizer_files_and_chat_template_are_copied(tmp_path: Path, family: dict[str, Path]) -> None:
    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (base / "tokenizer.json").write_text("{}")
    recipe = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}}],
              "chat_template": "chatml"}
    out = merge(recipe, tmp_path / "out", progress=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 64 and "<|im_start|>" in cfg["chat_template"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_overwrite(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    assert run_cli("merge", recipe, out) == 0
    assert run_cli("merge", recipe, out) == 2  # exists
    assert run_cli("merge", recipe, out, "--overwrite") == 0
    assert not (tmp_path / "out.old").exists()


def test_pickle_needs_allow_pickle(tmp_path: Path) -> None:
    src = make_model(tmp_path / "safe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(src / "config.json", pickled / "config.json")
    torch.save(load_state(src), pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "pickled"), "parameters": {"weight": 1.0}}]})
    assert run_cli("merge", recipe, tmp_path / "out") == 2
    assert_no_output(tmp_path / "out")
    assert run_cli("merge", recipe, tmp_path / "out", "--allow-pickle") == 0
    for name, t in load_state(src).items():
        torch.testing.assert_close(load_state(tmp_path / "out")[name], t)


def test_failure_mid_merge_leaves_no_output(tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.methods.linear import Linear

    calls = {"n": 0}
    original = Linear.merge

    def flaky(self, inputs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk on fire")
        return original(self, inputs)

    monkeypatch.setattr(Linear, "merge", flaky)
    recipe = {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(recipe, tmp_path / "out", progress=False, shard_size="20KB")
    assert_no_output(tmp_path / "out")


# ---------------------------------------------------------------- bad input
def _truncate_a_shard(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def _drop_a_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("*.safetensors"))[0]
    state = load_file(str(shard))
    dropped = next(iter(state))
    del state[dropped]
    save_file(state, str(shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))


def _corrupt_header(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))


def _huge_header_length(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _remove_a_shard(folder: Path) -> None:
    sorted(folder.glob("*.safetensors"))[0].unlink()


@pytest.mark.parametrize("damage, message", [
    (_truncate_a_shard, "truncated"),
    (_drop_a_tensor, "missing"),
    (_corrupt_header, "corrupt safetensors header"),
    (_huge_header_length, "corrupt safetensors header"),
    (_remove_a_shard, "file not found"),
])
def test_corrupt_inputs(tmp_path: Path, family: dict[str, Path], damage, message: str, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken"
    shutil.copytree(family["a"], broken)
    damage(broken)
    recipe = write_recipe(tmp_path, {"merge_method": "ties", "base_model": str(family["base"]), "models": [
        {"model": str(broken), "parameters": {"weight": 1.0, "density": 0.5}}]})
    assert run_cli("merge", recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "broken" in err, err
    assert_no_output(tmp_path / "out")


def test_shape_mismatch_names_the_tensor(tmp_path: Path, family: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaForCausalLM

    from tests.helpers import llama_config

    narrow = llama_config(4)
    narrow.intermediate_size = 48  # the family has 64
    LlamaForCausalLM(narrow).save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family["a"]), "parameters": {"weight": 1.0}},
        {"model": str(tmp_path / "wide"), "parameters": {"weight": 1.0}}]})
    assert run_cli("merge", recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "shapes differ" in err and "mlp" in err and err.count("\n") == 1
    assert_no_output(tmp_path / "out")


BAD_RECIPES = [
    ({"merge_method": "tiez", "models": [{"model": "A"}]}, "unknown method 'tiez'"),
    ({"merge_method": "linear", "modles": [{"model": "A"}]}, "modles: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1, "density": 0.5}}]},
     "models[0].parameters.density: linear takes no parameter 'density'"),
    ({"merge_method": "ties", "models": [{"model": "A", "parameters": {"weight": 1}}]}, "needs a base model"),
    ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1, "density": 1.5}}]},
     "models[0].parameters.density: 'density' = 1.5 is out of range [0, 1]"),
    ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1, "density": [0.5, -0.1]}}]},
     "out of range"),
    ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1, "normalize": False}}]},
     "'normalize' is a global parameter"),
    ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "A"}]}, "no value of 'weight'"),
    ({"merge_method": "slerp", "base_model": "BASE", "models": [{"model": "A"}]}, "needs a value for 't'"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "give either 'tokenizer_source' or a 'tokenizer' block"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "tokenizer": {"sauce": "base"}},
     "tokenizer.sauce: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "dtype": "float8"}, "dtype: must be one of"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "arithmetic": "float64"},
     "arithmetic: must be one of"),
    ({"merge_method": "linear", "models": [{"model": "NOPE", "parameters": {"weight": 1}}]}, "models[0].model: "),
    ({"merge_method": "passthrough", "models": [{"model": "A"}, {"model": "BASE"}]}, "takes at most 1 model"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [2, 9]}]}]}, "past the 4 layers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [3, 1]}]}]}, "layer_range"),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1}}], "slices": []}, "exactly one of 'models' or 'slices'"),
    ({"merge_method": "nearswap", "models": [{"model": "A"}], "parameters": {"t": 0.1}}, "base_model: nearswap needs a base model"),
    ({"merge_method": "nearswap", "base_model": "BASE", "models": [{"model": "A"}]}, "parameters.t: nearswap needs a value for 't'"),
    ({"merge_method": "ram", "models": [{"model": "A"}]}, "base_model: ram needs a base model"),
    ({"merge_method": "ramplus_tl", "base_model": "BASE", "models": [{"model": "A"}], "parameters": {"epsilon": -1}},
     "parameters.epsilon: 'epsilon' = -1 is out of range [0, inf]"),
    ({"merge_method": "sce", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1}}]},
     "models[0].parameters.weight: sce takes no parameter 'weight'"),
    ({"merge_method": "multislerp", "models": [{"model": "A"}, {"model": "BASE"}]}, "no value of 'weight'"),
    ({"merge_method": "karcher", "models": [{"model": "A"}, {"model": "BASE"}], "parameters": {"max_iter": 2.5}},
     "parameters.max_iter: 'max_iter' must be a whole number, got 2.5"),
    ({"merge_method": "arcee_fusion", "base_model": "BASE", "models": [{"model": "A", "parameters": {"weight": 1}}]},
     "arcee_fusion takes no parameter 'weight'; it takes: none"),
]


@pytest.mark.parametrize("recipe, message", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_recipes(tmp_path: Path, family: dict[str, Path], recipe: dict, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump(recipe).replace("BASE", str(family["base"])).replace(": A\n", f": {family['a']}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run_cli("merge", path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert_no_output(tmp_path / "out")


def test_bad_yaml_and_missing_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [\n  - model: x\n")
    assert run_cli("merge", path, tmp_path / "out") == 2
    assert "invalid YAML at line" in capsys.readouterr().err
    assert run_cli("merge", tmp_path / "missing.yaml", tmp_path / "out") == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert_no_output(tmp_path / "out")


def test_bad_device_and_shard_size(tmp_path: Path, family: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}}]})
    if not torch.cuda.is_available():
        assert run_cli("merge", recipe, tmp_path / "out", "--device", "cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert run_cli("merge", recipe, tmp_path / "out", "--shard-size", "lots") == 2
    assert "--shard-size" in capsys.readouterr().err
    assert_no_output(tmp_path / "out")


def test_checkpoint_reads_only_headers_until_asked(tmp_path: Path, family: dict[str, Path]) -> None:
    ckpt = Checkpoint(family["a"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert ckpt.info(name).shape == (64, 32) and ckpt.info(name).dtype == torch.float32
    torch.testing.assert_close(ckpt.read(name), load_state(family["a"])[name], rtol=0, atol=0)
    with pytest.raises(MergelabError, match="no tensor named"):
        ckpt.read("nope")


def test_python_api_is_the_function() -> None:
    import mergelab
    import mergelab.merging  # noqa: F401  (importing the module must not shadow the function)

    assert callable(mergelab.merge) and mergelab.merge.__name__ == "merge"


def test_written_recipe_reproduces_the_merge(tmp_path: Path, family: dict[str, Path]) -> None:
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "models": [
        {"model": str(family["a"]), "parameters": {"weight": 0.7, "density": [0.3, 0.9]}},
        {"model": str(family["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}], "density": 0.6}}]}
    first = merge(recipe, tmp_path / "first", progress=False)
    again = merge(first / "mergekit_config.yml", tmp_path / "again", progress=False)
    a, b = load_state(first), load_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
