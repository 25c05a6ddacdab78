"""Evaluators: scorers against hand-computed values, batching parity, lm-eval parity, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergelab.cli import main
from mergelab.errors import CheckpointError, DataError
from mergelab.eval import (
    Example,
    TaskSplit,
    answer_nll,
    answer_prob,
    greedy_answers,
    lm_eval_score,
    load_model,
    load_task,
    read_jsonl,
    score,
    zoo_task_folder,
)
from mergelab.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class BigramLM(torch.nn.Module):
    """A causal LM whose next-token distribution depends only on the current token.

    `rows[c] = {d: p}` gives P(d | c) for a few tokens d; the rest of each row's mass is spread
    evenly, so every NLL and greedy output below can be worked out by hand.
    """

    def __init__(self, tok, rows: dict[str, dict[str, float]]):
        super().__init__()
        vocab = len(tok)
        probs = torch.full((vocab, vocab), 1.0 / vocab)
        for cur, nxt in rows.items():
            row = torch.zeros(vocab)
            ids = [tok.convert_tokens_to_ids(t) for t in nxt]
            row[ids] = torch.tensor(list(nxt.values()))
            rest = (1 - row.sum()) / (vocab - len(ids))
            probs[tok.convert_tokens_to_ids(cur)] = torch.where(row > 0, row, rest)
        self.register_buffer("logits_table", probs.log())  # (vocab, vocab): row = current token

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(logits=self.logits_table[input_ids], past_key_values=None)  # (b, t, vocab)


ROWS = {"=": {"1": 0.5, "2": 0.25}, "1": {"<eos>": 0.5, "2": 0.25}, "2": {"<eos>": 0.8}}
EXAMPLES = (Example("ab=", "1"), Example("abcd=", "12"), Example("x=", "2"))


def test_nll_matches_hand_computed_value(tok):
    # answer tokens (incl. <eos>) and their probabilities under ROWS:
    #   "1"  : P(1|=)=.5, P(eos|1)=.5
    #   "12" : P(1|=)=.5, P(2|1)=.25, P(eos|2)=.8
    #   "2"  : P(2|=)=.25, P(eos|2)=.8
    logs = [0.5, 0.5] + [0.5, 0.25, 0.8] + [0.25, 0.8]
    expected = -sum(math.log(p) for p in logs) / len(logs)
    model = BigramLM(tok, ROWS)
    assert answer_nll(model, tok, EXAMPLES) == pytest.approx(expected, rel=1e-6)
    assert answer_nll(model, tok, EXAMPLES, batch_size=1) == pytest.approx(expected, rel=1e-6)


def test_answer_probability_matches_hand_computed_value(tok):
    # the probability of each whole answer (with <eos>) under ROWS, averaged over the examples
    expected = (0.5 * 0.5 + 0.5 * 0.25 * 0.8 + 0.25 * 0.8) / 3
    model = BigramLM(tok, ROWS)
    assert answer_prob(model, tok, EXAMPLES) == pytest.approx(expected, rel=1e-6)
    assert score(model, tok, TaskSplit("toy", "test", EXAMPLES), metric="prob", batch_size=2).value == pytest.approx(expected, rel=1e-6)


def test_greedy_and_accuracy_match_hand_computed_values(tok):
    # Greedy from "=": "1" (p=.5), then <eos> (p=.5): every answer is "1", whatever the prompt
    # length (left padding must not shift the last position).
    model = BigramLM(tok, ROWS)
    assert greedy_answers(model, tok, [e.prompt for e in EXAMPLES], max_new_tokens=4) == ["1", "1", "1"]
    result = score(model, tok, TaskSplit("toy", "test", EXAMPLES), metric="accuracy", batch_size=2)
    assert result.value == pytest.approx(1 / 3)
    assert (result.task, result.split, result.metric, result.n) == ("toy", "test", "accuracy", 3)
    assert result.seconds > 0


def test_greedy_stops_at_max_new_tokens(tok):
    # "2" -> "2" -> ... never reaches <eos> within the budget: the text is cut at 3 tokens.
    model = BigramLM(tok, {"=": {"2": 0.9}, "2": {"2": 0.9}})
    assert greedy_answers(model, tok, ["a="], max_new_tokens=3) == ["222"]


def _tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


MIXED = (Example("add 12+03=", "015"), Example("rev ab=", "ba"), Example("count a abcaaa=", "4"))


def test_batched_nll_equals_one_example_at_a_time_reference(tok):
    # Reference: unpadded forward of each sequence, log-softmax picked by hand.
    model = _tiny_llama(tok)
    total, count = 0.0, 0
    for e in MIXED:
        prompt = tok(e.prompt)["input_ids"]
        seq = prompt + tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)  # (t, vocab)
        for pos in range(len(prompt), len(seq)):
            total -= logp[pos - 1, seq[pos]].item()
            count += 1
    assert answer_nll(model, tok, MIXED) == pytest.approx(total / count, rel=1e-5)


def test_batched_greedy_equals_hf_generate_one_at_a_time(tok):
    # Left padding + KV cache against `generate` on each unpadded prompt.
    model = _tiny_llama(tok, seed=1)
    prompts = [e.prompt for e in MIXED]
    reference = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        reference.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert greedy_answers(model, tok, prompts, max_new_tokens=5) == reference


def test_score_rejects_unknown_metric(tok):
    with pytest.raises(DataError, match="unknown metric"):
        score(BigramLM(tok, ROWS), tok, TaskSplit("toy", "test", EXAMPLES), metric="bleu")


# ---------------------------------------------------------------- task files: bad inputs give one line


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_task_file(tmp_path):
    with pytest.raises(DataError) as exc:
        read_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl: no such task file" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        load_task(tmp_path, "nope", "test")
    assert "no task 'nope'" in _one_line(exc)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a=", "answer": "b"}\n{"prompt": "a=", oops\n')
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:2: not valid JSON" in _one_line(exc)
    path.write_text('{"prompt": "a="}\n')
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:1: expected an object" in _one_line(exc)


def test_empty_split(tmp_path):
    (tmp_path / "tasks" / "toy").mkdir(parents=True)
    (tmp_path / "tasks" / "toy" / "test.jsonl").write_text("\n\n")
    with pytest.raises(DataError) as exc:
        load_task(tmp_path, "toy", "test")
    assert "no examples (the split is empty)" in _one_line(exc)


def test_load_task_limit_and_names(tmp_path):
    (tmp_path / "toy").mkdir()
    rows = [{"prompt": f"p{i}=", "answer": str(i)} for i in range(5)]
    (tmp_path / "toy" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(tmp_path, "toy", "validation", limit=3)  # a tasks folder works as well as a zoo
    assert (task.name, task.split, len(task)) == ("toy", "validation", 3)
    assert task.examples[2] == Example("p2=", "2")


# ---------------------------------------------------------------- on the zoo


def test_model_folder_without_tokenizer(zoo_dir, tmp_path, capsys):
    folder = tmp_path / "no_tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(zoo_dir / "base" / name, folder / name)
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    assert "no tokenizer here" in _one_line(exc)
    assert main(["eval", str(folder), "--task", "add", "--zoo", str(zoo_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergelab: error:") and "no tokenizer here" in err and "\n" not in err


def test_cli_eval_zoo_skill(zoo_dir, capsys):
    assert main(["eval", str(zoo_dir / "experts" / "sort"), "--task", "sort", "--limit", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["task"], out["split"], out["metric"], out["n"]) == ("sort", "test", "accuracy", 20)
    assert main(["eval", str(zoo_dir / "adapters" / "shift"), "--task", "shift", "--metric", "nll", "--limit", "20"]) == 0
    assert "shift/test nll=" in capsys.readouterr().out
    assert main(["eval", str(zoo_dir / "base"), "--task", "nope", "--metric", "nll"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err


def test_lm_eval_bridge_matches_exact_match_scorer(zoo_dir, tmp_path):
    model, tok = load_model(zoo_dir / "experts" / "back")
    ours = score(model, tok, load_task(zoo_dir, "back", "test", limit=60), metric="accuracy")
    theirs = lm_eval_score(model, tok, zoo_task_folder(zoo_dir, "back", tmp_path / "tasks"), limit=60)
    assert (theirs.task, theirs.split, theirs.metric, theirs.n) == ("zoo_back", "test", "exact_match", 60)
    assert theirs.value == pytest.approx(ours.value)
    assert 0 < ours.value  # the expert gets some right, so the match is not 0 == 0


def test_lm_eval_bad_task_folder(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        lm_eval_score(BigramLM(tok, ROWS), tok, tmp_path / "empty")
    assert "expected one lm-eval task" in _one_line(exc)
