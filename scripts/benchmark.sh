#!/usr/bin/env bash
# The main job: install (scripts/install.sh, which rebuilds only what changed),
# then the throughput benchmark of DCQ against full softmax and Partial FC on
# its embedded default (any arguments are passed to benchmarks/throughput.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec ${PYTHON:-python3} benchmarks/throughput.py "$@"
