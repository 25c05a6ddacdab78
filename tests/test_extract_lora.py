"""`mergelab extract-lora`: mergekit-extract-lora's adapters (goldens made by
`tests/golden/make_golden_extract.py`: same modules and ranks, B @ A to float rounding), PEFT loads every adapter and merging it into the base
gives back the fine-tune: to float32 rounding at full rank, within the dropped singular values
at a threshold; embeddings and head as LoRA or in full; include / exclude / save-module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergelab.cli import main
from mergelab.lora import extract, load_adapter
from mergelab.lora.extract_plan import ExtractOptions
from mergelab.lora.renames import model_renamer
from tests.golden.arch_models import ARCHS

GOLDEN = Path(__file__).parent / "golden"
CASES = json.loads((GOLDEN / "extract" / "cases.json").read_text())["cases"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stored Llama-shaped inputs as model folders: base, and a (every tensor moved)."""
    root = tmp_path_factory.mktemp("extract")
    for name in ("base", "a"):
        (root / name).mkdir()
        shutil.copy(GOLDEN / "inputs" / f"{name}.safetensors", root / name / "model.safetensors")
        shutil.copy(GOLDEN / "config.json", root / name / "config.json")
    return {"base": root / "base", "a": root / "a"}


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def deltas(models: dict[str, Path]) -> dict[str, torch.Tensor]:
    base, a = load_file(str(models["base"] / "model.safetensors")), load_file(str(models["a"] / "model.safetensors"))
    return {n: a[n] - base[n] for n in a}


@pytest.mark.parametrize("case", CASES)
def test_matches_mergekit(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ours"
    assert main(["-q", "extract-lora", "--model", str(models["a"]), "--base-model", str(models["base"]), "--out-path", str(out),
                 *CASES[case]]) == 0
    ours, theirs = load_adapter(out), load_adapter(GOLDEN / "extract" / case)
    assert ours.modules.keys() == theirs.modules.keys()
    for name, m in theirs.modules.items():
        assert (ours.modules[name].kind, ours.modules[name].scale) == (m.kind, 1.0), name
        # The factors are bit-identical on the machine that made the goldens; on another machine
        # LAPACK's SVD differs in the last bits, and may flip a singular pair's sign (A off by 0.19
        # on one build, B @ A by 4e-7), so the shapes (rank) and the product are compared.
        assert ours.modules[name].A.shape == m.A.shape and ours.modules[name].B.shape == m.B.shape, name
        product = m.B @ m.A
        assert torch.allclose(ours.modules[name].B @ ours.modules[name].A, product, rtol=0,
                              atol=1e-5 * float(product.abs().max()) + 1e-7), name
    # mergekit also saves excluded norms once a norm of the same last name is saved (its modules_to_save are last names)
    excluded_by_name = {n for n in theirs.full if "layers.3." in n} if case == "epsilon_embed" else set()
    assert ours.full.keys() == theirs.full.keys() - excluded_by_name
    assert all(torch.equal(t, theirs.full[n]) for n, t in ours.full.items())


def test_full_rank_reproduces_the_fine_tune(models: dict[str, Path], tmp_path: Path) -> None:
    """Every module at full rank, embeddings and head as LoRA: PEFT's merge gives the fine-tune to float rounding."""
    errors = extract(models["base"], models["a"], tmp_path / "ex", options=ExtractOptions(max_rank=64, embed_lora=True), progress=False)
    assert max(errors.values()) < 1e-5
    adapter = load_adapter(tmp_path / "ex")
    assert adapter.modules["model.embed_tokens"].kind == "embedding" and "lm_head" in adapter.modules
    assert set(adapter.full) == {n for n in deltas(models) if n.endswith("norm.weight")}
    got, want = peft_merged(models["base"], tmp_path / "ex"), load_file(str(models["a"] / "model.safetensors"))
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst < 2e-6  # measured 1.8e-7 (weights ~0.1; relative Frobenius error per module <= 9.2e-7)


def test_threshold_error_is_the_dropped_singular_values(models: dict[str, Path], tmp_path: Path) -> None:
    """--sv-epsilon keeps S_k > eps: per module the Frobenius error is sqrt(sum of dropped S_k^2),
    no entry is off by more than the largest dropped one, and PEFT's merge shows the same error."""
    eps = 0.2
    errors = extract(models["base"], models["a"], tmp_path / "ex", options=ExtractOptions(sv_epsilon=eps), progress=False)
    adapter, got = load_adapter(tmp_path / "ex"), peft_merged(models["base"], tmp_path / "ex")
    base = load_file(str(models["base"] / "model.safetensors"))
    for name, delta in deltas(models).items():
        module = name.removesuffix(".weight")
        if module not in errors:
            continue
        s = torch.linalg.svdvals(delta)
        kept, dropped = s[s > eps], s[s <= eps]
        assert adapter.modules[module].rank == kept.numel() < s.numel(), module
        assert errors[module] == pytest.approx(float(dropped.norm() / s.norm()), rel=1e-4)
        off = got[name] - (base[name] + delta)
        assert float(off.norm()) == pytest.approx(float(dropped.norm()), rel=1e-4)
        assert float(off.abs().max()) <= float(dropped.max()) + 1e-6


def test_embeddings_and_head_default_to_modules_to_save(models: dict[str, Path], tmp_path: Path) -> None:
    extract(models["base"], models["a"], tmp_path / "ex", rank=4, progress=False)
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head", "model.norm"} <= set(config["modules_to_save"])
    got, want = peft_merged(models["base"], tmp_path / "ex"), load_file(str(models["a"] / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(got[name], want[name]), name


def test_include_exclude_save_module_skip(models: dict[str, Path], tmp_path: Path) -> None:
    options = ExtractOptions(max_rank=2, include=(r"layers\.[01]\.",), exclude=("v_proj",), save_modules=("model.layers.1.mlp.up_proj",),
                             skip_undecomposable=True)
    extract(models["base"], models["a"], tmp_path / "ex", options=options, progress=False)
    adapter = load_adapter(tmp_path / "ex")
    assert all(".layers.0." in m or ".layers.1." in m for m in adapter.modules)
    assert not any("v_proj" in m for m in adapter.modules) and "model.layers.0.self_attn.q_proj" in adapter.modules
    # embeddings and head are saved unless excluded (include does not apply to them: mergekit's rule); norms are skipped
    assert set(adapter.full) == {"model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "lm_head.weight"}
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]  # a subset: full names, not q_proj everywhere
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), tmp_path / "ex")


def test_bad_options_are_one_line_errors(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, a = str(models["base"]), str(models["a"])
    for args, message in ((["--max-rank", "0"], "--max-rank"), (["--sv-epsilon", "-1"], "--sv-epsilon"),
                          (["-i", "nothing-matches", "-e", "."], "nothing to extract")):
        assert main(["extract-lora", base, a, str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["extract-lora", base, a, str(tmp_path / "x"), "--out-path", str(tmp_path / "y")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gpt2_biases_travel_as_lora_bias(tmp_path: Path) -> None:
    """GPT-2: Conv1D weights (fan_in_fan_out), every target has a bias: the bias deltas go in lora_B.bias."""
    from tests.helpers import load_state, make_gpt2

    base = make_gpt2(tmp_path / "base", layers=2)
    tuned = make_gpt2(tmp_path / "tuned", seed=3, layers=2, perturb_from=base)
    extract(base, tuned, tmp_path / "ex", progress=False)
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["fan_in_fan_out"] is True
    got, want = peft_merged(base, tmp_path / "ex"), load_state(tuned)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-6  # measured 9.7e-8


# what an adapter cannot carry, by arch (everything else comes back to float rounding):
# Qwen2's q/k/v biases (o_proj and the MLP have none, and PEFT's lora_bias is all targets or none),
# BERT's cls.predictions.bias (a module holding others, its decoder tied to the embeddings),
# Mixtral's MoE blocks (left out: transformers 5 fuses the experts on load)
NOT_CARRIED = {"qwen2": r"self_attn\.[qkv]_proj\.bias", "bert": r"^cls\.predictions\.bias$", "mixtral": r"\.mlp\.(experts|gate)"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_round_trips_through_peft(arch: str, tmp_path: Path) -> None:
    """Full rank, default options: PEFT loads the adapter on the base (transformers' names: GPT-NeoX's
    embed_out is lm_head) and merging it gives the fine-tune back, but for what NOT_CARRIED names."""
    import re

    from tests.golden.arch_models import auto_class, build, fuse_experts
    from tests.helpers import load_state

    models = build(arch, tmp_path)
    options = ExtractOptions(exclude=("block_sparse_moe",) if arch == "mixtral" else ())
    extract(models["base"], models["a"], tmp_path / "ex", options=options, progress=False)
    model = auto_class(arch).from_pretrained(models["base"], dtype=torch.float32)
    got = PeftModel.from_pretrained(model, tmp_path / "ex").merge_and_unload().state_dict()
    rename = model_renamer(json.loads((models["a"] / "config.json").read_text()))
    state = load_state(models["a"])
    want = {rename(n): t for n, t in (fuse_experts(state) if arch == "mixtral" else state).items()}
    gap = re.compile(NOT_CARRIED.get(arch, "^$"))
    differ = {n for n, t in want.items() if float((got[n] - t).abs().max()) > 1e-6}
    assert differ == {n for n in want if gap.search(n)}


def test_fused_moe_blocks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.golden.arch_models import build

    models = build("mixtral", tmp_path)
    assert main(["extract-lora", str(models["base"]), str(models["a"]), str(tmp_path / "ex")]) == 2
    assert "-e 'block_sparse_moe'" in capsys.readouterr().err


def test_resized_vocabulary_saves_embeddings_and_head_in_full(models: dict[str, Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A fine-tune with 4 added tokens: embeddings and head in full even with --embed-lora (as mergekit);
    PEFT loads it on the base once its embeddings are resized, and gives the fine-tune back."""
    from safetensors.torch import save_file

    tuned = tmp_path / "tuned"
    tuned.mkdir()
    state = load_file(str(models["a"] / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], 0.1 * torch.randn(4, state[name].shape[1], generator=torch.Generator().manual_seed(3))])
    save_file(state, str(tuned / "model.safetensors"))
    config = json.loads((models["a"] / "config.json").read_text())
    (tuned / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 4}))
    extract(models["base"], tuned, tmp_path / "ex", options=ExtractOptions(max_rank=64, embed_lora=True), progress=False)
    assert "vocabulary differs" in caplog.text
    adapter = load_adapter(tmp_path / "ex")
    assert adapter.full["model.embed_tokens.weight"].shape[0] == config["vocab_size"] + 4 and "lm_head" not in adapter.modules
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    model.resize_token_embeddings(config["vocab_size"] + 4)
    got = PeftModel.from_pretrained(model, tmp_path / "ex").merge_and_unload().state_dict()
    assert max(float((got[n] - t).abs().max()) for n, t in state.items()) < 1e-6
