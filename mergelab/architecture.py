"""What a tensor name says about where it sits in a decoder stack.

Merge recipes address layers by index (`layer_range`, per-layer gradients), so every tensor
name is split into (stack prefix, layer index, suffix) when it belongs to a repeated block:

    model.layers.12.self_attn.q_proj.weight   Llama, Mistral, Qwen, Gemma, Phi-3 ...
    transformer.h.3.attn.c_attn.weight       GPT-2, GPT-J, Falcon (h), Bloom
    gpt_neox.layers.0.mlp.dense_h_to_4h.bias GPT-NeoX, Pythia
    model.decoder.layers.5.fc1.weight        OPT
    transformer.blocks.7.ffn.up_proj.weight  MPT
    encoder.block.2.layer.1.DenseReluDense.wo.weight   T5 (two stacks: encoder.block, decoder.block)

The index is the FIRST `<stack word>.N` of the name (the block), not a later one: in T5's
`block.2.layer.1` the 1 is a sub-layer of block 2. A checkpoint may hold several stacks (T5's
encoder and decoder, a vision tower next to a language model); each is one of mergekit's
"modules", with its own layer count and its own gradient.

Everything outside the stacks is "pre" (embeddings, before layer 0) or "post" (final norm,
LM head); gradients see t = 0 for both, as mergekit does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# lazy `.*?`: the outermost (first) stack word wins, so nested `block.N.layer.M` gives block N
_LAYER_RE = re.compile(r"^(?P<prefix>.*?(?:^|\.)(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "embed_in", "position_embeddings")
# names of tensors indexed by token id (embeddings, LM heads, their biases); not position or token-type tables
_VOCAB_MARKERS = ("embed", "wte", "lm_head", "shared", "output", "vocab", "predictions")
_NOT_VOCAB_MARKERS = ("position", "wpe", "token_type")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerName:
    """A tensor name inside a repeated block: `{prefix}.{index}.{suffix}`."""

    prefix: str
    index: int
    suffix: str

    def at(self, index: int) -> str:
        """The same tensor in another layer."""
        return f"{self.prefix}.{index}.{self.suffix}"


def parse_layer(name: str) -> LayerName | None:
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return LayerName(m["prefix"], int(m["index"]), m["suffix"])


def is_pre_weight(name: str) -> bool:
    """Embeddings come before the stack; everything else outside it (norms, heads) after."""
    return any(marker in name for marker in _PRE_MARKERS)


def is_vocab_weight(name: str, shape: tuple[int, ...], config: dict) -> bool:
    """A tensor outside the layer stacks whose first axis is the model's vocabulary (config.json's
    `vocab_size`): `model.embed_tokens.weight`, `lm_head.weight`, `transformer.wte.weight`, T5's `shared.weight`..."""
    size = config.get("vocab_size")
    return (parse_layer(name) is None and bool(shape) and shape[0] == size and any(m in name for m in _VOCAB_MARKERS)
            and not any(m in name for m in _NOT_VOCAB_MARKERS))


@dataclass(frozen=True)
class Stack:
    """The main repeated block of a checkpoint: its prefix and its layers' tensor suffixes."""

    prefix: str
    num_layers: int
    suffixes: dict[int, tuple[str, ...]]  # layer index -> tensor suffixes in checkpoint order


def find_stacks(names: Iterable[str]) -> dict[str, Stack]:
    """Every stack of a checkpoint by prefix, in the order their first tensors appear."""
    by_prefix: dict[str, dict[int, list[str]]] = {}
    for name in names:
        parsed = parse_layer(name)
        if parsed is not None:
            by_prefix.setdefault(parsed.prefix, {}).setdefault(parsed.index, []).append(parsed.suffix)
    return {prefix: Stack(prefix, max(layers) + 1, {i: tuple(s) for i, s in sorted(layers.items())})
            for prefix, layers in by_prefix.items()}


def find_stack(names: Iterable[str]) -> Stack | None:
    """The stack with the most layers: the decoder of a language model (not, e.g., its vision tower)."""
    stacks = find_stacks(names)
    return max(stacks.values(), key=lambda s: len(s.suffixes)) if stacks else None


def describe_stacks(stacks: dict[str, Stack]) -> str:
    """`encoder.block (3 layers), decoder.block (2 layers)`, for messages."""
    return ", ".join(f"{s.prefix} ({s.num_layers} layers)" for s in stacks.values())


def layer_count_key(config: dict) -> str | None:
    """The config.json key that holds the number of layers, if any."""
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
