"""LoraHub (`mergelab lorahub`): a short search lowers the few-shot loss, the live adapter equals
the saved one loaded by PEFT, seq2seq bases work, the catalog job validates, bad inputs fail
on one line before any model is loaded."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.eval import load_tokenizer
from mergelab.eval.data import write_jsonl
from mergelab.lora.hub import hub_optimizer, run_lorahub
from mergelab.lora.hub_evaluator import HubEvaluator, answer_loss, load_base
from mergelab.lora.hub_job import load_hub_job, parse_hub_job

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "search").glob("lorahub_*.yaml"))
POOL = ["reverse", "shift", "sort"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend


def job_dict(zoo: Path, **overrides: Any) -> dict[str, Any]:
    """A small job on the zoo (reverse, its adapter in the pool: the search has something to find) (5 examples, 20 report examples)."""
    job = {"base": str(zoo / "base"), "adapters": [str(zoo / "adapters" / a) for a in POOL],
           "examples": {"task": "reverse", "tasks": str(zoo / "tasks"), "split": "train[0:5]"},
           "report": {"task": "reverse", "tasks": str(zoo / "tasks"), "split": "test", "limit": 20},
           "optimizer": {"budget": 10, "seed": 0}}
    return {**job, **overrides}


def write_job(folder: Path, job: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def assert_live_equals_peft(evaluator: HubEvaluator, weights: list[float], adapter: Path, inputs: dict[str, torch.Tensor]) -> None:
    """Logits of the live adapter set to `weights` == PeftModel.from_pretrained(base, adapter)."""
    evaluator.live.set_weights(weights)
    reference = PeftModel.from_pretrained(load_base(evaluator.job.base), adapter).eval()
    with torch.no_grad():
        live, ref = evaluator.model(**inputs).logits, reference(**inputs).logits
        with reference.disable_adapter():
            plain = reference(**inputs).logits
    torch.testing.assert_close(live, ref, rtol=1e-5, atol=1e-6)
    assert (live - plain).abs().max() > 1e-3  # the composition does change the model


# ---------------------------------------------------------------- a run on the reduced zoo
@pytest.fixture(scope="module")
def run(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mergelab lorahub` on a job beside the zoo (relative paths), through the CLI."""
    root = tmp_path_factory.mktemp("hub")
    (root / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    job = job_dict(Path("../zoo"), adapters="../zoo/adapters/[rs]*")  # a glob: reverse, shift, sort
    path = write_job(root / "search", job)
    assert main(["-q", "lorahub", str(path), str(root / "out")]) == 0
    return root / "out"


def test_short_run_lowers_the_loss_and_writes_the_folder(run: Path, zoo_dir: Path) -> None:
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "report.json",
                                                     "steps.jsonl", "weights.json"]
    assert not run.with_name("out.partial").exists()
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(10))
    assert steps[0]["weights"] == [0.0, 0.0, 0.0] and steps[0]["penalty"] == 0.0  # the start: the base model
    for s in steps:
        assert s["total"] == pytest.approx(s["loss"] + s["penalty"])
        assert s["penalty"] == pytest.approx(0.05 * sum(abs(w) for w in s["weights"]) / 3)
    best = min(steps, key=lambda s: s["total"])
    assert best["total"] < steps[0]["total"] - 0.01
    weights = json.loads((run / "weights.json").read_text())
    assert list(weights) == [str((zoo_dir / "adapters" / a).resolve()) for a in POOL] and list(weights.values()) == best["weights"]
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "reverse/test" and report["n"] == 20 and report["best_step"] == best["step"]
    assert report["base"]["examples/nll"] == pytest.approx(steps[0]["loss"])
    assert report["composed"]["examples/nll"] == pytest.approx(best["loss"])
    for who in ("composed", "base", "uniform"):
        assert set(report[who]) == {"examples/nll", "reverse/accuracy", "reverse/nll"}


def test_after_the_start_each_adapter_is_tried_alone_at_full_strength(run: Path) -> None:
    """Steps 1..N are the single-adapter probes (`optimizer.singles`), each at `high`."""
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["weights"] for s in steps[1:4]] == [[1.5, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 1.5]]


def test_without_singles_the_optimizer_takes_its_own_steps(zoo_dir: Path) -> None:
    job = parse_hub_job(job_dict(zoo_dir, optimizer={"budget": 10, "seed": 0, "singles": False}), zoo_dir, "job")
    optimizer = hub_optimizer(job, 1, 10)
    asked = []
    for _ in range(4):  # told one by one: some of NGOpt's choices wait for each tell before the next ask
        candidate = optimizer.ask()
        optimizer.tell(candidate, 1.0)
        asked.append(list(candidate.value))
    assert asked[0] == [0.0] * len(job.adapters)
    assert not any(sorted(a)[-1] == 1.5 and a.count(0.0) == len(a) - 1 for a in asked[1:])


def test_live_adapter_equals_the_saved_adapter_in_peft(run: Path, zoo_dir: Path) -> None:
    job = parse_hub_job(job_dict(zoo_dir), zoo_dir, "job")
    evaluator = HubEvaluator(job)
    weights = list(json.loads((run / "weights.json").read_text()).values())
    enc = evaluator.tokenizer(["mirror abc=", "reverse hello="], padding=True, return_tensors="pt")
    assert_live_equals_peft(evaluator, weights, run, dict(enc))
    # the loss of a step is that of the saved adapter on the examples
    assert answer_loss(evaluator.model, evaluator.tokenizer, job.examples) == pytest.approx(
        json.loads((run / "report.json").read_text())["composed"]["examples/nll"], abs=1e-6)


def test_evaluator_factory_pickles_for_ray_workers(zoo_dir: Path) -> None:
    factory = partial(HubEvaluator, parse_hub_job(job_dict(zoo_dir), zoo_dir, "job"), "cpu")
    assert pickle.loads(pickle.dumps(factory)).args[0].adapters == factory.args[0].adapters


def test_ray_workers(tmp_path: Path, zoo_dir: Path) -> None:
    """Two Ray actors, each with its own base and live adapter; the report is scored on one of them."""
    job = parse_hub_job(job_dict(zoo_dir, report={**job_dict(zoo_dir)["report"], "limit": 5}), zoo_dir, "job")
    result = run_lorahub(job, tmp_path / "out", workers=2, budget=6, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert sorted(s["step"] for s in steps) == list(range(6)) and {s["worker"] for s in steps} == {"w0", "w1"}
    assert result.best.total == min(s["total"] for s in steps) and set(result.report) == {"composed", "base", "uniform"}


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_catalog_jobs_validate_against_the_zoo(tmp_path: Path, zoo_dir: Path, job: Path) -> None:
    (tmp_path / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    (tmp_path / "search").mkdir()
    loaded = load_hub_job(shutil.copy(job, tmp_path / "search" / job.name))
    assert len(loaded.adapters) >= 2 and loaded.examples and loaded.report is not None


# ---------------------------------------------------------------- seq2seq
def make_t5(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random T5 with the zoo's tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_t5_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on the T5 with a random lora_B (PEFT initialises it to zero)."""
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wi"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def t5_pool(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny T5 and two adapters on it."""
    root = tmp_path_factory.mktemp("t5")
    t5 = make_t5(root / "t5", zoo_dir / "base")
    return t5, [str(make_t5_adapter(t5, root / f"a{i}", seed=i)) for i in range(2)]


def test_seq2seq_base(tmp_path: Path, t5_pool: tuple[Path, list[str]]) -> None:
    t5, adapters = t5_pool
    rows = [{"prompt": f"copy {w}=", "answer": w} for w in ("abc", "hello", "xyz", "bed", "mug", "kite")]
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        (tmp_path / "tasks" / "copy").mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / "tasks" / "copy" / f"{split}.jsonl", part)
    job = parse_hub_job({"base": str(t5), "adapters": adapters, "examples": {"task": "copy", "tasks": "tasks", "split": "train"},
                         "report": {"task": "copy", "tasks": "tasks"}, "optimizer": {"budget": 8}, "l1": 0.0}, tmp_path, "job")
    result = run_lorahub(job, tmp_path / "out", progress=False)
    steps = [json.loads(line) for line in (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["weights"] == [0.0, 0.0] and result.best.total < steps[0]["total"]
    assert set(result.report["base"]) == {"examples/nll", "copy/accuracy", "copy/nll"}
    evaluator = HubEvaluator(job)
    enc = evaluator.tokenizer(["copy abc=", "copy hello="], padding=True, return_tensors="pt")
    inputs = {**enc, "decoder_input_ids": torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])}
    assert_live_equals_peft(evaluator, result.best.weights, tmp_path / "out", inputs)


# ---------------------------------------------------------------- bad inputs
def edit_config(folder: Path, **changes: Any) -> None:
    data = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**data, **changes}))


def edit_state(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    file = folder / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def rank_4(folder: Path) -> None:
    edit_config(folder, r=4)
    edit_state(folder, lambda s: {k: (v[:4] if "lora_A" in k else v[:, :4]).contiguous() for k, v in s.items()})


BAD_ADAPTERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "other_base": (lambda d: edit_config(d, base_model_name_or_path="../../other"), "different base models"),
    "other_modules": (lambda d: edit_state(d, lambda s: {k: v for k, v in s.items() if ".mlp." not in k}),
                      "has no LoRA on module .*needs the same target modules"),
    "rank": (rank_4, "has rank 4, .* rank 8; LoraHub sums"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), r"adapters\[1\]: .*no adapter_config.json"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_pools_fail_on_one_line(tmp_path: Path, zoo_dir: Path, case: str) -> None:
    edit, expected = BAD_ADAPTERS[case]
    bad = shutil.copytree(zoo_dir / "adapters" / "shift", tmp_path / "bad")
    edit(bad)
    path = write_job(tmp_path, job_dict(zoo_dir, adapters=[str(zoo_dir / "adapters" / "reverse"), str(bad)]))
    with pytest.raises(MergelabError, match=expected) as err:
        run_lorahub(load_hub_job(path), tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_adapters_of_another_base_are_refused_by_the_base(tmp_path: Path, zoo_dir: Path, t5_pool: tuple[Path, list[str]]) -> None:
    """Adapters that agree with each other but not with the job's base (another architecture)."""
    job = parse_hub_job(job_dict(zoo_dir, adapters=t5_pool[1]), tmp_path, "job")
    with pytest.raises(MergelabError, match="is not in the base model .*another base"):
        run_lorahub(job, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(("edit", "expected"), [
    ({"optimizer": {"name": "Bogus"}}, "optimizer.name: unknown nevergrad optimizer 'Bogus'"),
    ({"optimizer": {"name": "ngopt"}}, "did you mean NGOpt"),
    ({"examples": "no_answers.jsonl"}, "examples: .*no_answers.jsonl:1: expected an object with string fields 'prompt' and 'answer'"),
    ({"examples": {"task": "nope", "tasks": "ZOO/tasks"}}, "examples: .*no task 'nope'"),
    ({"report": {"task": "reverse", "tasks": "ZOO/tasks", "split": "train[3:9]"}}, "report.split: overlaps examples.split"),
    ({"optimizer": {"low": 0.5}}, "starts at weight 0"),
    ({"adapters": "ZOO/adapters/zz*"}, "adapters: .* matches no folder"),
    ({"adapters": ["ZOO/adapters/back"]}, "at least 2 adapters"),
    ({"adaptors": []}, "adaptors: unknown key"),
    ({"l1": -1}, "l1: Input should be greater than or equal to 0"),
])
def test_bad_jobs_fail_on_one_line_with_the_key(tmp_path: Path, zoo_dir: Path, edit: dict[str, Any], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "no_answers.jsonl").write_text('{"prompt": "mirror abc="}\n')
    text = json.dumps({**job_dict(zoo_dir), **edit}).replace("ZOO", str(zoo_dir))
    path = write_job(tmp_path, json.loads(text))
    assert main(["lorahub", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mergelab: error: {path}: ")
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
