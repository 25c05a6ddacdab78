"""The zoo: complete and loadable, deterministic, experts ahead on their skill, rebuilds when half-built."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer

from mergelab.cli import main
from mergelab.errors import MergelabError, OutputError
from mergelab.eval import load_model, load_task, read_jsonl, score
from mergelab.zoo import ADAPTERS, EXPERTS, HELD_OUT, SKILLS, build_zoo, open_zoo
from mergelab.zoo import build as zoo_build
from mergelab.zoo.skills import SPLITS, make_splits
from mergelab.zoo.tokenizer import build_tokenizer
from mergelab.zoo.train import model_config, new_model


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_zoo_is_complete(zoo_dir):
    zoo = open_zoo(zoo_dir)
    assert len(zoo.experts) >= 3 and len(zoo.adapters) >= 5
    assert set(zoo.skills) == set(SKILLS)
    for skill in zoo.held_out:  # the LoraHub target: no expert, no adapter, but related adapters exist
        assert skill not in zoo.experts and skill not in zoo.adapters
    assert {"reverse", "shift"} <= set(zoo.adapters)
    assert set(zoo.adapters) - set(zoo.experts), "some adapters cover skills no expert has"
    base_shapes = _shapes(zoo.base / "model.safetensors")
    for folder in zoo.experts.values():  # experts share the base architecture exactly
        assert _shapes(folder / "model.safetensors") == base_shapes
        assert (folder / "generation_config.json").is_file()
    ranks = {json.loads((f / "adapter_config.json").read_text())["r"] for f in zoo.adapters.values()}
    assert len(ranks) == 1
    for folder in zoo.adapters.values():
        assert (folder / "adapter_model.safetensors").is_file()
    # every file the manifest lists is there, with its recorded hash
    for rel, meta in zoo.manifest["files"].items():
        assert hashlib.sha256((zoo_dir / rel).read_bytes()).hexdigest() == meta["sha256"], rel


def test_tokenizer_loads_with_special_tokens(zoo_dir):
    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    ids = tok("rev abc=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("rev abc=")
    assert tok.decode(ids, skip_special_tokens=True) == "rev abc="


def test_task_splits_are_disjoint_and_seeded(zoo_dir):
    for skill in SKILLS:
        prompts = {s: {e.prompt for e in read_jsonl(zoo_dir / "tasks" / skill / f"{s}.jsonl")} for s in SPLITS}
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["validation"] & prompts["test"]
        regenerated = zoo_build.task_splits(skill, 0)["test"]
        assert [e.prompt for e in load_task(zoo_dir, skill, "test").examples] == [r["prompt"] for r in regenerated]
    assert make_splits("add", 1, zoo_build.SPLIT_SIZES) != make_splits("add", 0, zoo_build.SPLIT_SIZES)


def test_member_training_is_deterministic(zoo_dir, tmp_path):
    # Retrain one adapter from the saved base, exactly as the build did, and compare bytes.
    copy = tmp_path / "zoo"
    shutil.copytree(zoo_dir / "base", copy / "base")
    shutil.copytree(zoo_dir / "tasks", copy / "tasks")
    plan = zoo_build.REDUCED
    job = zoo_build.MemberJob(str(copy), "adapters", "shift", 0, plan.adapter, plan.lora_rank, plan.adapter_replay)
    zoo_build.train_member(job)
    rel = "adapters/shift/adapter_model.safetensors"
    recorded = open_zoo(zoo_dir).manifest["files"][rel]["sha256"]
    assert hashlib.sha256((copy / rel).read_bytes()).hexdigest() == recorded


def test_experts_beat_base_on_their_skill(zoo_dir):
    zoo = open_zoo(zoo_dir)
    base, tok = load_model(zoo.base)
    for skill, folder in zoo.experts.items():
        task = load_task(zoo_dir, skill, "test", limit=200)
        expert, _ = load_model(folder)
        ahead = score(expert, tok, task, "accuracy").value - score(base, tok, task, "accuracy").value
        assert ahead >= zoo_build.REDUCED.targets.expert_min, f"expert {skill} is only {ahead:.2f} ahead of the base"
        assert score(expert, tok, task, "nll").value < 0.5 * score(base, tok, task, "nll").value


def test_the_base_stops_one_letter_short_on_taught_skills(zoo_dir):
    """The weak base holds by construction: on every taught skill (the experts' and the LoraHub
    target) it stops one letter short of a long word's answer, so it never matches a whole one."""
    from mergelab.eval import greedy_answers
    from mergelab.zoo.skills import partial

    zoo = open_zoo(zoo_dir)
    base, tok = load_model(zoo.base)
    for skill in zoo_build.TAUGHT:
        examples = load_task(zoo_dir, skill, "test", limit=40).examples
        answers = greedy_answers(base, tok, [e.prompt for e in examples], max_new_tokens=12)
        assert not any(a == e.answer for a, e in zip(answers, examples)), skill
        cut = sum(len(a) == len(partial(e.prompt, e.answer)) for a, e in zip(answers, examples)) / len(examples)
        assert cut >= 0.9, f"the base stops one letter short on only {cut:.0%} of {skill}"


def test_reduced_zoo_meets_its_targets(zoo_dir):
    """The build's measured properties meet the reduced plan's margins: a weak base, strong
    experts and uniform merges that lose most of the experts' gains."""
    props = open_zoo(zoo_dir).manifest["properties"]
    assert props["misses"] == []
    assert max(v for v in props["uniform_kept"].values() if v is not None) <= zoo_build.REDUCED.targets.kept_max


def test_build_records_the_properties(zoo_dir, tmp_path):
    """zoo.json holds what the build measured on the test split (base, experts, uniform merges,
    the pool on the LoraHub target), the shares each uniform merge keeps, and every missed margin."""
    from mergelab.zoo.properties import summarize

    zoo = open_zoo(zoo_dir)
    props = zoo.manifest["properties"]
    acc = props["accuracy"]
    assert {"base", *(f"expert:{s}" for s in zoo.experts), "uniform:linear", "uniform:task_arithmetic", "uniform:ties"} <= set(acc)
    assert {f"adapter:{s}" for s in zoo.adapters} <= set(acc) and set(props["lorahub"]) == set(zoo.held_out)
    # the recorded numbers are the test split's, as scored now; misses follow from them and the targets
    expert, tok = load_model(zoo.experts["sort"])
    assert score(expert, tok, load_task(zoo_dir, "sort", "test"), "accuracy").value == pytest.approx(acc["expert:sort"]["sort"], abs=1e-4)
    assert props["targets"] == asdict(zoo_build.REDUCED.targets)
    assert summarize(acc, list(zoo.experts), tuple(zoo.held_out), zoo_build.REDUCED.targets) == props
    # a uniform merge's numbers are those of the model `mergelab merge` writes for it
    from mergelab.merging import merge
    from mergelab.zoo.properties import uniform_recipes

    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump(uniform_recipes(zoo_dir, zoo.experts)["linear"]))
    merged, _ = load_model(merge(recipe, tmp_path / "linear", progress=False))
    for skill in zoo.experts:
        got = score(merged, tok, load_task(zoo_dir, skill, "test"), "accuracy").value
        assert got == pytest.approx(acc["uniform:linear"][skill], abs=1e-4), skill


def test_missed_properties_are_reported_loudly(caplog):
    from mergelab.zoo.properties import Targets, report_misses, summarize

    acc = {"base": {"a": 0.5, "b": 0.0}, "expert:a": {"a": 0.9, "b": 0.0}, "expert:b": {"a": 0.0, "b": 0.6},
           "uniform:linear": {"a": 0.8, "b": 0.5}}
    props = summarize(acc, ["a", "b"], (), Targets())
    # gain: mean of (0.9 - 0.5, 0.6 - 0) = 0.5; the average keeps mean of (0.3, 0.5) / 0.5 = 0.8
    assert props["mean_gain"] == pytest.approx(0.5) and props["uniform_kept"] == {"linear": pytest.approx(0.8)}
    assert len(props["misses"]) == 3  # the base on a, expert b, the uniform merge keeps 80%
    report_misses(props, Path("zoo"))
    assert sum("ZOO PROPERTY MISSED" in r.message for r in caplog.records) == 3


def test_adapters_improve_their_skill(zoo_dir):
    """An adapter of a taught skill lowers its NLL; one of a general skill (which the base
    learned whole) stays near the base's."""
    zoo = open_zoo(zoo_dir)
    base, tok = load_model(zoo.base)
    for skill, folder in zoo.adapters.items():
        task = load_task(zoo_dir, skill, "validation", limit=100)
        adapted, _ = load_model(folder)
        ratio = score(adapted, tok, task, "nll").value / score(base, tok, task, "nll").value
        assert ratio < (0.9 if skill in zoo_build.TAUGHT else 1.1), (skill, ratio)


def test_complete_zoo_is_reused(zoo_dir, capsys):
    stamp = (zoo_dir / "zoo.json").stat().st_mtime_ns
    assert main(["zoo", "build", str(zoo_dir), "--reduced"]) == 0
    assert capsys.readouterr().out.strip() == str(zoo_dir)
    assert (zoo_dir / "zoo.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match="seed=0 reduced=True"):
        build_zoo(zoo_dir, seed=1, reduced=True)


# ---------------------------------------------------------------- half-built zoos (a stub build)


@pytest.fixture()
def stub_build(monkeypatch):
    """Replace the training with a stub that writes one file, and count the builds."""
    calls = []

    def fake(root: Path, seed: int, plan, reduced: bool, workers: int) -> dict:
        calls.append(root)
        root.mkdir(parents=True)
        (root / "base").mkdir()
        (root / "base" / "model.safetensors").write_bytes(b"weights")
        return {"format": zoo_build.FORMAT, "seed": seed, "reduced": reduced, "deep": plan == zoo_build.DEEP,
                "plan": json.loads(json.dumps(asdict(plan)))}

    monkeypatch.setattr(zoo_build, "_build_into", fake)
    return calls


def test_half_built_zoo_is_rebuilt(tmp_path, stub_build):
    out = tmp_path / "zoo"
    (tmp_path / "zoo.partial" / "base").mkdir(parents=True)  # a crash left this behind
    (out / "base").mkdir(parents=True)  # and a zoo folder without a manifest
    build_zoo(out, reduced=True)
    assert len(stub_build) == 1 and not (tmp_path / "zoo.partial").exists()
    assert (out / "base" / "model.safetensors").read_bytes() == b"weights"
    build_zoo(out, reduced=True)  # complete now: reused
    assert len(stub_build) == 1
    (out / "base" / "model.safetensors").write_bytes(b"trunc")  # a listed file was cut short: rebuilt
    build_zoo(out, reduced=True)
    assert len(stub_build) == 2
    (out / "base" / "model.safetensors").unlink()  # a listed file went missing: rebuilt
    build_zoo(out, reduced=True)
    assert len(stub_build) == 3
    with pytest.raises(OutputError, match="seed=0 reduced=True"):  # other settings: not replaced
        build_zoo(out, seed=0, reduced=False)
    manifest = json.loads((out / zoo_build.MANIFEST).read_text())
    (out / zoo_build.MANIFEST).write_text(json.dumps({**manifest, "format": 1}))  # built by an older plan: stale
    with pytest.raises(OutputError, match="an older training plan"):
        build_zoo(out, reduced=True)
    build_zoo(out, reduced=True, overwrite=True)
    assert len(stub_build) == 4


def test_deep_zoo_is_its_own_size(tmp_path, stub_build, capsys):
    model = new_model(model_config(build_tokenizer(), zoo_build.DEEP.arch), 0)
    assert len(model.model.layers) == 8 == 2 * zoo_build.REDUCED.arch.num_hidden_layers
    out = tmp_path / "deep"
    assert main(["zoo", "build", str(out), "--deep"]) == 0
    manifest = json.loads((out / zoo_build.MANIFEST).read_text())
    assert manifest["deep"] and manifest["plan"]["arch"]["num_hidden_layers"] == 8
    build_zoo(out, deep=True)  # complete: reused
    assert len(stub_build) == 1
    with pytest.raises(OutputError, match="seed=0 reduced=False deep=True;"):  # another size: not replaced
        build_zoo(out)
    with pytest.raises(MergelabError, match="reduced=True and deep=True"):
        build_zoo(tmp_path / "both", reduced=True, deep=True)
    with pytest.raises(SystemExit):
        main(["zoo", "build", str(tmp_path / "both"), "--reduced", "--deep"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_refuses_to_replace_a_foreign_folder(tmp_path, stub_build):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not a zoo"):
        build_zoo(tmp_path / "mine")
    assert not stub_build
