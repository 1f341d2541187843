"""Reach a libvirt domain: connection, errors, events on asyncio, and QEMU's pid.

libvirt's calls block; callers run them in threads (``asyncio.to_thread``). Events (domain
lifecycle, QEMU monitor events) are dispatched by ``libvirtaio`` on the asyncio loop that was
running when the first connection was opened: libvirt accepts one event implementation per
process and keeps it (``virEventRegisterImpl``), so :func:`ensure_event_loop` registers it once.

QEMU's pid comes from libvirt, never from a socket's peer (through ``virt-qemu-qmp-proxy`` the
peer is the proxy, not QEMU): libvirt's pid file for the domain (``/run/libvirt/qemu/NAME.pid``
for ``qemu:///system``, ``$XDG_RUNTIME_DIR/libvirt/qemu/run/NAME.pid`` for ``qemu:///session``),
accepted only when that process's command line carries the domain's ``-uuid``; else the process
whose command line does. Remote URIs have no local pid: host facts are then unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from qmpdump.errors import (
    DomainNotFound,
    DomainNotRunning,
    LibvirtError,
    LibvirtPermission,
    LibvirtUnavailable,
    UsageError,
)

__all__ = [
    "DEFAULT_URI",
    "DomainRef",
    "ensure_event_loop",
    "libvirt_module",
    "open_domain",
    "qemu_pid",
    "translate",
]

DEFAULT_URI = "qemu:///system"

_lock = threading.Lock()
_event_loop: asyncio.AbstractEventLoop | None = None


def libvirt_module() -> ModuleType:
    """The ``libvirt`` module, or a clear :class:`UsageError` when the extra is missing."""
    try:
        import libvirt  # noqa: PLC0415 - optional extra
    except ImportError as err:
        raise UsageError(
            "libvirt support needs libvirt-python: pip install 'qmpdump[libvirt]' "
            "(Debian: apt-get install libvirt-dev pkg-config first)"
        ) from err
    module: ModuleType = libvirt
    return module


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; qmpdump reports them itself."""


def ensure_event_loop() -> None:
    """Dispatch libvirt's events on the running asyncio loop (once per process)."""
    global _event_loop  # noqa: PLW0603 - libvirt's event implementation is per process
    libvirt = libvirt_module()
    import libvirtaio  # noqa: PLC0415 - ships with libvirt-python

    loop = asyncio.get_running_loop()
    with _lock:
        if _event_loop is None:
            libvirt.registerErrorHandler(_quiet, None)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _event_loop = loop
        elif _event_loop is not loop:
            raise LibvirtError(
                "libvirt", "libvirt's events are bound to another asyncio loop in this process"
            )


@dataclass(frozen=True, slots=True)
class DomainRef:
    """Which domain, on which libvirt."""

    uri: str
    name: str

    def describe(self, path: str) -> str:
        """How maps and sidecars name the VM and the path used (``passthrough``/``supported``)."""
        return f"libvirt {self.uri} domain {self.name} (monitor {path})"


def translate(err: Exception, ref: DomainRef, doing: str) -> LibvirtError:
    """A ``libvirt.libvirtError`` as the matching :class:`LibvirtError` (cause kept)."""
    libvirt = libvirt_module()
    where = f"libvirt {ref.uri} domain {ref.name}"
    if not isinstance(err, libvirt.libvirtError):
        return LibvirtError(where, f"{doing}: {err}", err)
    code = err.get_error_code()
    message = err.get_error_message() or str(err)
    text = f"{doing}: {message}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(where, f"no such domain ({message})", err)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return DomainNotRunning(where, f"the domain is not running ({message})", err)
    if (
        code
        in (
            libvirt.VIR_ERR_AUTH_FAILED,
            libvirt.VIR_ERR_AUTH_CANCELLED,
            libvirt.VIR_ERR_ACCESS_DENIED,
        )
        or "Permission denied" in message
    ):
        return LibvirtPermission(where, f"permission denied: {text}", err)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR) or (
        err.get_error_domain() == libvirt.VIR_FROM_RPC
    ):
        return LibvirtUnavailable(where, f"libvirtd cannot be reached: {text}", err)
    return LibvirtError(where, text, err)


def open_domain(ref: DomainRef, *, read_only: bool = False) -> tuple[Any, Any]:
    """Connect and look the domain up (blocking): ``(virConnect, virDomain)``."""
    libvirt = libvirt_module()
    try:
        conn = libvirt.openReadOnly(ref.uri) if read_only else libvirt.open(ref.uri)
    except libvirt.libvirtError as err:
        raise translate(err, ref, "connect") from err
    try:
        dom = conn.lookupByName(ref.name)
    except libvirt.libvirtError as err:
        conn.close()
        raise translate(err, ref, "look up the domain") from err
    return conn, dom


def _pid_dir(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.hostname or parts.scheme not in ("qemu", "qemu+unix"):
        return None  # a remote libvirt: its QEMU is not a process of this host
    if parts.path == "/system":
        return Path("/run/libvirt/qemu")
    if parts.path == "/session":
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return Path(runtime) / "libvirt" / "qemu" / "run"
    return None


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _has_uuid(argv: list[str], uuid: str) -> bool:
    return any(a == "-uuid" and b.lower() == uuid.lower() for a, b in itertools.pairwise(argv))


def qemu_pid(uri: str, name: str, uuid: str) -> int | None:
    """QEMU's pid for a running domain, from libvirt's pid file or the domain's ``-uuid``."""
    folder = _pid_dir(uri)
    if folder is None:
        return None
    try:
        pid = int((folder / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and _has_uuid(_argv(pid), uuid):
        return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _has_uuid(_argv(int(entry.name)), uuid):
            return int(entry.name)
    return None
