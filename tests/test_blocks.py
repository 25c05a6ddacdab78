"""Merging in bounded memory: a tensor larger than its share of `--memory` is merged in blocks of
flat elements, and the result is the same, bit for bit, as merging it whole. The block size is made
tiny here (64 elements, `execute.BLOCK_ALIGN`) so that small tensors split into hundreds of blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab import execute
from mergelab.checkpoint import Checkpoint
from mergelab.merging import merge
from mergelab.methods import _select, slerp
from mergelab.writer import ShardedWriter
from tests.helpers import load_state

SHAPES = {"model.embed_tokens.weight": (301, 70), "model.layers.0.mlp.up_proj.weight": (90, 70),
          "model.layers.0.input_layernorm.weight": (70,), "lm_head.weight": (301, 70)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 70}


def write_model(folder: Path, seed: int, dtype: torch.dtype, tied: bool) -> Path:
    """Random weights near a shared base; `tied`: rounded to multiples of 1/64, so magnitudes tie often."""
    folder.mkdir(parents=True)
    writer = ShardedWriter(folder, [(n, s, dtype) for n, s in SHAPES.items()], 40_000)
    for i, (name, shape) in enumerate(SHAPES.items()):
        base = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 * seed + i)) * 0.1 * (seed > 0)
        t = base + noise
        writer.write(name, (torch.round(t * 64) / 64 if tied else t).to(dtype))
    writer.close()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[torch.dtype, bool], list[Path]]:
    root = tmp_path_factory.mktemp("blocks")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for tied in (False, True):
            name = f"{str(dtype).split('.')[-1]}_{'tied' if tied else 'plain'}"
            out[(dtype, tied)] = [write_model(root / name / m, seed, dtype, tied) for seed, m in enumerate(("base", "a", "b"))]
    return out


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "BLOCK_ALIGN", 64)
    monkeypatch.setattr(slerp, "CHUNK", 64)  # slerp's chunks, as mergekit's 1M, must not straddle blocks


def recipe(method: str, paths: list[Path], params: dict | None = None, **global_params) -> dict:
    base, a, b = map(str, paths)
    two = method in ("slerp", "nearswap")
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in ((base, 0.2), (a, 0.5), (b, 0.3))]
        return {"merge_method": method, "models": models}
    models = [{"model": a, "parameters": {"weight": 0.6, "density": 0.45, **(params or {})}},
              {"model": b, "parameters": {"weight": 0.4, "density": 0.7, **(params or {})}}]
    if two or method == "ram":  # ram: no per-model parameters
        models = [{"model": m} for m in ((a,) if two else (a, b))]
    return {"merge_method": method, "base_model": base, "models": models, "parameters": global_params}


CASES = [
    ("linear", {}, {}),
    ("task_arithmetic", {}, {}),
    ("ties", {}, {}),
    ("ties", {}, {"tie_break": "position"}),
    ("ties", {}, {"sign_from": "trimmed", "normalize": False}),
    ("breadcrumbs_ties", {"gamma": 0.05}, {}),
    ("breadcrumbs_ties", {"gamma": 0.05}, {"tie_break": "position"}),
    ("breadcrumbs", {"gamma": 0.01}, {}),
    ("slerp", {}, {"t": 0.3}),
    ("nearswap", {}, {"t": 0.05}),
    ("ram", {}, {}),
    ("dare_ties", {}, {}),  # not split (random draws over the whole tensor): merged whole, as without a budget
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
@pytest.mark.parametrize("method,params,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, _, o in CASES])
def test_blocks_give_the_whole_tensor_result(models, tmp_path: Path, method: str, params: dict, options: dict,
                                             dtype: torch.dtype, tied: bool) -> None:
    r = recipe(method, models[(dtype, tied)], params, **options)
    if method in ("slerp", "nearswap"):
        r["parameters"] = options
    whole = load_state(merge(r, tmp_path / "whole", progress=False, memory=None))
    blocks = load_state(merge(r, tmp_path / "blocks", progress=False, memory=1))
    for name in SHAPES:
        assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


def test_a_budget_splits_only_what_exceeds_its_share(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = execute.read_block
    monkeypatch.setattr(execute, "read_block", lambda plan, job, a, b: calls.append((a, b)) or real(plan, job, a, b))
    r = recipe("linear", models[(torch.float32, False)])
    merge(r, tmp_path / "none", progress=False, memory=None)
    assert calls == []
    merge(r, tmp_path / "small", progress=False, memory=1)
    assert len(calls) == sum(-(-(s[0] * (s[1] if len(s) > 1 else 1)) // 64) for s in SHAPES.values())
    assert all((b - a == 64) or b % 70 == 0 for a, b in calls)  # full blocks, but for each tensor's last


def test_read_range_reads_that_range(models) -> None:
    ckpt = Checkpoint(models[(torch.bfloat16, False)][1])
    whole = ckpt.read("model.embed_tokens.weight").reshape(-1)
    for a, b in ((0, 64), (130, 7000), (21000, 21070), (5, 5)):
        assert torch.equal(ckpt.read_range("model.embed_tokens.weight", a, b), whole[a:b])


def _keys(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).abs()
    if kind == "ties":
        return (torch.round(x * 8) / 8).float()
    return x.to(torch.bfloat16) if kind == "bf16" else x.double() if kind == "f64" else x


@pytest.mark.parametrize("kind", ["f32", "ties", "bf16", "f64"])
@pytest.mark.parametrize("tie_break", _select.TIE_BREAKS)
def test_windows_over_blocks_are_the_windows_of_the_whole(kind: str, tie_break: str) -> None:
    n = 5000
    keys = _keys(kind, n)
    blocks = lambda: ([keys[a : a + 700]] for a in range(0, n, 700))  # noqa: E731
    for lo, hi, descending in ((0, 1, True), (0, 2500, True), (0, 4999, True), (0, n, True), (0, 0, True),
                               (0, 2000, False), (40, 4000, False), (1, n - 1, False)):
        [window] = _select.windows_over_blocks(blocks, n, [(lo, hi, descending)], tie_break)
        mask = torch.cat([window.mask(k[0], a) for k, a in zip(blocks(), range(0, n, 700))])
        assert torch.equal(mask, _select._window(keys, lo, hi, descending, tie_break)), (lo, hi, descending)


def test_a_nan_key_falls_back_to_the_sort() -> None:
    keys = _keys("f32", 3000)
    keys[17] = float("nan")
    blocks = lambda: ([keys[a : a + 512]] for a in range(0, 3000, 512))  # noqa: E731
    sorted_for = []
    [window] = _select.windows_over_blocks(blocks, 3000, [(0, 1200, True)], "position", sorted_for.append)
    assert sorted_for == [0] and torch.equal(window.whole, _select._window(keys, 0, 1200, True, "position"))


def test_a_method_with_passes_splits_only_what_exceeds_the_whole_budget(models, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES reads a split tensor once more per pass (and sorts it whole anyway where bf16 ties split the cut), so
    a tensor that fits the budget whole is merged whole even when it exceeds its share; linear splits it."""
    split: set[str] = set()
    real = execute.read_block
    monkeypatch.setattr(execute, "read_block", lambda plan, job, a, b: split.add(job.name) or real(plan, job, a, b))
    paths = models[(torch.bfloat16, True)]
    whole = load_state(merge(recipe("ties", paths), tmp_path / "whole", progress=False, memory=None))
    n_embed = 301 * 70  # ~22 bytes an element: 0.46 MB whole, 0.1 MB its share of 0.5 MB
    for memory, expected in ((500_000, set()), (400_000, {"model.embed_tokens.weight", "lm_head.weight"})):
        split.clear()
        out = load_state(merge(recipe("ties", paths), tmp_path / str(memory), progress=False, memory=memory))
        assert split == expected and 400_000 < n_embed * 22 <= 500_000
        assert all(torch.equal(whole[k].view(torch.uint8), out[k].view(torch.uint8)) for k in SHAPES)
    split.clear()
    merge(recipe("linear", paths), tmp_path / "linear", progress=False, memory=500_000)
    assert "model.embed_tokens.weight" in split
