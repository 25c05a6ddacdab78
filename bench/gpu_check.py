"""The GPU check of issue #13 in one run: mergelab on GPU and CPU, mergekit, the I/O floor, bit-identity.

    python bench/gpu_check.py --out DIR [--small] [--mergekit PATH/TO/mergekit-yaml] [--workdir W] [--budget 480]

(bench/gpu_check.sh sets up the environment and calls this.) Makes bench_merge's three bf16
Llama-shaped checkpoints (~1.1B parameters, 2.2 GB each; `--small`: 4 layers, hidden 256), then
runs, each in a fresh process: the I/O floor, TIES (2 models on the base) and linear (3 models)
with `mergelab merge --device cuda` and `--device cpu`, seeded DARE-TIES twice on the GPU, and
mergekit `--cuda` / `--gpu-rich` when `--mergekit` is given. Without a CUDA device the GPU cases are
skipped and each mergelab case runs twice on the CPU, so every check still runs. Checks, tensor by
tensor with torch.equal: GPU == CPU (TIES, linear), DARE == DARE (same seed), and mergelab CPU ==
mergekit (information only). Prints one markdown table (and writes DIR/gpu_check.md, DIR/results.json
after every case, so a run cut short keeps what it measured). Exit 1 if a mergelab identity check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_merge import IO_FLOOR, merge_command, mergekit_command, recipes, run_measured, same_tensors, write_models

IO = "I/O floor: read the 3 inputs, write 1 output"


def machine() -> dict[str, str]:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().replace("\n", ", ") or "cpu"
    except (OSError, subprocess.SubprocessError):
        gpu = "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": gpu,
            "torch": torch.__version__, "cores": str(os.cpu_count()), "commit": commit or "?"}


class Check:
    """Runs the cases in order, keeps the rows and identity results, rewrites the report after each."""

    def __init__(self, args: argparse.Namespace, info: dict[str, str]) -> None:
        self.args, self.info, self.t0 = args, info, time.perf_counter()
        self.rows: dict[str, tuple[float, float]] = {}
        self.checks: list[tuple[str, str, bool]] = []  # (what, '' or the difference, counts for the exit code)
        self.notes: list[str] = []
        self.outs = Path(args.workdir) / "outs"

    def run(self, label: str, cmd: list[str], out: Path | None) -> Path | None:
        if time.perf_counter() - self.t0 > self.args.budget:
            self.note(f"skipped (past --budget {self.args.budget:.0f} s): {label}")
            return None
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        try:
            self.rows[label] = run_measured(cmd)
        except SystemExit as e:  # one failed case is reported, the others still run
            self.note(f"FAILED: {label}: {str(e).strip().splitlines()[-1]}")
            return None
        print(f"{label}: {self.rows[label][0]:.1f} s, {self.rows[label][1]:.2f} GB", file=sys.stderr, flush=True)
        self.write()
        return out

    def compare(self, what: str, a: Path | None, b: Path | None, counts: bool = True) -> None:
        if a is not None and b is not None:
            self.checks.append((what, same_tensors(a, b), counts))
            self.write()

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.notes.append(line)
        self.write()

    def table(self) -> str:
        i = self.info
        lines = [f"{i['date']}, {i['gpu']}, torch {i['torch']}, {i['cores']} cores, mergelab {i['commit']}"
                 f"{', small shapes (--small)' if self.args.small else ''}", "",
                 "| case | wall s | peak RSS GB | x I/O floor | x mergekit --gpu-rich |", "|---|---:|---:|---:|---:|"]
        floor = self.rows.get(IO, (0.0, 0.0))[0]
        for label, (s, gb) in self.rows.items():
            case = label.split()[0]
            ref = self.rows.get(f"{case} mergekit --gpu-rich", self.rows.get(f"{case} mergekit", (0.0, 0.0)))[0]
            ratio = lambda x: f"{s / x:.2f}" if x and label != IO else "-"  # noqa: E731
            lines.append(f"| {label} | {s:.1f} | {gb:.2f} | {ratio(floor)} | {ratio(ref) if 'mergekit' not in label else '-'} |")
        if "--gpu-rich" not in "".join(self.rows) and any("mergekit" in k for k in self.rows):
            lines.append("\n(no --gpu-rich without CUDA: the last column is against mergekit on the CPU)")
        lines.append("")
        for what, diff, counts in self.checks:
            lines.append(f"- {what}: {'bit-identical, every tensor' if not diff else 'DIFFERS: ' + diff}"
                         f"{'' if counts else ' (information)'}")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def write(self) -> None:
        out = Path(self.args.out)
        (out / "gpu_check.md").write_text(self.table() + "\n")
        (out / "results.json").write_text(json.dumps(
            {"machine": self.info, "rows": self.rows, "checks": self.checks, "notes": self.notes}, indent=1))

    def failed(self) -> bool:
        return any(diff for _, diff, counts in self.checks if counts) or any(n.startswith("FAILED") for n in self.notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.md, results.json")
    ap.add_argument("--workdir", default=None, help="fixtures and outputs (default a new temp dir, removed at the end)")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml to time (its own environment)")
    ap.add_argument("--small", action="store_true", help="small shapes: a smoke test in seconds")
    ap.add_argument("--budget", type=float, default=420, help="start no case after this many seconds (default 420)")
    args = ap.parse_args()
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    args.workdir = str(workdir)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    c = Check(args, machine())
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"  # the device of the run compared with --device cpu: the GPU, or the CPU again
    again = "" if cuda else ", run 2"
    if not cuda:
        c.note("no CUDA device: GPU cases skipped (each mergelab case runs twice on the CPU instead)")
    t = time.perf_counter()
    dirs = write_models(workdir / "inputs", "small" if args.small else "full")
    c.note(f"fixtures: 3 checkpoints of {sum(f.stat().st_size for f in dirs[0].glob('*.safetensors')) / 1e9:.2f} GB "
           f"ready in {time.perf_counter() - t:.0f} s")
    paths, o = recipes(workdir / "inputs", dirs), c.outs
    o.mkdir(parents=True, exist_ok=True)
    c.run(IO, [sys.executable, "-c", IO_FLOOR, str(o / "io"), *map(str, dirs)], o / "io")
    shutil.rmtree(o / "io", ignore_errors=True)
    cpu_out = {}
    for case in ("ties", "linear"):
        a = c.run(f"{case} mergelab --device {dev}{again}", merge_command(paths[case], o / f"{case}-{dev}2", dev), o / f"{case}-{dev}2")
        b = c.run(f"{case} mergelab --device cpu", merge_command(paths[case], o / f"{case}-cpu", "cpu"), o / f"{case}-cpu")
        c.compare(f"{case}: mergelab --device {dev} == --device cpu" if cuda else f"{case}: mergelab --device cpu twice", a, b)
        cpu_out[case] = b
    d1 = c.run(f"dare_ties mergelab --device {dev} --seed 1", merge_command(paths["dare_ties"], o / "dare-1", dev, 1), o / "dare-1")
    d2 = c.run(f"dare_ties mergelab --device {dev} --seed 1, run 2", merge_command(paths["dare_ties"], o / "dare-2", dev, 1), o / "dare-2")
    c.compare(f"dare_ties: seed 1 twice on {dev}", d1, d2)
    if args.mergekit:
        for case in ("ties", "linear"):
            for flags in (("--gpu-rich", "--cuda") if cuda else ("",)):
                m = c.run(f"{case} mergekit {flags}".strip(), mergekit_command(args.mergekit, paths[case], o / "mk", flags), o / "mk")
                c.compare(f"{case}: mergelab --device cpu == mergekit {flags}".strip(), cpu_out[case], m, counts=False)
    else:
        c.note("mergekit not given (MERGEKIT=PATH or mergekit wheels in WHEELS): mergekit cases skipped")
    if cuda:  # DARE draws on the GPU against the CPU's: information, the GPU only has to repeat itself
        d3 = c.run("dare_ties mergelab --device cpu --seed 1", merge_command(paths["dare_ties"], o / "dare-3", "cpu", 1), o / "dare-3")
        c.compare("dare_ties: seed 1 on cuda == on cpu", d1, d3, counts=False)
    shutil.rmtree(o, ignore_errors=True)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(c.table())
    sys.exit(1 if c.failed() else 0)


if __name__ == "__main__":
    main()
