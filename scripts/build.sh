#!/usr/bin/env bash
# Builds dcq_ops in editable mode against the installed torch (its C++ extension,
# and its CUDA kernels when torch has CUDA and nvcc is found), unless the
# installed build is already up to date: scripts/build_stamp.py compares a stamp
# of every input of the build (sources and headers, setup.py, torch, compilers,
# TORCH_CUDA_ARCH_LIST and the other variables the build reads) and checks that
# the installed package loads with its extension. A rebuild recompiles only the
# objects whose inputs changed (setup.py keeps them in build/).
#   DCQ_OPS_FORCE_BUILD=1   run pip even when the build is up to date
#   MAX_JOBS                parallel compile jobs (default 2)
# Used by install.sh (so test.sh and benchmark.sh) and gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if "$PYTHON" scripts/build_stamp.py check; then
  exit 0
fi
MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" scripts/build_stamp.py write
