#!/usr/bin/env bash
# Creates .venv with PyTorch and outlierlab (editable, with the hf, lightning, tensorboard, cluster, fast and dev extras;
# scripts/constraints.txt pins the packages whose releases change what the tests build, check or lint).
# CPU machines get the CPU build of torch 2.13.0; on a machine with an NVIDIA GPU pip's default
# (CUDA) build is installed instead. Set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.9.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then spec="$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
    else spec="torch==2.13.0"; fi
    echo "setup: installing $spec"
    .venv/bin/pip install --quiet --disable-pip-version-check "$spec"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c scripts/constraints.txt \
    -e ".[hf,lightning,tensorboard,cluster,fast,dev]"
touch .venv/.outlierlab-setup
echo "setup: ready (.venv/bin/outlierlab)"
