"""mergekit-yaml's flags on `mergelab merge`: each maps to ours or is accepted with its reason; an unknown one errors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergelab.cli import build_parser, main
from mergelab.cli_mergekit import parse_kmb
from tests.helpers import load_state, make_family, make_model

MERGEKIT_YAML = Path("/work/mkvenv/bin/mergekit-yaml")
# mergekit 0.1.5's `mergekit-yaml --help`, every option (the --no- forms of its switches too)
MERGEKIT_FLAGS = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--trust-remote-code", "--no-trust-remote-code", "--transformers-cache X", "--lora-merge-cache X",
    "--lora-merge-dtype bfloat16", "--random-seed 3", "-v", "-vv", "--quiet", "--no-quiet", "--cuda", "--no-cuda",
    "--device cpu", "--low-cpu-memory", "--no-low-cpu-memory", "--lazy-unpickle", "--no-lazy-unpickle", "--read-to-gpu",
    "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "-j 2", "--num-threads 2", "--gpu-rich", "--async-write",
    "--no-async-write", "--write-threads 2", "--out-shard-size 1B", "--copy-tokenizer", "--no-copy-tokenizer",
    "--clone-tensors", "--no-clone-tensors", "--write-model-card", "--no-write-model-card", "--safe-serialization",
    "--no-safe-serialization",
]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_mergekit")
    fam = make_family(root / "m", ["a"])
    (fam["base"] / "tokenizer_config.json").write_text("{}")
    path = root / "linear.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(fam["base"]), "parameters": {"weight": 0.5}}, {"model": str(fam["a"]), "parameters": {"weight": 0.5}}]}))
    return path


@pytest.mark.parametrize("flag", MERGEKIT_FLAGS)
def test_every_mergekit_flag_parses(flag: str) -> None:
    build_parser().parse_args(["merge", "r.yaml", "out", *flag.split()])


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit's venv is not on this machine")
def test_flag_list_is_mergekit_s() -> None:
    """The list above is every option mergekit-yaml's help shows (so a new mergekit flag fails here, not for a user)."""
    text = subprocess.run([str(MERGEKIT_YAML), "--help"], capture_output=True, text=True, check=True).stdout
    theirs = {f for pair in re.findall(r"^\s+(-j, --num-threads|-[-\w]+(?: / --[-\w]+)?)", text, re.M)
              for f in re.split(r" / |, ", pair)} - {"--help"}
    ours = {f.split()[0] for f in MERGEKIT_FLAGS if f != "-vv"}
    assert theirs == ours


def test_unknown_flag_still_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["merge", "r.yaml", "out", "--lazy-unpickel"])
    assert exc.value.code == 2 and "--lazy-unpickel" in capsys.readouterr().err


def test_help_says_why_a_flag_does_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lazy-unpickle, --no-lazy-unpickle no effect: safetensors are read tensor by tensor" in help_text
    assert "--transformers-cache X no effect: models are local folders" in help_text
    assert "--cuda, --no-cuda --device cuda" in help_text


def captured(monkeypatch: pytest.MonkeyPatch, *flags: str) -> dict[str, Any]:
    """The keyword arguments `mergelab merge r.yaml out FLAGS` passes to `merge()`."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr("mergelab.merging.merge", lambda recipe, out, **kw: seen.update(kw))
    assert main(["merge", "r.yaml", "out", *flags]) == 0
    return seen


def test_mapped_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    kw = captured(monkeypatch, "--cuda", "--random-seed", "7", "--out-shard-size", "500M", "-j", "3", "--allow-crimes",
                  "--no-copy-tokenizer", "--no-write-model-card", "--quiet")
    assert kw["device"] == "cuda" and kw["seed"] == 7 and kw["shard_size"] == 500_000_000 and kw["workers"] == 3
    assert kw["allow_crimes"] is True and kw["copy_tokenizer"] is False and kw["write_model_card"] is False
    assert kw["progress"] is False
    assert captured(monkeypatch, "--gpu-rich", "--device", "cuda:1")["device"] == "cuda:1"  # --device wins
    plain = captured(monkeypatch)
    assert plain["device"] == "cpu" and "copy_tokenizer" not in plain and plain["progress"] is True


def test_no_effect_flags_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    noted = captured(monkeypatch, "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code", "--transformers-cache", "X",
                     "--clone-tensors", "--async-write", "--write-threads", "4", "--no-cuda", "--safe-serialization")
    assert noted == captured(monkeypatch)


def test_mergekit_sizes() -> None:
    assert [parse_kmb(s) for s in ("5B", "500M", "64k", "1000")] == [5 * 10**9, 5 * 10**8, 64_000, 1000]


@pytest.mark.parametrize("flags, message", [
    (["--out-shard-size", "5GB"], "--out-shard-size: cannot read '5GB'"),
    (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings: not supported"),
    (["--cuda"], "no CUDA device"),
])
def test_bad_or_unsupported_is_one_line(recipe: Path, tmp_path: Path, flags: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if flags == ["--cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["-q", "merge", str(recipe), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_output_flags_end_to_end(recipe: Path, tmp_path: Path) -> None:
    """--out-shard-size in mergekit's units, --no-copy-tokenizer and --no-write-model-card on a real merge."""
    plain, flagged = tmp_path / "plain", tmp_path / "flagged"
    assert main(["-q", "merge", str(recipe), str(plain), "--shard-size", "20KB"]) == 0
    assert main(["-q", "merge", str(recipe), str(flagged), "--out-shard-size", "20K", "--no-copy-tokenizer",
                 "--no-write-model-card"]) == 0
    assert sorted(p.name for p in plain.glob("*.safetensors")) == sorted(p.name for p in flagged.glob("*.safetensors"))
    assert len(list(flagged.glob("*.safetensors"))) > 1
    assert (plain / "tokenizer_config.json").is_file() and not (flagged / "tokenizer_config.json").exists()
    assert (plain / "README.md").is_file() and not (flagged / "README.md").exists()
    assert not (flagged / "mergekit_config.yml").exists() and (flagged / "config.json").is_file()


def test_allow_crimes(tmp_path: Path) -> None:
    """Models whose config names another architecture: refused, naming the flag; merged with --allow-crimes."""
    llama = make_model(tmp_path / "llama", "llama")
    mistral = make_model(tmp_path / "mistral", "mistral", seed=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llama), "parameters": {"weight": 0.5}}, {"model": str(mistral), "parameters": {"weight": 0.5}}]}))
    assert main(["-q", "merge", str(path), str(tmp_path / "refused")]) == 2
    assert main(["-q", "merge", str(path), str(tmp_path / "out"), "--allow-crimes"]) == 0
    merged, a, b = (load_state(p) for p in (tmp_path / "out", llama, mistral))
    name = "model.layers.0.mlp.up_proj.weight"
    assert (merged[name] - (a[name] + b[name]) / 2).abs().max() < 1e-6
