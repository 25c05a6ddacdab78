"""Tiny Llama-shaped models whose tokenizers differ, for the tokenizer parity tests.

Imported both by `make_golden_tokenizer.py` (in mergekit's venv) and by
`tests/test_tokenizer.py` (in ours), so it imports neither mergekit nor mergelab:

    base   BPE over 26 tokens (<unk> <s> </s>, letters a-w) + 6 merges (he ll llo hell hello wo): 32 rows
    chat   base's tokenizer + "qq" (a regular BPE token) + added specials <|im_start|> <|im_end|>: 35 rows
    code   base's tokens with the letters' ids reversed, + "qq": 33 tokens, but 36 rows (3 padding rows,
           as models padded to a multiple of 64 have)

Every model's weights are a function of a seed and its tokens, so a token's embedding row in
`chat` and `code` is base's row of the same token plus noise: a merge that aligns rows by id
instead of by token gives visibly different numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS = 16, 32, 2
SPECIALS = ["<unk>", "<s>", "</s>"]
LETTERS = list("abcdefghijklmnopqrstuvw")
MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "ll"), ("hell", "o"), ("w", "o")]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def vocabulary(name: str) -> tuple[dict[str, int], list[tuple[str, str]], list[str], int]:
    """(BPE vocab, merges, added special tokens, embedding rows) of model `name`."""
    letters = LETTERS[::-1] if name == "code" else LETTERS
    tokens = SPECIALS + letters + ["".join(m) for m in MERGES]
    merges = list(MERGES)
    if name in ("chat", "code"):
        tokens.append("qq")
        merges.append(("q", "q"))
    added = CHAT_TOKENS if name == "chat" else []
    rows = {"base": 32, "chat": 35, "code": 36}[name]
    return {t: i for i, t in enumerate(tokens)}, merges, added, rows


def save_tokenizer(folder: Path, name: str) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges, added, _ = vocabulary(name)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    tok.save_pretrained(str(folder))


def _rows(name: str, tokens: list[str], rows: int, g_seed: int) -> torch.Tensor:
    """(rows, HIDDEN): each token's row is a fixed function of the token (base's row) plus this model's noise."""
    out = torch.empty(rows, HIDDEN)
    noise = torch.Generator().manual_seed(g_seed)
    for i in range(rows):
        key = tokens[i] if i < len(tokens) else f"<pad {i}>"
        g = torch.Generator().manual_seed(sum(ord(c) * 131 ** k for k, c in enumerate(key)) % (2**31))
        out[i] = 0.1 * torch.randn(HIDDEN, generator=g)
    if name != "base":
        out += 0.02 * torch.randn(out.shape, generator=noise)
    return out


def weights(name: str) -> dict[str, torch.Tensor]:
    """The model's tensors: vocabulary rows by token, the rest base plus per-model noise."""
    vocab, _, added, rows = vocabulary(name)
    tokens = list(vocab) + added
    seed = {"base": 0, "chat": 1, "code": 2}[name]
    g = torch.Generator().manual_seed(100)
    noise = torch.Generator().manual_seed(200 + seed)
    shapes = {"model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    out = {"model.embed_tokens.weight": _rows(name, tokens, rows, 10 + seed)}
    for n, shape in shapes.items():
        base = (1 + 0.01 * torch.randn(shape, generator=g)) if len(shape) == 1 else 0.1 * torch.randn(shape, generator=g)
        out[n] = base if name == "base" else base + 0.03 * torch.randn(shape, generator=noise)
    out["lm_head.weight"] = _rows(name, ["head " + t for t in tokens], rows, 20 + seed)
    return out


def config(rows: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": rows, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def make_models(folder: Path) -> dict[str, Path]:
    """`folder/<name>/` for base, chat and code: config, weights and tokenizer; returns the folders."""
    out = {}
    for name in ("base", "chat", "code"):
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        save_file(weights(name), str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(config(vocabulary(name)[3]), indent=2))
        save_tokenizer(path, name)
        out[name] = path
    return out


def tokenizer_summary(folder: Path) -> dict:
    """What the tests compare of an output tokenizer: its vocabulary, added tokens and config.json's vocab_size."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    added = {str(i): {"content": t.content, "special": t.special} for i, t in sorted(tok.added_tokens_decoder.items())}
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    return {"vocab": dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1])), "added_tokens": added, "vocab_size": vocab_size}
