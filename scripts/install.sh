#!/usr/bin/env bash
# Installs what dcq_ops needs on a fresh machine with only Python on it, then
# builds the package (its C++ extension, and its CUDA kernels when torch has
# CUDA and nvcc is found) against the installed torch (scripts/build.sh: a second
# run with nothing changed does not rebuild; a change recompiles only what it touches).
#   DCQ_OPS_REQUIRE_CUDA=1  fail unless the CUDA kernels compile (CI sets it)
#   TORCH_SPEC              torch requirement (default torch==2.14.1)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

echo "== installing $TORCH_SPEC and the build/test requirements"
"$PYTHON" -m pip install -q "$TORCH_SPEC" numpy ninja setuptools wheel pytest expecttest matplotlib pillow

if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "== building dcq_ops (CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0;10.0+PTX})"
# Skipped when nothing the build depends on changed; else only what changed recompiles.
PYTHON="$PYTHON" bash scripts/build.sh

"$PYTHON" - <<'PY'
import os
import dcq_ops
print("dcq_ops backends:", dcq_ops.backends("cpu"))
if os.environ.get("DCQ_OPS_REQUIRE_CUDA") == "1":
    assert dcq_ops.extension_loaded(), dcq_ops.EXTENSION_ERROR
    assert dcq_ops.has_cuda_kernels(), "the extension was built without its CUDA kernels"
    print("dcq_ops: CUDA kernels compiled")
PY
