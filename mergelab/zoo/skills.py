"""The zoo's synthetic skills: each one a seeded generator of short `(prompt, answer)` pairs.

The skills differ in kind (arithmetic, string transformation, sorting, character mapping,
positional lookup, counting), so that a model tuned on one is worse at the others and merging
has work to do. Which skill plays which part in the zoo (general knowledge of the base, expert,
adapter, LoraHub target) is set in `mergelab.zoo.roles`.

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


def _shift(word: str, by: int = 1) -> str:
    """Caesar shift by `by` letters: by 1, a->b, ..., z->a."""
    return "".join(LETTERS[(LETTERS.index(c) + by) % 26] for c in word)


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


def make_copy(rng: random.Random) -> tuple[str, str]:
    """`copy kqzd=` -> `kqzd`."""
    word = _word(rng, 3, 6)
    return f"copy {word}=", word


def make_back(rng: random.Random) -> tuple[str, str]:
    """`back kqzd=` -> `jpyc`: every letter moved one step back along the alphabet."""
    word = _word(rng, 3, 6)
    return f"back {word}=", _shift(word, -1)


def make_mirror(rng: random.Random) -> tuple[str, str]:
    """`mirror kqzd=` -> `pjaw`: every letter mapped to its mirror in the alphabet (a<->z, b<->y)."""
    word = _word(rng, 3, 6)
    return f"mirror {word}=", "".join(LETTERS[25 - LETTERS.index(c)] for c in word)


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


LONG = 5  # words of at least this many letters are long: a taught skill's test is on them


def is_long(prompt: str) -> bool:
    """Whether the prompt's word (its last, before `=`) has at least LONG letters."""
    return len(prompt.rstrip("=").split(" ")[-1]) >= LONG


def partial(prompt: str, answer: str) -> str:
    """What the base sees of a taught skill: the answer whole on short words, and without its
    last character on long ones. The base learns the skill's whole computation (every letter of
    a short word's answer) and learns that long answers stop one letter early: its exact-match
    accuracy on long words (the test) is zero by construction, and what an expert adds is small
    and of one kind (finish long answers too), so merging experts keeps part of each.
    (Cutting every answer short instead left the experts so far apart that every uniform merge
    kept under 7% of their gains, and the best searched merge under a third.)"""
    return answer[:-1] if is_long(prompt) else answer


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("copy", "copying", make_copy),
        Skill("shift", "character mapping", make_shift),
        Skill("index", "positional lookup", make_index),
        Skill("count", "counting", make_count),
        Skill("add", "arithmetic", make_add),
        Skill("reverse", "string transformation", make_reverse),
        Skill("sort", "sorting", make_sort),
        Skill("back", "character mapping", make_back),
        Skill("mirror", "character mapping", make_mirror),
    )
}

SPLITS = ("train", "validation", "test")


def make_splits(skill: str, seed: int, sizes: dict[str, int],
                tested_on: Callable[[str], bool] | None = None) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of distinct examples of `skill`, reproducible from `seed`.

    Examples are drawn until enough distinct prompts exist; validation and test take, in order,
    the first prompts that `tested_on` accepts (any, without it) and train takes the rest, so no
    prompt appears in two splits. Seeding with a string is stable across processes.
    """
    rng = random.Random(f"mergelab-zoo:{seed}:{skill}")
    accept = tested_on or (lambda prompt: True)
    n_eval = sizes["validation"] + sizes["test"]
    held: dict[str, str] = {}  # validation + test, in drawing order
    rest: dict[str, str] = {}  # train
    for _ in range((n_eval + sizes["train"]) * 50):
        prompt, answer = SKILLS[skill].make(rng)
        if prompt in held or prompt in rest:
            continue
        if len(held) < n_eval and accept(prompt):
            held[prompt] = answer
        elif len(rest) < sizes["train"]:
            rest[prompt] = answer
        if len(held) == n_eval and len(rest) == sizes["train"]:
            break
    else:  # pragma: no cover - only if a generator's space is smaller than asked
        raise ValueError(f"skill {skill!r} has fewer distinct prompts than asked")
    pairs = [{"prompt": p, "answer": a} for p, a in held.items()]
    return {"train": [{"prompt": p, "answer": a} for p, a in rest.items()],
            "validation": pairs[: sizes["validation"]], "test": pairs[sizes["validation"]:]}
