#!/usr/bin/env bash
# Set up ./.venv from nothing (idempotent: an existing, complete venv is reused).
#   bash scripts/bootstrap.sh        the light install: zero-shot sorting (inference)
#   bash scripts/bootstrap.sh test   everything: corpus + training stack, Dask, test tools
# TORCH_SPEC overrides the torch requirement (default: the 2.13.0 build, CPU here; on a GPU
# machine set e.g. TORCH_SPEC="torch>=2.2" to get your CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-main}"
case "$what" in
  main) extras="" ;;
  test) extras="[dev]" ;;
  *) echo "usage: bash scripts/bootstrap.sh [main|test]" >&2; exit 2 ;;
esac
stamp=".venv/.spikevault-$what-$(sha256sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
# torch first, so nothing below pulls a multi-GB CUDA build on a CPU machine.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install -q -e ".$extras"
# Compile the sort's numba kernels into numba's disk cache now (about 30 s), not in the first sort
# (inference/warmup.py). A failure here only means they compile on first use.
.venv/bin/spikevault warmup || echo "bootstrap: warm-up failed; numba compiles the kernels on the first sort" >&2
touch "$stamp"
