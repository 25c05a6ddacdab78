"""`mergelab.merge(recipe, out)`: the merge flow, recipe -> plan -> execute -> output folder.

The Python twin of `mergelab merge recipe.yaml OUT`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from mergelab.device import resolve_device
from mergelab.execute import DEFAULT_MEMORY, execute
from mergelab.plan import Plan, make_plan
from mergelab.recipe import Recipe, load_recipe
from mergelab.writer import OutputFolder, ShardedWriter, parse_size

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RECIPE_FILE = "mergekit_config.yml"  # the name merge tooling and model hubs look for


def merge(
    recipe: str | os.PathLike[str] | dict | Recipe,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    seed: int = 0,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    float32_arithmetic: bool = False,
    workers: int | None = None,
    allow_crimes: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    memory: str | int | None = DEFAULT_MEMORY,
) -> Path:
    """Run a merge recipe (a YAML path, a dict, or a `Recipe`) and write the model to `out`.

    Everything is validated before the first tensor is read; the model is written into
    `out.partial/` and renamed to `out` when complete. Returns the output folder.
    `float32_arithmetic`: as the recipe key `arithmetic: float32` (and recorded in the written recipe).
    `workers`: threads merging one tensor each (default: see `execute`); `allow_crimes`: merge models whose
    config.json names different architectures; `copy_tokenizer`/`write_model_card`: False leaves out the template's
    tokenizer files / README.md and mergekit_config.yml (mergekit-yaml's flags of those names).
    `memory`: bytes (or '2GB') of tensors in flight; larger tensors are merged in blocks (see `execute`); None: no limit.
    """
    recipe = load_recipe(recipe)
    if float32_arithmetic:
        recipe = recipe.model_copy(update={"arithmetic": "float32"})
    folder = OutputFolder(out, overwrite)
    size = parse_size(shard_size)
    budget = parse_size(memory, "memory") if memory is not None else None
    resolve_device(device)
    plan = make_plan(recipe, allow_pickle=allow_pickle, allow_crimes=allow_crimes)
    chat_template = _chat_template(recipe)
    try:
        partial = folder.create()
        writer = ShardedWriter(partial, [(j.name, j.shape, j.dtype) for j in plan.jobs], size)
        try:
            execute(plan, writer, device=device, seed=seed, progress=progress, workers=workers, memory=budget)
            writer.close()
        finally:
            writer.abort()
        write_metadata(plan, partial, seed=seed, chat_template=chat_template, copy_tokenizer=copy_tokenizer,
                       write_card=write_model_card)
        return folder.commit()
    except BaseException:
        folder.discard()
        raise
    finally:
        plan.close()


def _chat_template(recipe: Recipe) -> str | None:
    from mergelab.errors import RecipeError

    value = recipe.chat_template
    if value is None or "{%" in value or "{{" in value:
        return value
    if value == "chatml":
        return CHATML
    raise RecipeError(f"chat_template: unknown template name {value!r}; use 'chatml' or a Jinja template string")


def write_metadata(plan: Plan, folder: Path, *, seed: int, chat_template: str | None, copy_tokenizer: bool = True,
                   write_card: bool = True) -> None:
    """config.json, generation config, tokenizer files, the recipe and a model card."""
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    gen = plan.template.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, folder / gen.name)
    if plan.vocabulary is not None:  # a tokenizer built for the output (tokenizer_source / tokenizer:), saved as mergekit does
        tokenizer = plan.vocabulary.tokenizer
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(str(folder))
        chat_template = None
    elif copy_tokenizer:
        for name in TOKENIZER_FILES:
            src = plan.tokenizer_dir / name
            if src.is_file():
                shutil.copyfile(src, folder / name)
    if chat_template is not None and copy_tokenizer:
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if write_card:
        (folder / RECIPE_FILE).write_text(plan.recipe.to_yaml(absolute_paths=True))
        (folder / "README.md").write_text(model_card(plan, seed))


def model_card(plan: Plan, seed: int) -> str:
    recipe = plan.recipe
    sources = [str(ref) for ref in plan.model_keys]  # a model with an adapter shows as base+adapter
    base = str(recipe.ref(recipe.base_model)) if recipe.base_model else None
    lines = ["---", "library_name: transformers", "tags:", "- mergelab", "- merge"]
    if base:
        lines += ["base_model:", f"- {base}"]
    lines += ["---", "", f"# {recipe.name or Path(sources[0]).name + ' merge'}", "",
              f"This model was merged with mergelab using the "
              f"**{recipe.merge_method}** method{' (seed ' + str(seed) + ')' if plan.method.randomised else ''}.", "",
              "## Sources", ""]
    lines += [f"- {s}{' (base)' if s == base else ''}" for s in sources]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml(absolute_paths=True).rstrip(), "```", ""]
    return "\n".join(lines)
