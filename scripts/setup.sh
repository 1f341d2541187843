#!/usr/bin/env bash
# Install what qmpdump, its demo and its tests need on Debian 12 (as root), idempotently:
# Debian packages (QEMU, busybox-static, cpio, kmod; Python's venv; the dump readers; libvirt;
# liblzo2-dev, python3-dev and gcc to build python-lzo, which has no wheel for Python 3.11;
# libc6-dev for the guest's static write-load program) and a virtual environment at .venv with
# the package and its test tools. Sourced by demo.sh and test.sh.
set -euo pipefail

QMPDUMP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export QMPDUMP_ROOT
VENV="${QMPDUMP_VENV:-$QMPDUMP_ROOT/.venv}"

debian_packages=(qemu-system-x86 qemu-utils busybox-static cpio kmod python3 python3-venv makedumpfile crash curl binutils
    liblzo2-dev python3-dev gcc libc6-dev)

# libvirt for the libvirt tier and qmpdump[libvirt] (libvirt-dev and pkg-config build
# libvirt-python, with gcc and python3-dev: pip builds it from source); installed without
# recommends (no systemd units, no dnsmasq).
libvirt_packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-clients-qemu libvirt-dev pkg-config
    gcc python3-dev)

missing=()
for pkg in "${debian_packages[@]}" "${libvirt_packages[@]}"; do
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
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${debian_packages[@]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${libvirt_packages[@]}"
fi
# libvirtd refuses to start without the user and groups that Debian's libvirt-daemon-system (not
# installed: no systemd here) would make. The tests start libvirtd by hand
# (qmpdump/testbed/libvirtd.py).
for group in kvm libvirt libvirt-qemu; do
    getent group "$group" >/dev/null || groupadd --system "$group"
done
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu

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
