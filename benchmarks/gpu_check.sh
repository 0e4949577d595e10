#!/usr/bin/env bash
# GPU check in one call (≤ 8 minutes on one H100/H200, installation included): CUDA correctness
# (bf16 autocast, inductor compile vs fp32), DDP and FSDP (two ranks on the one GPU over gloo),
# tokens/s and MFU (of the measured and the datasheet bf16 peak) of a 124M-class GPT with compile,
# monitor overhead on the GPU.
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
# outlierlab's runtime requirements (pyproject.toml [project] dependencies, not the dev extras;
# the image's CUDA torch satisfies torch>=2.9 and is left alone): all there, or say which are not
"$PY" - <<'PYEOF' || { echo "gpu_check: install them (benchmarks/gpu_wheels.sh, carry .whl)"; exit 2; }
import importlib.metadata as md, re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
missing = []
for spec in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{spec} (absent)")
        continue
    if not req.specifier.contains(re.sub(r"\+.*", "", have), prereleases=True):
        missing.append(f"{spec} (have {have})")
if missing:
    print("gpu_check: missing runtime requirements: " + ", ".join(missing))
    sys.exit(1)
print("runtime requirements: all present")
PYEOF
# every module a section imports, so a missing dependency fails here, not after minutes
"$PY" -c 'import outlierlab.config, outlierlab.optim, outlierlab.train, outlierlab.train.fsdp, outlierlab.monitor, outlierlab.model, outlierlab.cli' || {
  echo "gpu_check: outlierlab does not import with $PY (missing dependency?)"; exit 2; }
# ≤ 8 minutes in all: the sections get --budget (default 420 s), the whole script 450 s; a dry
# run on a (shared) CPU gets 20 minutes, so every section runs there
limit=450
for a in "$@"; do [ "$a" = "--dry-run" ] && limit=1200; done
exec timeout "$limit" "$PY" benchmarks/gpu_check.py "$@"
