"""The output tokenizer of a recipe with `tokenizer_source:` or a `tokenizer:` block, as mergekit builds it.

    source: base       the base model's tokenizer (the first model's without a base), less any
                       token whose id is past the model's `vocab_size` (BPE only)
    source: union      the base's, then every token of the other models it lacks, in recipe order:
                       their plain tokens first, then their added tokens (with their settings)
    source: <model>    that folder's tokenizer as it is
    tokens: {...}      tokens not yet in the vocabulary are added (plain, not special)

Each model's permutation maps an output token id to the row of that token in the model (-1 where
the model lacks it, or its id is past the model's `vocab_size`); `vocabulary.py` builds the rows.
Source: mergekit 0.1.5 `mergekit/tokenizer/build.py`. One difference: mergekit takes the models
of a union (and, without a base, "the first model") from a Python set, whose order changes from
run to run; mergelab takes them in recipe order, so several models adding tokens give the same ids
every time.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mergelab.errors import RecipeError
from mergelab.recipe import ModelRef

log = logging.getLogger(__name__)


def load_tokenizer(path: Path, key: str) -> Any:
    """A fast `transformers` tokenizer from a model folder; a one-line error naming `key` if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise RecipeError(f"{key}: cannot load a tokenizer from {path} ({reason})") from None


def vocab_size(config: dict, tokenizer: Any) -> int:
    """The rows of a model's vocabulary: config.json's `vocab_size`, else the tokenizer's length."""
    size = config.get("vocab_size")
    return size if isinstance(size, int) else len(tokenizer.get_vocab())


def stripped(tokenizer: Any, size: int, key: str) -> Any:
    """`tokenizer` less the tokens whose id is `size` or more (mergekit's `get_stripped_tokenizer`)."""
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= size}
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise RecipeError(f"{key}: its tokenizer has {len(unused)} token(s) past the model's vocab_size {size} and is "
                          f"{data['model']['type']}, not BPE, so they cannot be dropped for a tokenizer merge")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def union(base: Any, others: list[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token of `others` ((tokenizer, vocab_size), base first) it lacks."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        plain.update((t, None) for t, idx in tok.get_vocab().items() if idx < size)
        for idx, info in tok.added_tokens_decoder.items():
            if idx < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy of the base (mergekit reloads it from disk too)
        base.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base.get_vocab()
    for t in plain:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_tokenizer(source: str, source_key: str, resolve: Any, base: ModelRef, models: dict[ModelRef, dict], keys: dict[ModelRef, str],
                    extra_tokens: list[str]) -> tuple[Any, dict[ModelRef, dict[str, int]]]:
    """(output tokenizer, each model's vocabulary (token -> row, past-`vocab_size` ids dropped)).

    `models`: every model of the recipe (recipe order) -> its config.json; `base`: the base (else the
    first model); `resolve`: a model path of the recipe -> its folder."""
    base_tok = load_tokenizer(base.path, keys[base])
    tokenizers = {base: stripped(base_tok, vocab_size(models[base], base_tok), keys[base])}
    for ref in models:
        if ref not in tokenizers:
            try:
                tokenizers[ref] = load_tokenizer(ref.path, keys[ref])
            except RecipeError as exc:  # as mergekit: a model without a tokenizer is taken to have the base's
                log.warning("%s; taking it to have the base's vocabulary", exc)
    sizes = {ref: vocab_size(models[ref], tokenizers.get(ref, tokenizers[base])) for ref in models}
    if source == "base":
        out = tokenizers[base]
    elif source == "union":
        out = union(tokenizers[base], [(tok, sizes[ref]) for ref, tok in tokenizers.items()])
    else:
        folder = resolve(source)
        if not folder.is_dir():
            raise RecipeError(f"{source_key}: {folder}: folder not found")
        out = load_tokenizer(folder, source_key)
    have = set(out.get_vocab())
    for tok in extra_tokens:
        if tok not in have:
            out.add_tokens(tok)
            have.add(tok)
    vocabs = {ref: {t: i for t, i in tokenizers.get(ref, tokenizers[base]).get_vocab().items() if i < sizes[ref]}
              for ref in models}
    return out, vocabs
