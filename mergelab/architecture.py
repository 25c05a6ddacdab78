"""What a tensor name says about where it sits in a decoder stack.

Merge recipes address layers by index (`layer_range`, per-layer gradients), so every tensor
name is split into (stack prefix, layer index, suffix) when it belongs to a repeated block:

    model.layers.12.self_attn.q_proj.weight   Llama, Mistral, Qwen, Gemma, Phi-3 ...
    transformer.h.3.attn.c_attn.weight       GPT-2, GPT-J, Falcon (h), Bloom
    gpt_neox.layers.0.mlp.dense_h_to_4h.bias GPT-NeoX, Pythia
    model.decoder.layers.5.fc1.weight        OPT
    transformer.blocks.7.ffn.up_proj.weight  MPT

Everything outside the stack is "pre" (embeddings, before layer 0) or "post" (final norm,
LM head); gradients see t = 0 for both, as mergekit does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "embed_in", "position_embeddings")
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


@dataclass(frozen=True)
class Stack:
    """The main repeated block of a checkpoint: its prefix and its layers' tensor suffixes."""

    prefix: str
    num_layers: int
    suffixes: dict[int, tuple[str, ...]]  # layer index -> tensor suffixes in checkpoint order


def find_stack(names: Iterable[str]) -> Stack | None:
    """The prefix with the most layers is the decoder stack (others, e.g. a vision tower, are not)."""
    by_prefix: dict[str, dict[int, list[str]]] = {}
    for name in names:
        parsed = parse_layer(name)
        if parsed is not None:
            by_prefix.setdefault(parsed.prefix, {}).setdefault(parsed.index, []).append(parsed.suffix)
    if not by_prefix:
        return None
    prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
    layers = by_prefix[prefix]
    return Stack(prefix, max(layers) + 1, {i: tuple(s) for i, s in sorted(layers.items())})


def layer_count_key(config: dict) -> str | None:
    """The config.json key that holds the number of layers, if any."""
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
