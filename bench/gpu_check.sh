#!/usr/bin/env bash
# The GPU check of issue #13 in one call, from the repo root of a fresh copy (no .venv needed):
#
#   bash bench/gpu_check.sh [--small] [more bench/gpu_check.py flags, e.g. --budget 420]
#
# env: OUT      results folder (gpu_check.md, results.json, log.txt); default a new temp dir
#      WHEELS   folder of wheels for what is missing (pydantic, pyyaml, tqdm, mergekit and its deps);
#               installed with --no-index: nothing is downloaded
#      MERGEKIT path to a mergekit-yaml; default: one installed from WHEELS if it holds mergekit, else none
#      WORKDIR  fixtures and merge outputs (kept when given; default a temp dir, removed at the end)
# Makes the bench's three ~1.1B bf16 checkpoints (or small ones with --small), times the I/O floor, TIES
# and linear with mergelab --device cuda / cpu and mergekit --gpu-rich / --cuda, checks bit-identity and
# prints the table (bench/gpu_check.py). Without a CUDA device the GPU cases are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Which Python: a system torch that sees a GPU wins (the GPU machine has torch with CUDA installed
# system-wide; .ci/setup's .venv would hold the CPU build), then the repo's .venv, then any system torch.
# A system torch gets a venv with --system-site-packages, so torch is used where it is, never reinstalled.
sys_torch=$(python3 -c "import torch; print(torch.cuda.is_available())" 2>/dev/null || echo none)
if [ "$sys_torch" = True ] || { [ "$sys_torch" = False ] && [ ! -x .venv/bin/python ]; }; then
    VENV=${VENV:-/tmp/mergelab-gpu-venv}
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    echo "gpu_check: no torch here (no system torch, no .venv): run .ci/setup first" >&2; exit 1
fi
pip_offline() {  # pip install from WHEELS only; quiet unless it fails
    "$PY" -m pip install -q --disable-pip-version-check --no-index ${WHEELS:+--find-links "$WHEELS"} "$@"
}
# mergelab itself, without its dependencies (torch is there; ray, transformers... are not needed to merge).
# An editable install needs setuptools >= 68; where there is none, a .pth file puts the repo on sys.path instead.
if ! (cd / && "$PY" -c "import mergelab, sys; sys.exit(not mergelab.__file__.startswith('$PWD/'))" 2>/dev/null); then
    pip_offline --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || echo "$PWD" >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mergelab-src.pth"
fi
# What the merge path imports beyond torch (module=package); missing ones come from WHEELS.
for dep in yaml=pyyaml pydantic=pydantic tqdm=tqdm numpy=numpy; do
    "$PY" -c "import ${dep%%=*}" 2>/dev/null && continue
    [ -n "${WHEELS:-}" ] && pip_offline "${dep#*=}" || true
    "$PY" -c "import ${dep%%=*}" 2>/dev/null || { echo "gpu_check: ${dep#*=} missing: put its wheel in WHEELS=DIR" >&2; exit 1; }
done
# mergekit in its own venv over the same system torch, when WHEELS holds it and MERGEKIT is not given:
# with its dependencies from WHEELS, or else every wheel there with --no-deps (a trimmed set: what a
# merge imports, without datasets/pyarrow, which mergekit requires but mergekit-yaml does not import).
if [ -z "${MERGEKIT:-}" ] && [ -n "${WHEELS:-}" ] && compgen -G "$WHEELS/mergekit-*.whl" >/dev/null; then
    MKVENV=/tmp/mergelab-gpu-mergekit
    mk_pip() { "$MKVENV/bin/python" -m pip install -q --disable-pip-version-check --no-index "$@"; }
    [ -x "$MKVENV/bin/python" ] || python3 -m venv --system-site-packages "$MKVENV"
    "$MKVENV/bin/mergekit-yaml" --help >/dev/null 2>&1 || mk_pip --find-links "$WHEELS" mergekit \
        || mk_pip --no-deps "$WHEELS"/*.whl || true
    if "$MKVENV/bin/mergekit-yaml" --help >/dev/null 2>&1; then MERGEKIT=$MKVENV/bin/mergekit-yaml
    else echo "gpu_check: mergekit did not install from $WHEELS: mergekit cases skipped" >&2; fi
fi

rc=0  # bench/gpu_check.py imports bench_merge from its own folder; merges run from the repo root
"$PY" bench/gpu_check.py --out "$OUT" ${WORKDIR:+--workdir "$WORKDIR"} ${MERGEKIT:+--mergekit "$MERGEKIT"} "$@" 2>&1 \
    | tee "$OUT/log.txt" || rc=$?
echo "gpu_check: results in $OUT (exit $rc)"
exit $rc
