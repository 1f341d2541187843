#!/usr/bin/env bash
# The whole test suite: lint, types, then every test tier against real QEMU (README, second
# command). Extra arguments go to pytest (e.g. -m bare).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$QMPDUMP_ROOT"

echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy --strict"; mypy
echo "== pytest"
start=$(date +%s)
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero.
pytest "$@"
echo "suite wall time: $(( $(date +%s) - start )) s"
