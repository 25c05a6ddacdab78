"""Regenerate the mergekit golden outputs for `tests/test_parity_mergekit.py`.

Run with the mergekit venv (this script must not import mergelab):

    /work/mkvenv/bin/python tests/golden/make_golden.py [CASE ...]   (CASEs only: the other goldens stay)

It writes tiny random checkpoints (`inputs/<model>.safetensors`: Llama-shaped base, a, b, c
and their bfloat16 roundings <model>_bf16, sharing `config.json`; T5-shaped t5_base, t5_a, t5_b sharing `config_t5.json`), one recipe per case
(`cases/<case>.yaml`, `dtype: float32` unless the case sets one (None: no dtype), model paths `models/<name>`
relative to the recipe) and mergekit's merged tensors (`cases/<case>.safetensors`), plus
`manifest.json` with the mergekit version, each input's config file and each output's layer count.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LAYER = {
    "input_layernorm.weight": (16,),
    "self_attn.q_proj.weight": (16, 16),
    "self_attn.k_proj.weight": (16, 16),
    "self_attn.v_proj.weight": (16, 16),
    "self_attn.o_proj.weight": (16, 16),
    "post_attention_layernorm.weight": (16,),
    "mlp.gate_proj.weight": (32, 16),
    "mlp.up_proj.weight": (32, 16),
    "mlp.down_proj.weight": (16, 32),
}


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (32, 16)}
    for i in range(CONFIG["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k}": v for k, v in LAYER.items()})
    out.update({"model.norm.weight": (16,), "lm_head.weight": (32, 16)})
    return out


def make_models() -> dict[str, dict[str, torch.Tensor]]:
    """base: random; a, b, c: base plus task vectors of different sizes (signs conflict)."""
    g = torch.Generator().manual_seed(1234)
    base = {}
    for name, shape in shapes().items():
        if len(shape) == 1:  # norms: near 1, so SLERP takes its linear branch there
            base[name] = 1 + 0.01 * torch.randn(shape, generator=g)
        else:
            base[name] = 0.1 * torch.randn(shape, generator=g)
    models = {"base": base}
    for key, scale in (("a", 0.05), ("b", 0.03), ("c", 0.08)):
        models[key] = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
    return models


# T5: two stacks (encoder 3 blocks, decoder 2) of blocks nesting sub-layers, `block.N.layer.M`
T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "d_model": 16,
    "d_kv": 4,
    "d_ff": 32,
    "num_layers": 3,
    "num_decoder_layers": 2,
    "num_heads": 2,
    "vocab_size": 32,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "is_encoder_decoder": True,
    "tie_word_embeddings": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}
T5_ATTENTION = {"q.weight": (8, 16), "k.weight": (8, 16), "v.weight": (8, 16), "o.weight": (16, 8)}
T5_FFN = {"wi_0.weight": (32, 16), "wi_1.weight": (32, 16), "wo.weight": (16, 32)}


def t5_shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    stacks = (("encoder", 3, ("SelfAttention", "DenseReluDense")),
              ("decoder", 2, ("SelfAttention", "EncDecAttention", "DenseReluDense")))
    for stack, depth, parts in stacks:
        for i in range(depth):
            for j, part in enumerate(parts):
                prefix = f"{stack}.block.{i}.layer.{j}.{part}"
                out.update({f"{prefix}.{k}": v for k, v in (T5_FFN if part == "DenseReluDense" else T5_ATTENTION).items()})
                if i == 0 and part == "SelfAttention":  # relative position buckets live in block 0 only
                    out[f"{prefix}.relative_attention_bias.weight"] = (32, 2)
                out[f"{stack}.block.{i}.layer.{j}.layer_norm.weight"] = (16,)
        out[f"{stack}.final_layer_norm.weight"] = (16,)
    out["shared.weight"] = (32, 16)  # tied: the embeddings of both stacks and the LM head
    return out


def make_t5_models() -> dict[str, dict[str, torch.Tensor]]:
    """t5_base: random; t5_a, t5_b: t5_base plus task vectors (its own generator: the Llama inputs stay as they were)."""
    g = torch.Generator().manual_seed(4321)
    base = {n: (1 + 0.01 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
            for n, s in t5_shapes().items()}
    models = {"t5_base": base}
    for key, scale in (("t5_a", 0.05), ("t5_b", 0.03)):
        models[key] = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
    return models


CONFIG_FILES = {"config.json": CONFIG, "config_t5.json": T5_CONFIG}


def all_models() -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Every input model: its tensors and the name of its config file."""
    llama = make_models()
    out = {name: (tensors, "config.json") for name, tensors in llama.items()}
    # bf16-valued checkpoints (stored as bfloat16, as on the hub): their task vectors tie in magnitude
    out.update({f"{name}_bf16": ({n: t.bfloat16() for n, t in tensors.items()}, "config.json") for name, tensors in llama.items()})
    out.update({name: (tensors, "config_t5.json") for name, tensors in make_t5_models().items()})
    return out


def m(name: str) -> str:
    return f"models/{name}"


CASES: dict[str, dict] = {
    "linear_normalize": {
        "merge_method": "linear",
        "models": [{"model": m("a"), "parameters": {"weight": 1.0}},
                   {"model": m("b"), "parameters": {"weight": 2.0}},
                   {"model": m("c"), "parameters": {"weight": 0.5}}],
        "parameters": {"normalize": True},
    },
    "linear_sum": {
        "merge_method": "linear",
        "models": [{"model": m("a"), "parameters": {"weight": [0.3, 0.9]}},
                   {"model": m("b"), "parameters": {"weight": 0.5}}],
        "parameters": {"normalize": False},
    },
    "slerp_gradient": {
        "merge_method": "slerp",
        "base_model": m("base"),
        "models": [{"model": m("base")}, {"model": m("a")}],
        "parameters": {"t": [0, 0.5, 1]},
    },
    "slerp_filter": {
        "merge_method": "slerp",
        "base_model": m("base"),
        "models": [{"model": m("base")}, {"model": m("c")}],
        "parameters": {"t": [{"filter": "self_attn", "value": 0.3},
                             {"filter": "mlp", "value": [0, 1]},
                             {"value": 0.7}]},
    },
    # slices: the gradient restarts in every slice; slice parameters override the top level
    "slerp_slices": {
        "merge_method": "slerp",
        "base_model": m("base"),
        "slices": [
            {"sources": [{"model": m("base"), "layer_range": [0, 2]}, {"model": m("a"), "layer_range": [0, 2]}],
             "parameters": {"t": [0.1, 0.9]}},
            {"sources": [{"model": m("base"), "layer_range": [2, 4]}, {"model": m("a"), "layer_range": [2, 4]}]},
        ],
        "parameters": {"t": [{"filter": "lm_head", "value": 0.8}, {"value": [0.6, 0.2]}]},
    },
    "nuslerp_nobase": {
        "merge_method": "nuslerp",
        "models": [{"model": m("a"), "parameters": {"weight": 1.0}},
                   {"model": m("b"), "parameters": {"weight": 3.0}}],
    },
    "nuslerp_base_rowwise": {
        "merge_method": "nuslerp",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.4}},
                   {"model": m("c"), "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "nuslerp_base_colwise": {
        "merge_method": "nuslerp",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.4}},
                   {"model": m("c"), "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": False},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.7}},
                   {"model": m("b"), "parameters": {"weight": [0.2, 0.5]}}],
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": [1.0, 0.5], "density": [0.2, 0.8]}},
                   {"model": m("b"), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m("c"), "parameters": {"weight": 0.4, "density": 0.7}}],
        "parameters": {"normalize": True},
    },
    # the base listed among the models (common in the wild) takes no weight and is not an input
    "ties_base_listed": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("base")},
                   {"model": m("a"), "parameters": {"weight": 0.5}},
                   {"model": m("c"), "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.4},
    },
    "ties_sum_lambda": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.5, "density": 0.3}},
                   {"model": m("c"), "parameters": {"weight": 0.5, "density": 0.6}}],
        "parameters": {"normalize": False, "lambda": 1.5, "int8_mask": True},
    },
    # a list of booleans is a step function over the layers, not an interpolation
    "ties_bool_gradient": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": m("b"), "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": [False, True]},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
                   {"model": m("b"), "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.1}}],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 0.7}},
                   {"model": m("b"), "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.1}},
                   # density + gamma > 1: the outlier cut shrinks (n_bot clamps to 0)
                   {"model": m("c"), "parameters": {"weight": 0.3, "density": 0.95, "gamma": 0.1}}],
        "parameters": {"normalize": True, "rescale": True, "gamma": 0.02},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"filter_wise": True},
    },
    "passthrough_slices": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m("base"), "layer_range": [0, 3]}]},
            {"sources": [{"model": m("a"), "layer_range": [1, 4],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                   {"filter": "down_proj", "value": 0.5},
                                                   {"value": 1.0}]}}]},
        ],
    },
    # what a data-flow search writes (mergelab/evolve/dataflow.py): single-layer slices from two
    # models, a layer used twice, each layer's output projections scaled
    "dataflow_route": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": m(model), "layer_range": [layer, layer + 1],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": scale},
                                                          {"filter": "down_proj", "value": scale}]}}]}
                   for model, layer, scale in (("b", 0, 1.0), ("a", 1, 1.25), ("b", 2, 0.75), ("a", 1, 0.5), ("a", 3, 1.0))],
    },
    # inputs rounded to bfloat16 before merging, output bfloat16 (the math itself is float32)
    "linear_bf16": {
        "merge_method": "linear",
        "models": [{"model": m("a"), "parameters": {"weight": 0.3}},
                   {"model": m("c"), "parameters": {"weight": 0.7}}],
        "dtype": "bfloat16",
    },
    # randomised methods at density 1 are deterministic: plain task arithmetic / TIES sums
    "dare_linear_density1": {
        "merge_method": "dare_linear",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": m("b"), "parameters": {"weight": 0.4, "density": 1.0}}],
    },
    "dare_ties_density1": {
        "merge_method": "dare_ties",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": m("c"), "parameters": {"weight": 0.4, "density": 1.0}}],
        "parameters": {"normalize": True},
    },
    "della_density1": {
        "merge_method": "della",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": m("c"), "parameters": {"weight": 0.4, "density": 1.0}}],
    },
    "della_linear_density1": {
        "merge_method": "della_linear",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.6, "density": 1.0}},
                   {"model": m("b"), "parameters": {"weight": 0.4, "density": 1.0}}],
        "parameters": {"lambda": 0.9},
    },
    # the methods mergekit added after the first golden set
    "multislerp_base": {
        "merge_method": "multislerp",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": [0.2, 0.6]}},
                   {"model": m("b"), "parameters": {"weight": 0.5}},
                   {"model": m("c"), "parameters": {"weight": 0.3}}],
    },
    "multislerp_nobase": {
        "merge_method": "multislerp",
        "models": [{"model": m("a"), "parameters": {"weight": 1.0}},
                   {"model": m("c"), "parameters": {"weight": 3.0}}],
        "parameters": {"normalize_weights": False, "eps": 1e-6},
    },
    # mergekit computes multislerp in the inputs' dtype (no upcast): bfloat16 arithmetic here
    "multislerp_bf16": {
        "merge_method": "multislerp",
        "base_model": m("base"),
        "models": [{"model": m("a"), "parameters": {"weight": 0.4}},
                   {"model": m("c"), "parameters": {"weight": 0.6}}],
        "dtype": "bfloat16",
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
    },
    # karcher ignores the base's role: a base_model is one more input at weight 1/N
    "karcher_base_joins": {
        "merge_method": "karcher",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("c")}],
        "parameters": {"max_iter": 3, "tol": 1e-4},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"select_topk": [0.3, 0.8]},
    },
    "sce_all": {
        "merge_method": "sce",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("c")}],
        "parameters": {"int8_mask": True},
    },
    "ram": {
        "merge_method": "ram",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"epsilon": 0.03},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"epsilon": 0.04, "r": 0.5, "alpha": 0.5},
    },
    # the boost is float32 in mergekit, so over bfloat16 inputs the sum is float32 before the cast
    "ramplus_tl_bf16": {
        "merge_method": "ramplus_tl",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("c")}],
        "parameters": {"epsilon": 0.02, "r": 1.0, "alpha": 1.0},
        "dtype": "bfloat16",
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": m("base"),
        "models": [{"model": m("a")}],
        "parameters": {"t": [0.01, 0.08]},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": m("base"),
        "models": [{"model": m("base")}, {"model": m("c")}],
    },
    "arcee_fusion_bf16": {
        "merge_method": "arcee_fusion",
        "base_model": m("base"),
        "models": [{"model": m("a")}],
        "dtype": "bfloat16",
    },
    # T5: the layer of `encoder.block.N.layer.M...` is N, each stack with its own gradient
    "t5_slerp_gradient": {
        "merge_method": "slerp",
        "base_model": m("t5_base"),
        "models": [{"model": m("t5_base")}, {"model": m("t5_a")}],
        "parameters": {"t": [0.1, 0.9]},
    },
    "t5_ties_gradient": {
        "merge_method": "ties",
        "base_model": m("t5_base"),
        "models": [{"model": m("t5_a"), "parameters": {"weight": 1.0, "density": [0.3, 0.9]}},
                   {"model": m("t5_b"), "parameters": {"weight": [0.2, 0.8], "density": 0.5}}],
    },
}


def variant(case: str, suffix: str = "", **keys: object) -> dict:
    """Case `case` over the models `<name><suffix>`, with top-level `keys` set (e.g. dtype)."""
    def rename(value: object) -> object:
        if isinstance(value, str) and value.startswith("models/"):
            return value + suffix
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return value

    return {**rename(CASES[case]), **keys}  # type: ignore[dict-item]


# bf16-valued inputs in a float32 recipe: many equal magnitudes at the density cut, where mergekit
# keeps those its (unstable) argsort puts first
CASES.update({f"{case}_bf16_inputs": variant(case, "_bf16")
              for case in ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties_density1")})
CASES["ties_rescale_bf16_inputs"] = {
    "merge_method": "ties",
    "base_model": m("base_bf16"),
    "models": [{"model": m("a_bf16"), "parameters": {"weight": 0.5, "density": 0.3}},
               {"model": m("c_bf16"), "parameters": {"weight": 0.5, "density": 0.45}}],
    "parameters": {"rescale": True, "lambda": 1.2},
}

# `dtype: bfloat16` / `float16`: mergekit computes most methods in that dtype (linear and slerp in
# float32, rounded to it); the default arithmetic must match it bit for bit
CASES.update({f"{case}_bf16": variant(case, dtype="bfloat16") for case in (
    "linear_sum", "task_arithmetic", "ties", "ties_sum_lambda", "ties_bool_gradient", "slerp_gradient", "slerp_filter",
    "nuslerp_nobase", "nuslerp_base_rowwise", "nuslerp_base_colwise", "model_stock", "model_stock_filter_wise",
    "breadcrumbs", "breadcrumbs_ties", "dare_ties_density1", "dare_linear_density1", "della_density1", "della_linear_density1")})
CASES.update({f"{case}_fp16": variant(case, dtype="float16") for case in (
    "linear_normalize", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp_gradient", "nuslerp_base_rowwise", "model_stock")})
# no `dtype` over checkpoints stored in bfloat16: mergekit computes in the stored dtype
CASES["ties_bf16_stored_no_dtype"] = variant("ties", "_bf16", dtype=None)
CASES["slerp_bf16_stored_no_dtype"] = variant("slerp_gradient", "_bf16", dtype=None)


def run_mergekit(recipe_path: Path, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    data = yaml.safe_load(recipe_path.read_text())
    # mergekit resolves paths against the working directory: make them absolute
    data = _absolute(data, recipe_path.parent)
    config = MergeConfiguration.model_validate(data)
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))


def _absolute(data: dict, root: Path) -> dict:
    def fix(p: str) -> str:
        return str((root / p).resolve())

    if "base_model" in data:
        data["base_model"] = fix(data["base_model"])
    for entry in data.get("models", []):
        entry["model"] = fix(entry["model"])
    for s in data.get("slices", []):
        for src in s["sources"]:
            src["model"] = fix(src["model"])
    return data


def main(only: list[str]) -> None:
    """Every case from fresh inputs; with `only`, just those cases over the stored inputs (the
    others, made on another machine, stay as they are)."""
    import mergekit  # noqa: F401  (fail early outside the mergekit venv)
    from importlib.metadata import version

    models = all_models()
    inputs, cases = HERE / "inputs", HERE / "cases"
    if only:
        unknown = sorted(set(only) - set(CASES))
        if unknown:
            raise SystemExit(f"no such case: {', '.join(unknown)}")
        manifest = json.loads((HERE / "manifest.json").read_text())
        models = {n: (load_file(str(inputs / f"{n}.safetensors")), f) for n, f in manifest["models"].items()}
    else:
        for d in (inputs, cases):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        for file, config in CONFIG_FILES.items():
            (HERE / file).write_text(json.dumps(config, indent=2) + "\n")
        for name, (tensors, _) in models.items():
            save_file(tensors, str(inputs / f"{name}.safetensors"))
        manifest = {"mergekit_version": version("mergekit"), "models": {n: f for n, (_, f) in models.items()}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (_, file) in models.items():  # model folders next to the recipes, as the test builds them
            (work / "models" / name).mkdir(parents=True)
            shutil.copy(inputs / f"{name}.safetensors", work / "models" / name / "model.safetensors")
            (work / "models" / name / "config.json").write_text(json.dumps(CONFIG_FILES[file]))
        for case, recipe in CASES.items():
            if only and case not in only:
                continue
            recipe = {**recipe, "dtype": recipe.get("dtype", "float32")}
            text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
            (cases / f"{case}.yaml").write_text(text)
            (work / f"{case}.yaml").write_text(text)
            out = work / f"out_{case}"
            run_mergekit(work / f"{case}.yaml", out)
            merged: dict[str, torch.Tensor] = {}
            for shard in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(shard)))
            save_file({k: v.contiguous() for k, v in merged.items()}, str(cases / f"{case}.safetensors"))
            out_config = json.loads((out / "config.json").read_text())
            layers = out_config.get("num_hidden_layers", out_config.get("num_layers"))  # T5 names it num_layers
            manifest["cases"][case] = {"layers": layers, "tensors": len(merged)}
            print(f"{case}: {len(merged)} tensors, {layers} layers")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
