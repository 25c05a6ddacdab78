#!/usr/bin/env bash
# The whole merge flow on the built-in example, from a fresh machine:
#   1) install mergelab into ./.venv (CPU torch first),
#   2) build the tiny trained zoo (a base, three experts, LoRA adapters, task data; 7-8 min on 2 cores),
#   3) merge its experts the three ways people set by hand (uniform linear, task arithmetic, TIES),
#   4) search a merge recipe by evolution (mergelab search) and merge the recipe it finds,
#   5) score every model on every skill: what merging keeps and what it loses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export PATH="$PWD/.venv/bin:$PATH"
mergelab zoo build zoo
mkdir -p out
for recipe in examples/uniform_linear.yaml examples/uniform_task_arithmetic.yaml examples/uniform_ties.yaml; do
    name=$(basename "$recipe" .yaml)
    mergelab merge "$recipe" "out/$name" --overwrite
done
# the default evolutionary search (search/evolve.yaml: 100 candidates; --resume reuses a finished run)
mergelab search search/evolve.yaml --out runs/evolve --resume
mergelab search report runs/evolve
mergelab merge runs/evolve/best.yaml out/searched --overwrite
python examples/zoo_table.py zoo \
    --model uniform_linear=out/uniform_linear \
    --model uniform_task_arithmetic=out/uniform_task_arithmetic \
    --model uniform_ties=out/uniform_ties \
    --model searched=out/searched
