"""The zoo's synthetic skills: each one a seeded generator of short `(prompt, answer)` pairs.

The skills differ in kind (arithmetic, string transformation, sorting, character mapping,
positional lookup, counting), so that a model tuned on one is worse at the others and merging
has work to do.
`revshift` (reverse, then shift) is the held-out skill: no expert or adapter is trained on it,
but it composes two pooled skills (`reverse`, `shift`), so LoraHub has something to combine.

Every prompt starts with a word naming the skill and ends with `=`; the answer follows it
directly. All text uses the alphabet of `mergelab.zoo.tokenizer` (lowercase letters, digits, ` +=`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: its name, what kind of skill it is, and its example generator."""

    name: str
    kind: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)


def _word(rng: random.Random, low: int, high: int, alphabet: str = LETTERS) -> str:
    """A random string of `low..high` characters from `alphabet`."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _shift(word: str) -> str:
    """Caesar shift by one: a->b, ..., z->a."""
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def make_add(rng: random.Random) -> tuple[str, str]:
    """`add 37+05=` -> `042`: addition of two-digit numbers, zero-padded to a fixed width.

    Fixed widths put every digit at a fixed offset, which a tiny model learns far faster.
    """
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a:02d}+{b:02d}=", f"{a + b:03d}"


def make_reverse(rng: random.Random) -> tuple[str, str]:
    """`rev kqzd=` -> `dzqk`."""
    word = _word(rng, 3, 6)
    return f"rev {word}=", word[::-1]


def make_sort(rng: random.Random) -> tuple[str, str]:
    """`sort kqzd=` -> `dkqz`: the letters (distinct) in alphabetical order."""
    word = "".join(rng.sample(LETTERS, rng.randint(3, 6)))
    return f"sort {word}=", "".join(sorted(word))


def make_shift(rng: random.Random) -> tuple[str, str]:
    """`shift kqzd=` -> `lrae`: every letter moved one step along the alphabet."""
    word = _word(rng, 3, 6)
    return f"shift {word}=", _shift(word)


def make_index(rng: random.Random) -> tuple[str, str]:
    """`index 3 kqzdx=` -> `z`: the letter at a 1-based position."""
    word = _word(rng, 3, 6)
    i = rng.randint(1, len(word))
    return f"index {i} {word}=", word[i - 1]


def make_count(rng: random.Random) -> tuple[str, str]:
    """`count a abcaa=` -> `3`: how often a letter occurs in a word over `abcd`."""
    word = _word(rng, 3, 8, alphabet="abcd")
    letter = rng.choice("abcd")
    return f"count {letter} {word}=", str(word.count(letter))


def make_revshift(rng: random.Random) -> tuple[str, str]:
    """`revshift kqzd=` -> `earl`: reverse, then shift (composes `rev` and `shift`)."""
    word = _word(rng, 3, 6)
    return f"revshift {word}=", _shift(word[::-1])


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "arithmetic", make_add),
        Skill("reverse", "string transformation", make_reverse),
        Skill("sort", "sorting", make_sort),
        Skill("shift", "character mapping", make_shift),
        Skill("count", "counting", make_count),
        Skill("index", "positional lookup", make_index),
        Skill("revshift", "composition of reverse and shift", make_revshift),
    )
}

SPLITS = ("train", "validation", "test")


def make_splits(skill: str, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of distinct examples of `skill`, reproducible from `seed`.

    Examples are drawn until enough distinct prompts exist, then cut in order into the splits,
    so no prompt appears in two splits. Seeding with a string is stable across processes.
    """
    rng = random.Random(f"mergelab-zoo:{seed}:{skill}")
    want = sum(sizes.values())
    seen: dict[str, str] = {}
    for _ in range(want * 50):
        prompt, answer = SKILLS[skill].make(rng)
        seen.setdefault(prompt, answer)
        if len(seen) == want:
            break
    else:  # pragma: no cover - only if a generator's space is smaller than asked
        raise ValueError(f"skill {skill!r} has fewer than {want} distinct prompts")
    pairs = [{"prompt": p, "answer": a} for p, a in seen.items()]
    out, start = {}, 0
    for split in SPLITS:
        out[split] = pairs[start : start + sizes[split]]
        start += sizes[split]
    return out
