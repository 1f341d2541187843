"""Whether a QEMU process belongs to a libvirt domain, from libvirt's own pid files.

libvirt writes ``NAME.pid`` for every running domain: ``/run/libvirt/qemu`` for the system
instance, ``$XDG_RUNTIME_DIR/libvirt/qemu/run`` (``/run/user/UID/...``) for session instances.
A QMP socket of qmpdump's own on such a QEMU is the set-up the README used to suggest; QEMU's
``dump-guest-memory`` through it is not safe there (see :func:`qmpdump.qmp.guestdump.guest_dump`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["libvirt_domain_of"]


def _pid_dirs() -> list[Path]:
    dirs = [Path("/run/libvirt/qemu")]
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(runtime) / "libvirt" / "qemu" / "run")
    dirs += sorted(Path("/run/user").glob("*/libvirt/qemu/run"))
    return dirs


def libvirt_domain_of(pid: int) -> str | None:
    """The name of the libvirt domain whose QEMU has this pid, or None (blocking, quick)."""
    for folder in _pid_dirs():
        try:
            files = list(folder.glob("*.pid"))
        except OSError:
            continue
        for path in files:
            try:
                if int(path.read_text().strip()) == pid and _runs_domain(pid, path.stem):
                    return path.stem
            except (OSError, ValueError):
                continue
    return None


def _runs_domain(pid: int, name: str) -> bool:
    """Whether QEMU's command line names the domain (``-name guest=NAME,...``): a pid file left
    by a crashed libvirtd may name a pid that another process has since."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = f"guest={name}".encode()
    return any(arg == want or arg.startswith(want + b",") for arg in argv)
