"""Build the zoo: task data, a tiny pretrained base, full-fine-tuned experts and LoRA adapters.

Layout of a zoo folder (all members share one architecture, so they merge tensor by tensor):

    zoo.json                          manifest, written last: a zoo without it is not complete
    tasks/<skill>/{train,validation,test}.jsonl
    base/                             LlamaForCausalLM + tokenizer, pretrained on every skill
    experts/<skill>/                  full fine-tunes of base, one skill each (+ tokenizer)
    adapters/<skill>/                 PEFT LoRA adapters on base, one skill each, same rank

What the demonstrations rest on holds by construction, not by the luck of one machine's floats:
the base learns the GENERAL skills whole, and every TAUGHT skill (the experts' and the LoraHub
target's) whole on short words but one letter short on long ones (`skills.partial`). A taught
skill is tested on long words only, so the base's exact-match accuracy there is zero however
training goes. An expert or adapter learns to finish long answers of its one skill: a small
change of one kind, since the base already computes every letter. Added up, the experts'
changes collide (each moves where answers stop), so the uniform merges lose a large share of
the experts' gains while weights set per layer keep more. The build measures these properties
(`properties.py`) and records them in the manifest; a miss is logged loudly.

The build writes into `DIR.partial/` and renames it to `DIR` at the end, so a crash never
leaves a folder that looks like a zoo; a leftover `DIR.partial/` is removed on the next build.
Everything is seeded (data, init, batch order) and each member trains on one thread, so the
same seed gives the same weights on the same machine and torch version, however many worker
processes share the experts and adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import peft
import torch
import transformers
from tqdm.auto import tqdm

from mergelab.errors import OutputError
from mergelab.zoo.members import MemberJob, member_seed, save_model, train_member
from mergelab.zoo.plans import DEEP, FULL, REDUCED, BuildPlan, plan_for
from mergelab.zoo.properties import measure, report_misses
from mergelab.zoo.roles import ADAPTERS, EXPERTS, GENERAL, HELD_OUT, SPLIT_SIZES, TAUGHT, base_mixture, task_splits, write_tasks
from mergelab.zoo.skills import SKILLS
from mergelab.zoo.tokenizer import build_tokenizer
from mergelab.zoo.train import deterministic, model_config, new_model, train

__all__ = ["ADAPTERS", "DEEP", "EXPERTS", "FULL", "GENERAL", "HELD_OUT", "MANIFEST", "REDUCED", "SPLIT_SIZES", "TAUGHT",
           "BuildPlan", "MemberJob", "build_zoo", "read_manifest", "task_splits", "train_member"]

log = logging.getLogger(__name__)

MANIFEST = "zoo.json"
FORMAT = 4  # 4: general skills whole in the base, taught skills cut short (3: properties measured)


def build_zoo(
    dir: str | Path, seed: int = 0, reduced: bool = False, overwrite: bool = False, workers: int | None = None,
    deep: bool = False,
) -> Path:
    """Build the zoo into `dir` (or reuse a complete one built with the same settings); returns `dir`.

    `reduced`: the test suite's smaller zoo; `deep`: eight layers, for data-flow search (`plans.py`).

    `workers` processes (default: 2, or 1 on a one-core machine) train the experts and adapters;
    the weights do not depend on it.
    """
    out, plan = Path(dir), plan_for(reduced, deep)
    if _is_complete(out, seed, reduced, plan):
        log.info("reusing the complete zoo in %s", out)
        return out
    _check_replaceable(out, seed, reduced, plan, overwrite)
    building = out.with_name(out.name + ".partial")
    if building.exists():
        log.info("removing the half-built %s", building)
        shutil.rmtree(building)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    start = time.perf_counter()
    manifest = _build_into(building, seed, plan, reduced, workers)
    manifest["build_seconds"] = round(time.perf_counter() - start, 1)
    _write_manifest(building, manifest)  # last: its presence marks the zoo complete
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    log.info("zoo built in %s (%.0f s)", out, manifest["build_seconds"])
    report_misses(manifest.get("properties", {}), out)  # named by where the zoo now is
    return out


def read_manifest(dir: str | Path) -> dict[str, Any] | None:
    """The zoo's manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(out: Path, seed: int, reduced: bool, plan: BuildPlan) -> bool:
    """A manifest for these settings, and every file it lists present with its recorded size."""
    manifest = read_manifest(out)
    if manifest is None or _settings(manifest) != _settings_of(seed, reduced, plan):
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (out / rel).is_file() and (out / rel).stat().st_size == meta["bytes"] for rel, meta in files.items()
    )


def _settings(manifest: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What a zoo was built with: seed, size and training plan (a zoo of an older plan is stale)."""
    return manifest.get("seed"), manifest.get("reduced"), (manifest.get("format"), manifest.get("plan"))


def _settings_of(seed: int, reduced: bool, plan: BuildPlan) -> tuple[Any, Any, Any]:
    return seed, reduced, (FORMAT, json.loads(json.dumps(asdict(plan))))


def _check_replaceable(out: Path, seed: int, reduced: bool, plan: BuildPlan, overwrite: bool) -> None:
    """Refuse to replace a folder that is not a zoo, or a zoo built with other settings."""
    if not out.exists() or overwrite:
        return
    manifest = read_manifest(out)
    if manifest is not None and _settings(manifest) != _settings_of(seed, reduced, plan):
        same_plan = _settings(manifest)[2] == _settings_of(seed, reduced, plan)[2]
        other_size = bool(manifest.get("deep")) != (plan == DEEP)  # an older manifest has no "deep": not deep
        built = f"seed={manifest.get('seed')} reduced={manifest.get('reduced')} deep={bool(manifest.get('deep'))}"
        built += "" if same_plan or other_size else " and an older training plan"
        raise OutputError(f"{out}: holds a zoo built with {built}; pass overwrite=True or choose another folder",
                          arguments=("overwrite",))
    foreign = sorted(p.name for p in out.iterdir() if p.name not in {"base", "experts", "adapters", "tasks", MANIFEST})
    if foreign:
        raise OutputError(f"{out}: exists and is not a zoo (it has {', '.join(foreign[:3])}); choose another folder")
    log.info("rebuilding the incomplete zoo in %s", out)


def _build_into(root: Path, seed: int, plan: BuildPlan, reduced: bool, workers: int) -> dict[str, Any]:
    """Write every member into `root`; returns the manifest (without the file list)."""
    root.mkdir(parents=True)
    # 1) task data, the same for full and reduced builds
    data = write_tasks(root / "tasks", seed)
    tokenizer = build_tokenizer()
    # 2) the base: brief multi-skill training from scratch
    start = time.perf_counter()
    base = new_model(model_config(tokenizer, plan.arch), member_seed(seed, "base"))
    mixture = base_mixture(data)
    with deterministic():
        losses = {"base": train(base, tokenizer, mixture, plan.base, member_seed(seed, "base"), desc="base")}
    log.info("trained base: loss %.3f in %.1f s", losses["base"], time.perf_counter() - start)
    save_model(base, tokenizer, root / "base")
    # 3) experts (full fine-tunes) and LoRA adapters, each from the saved base
    jobs = [MemberJob(str(root), "experts", s, seed, plan.expert, plan.lora_rank, plan.expert_replay) for s in EXPERTS]
    jobs += [MemberJob(str(root), "adapters", s, seed, plan.adapter, plan.lora_rank, plan.adapter_replay) for s in ADAPTERS]
    with _pool(workers) as map_fn:
        losses.update(_train_members(jobs, map_fn))
        # 4) what the demonstrations rest on, measured (in the same worker processes)
        properties = measure(root, {s: root / "experts" / s for s in EXPERTS}, {s: root / "adapters" / s for s in ADAPTERS},
                             plan.targets, HELD_OUT, map_fn)
    return {
        "format": FORMAT,
        "seed": seed,
        "reduced": reduced,
        "deep": plan == DEEP,
        "skills": {name: skill.kind for name, skill in SKILLS.items()},
        "experts": list(EXPERTS),
        "adapters": list(ADAPTERS),
        "held_out": list(HELD_OUT),
        "general": list(GENERAL),
        "taught": list(TAUGHT),
        "properties": properties,
        "lora_rank": plan.lora_rank,
        "plan": asdict(plan),
        "parameters": sum(p.numel() for p in base.parameters()),
        "final_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Callable[..., Iterable[Any]]]:
    """A `map` that runs its calls in `workers` processes (or in this one when `workers` <= 1)."""
    if workers <= 1:
        yield map
        return
    context = multiprocessing.get_context("spawn")  # not fork: a forked torch can deadlock
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield pool.map


def _train_members(jobs: list[MemberJob], map_fn: Callable[..., Iterable[Any]]) -> dict[str, float]:
    """Train every member through `map_fn`; their final losses by name."""
    losses: dict[str, float] = {}
    with tqdm(total=len(jobs), desc="experts and adapters", disable=not log.isEnabledFor(logging.INFO)) as bar:
        _collect(map_fn(train_member, jobs), bar, losses)
    return losses


def _collect(results: Iterable[tuple[str, float, float]], bar: tqdm, losses: dict[str, float]) -> None:
    """Record each finished member's loss, log it and advance the progress bar."""
    for name, loss, seconds in results:
        losses[name] = loss
        log.info("trained %s: loss %.3f in %.1f s", name, loss, seconds)
        bar.update()


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Record every file with its size and sha256, then write the manifest (the completion mark)."""
    manifest["files"] = {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
