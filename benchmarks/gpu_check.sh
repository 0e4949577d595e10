#!/usr/bin/env bash
# GPU check in one call (≤ 10 minutes on one H100/H200): CUDA correctness (bf16 autocast, compile
# vs fp32), tokens/s and MFU of a 124M-class GPT with compile, monitor overhead on the GPU, DDP.
# A bare GPU machine reaches no package index: what outlierlab needs beyond the GPU image comes
# as wheels in .whl/ (benchmarks/gpu_wheels.sh, run where PyPI is reachable; carry .whl), installed
# first into /tmp/site. Results after every section: $OUT/gpu_results.{json,md} if OUT is set,
# else benchmarks/.
# Exit status: non-zero when a correctness check fails.
#   benchmarks/gpu_check.sh             # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run   # every code path on the CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  # the GPU machine's python3 holds CUDA PyTorch; this checkout's .venv is the CPU build
  if python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PY=python3
  elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
echo "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
# every module a section imports, so a missing dependency fails here, not after minutes
"$PY" -c 'import outlierlab.config, outlierlab.optim, outlierlab.train, outlierlab.monitor, outlierlab.model, outlierlab.cli' || {
  echo "gpu_check: outlierlab does not import with $PY (missing dependency?)"; exit 2; }
exec timeout 585 "$PY" benchmarks/gpu_check.py "$@"
