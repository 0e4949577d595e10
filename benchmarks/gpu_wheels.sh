#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a bare GPU machine, which reaches no package
# index: what outlierlab needs and the GPU image (docs: /work/.library/device/KINDS.md) lacks.
# Run here (PyPI reachable); writes .whl/ (git-ignored), carried to the GPU machine with the run:
#   benchmarks/gpu_wheels.sh && <device run carry=[".whl"]> bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pure-Python wheels: tomli-w (config.py), pytorch-optimizer (optim/), gguf (GGUF input)
WHEELS=("tomli-w==1.2.0" "pytorch-optimizer==4.1.0" "gguf==0.19.0")
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
ls .whl
