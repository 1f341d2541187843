"""Which libvirt domains run, followed by libvirt's lifecycle events (for a daemon's VM list).

:class:`DomainWatch` opens one connection, lists the running domains whose names match the
configured globs, then turns libvirt's ``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` events (dispatched on
the asyncio loop by ``libvirtaio``) into :class:`DomainChange` records: a domain that starts
(``STARTED``) appears, one that stops or crashes (``STOPPED``, ``CRASHED``) disappears. Domains
defined later need nothing special: they appear when they start. A connection that libvirtd
closes ends the watch with :class:`~qmpdump.errors.LibvirtUnavailable`; the owner reconnects
(a fresh watch lists the running domains again, so nothing missed while disconnected is lost).

Pure part: :func:`matches` (fnmatch globs, like ``[[discover]]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from qmpdump.errors import LibvirtUnavailable
from qmpdump.libvirt.connection import DomainRef, ensure_event_loop, libvirt_module, translate

__all__ = ["DomainChange", "DomainWatch", "matches"]


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a domain name matches one of the globs (no globs: every domain)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class DomainChange:
    """A domain that appeared (``running``) or disappeared, and why."""

    name: str
    uuid: str
    running: bool
    reason: str


_CLOSED = DomainChange("", "", running=False, reason="libvirtd closed the connection")


class DomainWatch:
    """``async with DomainWatch(uri, globs) as watch``: :attr:`running` now, :meth:`next` later."""

    def __init__(self, uri: str, patterns: Sequence[str] = ()) -> None:
        self.uri = uri
        self.patterns = tuple(patterns)
        #: running matching domains: name -> uuid
        self.running: dict[str, str] = {}
        self._conn: Any = None
        self._callback: int | None = None
        self._queue: asyncio.Queue[DomainChange] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        libvirt = libvirt_module()
        ensure_event_loop()
        ref = DomainRef(self.uri, "*")
        try:
            self._conn = await asyncio.to_thread(libvirt.openReadOnly, self.uri)
        except libvirt.libvirtError as err:
            raise translate(err, ref, "connect") from err
        loop = asyncio.get_running_loop()
        try:
            # Subscribe before listing: a domain starting in between is seen twice, not never.
            self._callback = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, loop
            )
            self._conn.registerCloseCallback(self._on_close, loop)
            domains = await asyncio.to_thread(
                self._conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
            )
            for dom in domains:
                if matches(dom.name(), self.patterns):
                    self.running[dom.name()] = dom.UUIDString()
        except libvirt.libvirtError as err:
            await self.close()
            raise translate(err, ref, "list the domains") from err
        return self

    def _on_lifecycle(
        self, _conn: Any, dom: Any, event: int, _detail: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        libvirt = libvirt_module()
        name = dom.name()
        if not matches(name, self.patterns):
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            change = DomainChange(name, dom.UUIDString(), running=True, reason="started")
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            reason = "stopped" if event == libvirt.VIR_DOMAIN_EVENT_STOPPED else "crashed"
            change = DomainChange(name, dom.UUIDString(), running=False, reason=reason)
        else:
            return
        loop.call_soon_threadsafe(self._queue.put_nowait, change)

    def _on_close(self, _conn: Any, _reason: int, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._queue.put_nowait, _CLOSED)

    async def next(self) -> DomainChange:
        """The next change (waits); :attr:`running` is updated before it is returned."""
        change = await self._queue.get()
        if change is _CLOSED:
            raise LibvirtUnavailable(f"libvirt {self.uri}", change.reason)
        if change.running:
            if change.name in self.running:
                return await self.next()  # listed at start already
            self.running[change.name] = change.uuid
        else:
            self.running.pop(change.name, None)
        return change

    async def close(self) -> None:
        """Unsubscribe and close the connection. Idempotent."""
        libvirt = libvirt_module()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if self._callback is not None:
                conn.domainEventDeregisterAny(self._callback)
            conn.unregisterCloseCallback()
        self._callback = None
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(conn.close)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
