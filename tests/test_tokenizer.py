"""Merging models whose tokenizers differ: `tokenizer_source` and the `tokenizer:` block.

Golden: mergekit 0.1.5's tensors and output tokenizer for the recipes in `tests/golden/tokenizer/`
(made by `tests/golden/make_golden_tokenizer.py`) over the models of `tests/golden/tokenizer_models.py`,
which this test builds again: same tensors bit for bit, same vocabulary, added tokens and vocab_size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergelab.errors import MergelabError
from mergelab.merging import merge
from tests.golden.tokenizer_models import make_models, tokenizer_summary

GOLDEN = Path(__file__).parent / "golden" / "tokenizer"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tokenizer")
    make_models(work / "models")
    return work


def run(workdir: Path, recipe: dict | str, name: str) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return merge(path, workdir / f"out_{name}", progress=False, overwrite=True)


@pytest.mark.parametrize("case", MANIFEST["cases"])
def test_matches_mergekit(case: str, workdir: Path) -> None:
    out = run(workdir, (GOLDEN / f"{case}.yaml").read_text(), case)
    ours = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(GOLDEN / f"{case}.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=0, msg=lambda m: f"{case} {name}: {m}")
    assert tokenizer_summary(out) == json.loads((GOLDEN / f"{case}.tokenizer.json").read_text())


def test_golden_rows_moved(workdir: Path) -> None:
    """The goldens are not a row-by-id merge: code's letters sit in reversed rows, and aligning them matters."""
    theirs = load_file(str(GOLDEN / "model_task_arithmetic.safetensors"))["model.embed_tokens.weight"]
    base = load_file(str(workdir / "models" / "base" / "model.safetensors"))["model.embed_tokens.weight"]
    assert theirs.shape[0] == 33  # code's 33 tokens, not its 36 rows
    a_out, a_base = 3 + 22, 3  # 'a' in code's vocabulary (letters reversed; the output's) and in the base's
    assert torch.dist(theirs[a_out], base[a_base]) < 0.5 * torch.dist(theirs[a_out], base[a_out])


def test_merged_model_loads_and_tokenizes(workdir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / "out_union_ties"
    if not out.exists():
        run(workdir, (GOLDEN / "union_ties.yaml").read_text(), "union_ties")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("hello qq <|im_end|>", return_tensors="pt")["input_ids"]
    assert ids[0].tolist()[-2:] == [32, 34]
    assert model(ids).logits.shape == (1, ids.shape[1], 35)


def test_same_vocabulary_is_a_plain_merge(workdir: Path) -> None:
    """tokenizer_source: base over models sharing the base's tokenizer changes nothing but the saved tokenizer."""
    m = str(workdir / "models" / "base")
    recipe = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}], "tokenizer_source": "base"}
    out = run(workdir, recipe, "same_vocab")
    assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"],
                       load_file(str(workdir / "models" / "base" / "model.safetensors"))["lm_head.weight"])
    assert tokenizer_summary(out)["vocab_size"] == 32


def test_differing_vocabularies_without_tokenizer_say_how(workdir: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": str(workdir / "models" / n), "parameters": {"weight": 0.5}}
                                                   for n in ("base", "chat")]}
    with pytest.raises(MergelabError, match="vocabularies differ: set tokenizer_source"):
        run(workdir, recipe, "no_tokenizer")


def _tokens_recipe(workdir: Path, tokens: dict, **extra: object) -> dict:
    models = workdir / "models"
    return {"merge_method": "ties", "base_model": str(models / "base"),
            "models": [{"model": str(models / "chat"), "parameters": {"weight": 0.5, "density": 0.5}}],
            "tokenizer": {"source": "union", "tokens": tokens, **extra}}


@pytest.mark.parametrize("tokens, extra, message", [
    ({"<x>": {"source": "models/nowhere"}}, {}, r"tokenizer\.tokens\.<x>\.source: models/nowhere is not a model of this recipe"),
    ({"<x>": {"source": {"kind": "model_token", "model": "models/nowhere", "token": "a"}}}, {},
     r"tokenizer\.tokens\.<x>\.source\.model: models/nowhere is not a model"),
    ({"<x>": {"source": {"kind": "model_token", "model": "MODELS/chat", "token": "zz"}}}, {},
     r"tokenizer\.tokens\.<x>\.source\.token: 'zz' is not in the vocabulary of models\[0\]"),
    ({"<x>": {"source": {"kind": "model_token", "model": "MODELS/chat", "token_id": 99}}}, {},
     r"tokenizer\.tokens\.<x>\.source\.token_id: 99 is past the 35 rows"),
    ({"<x>": {"source": {"kind": "model_token", "model": "MODELS/chat", "token": "a", "token_id": 3}}}, {},
     r"tokenizer\.tokens\.<x>\.source.*exactly one of 'token' or 'token_id'"),
    ({"qq": {"source": "MODELS/base"}}, {}, r"tokenizer\.tokens\.qq\.source: base_model .* has no token 'qq'"),
    ({"<x>": {"force": True}}, {}, r"tokenizer\.tokens\.<x>\.source: needed for tensor 'model\.embed_tokens\.weight'"),
    ({"<x>": {"source": {"kind": "one"}}}, {}, r"tokenizer\.tokens\.<x>\.source"),
    ({}, {"pad_to_multiple_of": 0}, r"tokenizer\.pad_to_multiple_of"),
    ({}, {"source": "models/nowhere"}, r"tokenizer\.source: .*nowhere: folder not found"),
])
def test_bad_tokenizer_settings_are_one_line_errors(workdir: Path, tokens: dict, extra: dict, message: str) -> None:
    models = str(workdir / "models")
    recipe = json.loads(json.dumps(_tokens_recipe(workdir, tokens, **extra)).replace("MODELS", models))
    name = f"bad_{abs(hash(message))}"
    with pytest.raises(MergelabError, match=message) as exc:
        run(workdir, recipe, name)
    assert "\n" not in str(exc.value)
    assert not (workdir / f"out_{name}").exists() and not (workdir / f"out_{name}.partial").exists()


def test_both_tokenizer_keys_is_an_error(workdir: Path) -> None:
    recipe = _tokens_recipe(workdir, {}) | {"tokenizer_source": "base"}
    with pytest.raises(MergelabError, match="give either 'tokenizer_source' or a 'tokenizer' block"):
        run(workdir, recipe, "both")


def test_written_recipe_reruns(workdir: Path) -> None:
    """The recipe saved with the model (absolute paths, token sources included) gives the same model again."""
    first = run(workdir, (GOLDEN / "tokens_block.yaml").read_text(), "tokens_block_again")
    shutil.copy(first / "mergekit_config.yml", workdir / "elsewhere.yml")
    (workdir / "sub").mkdir(exist_ok=True)
    shutil.move(str(workdir / "elsewhere.yml"), workdir / "sub" / "rerun.yml")
    second = merge(workdir / "sub" / "rerun.yml", workdir / "sub" / "out", progress=False, overwrite=True)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings(workdir: Path) -> None:
    """Models without an LM head (tied to the embeddings): the one vocabulary tensor is re-ordered; the output loads."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    for name in ("base", "chat"):
        src, dst = workdir / "models" / name, workdir / "tied" / name
        shutil.copytree(src, dst, dirs_exist_ok=True)
        tensors = load_file(str(src / "model.safetensors"))
        del tensors["lm_head.weight"]
        save_file(tensors, str(dst / "model.safetensors"))
        config = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = workdir / "tied"
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tied / "base"), "tokenizer_source": "union",
              "models": [{"model": str(tied / "chat"), "parameters": {"weight": 1.0}}]}
    out = run(workdir, recipe, "tied")
    merged = load_file(str(out / "model.safetensors"))
    chat = load_file(str(tied / "chat" / "model.safetensors"))["model.embed_tokens.weight"]
    assert "lm_head.weight" not in merged and merged["model.embed_tokens.weight"].shape == (35, 16)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], chat, rtol=0, atol=1e-7)  # base + (chat - base)
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
