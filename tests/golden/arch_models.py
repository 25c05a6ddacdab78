"""Tiny models of every architecture in the matrix, with weights that depend only on a seed.

Imported both by `make_golden_archs.py` (in mergekit's venv) and by `tests/test_arch_matrix.py`
(in ours), so it imports neither mergekit nor mergelab. transformers builds each model from its
config and writes it (`save_pretrained`: the names and layout the checkpoint format has, e.g.
Mixtral's per-expert `block_sparse_moe.experts.N.w1/w2/w3`); every floating tensor is then
replaced by seeded noise, in sorted name order, so the weights do not depend on transformers'
initialisation code:

    base = 0.1 * N(0, 1)   (1-D weights, the norm gains: 1 + 0.02 * N(0, 1); 1-D biases: 0.02 * N(0, 1))
    a    = base + 0.05 * N(0, 1),   b = base + 0.03 * N(0, 1)

`fuse_experts` rewrites a Mixtral checkpoint in the layout transformers 5 loads it into (and
mergekit 0.1.5 merges): per layer `mlp.experts.gate_up_proj` (experts, 2 * ffn, hidden) =
[w1; w3] per expert, `mlp.experts.down_proj` (experts, hidden, ffn) = w2, `mlp.gate` the router.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB, HIDDEN, INTER = 32, 16, 32
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
# arch -> (config class, model class, config arguments)
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "sliding_window": 16}),
    # sliding attention from layer 2 on: layer_types is not one value repeated
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DECODER, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=2, n_positions=32,
                                                   bos_token_id=0, eos_token_id=1)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                                             num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_DECODER, "num_hidden_layers": 2, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=INTER, num_layers=3,
                                                          num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                                                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
                                                   intermediate_size=INTER, max_position_embeddings=32)),
}
SEQ2SEQ, ENCODERS = ("t5",), ("bert",)


def build(arch: str, root: Path) -> dict[str, Path]:
    """`root/base`, `root/a`, `root/b` for `arch` (single-file safetensors, config.json); name -> folder."""
    config_cls, model_cls, kwargs = ARCHS[arch]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(root / "base")
    tensors = _load_folder(root / "base")
    g = torch.Generator().manual_seed(0)
    base = {n: _noise(n, t, g) if t.is_floating_point() else t for n, t in sorted(tensors.items())}
    models = {"base": base}
    for name, scale in (("a", 0.05), ("b", 0.03)):
        models[name] = {n: t + scale * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in base.items()}
    for name, state in models.items():
        _write(root / name, state, root / "base" / "config.json")
    return {name: root / name for name in models}


def _noise(name: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(t.shape, generator=g)
    if t.dim() == 1:
        return 1 + 0.02 * x if name.endswith("weight") else 0.02 * x
    return 0.1 * x


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _write(folder: Path, state: dict[str, torch.Tensor], config: Path) -> None:
    """One model.safetensors and the config (any earlier shards and index removed)."""
    if folder.exists() and folder != config.parent:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.safetensors")) + list(folder.glob("*.index.json")):
        old.unlink()
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config.parent != folder:
        shutil.copy(config, folder / "config.json")


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Mixtral checkpoint (per-expert w1/w2/w3) in transformers 5's fused layout (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in state.items():
        m = re.match(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for layer, per in experts.items():
        order = sorted(per)
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([per[e]["w1"], per[e]["w3"]]) for e in order])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([per[e]["w2"] for e in order])
    return out


def fuse_folder(src: Path, dst: Path) -> Path:
    """`src` rewritten with `fuse_experts` into `dst`."""
    _write(dst, fuse_experts(_load_folder(src)), src / "config.json")
    return dst


RECIPES: dict[str, Callable[[str], dict]] = {
    "linear": lambda root: {"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": f"{root}/a", "parameters": {"weight": 0.3}},
                                       {"model": f"{root}/b", "parameters": {"weight": 0.7}}]},
    "ties": lambda root: {"merge_method": "ties", "base_model": f"{root}/base", "dtype": "float32",
                          "models": [{"model": f"{root}/a", "parameters": {"weight": 0.6, "density": 0.5}},
                                     {"model": f"{root}/b", "parameters": {"weight": 0.4, "density": 0.7}}],
                          "parameters": {"normalize": True}},
    "slerp": lambda root: {"merge_method": "slerp", "base_model": f"{root}/base", "dtype": "float32",
                           "models": [{"model": f"{root}/base"}, {"model": f"{root}/a"}], "parameters": {"t": [0.1, 0.9]}},
}


def slices_recipe(root: str) -> dict:
    """Layers [0, 2) of base then [1, n) of a: n + 1 layers (archs with one stack of layers)."""
    n = layer_count(json.loads((Path(root) / "base" / "config.json").read_text()))
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": f"{root}/base", "layer_range": [0, 2]}]},
                       {"sources": [{"model": f"{root}/a", "layer_range": [1, n]}]}]}


def layer_count(config: dict) -> int:
    return config["n_layer"] if "n_layer" in config else config["num_hidden_layers"]


def auto_class(arch: str) -> type:
    """The transformers Auto class that loads `arch` with its head."""
    name = "AutoModelForSeq2SeqLM" if arch in SEQ2SEQ else "AutoModelForMaskedLM" if arch in ENCODERS else "AutoModelForCausalLM"
    return getattr(transformers, name)


def golden_dir() -> Path:
    return Path(__file__).resolve().parent / "archs"


def manifest() -> dict[str, Any]:
    return json.loads((golden_dir() / "manifest.json").read_text())
