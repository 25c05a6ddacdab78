"""LoRA: adapters applied while merging (parity with PEFT's merge_and_unload), composition
(parity with PEFT's add_weighted_adapter where the rules agree, the documented differences
where they do not), extraction, and bad inputs (one-line errors, exit code 2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergelab.checkpoint import Checkpoint
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.lora import AdaptedCheckpoint, combine, compose, extract, load_adapter
from mergelab.merging import merge
from tests.helpers import load_state, make_gpt2, make_llama

TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---------------------------------------------------------------- fixtures
def make_adapter(base: Path, out: Path, *, seed: int, **lora: object) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's reference: the adapter merged into the base by merge_and_unload."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def peft_mix_updates(base: Path, adapters: dict[str, Path], weights: list[float], **kwargs: object) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter result: module name -> delta W of the mixed adapter (as stored)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=n)
    peft_model.add_weighted_adapter(names, weights, "mix", **kwargs)
    prefix = "base_model.model."
    return {name.removeprefix(prefix): m.get_delta_weight("mix") for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and "mix" in m.lora_A}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = make_llama(root / "base")
    qv, qkv = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]
    return {
        "base": base,
        "expert": make_llama(root / "expert", seed=1, perturb_from=base),
        "a": make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=qv),  # scale 2
        "b": make_adapter(base, root / "b", seed=2, r=4, lora_alpha=4, target_modules=qkv),  # scale 1
        "c": make_adapter(base, root / "c", seed=3, r=4, lora_alpha=4, target_modules=qkv),
        "r2": make_adapter(base, root / "r2", seed=4, r=2, lora_alpha=2, target_modules=qv),
    }


def run_cli(*args: object) -> int:
    return main(["--quiet", *map(str, args)])


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mergelab:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0] and err.endswith(errors[0] + "\n"), err


# ---------------------------------------------------------------- applying an adapter
APPLY_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3}),
    "embedding_and_saved_head": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_adapted_checkpoint_equals_merge_and_unload(tmp_path: Path, llama: dict[str, Path], case: str) -> None:
    adapter = make_adapter(llama["base"], tmp_path / "ad", seed=7, **APPLY_CASES[case])
    expected = peft_merged(llama["base"], adapter)
    ckpt = AdaptedCheckpoint(Checkpoint(llama["base"]), load_adapter(adapter))
    base = load_state(llama["base"])
    changed = 0
    for name in ckpt.tensors:
        torch.testing.assert_close(ckpt.read(name), expected[name], **TOL)
        changed += not torch.equal(expected[name], base[name])
    assert changed >= 4  # the adapter did change the model


def test_fan_in_fan_out_gpt2_with_lora_bias(tmp_path: Path) -> None:
    base = make_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(base, tmp_path / "ad", seed=3, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True, lora_bias=True)
    expected = peft_merged(base, adapter)
    ckpt = AdaptedCheckpoint(Checkpoint(base), load_adapter(adapter))
    assert load_adapter(adapter).modules["transformer.h.0.attn.c_attn"].transposed
    for name in ckpt.tensors:
        torch.testing.assert_close(ckpt.read(name), expected[name], **TOL)
    assert not torch.equal(ckpt.read("transformer.h.0.attn.c_attn.bias"), load_state(base)["transformer.h.0.attn.c_attn.bias"])


def test_recipe_with_base_plus_adapter_in_a_ties_merge(tmp_path: Path, llama: dict[str, Path]) -> None:
    # reference: the adapter merged by PEFT and saved as a model folder
    premerged = tmp_path / "premerged"
    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)
    PeftModel.from_pretrained(model, llama["a"]).merge_and_unload().save_pretrained(premerged)

    def recipe(first: dict) -> dict:
        return {"merge_method": "ties", "base_model": str(llama["base"]),
                "models": [{**first, "parameters": {"weight": 0.6, "density": 0.5}},
                           {"model": str(llama["expert"]), "parameters": {"weight": 0.4, "density": 0.7}}]}

    # `base+adapter`, relative to the recipe file
    shutil.copytree(llama["a"], tmp_path / "adapter_a")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe({"model": f"{llama['base']}+adapter_a"})))
    assert run_cli("merge", tmp_path / "r.yaml", tmp_path / "plus") == 0
    got = load_state(tmp_path / "plus")
    ref = load_state(merge(recipe({"model": str(premerged)}), tmp_path / "ref", progress=False))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL)
    # the explicit `adapter:` key gives the same bytes; the written recipe reproduces the merge
    same = load_state(merge(recipe({"model": str(llama["base"]), "adapter": str(llama["a"])}), tmp_path / "key", progress=False))
    written = (tmp_path / "plus" / "mergekit_config.yml").read_text()
    assert f"+{(tmp_path / 'adapter_a').resolve()}" in written
    again = load_state(merge(tmp_path / "plus" / "mergekit_config.yml", tmp_path / "again", progress=False))
    for name in got:
        assert torch.equal(same[name], got[name]) and torch.equal(again[name], got[name])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plus")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12).reshape(2, 6)).logits).all()


def test_plus_without_adapter_folder_is_a_path(tmp_path: Path, llama: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": f"{llama['base']}+nowhere"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    one_line_error(capsys, run_cli("merge", tmp_path / "r.yaml", tmp_path / "out"), "adapter folder must hold adapter_config.json")


def _wrong_shape(adapter: Path) -> None:
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in state if "layers.2.self_attn.q_proj.lora_A" in k)
    state[key] = torch.zeros(4, 40)
    save_file(state, str(adapter / "adapter_model.safetensors"))


def _dora(adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "adapter_config.json").unlink(), "no adapter_config.json"),
    (_wrong_shape, "'model.layers.2.self_attn.q_proj.weight' in"),
    (_dora, "DoRA"),
    (lambda a: (a / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
], ids=["no-config", "shape", "dora", "no-weights"])
def test_bad_adapters_in_recipes(tmp_path: Path, llama: dict[str, Path], damage, message: str,  # type: ignore[no-untyped-def]
                                 capsys: pytest.CaptureFixture[str]) -> None:
    adapter = Path(shutil.copytree(llama["a"], tmp_path / "ad"))
    damage(adapter)
    recipe = {"merge_method": "linear", "models": [{"model": str(llama["base"]), "adapter": str(adapter)}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    one_line_error(capsys, run_cli("merge", tmp_path / "r.yaml", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base(tmp_path: Path, llama: dict[str, Path]) -> None:
    small = make_llama(tmp_path / "small", layers=2)
    with pytest.raises(MergelabError, match="does not have"):
        AdaptedCheckpoint(Checkpoint(small), load_adapter(llama["a"]))


# ---------------------------------------------------------------- composing: parity with PEFT
def ours(adapter_paths: list[Path], weights: list[float], **kwargs: object) -> dict[str, torch.Tensor]:
    mixed = combine([load_adapter(p) for p in adapter_paths], weights, **kwargs)  # type: ignore[arg-type]
    return {name: m.weight_update() for name, m in mixed.modules.items()}


def assert_same_updates(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL)
    return max(float((got[n] - want[n]).abs().max()) for n in want)


def test_cat_and_svd_equal_peft(llama: dict[str, Path]) -> None:
    pair = {"a": llama["a"], "b": llama["b"]}  # different scales and target modules
    for method, weights, kwargs in [("cat", [0.7, -0.4], {}), ("svd", [0.7, 0.4], {"rank": 4})]:
        want = peft_mix_updates(llama["base"], pair, weights, combination_type=method, svd_rank=kwargs.get("rank"))
        assert_same_updates(ours(list(pair.values()), weights, method=method, **kwargs), want)


def test_ties_svd_equals_peft_with_unit_weights_and_trimmed_sign(llama: dict[str, Path]) -> None:
    pair = {"a": llama["a"], "b": llama["b"]}
    want = peft_mix_updates(llama["base"], pair, [1.0, 1.0], combination_type="ties_svd", density=0.5, svd_rank=8)
    got = ours(list(pair.values()), [1.0, 1.0], method="ties", density=0.5, rank=8, options={"sign_from": "trimmed"})
    assert_same_updates(got, want)


def test_linear_is_lorahub_and_peft_splits_square_roots(llama: dict[str, Path]) -> None:
    b, c = load_adapter(llama["b"]), load_adapter(llama["c"])
    mixed = combine([b, c], [0.5, 0.3], method="linear")
    q = "model.layers.0.self_attn.q_proj"
    # LoraHub: A and B are the weighted sums (scale 1 here)
    torch.testing.assert_close(mixed.modules[q].A, 0.5 * b.modules[q].A + 0.3 * c.modules[q].A)
    torch.testing.assert_close(mixed.modules[q].B, 0.5 * b.modules[q].B + 0.3 * c.modules[q].B)
    # PEFT's linear with weights w equals ours with weights sqrt(w) (unit scales, w >= 0)
    want = peft_mix_updates(llama["base"], {"b": llama["b"], "c": llama["c"]}, [0.5, 0.3], combination_type="linear")
    assert_same_updates(ours([llama["b"], llama["c"]], [math.sqrt(0.5), math.sqrt(0.3)], method="linear"), want)


def test_cat_and_svd_reproduce_the_summed_update(llama: dict[str, Path]) -> None:
    a, b = load_adapter(llama["a"]), load_adapter(llama["b"])
    for method, rank in [("cat", None), ("svd", 8)]:  # 8 = the sum of the ranks: no truncation
        mixed = combine([a, b], [0.7, 0.4], method=method, rank=rank)
        for name, m in mixed.modules.items():
            want = sum(w * ad.modules[name].update() for w, ad in [(0.7, a), (0.4, b)] if name in ad.modules)
            torch.testing.assert_close(m.update(), want, **TOL)
    # truncated: the error is the tail of the singular values (Eckart-Young)
    mixed = combine([a, b], [0.7, 0.4], method="svd", rank=3)
    q = "model.layers.0.self_attn.q_proj"
    full = 0.7 * a.modules[q].update() + 0.4 * b.modules[q].update()
    s = torch.linalg.svdvals(full)
    torch.testing.assert_close((full - mixed.modules[q].update()).norm(), s[3:].norm(), **TOL)


def test_dare_is_seeded_and_density_one_is_svd(llama: dict[str, Path]) -> None:
    paths = [llama["a"], llama["b"]]
    one = ours(paths, [0.7, 0.4], method="dare_ties", density=0.5, seed=3)
    assert all(torch.equal(one[n], t) for n, t in ours(paths, [0.7, 0.4], method="dare_ties", density=0.5, seed=3).items())
    assert not all(torch.equal(one[n], t) for n, t in ours(paths, [0.7, 0.4], method="dare_ties", density=0.5, seed=4).items())
    assert_same_updates(ours(paths, [0.7, 0.4], method="dare_linear", density=1.0), ours(paths, [0.7, 0.4], method="svd"))


def test_composed_adapter_loads_in_peft_and_changes_outputs_as_computed(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = tmp_path / "mix"
    code = run_cli("lora", "compose", out, "--adapter", f"{llama['a']}:0.7", "--adapter", f"{llama['b']}:-0.4", "--method", "cat")
    assert code == 0 and (out / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32), out)
    # expected: base + 0.7 delta_a - 0.4 delta_b, each delta from PEFT's own merge
    base = load_state(llama["base"])
    merged_a, merged_b = peft_merged(llama["base"], llama["a"]), peft_merged(llama["base"], llama["b"])
    expected = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)
    expected.load_state_dict({n: base[n] + 0.7 * (merged_a[n] - base[n]) - 0.4 * (merged_b[n] - base[n]) for n in base})
    x = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        got, want, plain = model(x).logits, expected(x).logits, AutoModelForCausalLM.from_pretrained(llama["base"])(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_compose_bad_inputs(tmp_path: Path, llama: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    other = Path(shutil.copytree(llama["b"], tmp_path / "other"))
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere/model"}))
    (tmp_path / "empty").mkdir()
    cases = [
        ([llama["a"], other], "svd", "different base models"),
        ([llama["a"], llama["r2"]], "linear", "'linear' needs equal ranks"),
        ([llama["a"], llama["b"]], "linear", "'linear' needs the same target modules"),
        ([llama["a"], tmp_path / "empty"], "svd", "no adapter_config.json"),
        ([llama["a"], llama["b"]], "slerp", "unknown composition"),
    ]
    for paths, method, message in cases:
        args = [a for p in paths for a in ("--adapter", p)]
        one_line_error(capsys, run_cli("lora", "compose", tmp_path / "out", *args, "--method", method), message)
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- extracting
def test_extract_recovers_a_low_rank_fine_tune_exactly(tmp_path: Path, llama: dict[str, Path]) -> None:
    finetuned = tmp_path / "ft"
    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32)
    PeftModel.from_pretrained(model, llama["a"]).merge_and_unload().save_pretrained(finetuned)
    errors = extract(llama["base"], finetuned, tmp_path / "ex", rank=4, progress=False)
    assert max(errors.values()) < 1e-5
    got = peft_merged(llama["base"], tmp_path / "ex")
    want = load_state(finetuned)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL)


def test_extract_reports_the_truncation_error(tmp_path: Path, llama: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("extract-lora", llama["base"], llama["expert"], tmp_path / "ex", "--rank", 8) == 0
    errors = extract(llama["base"], llama["expert"], tmp_path / "ex2", rank=8, progress=False)
    base, expert = load_state(llama["base"]), load_state(llama["expert"])
    for module, err in errors.items():
        s = torch.linalg.svdvals(expert[module + ".weight"] - base[module + ".weight"])
        assert err == pytest.approx(float(s[8:].norm() / s.norm()), rel=1e-4)
    # the adapter loads in PEFT; k_proj (16 x 32) keeps rank 8 like the others
    adapter = load_adapter(tmp_path / "ex")
    assert adapter.modules["model.layers.0.self_attn.k_proj"].rank == 8
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama["base"]), tmp_path / "ex")
    one_line_error(capsys, run_cli("extract-lora", llama["base"], tmp_path / "nowhere", tmp_path / "ex3", "--rank", 4), "model folder not found")


def test_extract_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    base = make_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(base, tmp_path / "ad", seed=5, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    finetuned = tmp_path / "ft"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(finetuned)
    extract(base, finetuned, tmp_path / "ex", rank=2, progress=False)
    assert json.loads((tmp_path / "ex" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    got, want = peft_merged(base, tmp_path / "ex"), load_state(finetuned)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL)


def test_python_api(tmp_path: Path, llama: dict[str, Path]) -> None:
    out = compose([llama["a"], llama["b"]], [0.5, 0.5], tmp_path / "mix", method="ties", density=0.5, rank=4)
    assert load_adapter(out).modules["model.layers.0.self_attn.k_proj"].rank == 4


def test_composed_zoo_adapter_finds_its_base_from_its_own_folder(tmp_path, zoo_dir) -> None:
    """The zoo's adapters name their base relative to their folder; the composed one, relative to its own."""
    from mergelab.eval import load_model
    from mergelab.lora import compose

    out = compose([zoo_dir / "adapters" / "back", zoo_dir / "adapters" / "sort"], [0.5, 0.5], tmp_path / "deep" / "mix",
                  method="cat")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (out / base).resolve() == (zoo_dir / "base").resolve()
    load_model(out)  # finds the base
