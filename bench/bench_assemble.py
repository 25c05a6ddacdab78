"""A data-flow candidate against a parameter-space candidate, on a 1.1B-parameter model.

    python bench/bench_assemble.py --workdir /tmp/mlassemble [--device cuda] [--candidates 5]

Writes two random-weight bfloat16 checkpoints with TinyLlama-1.1B's shapes (22 layers, hidden
2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000; 1.1B parameters, 2.2 GB each), then
times, on `--device`, after each evaluator has read its sources once:

- data-flow: `LiveAssembler.set_recipe` for random routes through both models' layers (slots:
  44 x 2 repeats, depth <= 22, scales in [0.5, 1.5]), the model built from the source tensors;
- parameter: `LiveMerger.set_recipe` for a linear merge of the two at random weights (every one
  of the 1.1B parameters computed and copied into the live model).

It prints the median seconds per candidate of each (and one forward pass of 64 tokens through
each candidate, so the assembled model is seen to run), and the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32000, 2048, 5632, 22, 32, 4
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
          "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV_HEADS, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def shapes() -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    layer = {"input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
             "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
             "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
             "mlp.gate_proj.weight": (INTER, HIDDEN), "mlp.up_proj.weight": (INTER, HIDDEN),
             "mlp.down_proj.weight": (HIDDEN, INTER)}
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def write_model(folder: Path, seed: int) -> Path:
    """A random bfloat16 checkpoint (skipped when it is there)."""
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)).to(torch.bfloat16)
               for n, s in shapes().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def timed(set_recipe, recipes: list, model_of, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """Seconds of `set_recipe` per recipe, and of one forward pass of the result."""
    build, forward = [], []
    for recipe in recipes:
        start = time.perf_counter()
        set_recipe(recipe)
        build.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            model_of()(ids.to(next(model_of().parameters()).device))
        forward.append(time.perf_counter() - start)
    return build, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlassemble"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidates", type=int, default=5)
    args = parser.parse_args()

    from mergelab.evolve.assemble import LiveAssembler
    from mergelab.evolve.dataflow import dataflow_space
    from mergelab.evolve.live import LiveMerger
    from mergelab.evolve.schema import DataflowSpec
    from mergelab.recipe import parse_recipe

    start = time.perf_counter()
    a, b = write_model(args.workdir / "a", 1), write_model(args.workdir / "b", 2)
    print(f"checkpoints ready in {time.perf_counter() - start:.0f} s ({sum(map(lambda s: torch.Size(s).numel(), shapes().values())) / 1e9:.2f}B parameters each)")
    rng = random.Random(0)
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))

    space = dataflow_space(DataflowSpec(models=[str(a), str(b)], repeats=2, max_layers=LAYERS), args.workdir, "bench")
    routes = [space.to_recipe({"include": [rng.random() for _ in space.slots],
                               "scale": [rng.uniform(0.5, 1.5) for _ in space.slots]}) for _ in range(args.candidates)]
    start = time.perf_counter()
    live = LiveAssembler(space.every_layer(), args.device)
    print(f"data-flow: sources read in {time.perf_counter() - start:.1f} s")
    flow, flow_fwd = timed(live.set_recipe, routes, lambda: live.model, ids)
    depths = [len(r.slices or []) for r in routes]
    live.close()
    del live

    merges = [parse_recipe({"merge_method": "linear", "dtype": "bfloat16",
                            "models": [{"model": str(a), "parameters": {"weight": w}},
                                       {"model": str(b), "parameters": {"weight": 1 - w}}]}, args.workdir, "bench")
              for w in (rng.uniform(0.1, 0.9) for _ in range(args.candidates))]
    start = time.perf_counter()
    merger = LiveMerger(merges[0], args.device)
    print(f"parameter: sources read in {time.perf_counter() - start:.1f} s")
    param, param_fwd = timed(merger.set_recipe, merges, lambda: merger.model, ids)
    merger.close()

    flow_s, param_s = statistics.median(flow), statistics.median(param)
    print(f"\n| candidate (1.1B, {args.device}, median of {args.candidates}) | build s | forward of 64 tokens s |")
    print("|---|---|---|")
    print(f"| data-flow: assemble a route (depth {min(depths)}-{max(depths)}) | {flow_s:.4f} | {statistics.median(flow_fwd):.3f} |")
    print(f"| parameter: linear merge into the live model | {param_s:.4f} | {statistics.median(param_fwd):.3f} |")
    print(f"\nassembling a data-flow candidate takes {flow_s / param_s:.4f}x the time of merging a parameter-space one "
          f"({param_s / flow_s:.0f}x less)")


if __name__ == "__main__":
    main()
