#!/usr/bin/env bash
# The whole test suite (README, second command): lint and types once, then every test on Debian's
# QEMU 7.2 and every real-QEMU tier (-m "bare or guest") again on bookworm-backports' QEMU 10.0,
# which the testbed fetches into ~/.cache/qmpdump on first use. Extra arguments go to pytest
# (e.g. -m bare; a -m given here replaces the 10.0 run's). With QMPDUMP_QEMU_BUILD set (7.2 or
# 10.0), only that QEMU runs, with every selected test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$QMPDUMP_ROOT"

echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy --strict"; mypy

failed=()
timings=()
run_pytest() {  # run_pytest BUILD PYTEST-ARGS...
    local build="$1"; shift
    echo "== pytest on QEMU $build: pytest $*"
    local start code=0
    start=$(date +%s)
    # pytest exits 5 when it collected no test: that is a failure here, like any other non-zero.
    QMPDUMP_QEMU_BUILD="$build" pytest "$@" || code=$?
    timings+=("QEMU $build: $(( $(date +%s) - start )) s (exit $code)")
    if [ "$code" -ne 0 ]; then failed+=("QEMU $build (exit $code)"); fi
}

start_all=$(date +%s)
if [ -n "${QMPDUMP_QEMU_BUILD:-}" ]; then
    run_pytest "$QMPDUMP_QEMU_BUILD" "$@"
else
    # Both QEMUs at once: most of a run is guests booting and waiting, so two runs share the two
    # cores well. Each has its own pytest temp folder and log, printed whole when both are done.
    logs=$(mktemp -d)
    ( run_pytest 10.0 -m "bare or guest" --basetemp="$logs/tmp-10.0" -p no:cacheprovider "$@" \
        > "$logs/10.0.log" 2>&1
      printf '%s\n' "${timings[@]}" > "$logs/10.0.timing"
      printf '%s\n' "${failed[@]+"${failed[@]}"}" > "$logs/10.0.failed" ) &
    other=$!
    run_pytest 7.2 --basetemp="$logs/tmp-7.2" "$@"
    wait "$other" || true
    cat "$logs/10.0.log"
    mapfile -t more < "$logs/10.0.timing"; timings+=("${more[@]}")
    while read -r line; do [ -n "$line" ] && failed+=("$line"); done < "$logs/10.0.failed"
    rm -rf "$logs"
fi
printf 'suite wall time: %s\n' "${timings[@]}"
echo "suite wall time, all runs: $(( $(date +%s) - start_all )) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
