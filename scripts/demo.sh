#!/usr/bin/env bash
# The main job end to end on the built-in demo VM (README, first command).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$QMPDUMP_ROOT"
exec qmpdump demo "$@"
