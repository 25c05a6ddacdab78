"""Peak memory on 70B-shaped tensors: TIES and linear merges in bounded memory (`mergelab merge --memory`).

    python bench/bench_memory.py --workdir /tmp/mlmem [--memory 1GB] [--cases linear,ties] [--check]

Writes three random-weight bfloat16 checkpoints with Llama-3-70B's shapes (vocab 128256, hidden 8192,
intermediate 28672, 64 heads / 8 KV heads) but 2 layers: a base and two perturbed copies, ~7.6 GB
each, of which the embedding and the head are 1.05B elements (2.1 GB) apiece. Then merges them, each
in a fresh process, and reports wall time and peak RSS:

- `linear`        : a 3-model linear merge;
- `ties`          : a 2-model TIES merge on the base (densities 0.5/0.7) with `tie_break: position`;
- `ties_mergekit` : the same with mergekit's tie order (the default). Over bfloat16 weights the density
                    cut splits equal magnitudes, and mergekit's order among them is that of its sort of
                    the whole tensor: it sorts the 1.05B-element embedding as mergekit does (~17 GB).
                    Not run unless asked for.

`--check` merges each case again with `--memory none` (whole tensors: ~20 GB for TIES here) and checks
that every output tensor is bit-identical to the blockwise one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_merge import run_measured

VOCAB, HIDDEN, INTER, KV = 128256, 8192, 28672, 1024
LAYER = {
    "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
    "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN), "mlp.down_proj.weight": (HIDDEN, INTER),
}
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
    "num_hidden_layers": 2, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": VOCAB,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "rope_theta": 500000.0,
}
ROWS = 4096  # rows generated at a time, so the fixture writer stays small too


def layout(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        names += [(f"model.layers.{i}.{s}", shape) for s, shape in LAYER.items()]
    return names + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_models(root: Path, layers: int) -> list[Path]:
    """base, ft1, ft2 (ft = base + small noise), streamed a few thousand rows at a time."""
    from mergelab.writer import ShardedWriter

    dirs = [root / n for n in ("base", "ft1", "ft2")]
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    entries = [(n, s, torch.bfloat16) for n, s in layout(layers)]
    writers = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        writers.append(ShardedWriter(d, entries, 5 * 10**9))
    g = torch.Generator().manual_seed(0)
    for name, shape in layout(layers):
        for start in range(0, shape[0], ROWS):
            rows = (min(ROWS, shape[0] - start), *shape[1:])
            base = torch.randn(rows, generator=g) * 0.02
            writers[0].write_part(name, base.to(torch.bfloat16))
            for w in writers[1:]:
                w.write_part(name, (base + torch.randn(rows, generator=g) * 0.004).to(torch.bfloat16))
    for w, d in zip(writers, dirs):
        w.close()
        (d / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}, indent=2))
    return dirs


def recipes(root: Path, dirs: list[Path]) -> dict[str, Path]:
    base, ft1, ft2 = (str(d) for d in dirs)
    ties = (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.7}}\ndtype: bfloat16\n")
    texts = {
        "linear": f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n"
                  f"  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"
                  "dtype: bfloat16\n",
        "ties": ties + "parameters: {normalize: true, tie_break: position}\n",
        "ties_mergekit": ties + "parameters: {normalize: true}\n",
    }
    for name, text in texts.items():
        (root / f"{name}.yaml").write_text(text)
    return {name: root / f"{name}.yaml" for name in texts}


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes, read 256 MB at a time."""
    from mergelab.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    out = {}
    for name, info in ckpt.tensors.items():
        h, n = hashlib.sha256(), info.nbytes // info.dtype.itemsize
        for start in range(0, n, 1 << 27):
            h.update(ckpt.read_range(name, start, min(start + (1 << 27), n)).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    ckpt.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/mergelab-bench-memory")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--memory", default="1GB", help="mergelab merge --memory (default 1GB, mergelab's default)")
    ap.add_argument("--cases", default="linear,ties", help="of linear, ties, ties_mergekit")
    ap.add_argument("--check", action="store_true", help="also merge with --memory none and compare, tensor by tensor")
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    dirs = write_models(root, args.layers)
    print(f"inputs ready in {time.perf_counter() - t:.0f} s: {', '.join(map(str, dirs))}", file=sys.stderr)
    paths = recipes(root, dirs)
    rows = []
    for case in args.cases.split(","):
        runs = [("blocks", args.memory)] + ([("whole", "none")] if args.check else [])
        found = {}
        for label, memory in runs:
            out = root / f"out_{case}_{label}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "mergelab.cli", "--quiet", "merge", str(paths[case]), str(out), "--memory", memory]
            seconds, gb = run_measured(cmd)
            print(f"{case} --memory {memory}: {seconds:.1f} s, {gb:.2f} GB", file=sys.stderr)
            rows.append((case, memory, seconds, gb))
            if args.check:
                found[label] = digests(out)
        if args.check:
            same = found["blocks"] == found["whole"]
            print(f"{case}: blockwise output {'bit-identical to' if same else 'DIFFERS from'} the whole-tensor merge", file=sys.stderr)
            rows[-1] = (*rows[-1][:3], rows[-1][3], same)  # type: ignore[assignment]
    print("| case | --memory | wall (s) | peak RSS (GB) |\n|---|---|---:|---:|")
    for case, memory, seconds, gb, *_ in rows:
        print(f"| {case} | {memory} | {seconds:.1f} | {gb:.2f} |")


if __name__ == "__main__":
    main()
