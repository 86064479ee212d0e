#!/usr/bin/env bash
# The test command: install (scripts/install.sh, which rebuilds only what changed:
# right after scripts/benchmark.sh it does not rebuild), then the whole test suite.
# GPU-only tests skip cleanly without a GPU; the Triton tests run on the CPU
# under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "== running the tests"
set +e
${PYTHON:-python3} -m pytest -q tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
