"""The zoo's sizes: architecture and training budgets of the full zoo, of the reduced one the
test suite builds and of the deep one data-flow search routes, with the margins each build's
properties must meet (`properties.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.errors import MergelabError
from mergelab.zoo.properties import Targets
from mergelab.zoo.train import Arch, TrainSpec


@dataclass(frozen=True)
class BuildPlan:
    """Architecture and training budgets of one zoo size."""

    arch: Arch
    base: TrainSpec
    expert: TrainSpec
    adapter: TrainSpec
    lora_rank: int = 8
    # Share of each batch drawn from the base's mixture while tuning a member: less forgetting
    # of what the base does, so members stay composable (merges, LoraHub).
    expert_replay: float = 0.3
    adapter_replay: float = 0.3
    targets: Targets = Targets()  # the margins the build's properties must meet


# Four layers trained twice as long, not eight: at this width a step costs about twice as much
# with eight layers, and in the same CPU time eight layers (1000 steps) learned the general skills
# on some seeds and not on others (copy 0.64 / 0.11 / 0.16 on long words, seeds 0-2; at lr 6e-3
# 0.89 on seed 1 and diverged on seeds 0 and 2), while four layers (2000 steps) copy and shift
# every word (1.00 / 0.99+ on seeds 0 and 2; loss 0.10-0.13 on all three) and reverse 98% of
# short words. An expert then only learns to finish its long answers (a small change), and a
# data-flow genome still has 3 x 4 source layers to route. The base's loss is on the answers
# only: its prompts are random letters. The experts train 800 steps: at 400, seed 2's reverse
# expert stopped at 0.74 (600: 0.88, 800: 0.93).
FULL = BuildPlan(
    arch=Arch(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4),
    base=TrainSpec(steps=2000, lr=3e-3),
    expert=TrainSpec(steps=800, lr=2e-3),
    adapter=TrainSpec(steps=200, lr=5e-3),
)
# For the test suite: a smaller model and shorter runs, same layout and members, its own targets.
# In this budget the base learns little (copy 0.01-0.16 on short words at 600 steps, seeds 0-1),
# so each expert learns its skill nearly from scratch, and *when* it clicks was the knife edge:
# at lr 3e-3 and 250 steps expert reverse scored 0.03 on seed 0 and expert back 0.27 on seed 1;
# at lr 6e-3 and 250 steps expert reverse scored 0.99 on seed 0 of one machine and 0.58 on
# another, and 0.77-0.97 over four member seeds from one base. At 400 steps the same four give
# 0.988-1.000, and seeds 0-3 build with every expert at 0.95-1.00. The narrower model (48 / 96)
# costs about half as much per step as 64 / 128: 60-67 s a build on this 2-core machine.
REDUCED = BuildPlan(
    arch=Arch(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4),
    base=TrainSpec(steps=400, lr=3e-3, answer_only=False),  # the loss on every token
    expert=TrainSpec(steps=400, lr=6e-3),
    adapter=TrainSpec(steps=100, lr=1e-2),
    targets=Targets(base_max=0.02, expert_min=0.7, kept_max=0.75),
)
# For data-flow search (bench/search_dataflow.py --deep): eight layers, so a route has 3 x 8 source
# layers to choose from and can leave one expert halfway down. FULL's budgets at REDUCED's width
# (48 / 96: a step of eight such layers costs about what four of 64 / 192 do): the base learned
# the general skills on seeds 0-2 (loss 0.130 / 0.157 / 0.237, FULL's 0.126-0.136), every expert
# scores 0.996-1.000 on its skill, the base 0.000-0.004, and the best uniform merge keeps 0.39 /
# 0.27 / 0.14 of the gain: FULL's targets with wide margins. REDUCED's budgets at eight layers
# (base 400 steps on every token, experts 400 at lr 6e-3) built in 137-192 s and met REDUCED's
# targets too (experts 0.96-1.00), but its experts learn their skill nearly from scratch, so no
# merge keeps anything (0.00 on seeds 0-2) and a parameter search found one skill only (0.30
# mean, below the best expert's 0.33): no zoo to compare merging on. This one builds in 226 s
# alone on the 2 cores (seed 0; FULL: 204-233 s), 988-999 s with three seeds at once.
DEEP = BuildPlan(
    arch=Arch(hidden_size=48, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4),
    base=TrainSpec(steps=2000, lr=3e-3),
    expert=TrainSpec(steps=800, lr=2e-3),
    adapter=TrainSpec(steps=200, lr=5e-3),
)


def plan_for(reduced: bool = False, deep: bool = False) -> BuildPlan:
    """The plan of a zoo size: FULL, REDUCED or DEEP (not both reduced and deep)."""
    if reduced and deep:
        raise MergelabError("reduced=True and deep=True: a zoo has one size; pass one of them", arguments=("reduced", "deep"))
    return DEEP if deep else REDUCED if reduced else FULL
