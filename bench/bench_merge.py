"""Merge speed and memory: mergelab vs mergekit on ~1.1B-parameter Llama-shaped checkpoints.

    python bench/bench_merge.py --workdir /tmp/mlbench [--mergekit /path/to/venv/bin/mergekit-yaml] [--repeats 3]
                                [--baseline /tmp/ml_before]   # another checkout: before/after in one run

Writes three random-weight bfloat16 checkpoints (22 layers, hidden 2048, intermediate 5632,
vocab 32000: a shared base and two perturbed copies, ~2.2 GB each), then times, each in a
fresh process and `--repeats` times:

- `io`        : reading every input tensor and writing an output of the same size (the floor);
- `linear`    : a 3-model linear merge;
- `ties`      : a 2-model TIES merge on the base (densities 0.5/0.7, weights 0.6/0.4, normalize);
- `ties_position`: the same with `tie_break: position` (mergelab only: equal magnitudes at the
                density cut taken by position, never sorting; not mergekit's entries);
- `dare_ties`: the TIES recipe with DARE's random drop (seeded; mergelab only, not run unless asked);

with mergelab, and with mergekit when `--mergekit` points at its `mergekit-yaml` (install it
in a separate environment: `pip install mergekit`; it is not a dependency), and with the
mergelab of another source tree when `--baseline` names one (e.g. the commit before a change:
`git archive REV | tar -x -C DIR`). Repeats run in rounds, every command once per round, so a
load that comes and goes on the machine falls on all of them alike. Reports median wall time
and median peak RSS per case, and the ratios, as a markdown table. `--device cuda` runs mergelab's
math on the GPU, `--mergekit-flags=--gpu-rich` passes flags to mergekit, `--small` makes small
shapes (4 layers, hidden 256) for a smoke test, `--check` keeps the outputs and checks that
mergekit's (and the baseline's) tensors equal mergelab's; bench/gpu_check.sh runs all of them in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-shaped checkpoints: TinyLlama-1.1B's shapes, and small ones for a smoke test (--small)
    "full": {"hidden": 2048, "intermediate": 5632, "kv": 256, "heads": 32, "kv_heads": 4, "layers": 22, "vocab": 32000},
    "small": {"hidden": 256, "intermediate": 688, "kv": 64, "heads": 4, "kv_heads": 1, "layers": 4, "vocab": 1024},
}


def layout(size: str = "full") -> list[tuple[str, tuple[int, ...]]]:
    d = SHAPES[size]
    h, i, kv = d["hidden"], d["intermediate"], d["kv"]
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    names = [("model.embed_tokens.weight", (d["vocab"], h))]
    for n in range(d["layers"]):
        names += [(f"model.layers.{n}.{s}", shape) for s, shape in layer.items()]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (d["vocab"], h))]


def config(size: str = "full") -> dict:
    d = SHAPES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d["hidden"],
        "intermediate_size": d["intermediate"], "num_hidden_layers": d["layers"], "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"], "vocab_size": d["vocab"], "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "rope_theta": 10000.0,
    }


def write_models(root: Path, size: str = "full") -> list[Path]:
    """base, ft1, ft2 (ft = base + small noise), streamed tensor by tensor with mergelab's writer."""
    from mergelab.writer import ShardedWriter

    dirs = [root / n for n in ("base", "ft1", "ft2")]
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    entries = [(n, s, torch.bfloat16) for n, s in layout(size)]
    writers = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        writers.append(ShardedWriter(d, entries, 2 * 10**9))
    g = torch.Generator().manual_seed(0)
    for name, shape in layout(size):
        base = torch.randn(shape, generator=g) * 0.02
        writers[0].write(name, base.to(torch.bfloat16))
        for w in writers[1:]:
            w.write(name, (base + torch.randn(shape, generator=g) * 0.004).to(torch.bfloat16))
    for w, d in zip(writers, dirs):
        w.close()
        (d / "config.json").write_text(json.dumps(config(size), indent=2))
    return dirs


def recipes(root: Path, dirs: list[Path]) -> dict[str, Path]:
    base, ft1, ft2 = (str(d) for d in dirs)
    texts = {
        "linear": f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n"
                  f"  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"
                  "dtype: bfloat16\n",
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                f"  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.7}}\nparameters: {{normalize: true}}\ndtype: bfloat16\n",
    }
    texts["ties_position"] = texts["ties"].replace("{normalize: true}", "{normalize: true, tie_break: position}")
    texts["dare_ties"] = texts["ties"].replace("merge_method: ties", "merge_method: dare_ties")  # seeded by --seed
    out = {}
    for name, text in texts.items():
        (root / f"{name}.yaml").write_text(text)
        out[name] = root / f"{name}.yaml"
    return out


CASES = ("linear", "ties", "ties_position", "dare_ties")
BASELINE_CASES = ("linear", "ties")  # recipes that mergekit, and a mergelab from before tie_break, run

IO_FLOOR = """
import sys, torch
from pathlib import Path
from mergelab.checkpoint import Checkpoint
from mergelab.writer import ShardedWriter
ckpts = [Checkpoint(p) for p in sys.argv[2:]]
first = ckpts[0]
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
w = ShardedWriter(out, [(n, i.shape, i.dtype) for n, i in first.tensors.items()], 5 * 10**9)
for name in first.tensors:
    ts = [c.read(name) for c in ckpts]
    w.write(name, ts[0])
w.close()
"""


def run_measured(cmd: list[str], cwd: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of `cmd`, measured from a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
        "dt = time.perf_counter() - t; "
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode and (sys.stderr.write(r.stderr.decode()[-2000:]) or 1))"
    )
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=cwd)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr}")
    seconds, kb = res.stdout.split()
    return float(seconds), int(kb) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergelab-bench"))
    ap.add_argument("--mergekit", help="path to mergekit-yaml in its own environment")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-repeats", type=int, default=1, help="mergekit's TIES alone takes ~5 min here")
    ap.add_argument("--cases", default="io,linear,ties")
    ap.add_argument("--baseline", help="another mergelab source tree, timed as 'CASE baseline' (its cwd puts it first on sys.path)")
    ap.add_argument("--device", default="cpu", help="mergelab merge --device (cpu, cuda, ...); labels name it unless cpu")
    ap.add_argument("--mergekit-flags", default="", help="extra mergekit-yaml flags, given with '=': --mergekit-flags=--gpu-rich")
    ap.add_argument("--small", action="store_true", help="small shapes (4 layers, hidden 256): a smoke test in seconds")
    ap.add_argument("--check", action="store_true", help="keep each command's first output and check, tensor by tensor, "
                    "that mergekit's and the baseline's equal mergelab's")
    args = ap.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    dirs = write_models(root, "small" if args.small else "full")
    print(f"inputs ready in {time.perf_counter() - t:.0f} s: {', '.join(map(str, dirs))}", file=sys.stderr)
    paths = recipes(root, dirs)
    out = root / "out"
    env_mk = {**os.environ, "HF_HUB_OFFLINE": "1"}
    os.environ.update(env_mk)
    cmds = commands(args, paths, dirs, out)
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in cmds}
    for round_ in range(max(args.repeats, args.mergekit_repeats)):  # every command once per round
        for label, (cmd, cwd) in cmds.items():
            if round_ >= (args.mergekit_repeats if label.endswith("mergekit") else args.repeats):
                continue
            subprocess.run(["rm", "-rf", str(out)])
            runs[label].append(run_measured(cmd, cwd))
            print(f"{label}: {runs[label][-1][0]:.1f} s, {runs[label][-1][1]:.2f} GB", file=sys.stderr)
            if args.check and round_ == 0:
                kept = root / "kept" / label.replace(" ", "_")
                subprocess.run(["rm", "-rf", str(kept)])
                kept.parent.mkdir(exist_ok=True)
                out.rename(kept)
    results = {label: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for label, rs in runs.items()}
    print("| case | median wall (s) | median peak RSS (GB) |\n|---|---:|---:|")
    for label, (s, gb) in results.items():
        print(f"| {label} | {s:.1f} | {gb:.2f} |")
    floor = results.get("io floor (read 3 models, write 1)")
    for case in CASES:
        ours = results.get(f"{case} mergelab")
        parts = [f"mergelab / io floor = {ours[0] / floor[0]:.2f}x time"] if ours and floor else []
        for other in ("mergekit", "baseline"):
            theirs = results.get(f"{case} {other}")
            if ours and theirs:
                parts.append(f"mergelab / {other} = {ours[0] / theirs[0]:.2f}x time, {ours[1] / theirs[1]:.2f}x peak RSS")
        if parts:
            print(f"\n{case}: " + "; ".join(parts), end="")
    print()
    for case in CASES if args.check else ():
        for other in ("mergekit", "baseline"):
            theirs = [label for label in runs if label.startswith(f"{case} {other}")]
            if f"{case} mergelab" in runs and theirs:
                kept = root / "kept"
                diff = same_tensors(kept / f"{case} mergelab".replace(" ", "_"), kept / theirs[0].replace(" ", "_"))
                print(f"{case}: {other} == mergelab, tensor by tensor: " + ("yes" if not diff else f"no ({diff})"))


def same_tensors(a: Path, b: Path) -> str:
    """'' when every tensor of a and b has the same name, shape, dtype and bytes; else what differs."""
    from mergelab.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    try:
        if set(ca.tensors) != set(cb.tensors):
            return f"tensor names differ ({len(set(ca.tensors) ^ set(cb.tensors))} not in both)"
        for name in sorted(ca.tensors):
            x, y = ca.read(name), cb.read(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return f"{name} differs"
        return ""
    finally:
        ca.close()
        cb.close()


def merge_command(recipe: Path, out: Path, device: str = "cpu", seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "mergelab.cli", "--quiet", "merge", str(recipe), str(out), "--overwrite",
            "--device", device, "--seed", str(seed)]


def mergekit_command(mergekit: str, recipe: Path, out: Path, flags: str = "") -> list[str]:
    return [mergekit, str(recipe), str(out), "--allow-crimes", "--lazy-unpickle", *flags.split()]


def commands(args: argparse.Namespace, paths: dict[str, Path], dirs: list[Path], out: Path) -> dict[str, tuple[list[str], str | None]]:
    """label -> (command, working directory) for every case asked for."""
    cmds: dict[str, tuple[list[str], str | None]] = {}
    cases = args.cases.split(",")
    if "io" in cases:
        cmds["io floor (read 3 models, write 1)"] = ([sys.executable, "-c", IO_FLOOR, str(out), *map(str, dirs)], None)
    for case in CASES:
        if case not in cases:
            continue
        label = f"{case} mergelab" + (f" --device {args.device}" if args.device != "cpu" else "")
        cmds[label] = (merge_command(paths[case], out, args.device), None)
        if args.baseline and case in BASELINE_CASES:  # `python -m` puts the working directory first on sys.path
            cmds[f"{case} baseline"] = (merge_command(paths[case], out, args.device), str(Path(args.baseline).resolve()))
        if args.mergekit and case in BASELINE_CASES:
            cmds[f"{case} mergekit" + (f" {args.mergekit_flags}" if args.mergekit_flags else "")] = (
                mergekit_command(args.mergekit, paths[case], out, args.mergekit_flags), None)
    return cmds


if __name__ == "__main__":
    main()
