"""Embedding and LM-head rows re-ordered to the output tokenizer (`tokenizer.py`), as mergekit does.

Before a vocabulary tensor (embeddings, LM head: indexed by token id along axis 0) is merged,
each input becomes a (rows, ...) tensor in the output tokenizer's order:

    row of token t = the model's own row of t, if it has t and t is not forced
                   = else t's default row:
        a configured token (`tokenizer.tokens`): zeros; or `model`'s row of t; or `model`'s row
            of another token (`{kind: model_token, model, token | token_id}`)
        any other token: the row of the one input that has it; zeros if none has it (a warning);
            the base's row if the base is an input and has it; else the mean of the rows of the
            inputs that have it (summed in input order, divided by their count, in the inputs' dtype)
    rows past the tokens (`pad_to_multiple_of`) = the mean of the token rows

Then the merge method runs on these as on any tensor. Source: mergekit 0.1.5
`mergekit/tokenizer/embed.py` (`PermutedVocabulary`), computed here with index operations instead
of a loop over tokens, with the same float operations in the same order (so bit for bit).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.errors import PlanError, RecipeError
from mergelab.recipe import ModelRef, ModelToken, Recipe, ZeroToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRule:
    """Where a configured token's default row comes from."""

    key: str  # `tokenizer.tokens.<token>`, for errors
    force: bool
    zero: bool = False
    model: int | None = None  # checkpoint index of the source model
    row: int | None = None  # `model_token`: that row of `model`; None: `model`'s row of the token itself


@dataclass(frozen=True)
class VocabJob:
    """A vocabulary tensor's inputs in the slice's order (mergekit's), and which one is the base."""

    members: tuple[Any, ...]  # plan `Source`s
    base: Any | None


@dataclass
class Vocabulary:
    """The output tokenizer and, per input model, where each of its tokens sits."""

    tokenizer: Any = field(repr=False)
    tokens: tuple[str, ...]  # by output id
    rows: int  # output rows: the tokens, padded to `pad_to_multiple_of`
    permutations: dict[int, torch.Tensor]  # checkpoint index -> (tokens,) the token's row there, -1 where it lacks it
    rules: dict[int, TokenRule]  # output id -> its configured rule

    @property
    def forced(self) -> torch.Tensor:
        """(tokens,) bool: tokens whose default row replaces every model's own."""
        mask = torch.zeros(len(self.tokens), dtype=torch.bool)
        mask[[i for i, r in self.rules.items() if r.force]] = True
        return mask

    def is_identity(self, models: list[int], rows: list[int]) -> bool:
        """True when aligning these models' tensors (of `rows` rows) would copy them unchanged."""
        ids = torch.arange(len(self.tokens))
        return (not any(r.force for r in self.rules.values()) and all(r == self.rows for r in rows)
                and all(torch.equal(self.permutations[m], ids) for m in models))

    def check(self, job: VocabJob, rows: dict[int, int], tensor: str, keys: dict[int, str]) -> None:
        """Every default row this tensor needs can be built from its inputs (before any tensor is read)."""
        models = [m.model for m in job.members]
        present = torch.stack([self.permutations[m] >= 0 for m in models])  # (models, tokens)
        need = self.forced | ~present.all(0)
        for tid, rule in self.rules.items():
            if not need[tid] or rule.zero:
                continue
            if rule.model is None:
                lacking = ", ".join(keys[m] for m in models if self.permutations[m][tid] < 0) or "every model (force)"
                raise RecipeError(f"{rule.key}.source: needed for tensor '{tensor}' (the token is new to {lacking}); give "
                                  "a model, {kind: model_token, model, token}, or {kind: zero}")
            if rule.model not in models:
                raise PlanError(f"{rule.key}.source: {keys[rule.model]} is not an input of tensor '{tensor}'")
            if rule.row is not None and rule.row >= rows[rule.model]:
                raise RecipeError(f"{rule.key}.source.token_id: {rule.row} is past the {rows[rule.model]} rows of "
                                  f"'{tensor}' in {keys[rule.model]}")

    def align(self, job: VocabJob, tensors: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """Each input of `job` re-ordered to the output vocabulary: (rows, ...) tensors, same keys."""
        views = [tensors[m] for m in job.members]  # (model rows, *rest)
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in views))
        perms = [self.permutations[m.model].to(views[0].device) for m in job.members]
        defaults = self._defaults(job, views, perms, dtype)
        return {m: self._reorder(v, p, defaults, dtype) for m, v, p in zip(job.members, views, perms)}

    def _defaults(self, job: VocabJob, views: list[torch.Tensor], perms: list[torch.Tensor], dtype: torch.dtype
                  ) -> torch.Tensor:
        """(tokens, *rest): the default row of every token some input lacks (or that is forced); zeros elsewhere."""
        n, device = len(self.tokens), views[0].device
        out = torch.zeros((n, *views[0].shape[1:]), dtype=dtype, device=device)
        present = torch.stack([p >= 0 for p in perms])  # (models, tokens)
        need = (self.forced.to(device) | ~present.all(0))
        # 1) configured tokens: zeros, a model's row of the token, or a model's row of another token
        configured = torch.zeros(n, dtype=torch.bool, device=device)
        for tid, rule in self.rules.items():
            configured[tid] = True
            if need[tid] and not rule.zero:
                i = [m.model for m in job.members].index(rule.model)  # type: ignore[arg-type]
                out[tid] = views[i][rule.row if rule.row is not None else perms[i][tid]]
        # 2) the others: the one input that has it, else the base's row, else the mean of those that have it
        auto = need & ~configured
        count = present.sum(0)
        donor = present.to(torch.int8).argmax(0)  # the first input that has the token
        for i, (view, p) in enumerate(zip(views, perms)):
            sel = auto & (count == 1) & (donor == i)
            out[sel] = view[p[sel]].to(dtype)
        shared = auto & (count > 1)
        if job.base is not None and job.base in job.members:
            b = job.members.index(job.base)
            from_base = shared & present[b]
            out[from_base] = views[b][perms[b][from_base]].to(dtype)
            shared &= ~from_base
        for i, (view, p) in enumerate(zip(views, perms)):  # summed in input order, as mergekit
            sel = shared & present[i]
            out[sel] = out[sel] + view[p[sel]]
        for c in count[shared].unique().tolist():
            sel = shared & (count == c)
            out[sel] = out[sel] / c
        if bool((auto & (count == 0)).any()):
            missing = [self.tokens[i] for i in torch.nonzero(auto & (count == 0)).flatten().tolist()]
            log.warning("tokens %s are in no input of a vocabulary tensor: their rows are zeros", missing[:5])
        return out

    def _reorder(self, view: torch.Tensor, perm: torch.Tensor, defaults: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(rows, *rest): the model's own row of each token it has (unless forced), else the default row."""
        n = len(self.tokens)
        out = torch.zeros((self.rows, *view.shape[1:]), dtype=dtype, device=view.device)
        head = out[:n]  # a view: writes land in `out`
        keep = (perm >= 0) & ~self.forced.to(view.device)
        head[keep] = view[perm[keep]].to(dtype)
        head[~keep] = defaults[~keep]
        if self.rows > n:  # padding rows: the mean embedding (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
            out[n:] = torch.mean(head, dim=0)
        return out


def plan_vocabulary(recipe: Recipe, refs: list[ModelRef], configs: dict[ModelRef, dict], keys: dict[ModelRef, str],
                    base: ModelRef) -> Vocabulary:
    """The output tokenizer of `recipe` and every model's permutation into it (tokenizers read, no tensor)."""
    from mergelab.tokenizer import build_tokenizer

    spec = recipe.tokenizer_spec
    assert spec is not None
    tokens_cfg = spec.tokens or {}
    tokenizer, vocabs = build_tokenizer(spec.source, _source_key(recipe), recipe.resolve, base, configs, keys, list(tokens_cfg))
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise RecipeError(f"{_source_key(recipe)}: the output tokenizer's ids are not 0..{len(by_id) - 1} without gaps")
    tokens = tuple(t for t, _ in by_id)
    index = {ref: i for i, ref in enumerate(refs)}
    perms = {index[ref]: torch.tensor([vocabs[ref].get(t, -1) for t in tokens], dtype=torch.long) for ref in refs}
    out_id = {t: i for i, t in enumerate(tokens)}
    rules = {out_id[tok]: _rule(recipe, tok, s, index, vocabs, keys) for tok, s in tokens_cfg.items()}
    pad = spec.pad_to_multiple_of
    rows = -(-len(tokens) // pad) * pad if pad else len(tokens)
    return Vocabulary(tokenizer, tokens, rows, perms, rules)


def _source_key(recipe: Recipe) -> str:
    return "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"


def _rule(recipe: Recipe, token: str, spec: Any, index: dict[ModelRef, int], vocabs: dict[ModelRef, dict[str, int]],
          keys: dict[ModelRef, str]) -> TokenRule:
    """A configured token's rule, its source model checked to be one of the recipe's and to have the token."""
    key = f"tokenizer.tokens.{token}"
    source = spec.source
    if source is None or isinstance(source, ZeroToken):
        return TokenRule(key, spec.force, zero=source is not None)
    model = source.model if isinstance(source, ModelToken) else source
    ref = recipe.ref(model)
    if ref not in index:
        where = f"{key}.source{'.model' if isinstance(source, ModelToken) else ''}"
        raise RecipeError(f"{where}: {model} is not a model of this recipe (its models: {', '.join(str(r) for r in index)})")
    if isinstance(source, ModelToken):
        row = source.token_id if source.token is None else vocabs[ref].get(source.token)
        if row is None:
            raise RecipeError(f"{key}.source.token: {source.token!r} is not in the vocabulary of {keys[ref]} ({model})")
        return TokenRule(key, spec.force, model=index[ref], row=row)
    if token not in vocabs[ref]:
        raise RecipeError(f"{key}.source: {keys[ref]} ({model}) has no token {token!r}; use {{kind: model_token, model, token}} "
                          "to take another token's row")
    return TokenRule(key, spec.force, model=index[ref])
