"""The metric registry: each entry's direction and scorers, the seq2seq scorers against the model's
own loss, and the readers (CLI choices, job schemas) taking their names from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from mergelab.errors import DataError
from mergelab.eval import Example, TaskSplit, load_tokenizer, score
from mergelab.eval.seq2seq import encode_seq2seq, seq2seq_nll, seq2seq_prob
from mergelab.metrics import METRICS, example_metrics, get_metric

EXAMPLES = (Example("copy abc=", "abc"), Example("copy hello=", "hello"), Example("copy xy=", "xy"))


@pytest.fixture(scope="module")
def t5(zoo_dir: Path):
    """A tiny random T5 with the zoo's tokenizer."""
    tok = load_tokenizer(zoo_dir / "base")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    return T5ForConditionalGeneration(config).eval(), tok


def test_every_entry_has_a_direction_and_its_scorers() -> None:
    assert list(METRICS) == ["accuracy", "nll", "prob", "lm-eval"]
    assert {n: m.lower_is_better for n, m in METRICS.items()} == {"accuracy": False, "nll": True, "prob": False, "lm-eval": False}
    assert example_metrics() == ("accuracy", "nll", "prob")
    for name in example_metrics():
        for scorer in (METRICS[name].causal, METRICS[name].seq2seq):
            assert callable(getattr(__import__(scorer.module, fromlist=["_"]), scorer.function))
    assert get_metric("nll").better(0.1, 0.2) and get_metric("accuracy").better(0.9, 0.5)
    with pytest.raises(DataError, match="unknown metric 'bleu'; choose one of: accuracy, nll, prob, lm-eval"):
        get_metric("bleu")


def test_seq2seq_prob_is_the_answer_probability_of_the_models_own_loss(t5) -> None:
    """One example: prob = exp(-loss * n), n its answer tokens and <eos>; several: the mean of those."""
    model, tok = t5
    singles = []
    for e in EXAMPLES:
        batch = encode_seq2seq(tok, [e])
        with torch.no_grad():
            loss = float(model(**batch).loss)  # HF's own mean CE over the n label tokens
        singles.append(math.exp(-loss * int((batch["labels"] != -100).sum())))
        assert seq2seq_prob(model, tok, [e]) == pytest.approx(singles[-1], rel=1e-5)
    assert seq2seq_prob(model, tok, EXAMPLES) == pytest.approx(sum(singles) / len(singles), rel=1e-5)
    assert seq2seq_prob(model, tok, EXAMPLES, batch_size=2) == pytest.approx(sum(singles) / len(singles), rel=1e-5)


def test_score_takes_the_seq2seq_scorer_for_an_encoder_decoder(t5) -> None:
    model, tok = t5
    task = TaskSplit("copy", "test", EXAMPLES)
    assert score(model, tok, task, "nll").value == pytest.approx(seq2seq_nll(model, tok, EXAMPLES))
    assert score(model, tok, task, "prob").value == pytest.approx(seq2seq_prob(model, tok, EXAMPLES))
    with pytest.raises(DataError, match="'lm-eval' is not scored on a task's examples"):
        score(model, tok, task, "lm-eval")


def test_the_cli_offers_the_registry() -> None:
    from mergelab.cli import build_parser

    parser = build_parser()
    eval_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" eval"))
    metric = next(a for a in eval_parser._actions if a.dest == "metric")
    assert tuple(metric.choices) == tuple(METRICS)


def test_the_search_report_says_which_way_each_metric_is_better(tmp_path: Path) -> None:
    import json

    from mergelab.evolve.report import write_report

    trial = {"index": 0, "genome": {"method": "linear"}, "values": {}, "metrics": {"add/nll": 0.5}, "loss": 0.5,
             "seconds": {"merge": 0.1, "load": 0.1, "eval": 0.2}, "worker": "local", "error": None}
    (tmp_path / "trials.jsonl").write_text(json.dumps(trial) + "\n")
    (tmp_path / "report.json").write_text(json.dumps({"best": {"add/accuracy": 0.9, "add/nll": 0.5}}))
    md = write_report(tmp_path)[1].read_text()
    assert "| mean accuracy (higher is better) | mean nll (lower is better) |" in md
