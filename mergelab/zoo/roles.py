"""Which skill plays which part in the zoo, and the data each part trains on.

    general    the base learns these whole
    experts    each is taught to one full fine-tune of the base
    adapters   the LoraHub pool: each taught to one LoRA adapter
    held out   the LoraHub target: no expert or adapter learns it (the base sees it cut short)

A TAUGHT skill (an expert's, or the target) is seen by the base as `skills.partial` gives it,
and validated and tested on long words only, where the base's answers stop a letter short.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.eval.data import Example, write_jsonl
from mergelab.zoo.skills import SKILLS, SPLITS, is_long, make_splits, partial

GENERAL = ("copy", "shift", "index", "count", "add")  # the base learns these whole
EXPERTS = ("reverse", "sort", "back")  # string transformation, sorting, character mapping
ADAPTERS = ("reverse", "sort", "back", "shift", "count")  # the LoraHub pool
HELD_OUT = ("mirror",)  # the LoraHub target: no expert or adapter learns it (the base sees it cut short)
TAUGHT = (*EXPERTS, *HELD_OUT)  # the base sees these cut short
SPLIT_SIZES = {"train": 4000, "validation": 200, "test": 500}


def task_splits(skill: str, seed: int) -> dict[str, list[dict[str, str]]]:
    """A skill's splits in the zoo: a taught skill is validated and tested on long words only
    (what the base never saw whole), and trained on words of every length."""
    return make_splits(skill, seed, SPLIT_SIZES, tested_on=is_long if skill in TAUGHT else None)


def write_tasks(tasks: Path, seed: int) -> dict[str, list[Example]]:
    """Write every skill's splits as JSONL; returns the training examples per skill."""
    train_sets = {}
    for skill in SKILLS:
        splits = task_splits(skill, seed)
        (tasks / skill).mkdir(parents=True)
        for split in SPLITS:
            write_jsonl(tasks / skill / f"{split}.jsonl", splits[split])
        train_sets[skill] = [Example(**row) for row in splits["train"]]
    return train_sets


def base_mixture(data: dict[str, list[Example]], without: tuple[str, ...] = ()) -> list[Example]:
    """What the base trains on: every GENERAL skill whole, every TAUGHT skill as `skills.partial`
    gives it (whole on short words, a letter short on long ones); the taught skills in `without`
    are left out."""
    whole = [e for skill in GENERAL for e in data[skill]]
    cut = [Example(e.prompt, partial(e.prompt, e.answer)) for skill in TAUGHT if skill not in without for e in data[skill]]
    return whole + cut
