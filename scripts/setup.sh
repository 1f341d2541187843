#!/usr/bin/env bash
# Install what qmpdump, its demo and its tests need on Debian 12 (as root), idempotently:
# Debian packages (QEMU, busybox-static, cpio, kmod; Python's venv) and a virtual environment
# at .venv with the package and its test tools. Sourced by demo.sh and test.sh.
set -euo pipefail

QMPDUMP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export QMPDUMP_ROOT
VENV="${QMPDUMP_VENV:-$QMPDUMP_ROOT/.venv}"

debian_packages=(qemu-system-x86 qemu-utils busybox-static cpio kmod python3 python3-venv makedumpfile crash curl binutils gcc libc6-dev)

missing=()
for pkg in "${debian_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
# The test guest's kernel comes from Debian's archive (apt-get download): the package lists
# must know linux-image-amd64 even when every package above is already installed.
if [ "${#missing[@]}" -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    echo "setup: apt-get update" >&2
    apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# Rebuild the venv only when it is missing or pyproject.toml changed since it was made.
stamp="$VENV/.qmpdump-pyproject.sha256"
want="$(sha256sum "$QMPDUMP_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: preparing $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$QMPDUMP_ROOT[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
