"""Tiny random-weight checkpoints for tests: built with transformers, saved in >= 2 shards.

    base = make_llama(tmp / "base")
    expert = make_llama(tmp / "add", seed=1, perturb_from=base)   # base + 0.02 * noise
    family = make_family(tmp, ["add", "reverse"])                 # {"base": ..., "add": ...}

Every function returns the folder it wrote. Weights depend only on the arguments (seeded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
HIDDEN = 32


def llama_config(layers: int = 4) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def mistral_config(layers: int = 4) -> MistralConfig:
    return MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         sliding_window=32, tie_word_embeddings=False)


def gpt2_config(layers: int = 4) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=64,
                      bos_token_id=0, eos_token_id=1)  # tied head


def t5_config(layers: int = 3) -> T5Config:
    """Two stacks of different depths (encoder `layers`, decoder `layers - 1`), blocks nesting sub-layers."""
    return T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers - 1,
                    num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


ARCHS: dict[str, tuple[Callable[[int], PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (llama_config, LlamaForCausalLM),
    "mistral": (mistral_config, MistralForCausalLM),
    "gpt2": (gpt2_config, GPT2LMHeadModel),
    "t5": (t5_config, T5ForConditionalGeneration),
}


def make_model(path: str | Path, arch: str = "llama", *, seed: int = 0, layers: int = 4, shard_size: str = "30KB",
               perturb_from: str | Path | None = None, scale: float = 0.02) -> Path:
    """A random `arch` model in `path` (float32, sharded by `shard_size`).

    With `perturb_from` (a model folder of the same arch), the weights are that model's plus
    `scale` * standard normal noise drawn from `seed`: a stand-in for a fine-tune.
    """
    path = Path(path)
    make_config, cls = ARCHS[arch]
    torch.manual_seed(seed)
    if perturb_from is None:
        model = cls(make_config(layers))
    else:
        model = cls.from_pretrained(perturb_from, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # tied parameters are listed once
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path, max_shard_size=shard_size, safe_serialization=True)
    return path


def make_llama(path: str | Path, *, seed: int = 0, layers: int = 4, shard_size: str = "30KB",
               perturb_from: str | Path | None = None, scale: float = 0.02) -> Path:
    """A tiny random Llama (hidden 32, 4 heads / 2 KV heads, vocab 64, untied head)."""
    return make_model(path, "llama", seed=seed, layers=layers, shard_size=shard_size, perturb_from=perturb_from, scale=scale)


def make_mistral(path: str | Path, *, seed: int = 0, layers: int = 4, shard_size: str = "30KB",
                 perturb_from: str | Path | None = None, scale: float = 0.02) -> Path:
    """A tiny random Mistral (as `make_llama`, with a sliding window)."""
    return make_model(path, "mistral", seed=seed, layers=layers, shard_size=shard_size, perturb_from=perturb_from, scale=scale)


def make_gpt2(path: str | Path, *, seed: int = 0, layers: int = 4, shard_size: str = "30KB",
              perturb_from: str | Path | None = None, scale: float = 0.02) -> Path:
    """A tiny random GPT-2 (hidden 32, 4 heads, vocab 64; the head is tied to the embeddings)."""
    return make_model(path, "gpt2", seed=seed, layers=layers, shard_size=shard_size, perturb_from=perturb_from, scale=scale)


def make_family(root: str | Path, experts: list[str], arch: str = "llama", *, seed: int = 0, layers: int = 4,
                shard_size: str = "30KB", scale: float = 0.02) -> dict[str, Path]:
    """`root/base` and one perturbed copy per expert name at `root/<name>`; name -> folder."""
    root = Path(root)
    base = make_model(root / "base", arch, seed=seed, layers=layers, shard_size=shard_size)
    out = {"base": base}
    for i, name in enumerate(experts, start=1):
        out[name] = make_model(root / name, arch, seed=seed + i, shard_size=shard_size, perturb_from=base, scale=scale)
    return out


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint folder, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out
