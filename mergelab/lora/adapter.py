"""PEFT LoRA adapter folders: read them into per-module low-rank factors, write them back.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's format,
https://huggingface.co/docs/peft/developer_guides/checkpoint). For a module `m` of the base
model (e.g. `model.layers.0.self_attn.q_proj`) the weights file has

    base_model.model.m.lora_A[.<adapter name>].weight   A  (r, in)
    base_model.model.m.lora_B[.<adapter name>].weight   B  (out, r)
    base_model.model.m.lora_embedding_A / _B            A  (r, vocab), B (dim, r)   (embedding layers)
    base_model.model.m[.modules_to_save[.<name>]].weight a full replacement tensor (modules_to_save)

and the update of the base weight W (out, in) is, as in PEFT's `merge_and_unload`:

    delta W = scale * B @ A,   scale = alpha / r   (or alpha / sqrt(r) with `use_rslora`)

where r and alpha come from `rank_pattern` / `alpha_pattern` when a key matches the module
(PEFT's rule: the first key k with re.match(rf"(.*\\.)?({k})$", module)), else `r` / `lora_alpha`.
`fan_in_fan_out` (GPT-2's Conv1D stores W as (in, out)) and embedding layers store W transposed,
so their update is (B @ A).T.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.errors import CheckpointError
from mergelab.writer import OutputFolder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])"
                       r"(?:\.(?!(?:weight|bias)$)(?P<name>[^.]+))?(?:\.(?P<param>weight|bias))?$")
# PEFT features whose merge is not scale * B @ A on a weight: refused by name
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true) rescales weight columns by a learned magnitude",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication) changes the layer count",
}


@dataclass
class LoraModule:
    """One adapted module: delta W = scale * B @ A, transposed when W is stored (in, out)."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    transposed: bool = False  # fan_in_fan_out or embedding: W is stored as (in, out)
    kind: Literal["linear", "embedding"] = "linear"
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias: true): bias update = scale * bias

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def target(self) -> str:
        """The base tensor this module updates."""
        return f"{self.name}.weight"

    def update(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * B @ A in `dtype`, in the (out, in) layout of the LoRA factors."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale  # (out, in)

    def weight_update(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update in the layout the base model stores its weight."""
        delta = self.update(dtype)
        return delta.T if self.transposed else delta

    @property
    def weight_shape(self) -> tuple[int, int]:
        out_in = (self.B.shape[0], self.A.shape[1])
        return out_in[::-1] if self.transposed else out_in


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory: its config, its modules, and any full tensors it replaces."""

    path: Path | None
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by module name
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> replacement

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def label(self) -> str:
        return str(self.path) if self.path else "adapter"


# ---------------------------------------------------------------- reading
def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked to be a LoRA adapter whose merge is scale * B @ A."""
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: adapter folder not found")
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter folder")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type')!r} is not supported; only LoRA adapters (peft_type LORA)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{file}: {what} is not supported; only plain LoRA adapters")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{file}: '{key}' must be a positive number, got {config.get(key)!r}")
    return config


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (config checked, all factors loaded: adapters are small)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (only adapter_model.bin: re-save it with safe_serialization=True)" if (path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}{hint}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights}: cannot read ({type(exc).__name__}: {exc})") from None
    return from_state_dict(state, config, path)


def from_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any], path: Path | None = None) -> LoraAdapter:
    """Group PEFT's flat keys into modules; compute each module's scale from the config."""
    where = f"{path / WEIGHTS_FILE}" if path else "adapter"
    factors: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{where}: '{key}' is a DoRA magnitude; DoRA adapters are not supported")
        m = _LORA_KEY.match(name)
        if m is None:
            full[_full_tensor_name(name)] = tensor
            continue
        slot = m["ab"] + ("_bias" if m["param"] == "bias" else "")
        factors.setdefault(m["module"], {})[slot] = tensor
        kinds[m["module"]] = "embedding" if m["emb"] else "linear"
    modules = {name: _module(name, f, kinds[name], config, where) for name, f in sorted(factors.items())}
    if not modules and not full:
        raise CheckpointError(f"{where}: no LoRA weights found")
    return LoraAdapter(path, config, modules, full)


def _full_tensor_name(name: str) -> str:
    """`lm_head.modules_to_save.default.weight` or `embed_tokens.base_layer.weight` -> `<module>.weight`."""
    parts = name.split(".")
    out: list[str] = []
    skip_next = False
    for i, part in enumerate(parts):
        if skip_next:
            skip_next = False
            continue
        if part == "modules_to_save":
            skip_next = i + 2 < len(parts)  # an adapter name follows unless the parameter does
            continue
        if part in ("base_layer", "original_module"):
            continue
        out.append(part)
    return ".".join(out)


def _module(name: str, f: dict[str, torch.Tensor], kind: str, config: dict[str, Any], where: str) -> LoraModule:
    if "A" not in f or "B" not in f:
        raise CheckpointError(f"{where}: module '{name}' has lora_{'A' if 'A' not in f else 'B'} missing")
    A, B = f["A"], f["B"]
    if A.dim() != 2 or B.dim() != 2:
        raise CheckpointError(f"{where}: module '{name}': only 2-D LoRA factors are supported (Linear, Conv1D, Embedding), got A {list(A.shape)}")
    if A.shape[0] != B.shape[1]:
        raise CheckpointError(f"{where}: module '{name}': lora_A has rank {A.shape[0]} but lora_B has {B.shape[1]}")
    r, alpha = pattern_value(config.get("rank_pattern"), name, config["r"]), pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    if r != A.shape[0]:
        raise CheckpointError(f"{where}: module '{name}': adapter_config.json gives rank {r} but lora_A has rank {A.shape[0]}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    # embeddings: A (r, vocab), B (dim, r), W (vocab, dim); Conv1D (fan_in_fan_out): W (in, out)
    transposed = kind == "embedding" or bool(config.get("fan_in_fan_out"))
    return LoraModule(name, A, B, float(scale), transposed, kind, f.get("B_bias"))  # type: ignore[arg-type]


def pattern_value(pattern: dict[str, Any] | None, module: str, default: float) -> Any:
    """PEFT's `get_pattern_key`: the first key matching the end of the module name (a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------- writing
def save_adapter(adapter: LoraAdapter, folder: Path) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` into an existing folder."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for m in adapter.modules.values():
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight"))
        state[f"{PREFIX}{m.name}.{a_key}"] = m.A.contiguous()
        state[f"{PREFIX}{m.name}.{b_key}"] = m.B.contiguous()
        if m.bias is not None:
            state[f"{PREFIX}{m.name}.lora_B.bias"] = m.bias.contiguous()
    for name, tensor in adapter.full.items():
        state[PREFIX + name] = tensor.contiguous()
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True, default=_json_default) + "\n")


def commit_adapter(adapter: LoraAdapter, folder: OutputFolder) -> Path:
    """Write `adapter` into `folder`'s partial directory and rename it into place."""
    partial = folder.create()
    try:
        save_adapter(adapter, partial)
        return folder.commit()
    except BaseException:
        folder.discard()
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def unit_scale_config(template: dict[str, Any], modules: dict[str, LoraModule], base_model: str | None,
                      targets: list[str] | None = None) -> dict[str, Any]:
    """A config for `modules` whose scales are all 1 (lora_alpha = r for every module).

    Keeps the template's other fields (PEFT's `add_weighted_adapter` does the same with
    `dataclasses.replace`); ranks that differ from the most common one go to `rank_pattern` and
    `alpha_pattern` under the exact (escaped) module name. `targets` defaults to the exact module
    names, so no module without factors gets a LoRA layer.
    """
    ranks = [m.rank for m in modules.values()]
    r = max(set(ranks), key=ranks.count) if ranks else int(template.get("r", 8))
    pattern = {re.escape(m.name): m.rank for m in modules.values() if m.rank != r}
    targets = targets if targets is not None else sorted(modules)
    config = {k: v for k, v in template.items() if k not in ("layers_to_transform", "layers_pattern", "exclude_modules")}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  target_modules=targets, peft_type="LORA", inference_mode=True)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    return config
