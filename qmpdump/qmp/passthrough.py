"""QMP through libvirt's monitor passthrough, behind the surface of :class:`QMPSession`.

libvirt owns the monitor of every domain it runs; ``virDomainQemuMonitorCommandWithFiles``
(``libvirt_qemu.qemuMonitorCommandWithFiles``) sends one QMP command on it, with at most one file
descriptor (what ``getfd`` needs), and ``virConnectDomainQemuMonitorEventRegister``
(``libvirt_qemu.qemuMonitorEventRegister``) delivers QEMU's events, which ``libvirtaio``
dispatches on the asyncio loop. :class:`LibvirtQMPSession` offers what the engines, the survey and
the exact-plug probe use of a :class:`QMPSession` (``execute``, ``hmp``, ``listen``,
``pass_fd``/``close_fd``, ``pid``, ``where``, ``connected``, ``timeout_s``), so they run unchanged.

Costs, stated by libvirt: the first passthrough command marks the domain *tainted*
(``custom-monitor``) for the rest of its life, and libvirt does not track what such commands
change. qmpdump sends only what it sends over a socket of its own: queries, ``stop``/``cont``
(libvirt follows them through the STOP/RESUME events), ``getfd``/``closefd`` and
``dump-guest-memory`` into our own pipe.

Not passed through: ``dump-guest-memory``. libvirt 9.0's libvirtd segfaults on the
``DUMP_COMPLETED`` event of a dump it did not start itself (measured: ``virsh qemu-monitor-command
DOM dump-guest-memory`` kills libvirtd in its per-domain event thread), so QEMU's dump always
goes through libvirt's own API: :meth:`LibvirtQMPSession.read_dump_prefix` (QEMU's headers and
notes, for the backend engine and ``--exact-plug``) starts ``virDomainCoreDumpWithFormat`` into a
FIFO of ours, reads the prefix and closes the FIFO (QEMU's next write fails, libvirt ends its job
and restores the run state); a full QEMU dump is the supported path's
(:mod:`qmpdump.libvirt.supported`).

QEMU's pid comes from libvirt (:func:`qmpdump.libvirt.connection.qemu_pid`). The session is
"connected" while the domain runs and libvirtd's connection is up: a domain that stops (lifecycle
event) or a connection that closes ends it, so an engine in flight sees QEMU gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from qemu.qmp.message import Message

from qmpdump.errors import (
    LibvirtError,
    QMPCommandError,
    QMPDisconnected,
    QMPReplyError,
    QMPTimeout,
    UnsafeThroughLibvirt,
)
from qmpdump.libvirt.connection import (
    DomainRef,
    ensure_event_loop,
    libvirt_module,
    open_domain,
    qemu_pid,
    translate,
)
from qmpdump.qmp.session import DEFAULT_TIMEOUT_S, EventQueue, QMPSession, _Listener

__all__ = ["NOT_PASSED_THROUGH", "LibvirtQMPSession"]

#: QMP commands this session never sends through libvirt (see the module docstring)
NOT_PASSED_THROUGH = frozenset({"dump-guest-memory"})

log = logging.getLogger(__name__)


class _Queue(_Listener):
    """A listener fed from libvirt's callbacks (on the loop thread, synchronously)."""

    def offer(self, event: Message) -> None:
        if self.accept(event):
            self._queue.put_nowait(event)


class _FdStash:
    """The fd :meth:`LibvirtQMPSession.pass_fd` hands to the next ``getfd``, which
    :meth:`LibvirtQMPSession.execute` sends through ``qemuMonitorCommandWithFiles`` (a dup of
    the caller's fd, closed once sent)."""

    def __init__(self) -> None:
        self.pending: int | None = None

    def put(self, fd: int) -> None:
        self.take()
        self.pending = os.dup(fd)

    def take(self) -> None:
        fd, self.pending = self.pending, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _parse_reply(command: str, text: str) -> Any:
    """The ``return`` of QEMU's reply as libvirt relays it, or the matching error."""
    try:
        reply = json.loads(text)
    except ValueError as err:
        raise QMPReplyError(command, f"not JSON: {text[:200]!r}") from err
    if not isinstance(reply, dict):
        raise QMPReplyError(command, f"not a JSON object: {text[:200]!r}")
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], dict) else {}
        raise QMPCommandError(
            command, str(error.get("class", "")), str(error.get("desc", reply["error"]))
        )
    return reply.get("return")


class LibvirtQMPSession(QMPSession):
    """A QMP session with a libvirt domain's QEMU, through libvirt's monitor passthrough."""

    def __init__(
        self,
        ref: DomainRef,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str = "qmpdump",
    ) -> None:
        super().__init__(ref.describe("passthrough"), timeout_s=timeout_s, name=name)
        self.ref = ref
        self._stash = _FdStash()
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[int] = []
        self._lifecycle: int | None = None
        self._listeners: set[_Queue] = set()
        self._alive = False

    @property
    def where(self) -> str:
        """URI, domain and path, as maps and sidecars show them."""
        return self.ref.describe("passthrough")

    @property
    def pid(self) -> int | None:
        """QEMU's pid, from libvirt (None for a remote libvirt)."""
        return self._pid

    @property
    def connected(self) -> bool:
        """Whether the domain runs and libvirt's connection is up."""
        return self._alive

    @property
    def domain(self) -> Any:
        """The ``libvirt.virDomain`` (for :mod:`qmpdump.libvirt` code)."""
        return self._dom

    async def connect(self) -> None:
        """Open libvirt, find the running domain, its QEMU's pid, and subscribe to events."""
        libvirt = libvirt_module()
        import libvirt_qemu  # noqa: PLC0415 - optional extra

        ensure_event_loop()
        self._conn, self._dom = await asyncio.to_thread(open_domain, self.ref)
        try:
            active = await asyncio.to_thread(self._dom.isActive)
            if not active:
                raise translate(libvirt.libvirtError("domain is not running"), self.ref, "connect")
            uuid = await asyncio.to_thread(self._dom.UUIDString)
            self._pid = await asyncio.to_thread(qemu_pid, self.ref.uri, self.ref.name, uuid)
            loop = asyncio.get_running_loop()
            self._callbacks.append(
                libvirt_qemu.qemuMonitorEventRegister(
                    self._conn, self._dom, None, self._on_monitor_event, loop, 0
                )
            )
            self._lifecycle = self._conn.domainEventRegisterAny(
                self._dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, loop
            )
            self._conn.registerCloseCallback(self._on_close, loop)
        except libvirt.libvirtError as err:
            await self.disconnect()
            raise translate(err, self.ref, "connect") from err
        except BaseException:
            await self.disconnect()
            raise
        self._alive = True
        self._connected = True
        log.debug("libvirt passthrough to %s (pid %s)", self.where, self._pid)

    def _on_monitor_event(
        self,
        _conn: Any,
        _dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        message: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": seconds, "microseconds": micros},
        }
        if details:
            with contextlib.suppress(ValueError):
                message["data"] = json.loads(details)
        loop.call_soon_threadsafe(self._deliver, Message(message))

    def _deliver(self, message: Message) -> None:
        for listener in list(self._listeners):
            listener.offer(message)

    def _on_lifecycle(
        self, _conn: Any, _dom: Any, event: int, _detail: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        libvirt = libvirt_module()
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            loop.call_soon_threadsafe(self._gone, "the domain stopped")

    def _on_close(self, _conn: Any, _reason: int, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._gone, "libvirtd closed the connection")

    def _gone(self, why: str) -> None:
        if self._alive:
            log.info("%s: %s", self.where, why)
        self._alive = False

    def _command(self, text: str, fd: int | None) -> str:
        import libvirt_qemu  # noqa: PLC0415 - optional extra

        if fd is None:
            return str(libvirt_qemu.qemuMonitorCommand(self._dom, text, 0))
        reply, files = libvirt_qemu.qemuMonitorCommandWithFiles(self._dom, text, [fd], 0)
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        return str(reply)

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Run one QMP command through libvirt and return its ``return`` value."""
        libvirt = libvirt_module()
        if command in NOT_PASSED_THROUGH:
            raise UnsafeThroughLibvirt(
                command,
                "qmpdump",
                "not sent through libvirt's monitor passthrough (libvirt 9.0's libvirtd "
                "crashes on the DUMP_COMPLETED event of a dump it did not start); QEMU's dump "
                "of a libvirt domain goes through libvirt's API (--monitor supported)",
            )
        if self._dom is None or not self._alive:
            raise QMPDisconnected(f"{self.where}: not connected (the domain is not running)")
        limit = self.timeout_s if timeout_s is None else timeout_s
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        fd = self._stash.pending if command == "getfd" else None
        if fd is not None:
            self._stash.pending = None
        try:
            async with asyncio.timeout(limit):
                text = await asyncio.to_thread(self._command, json.dumps(message), fd)
        except TimeoutError as err:
            raise QMPTimeout(command, limit) from err
        except libvirt.libvirtError as err:
            failure = translate(err, self.ref, command)
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT:
                raise QMPTimeout(f"{command} (libvirt: {failure})", limit) from err
            if type(failure) is not LibvirtError:  # not running, libvirtd gone, ...
                self._alive = False
                raise QMPDisconnected(f"{self.where}: {command!r} failed: {failure}") from err
            raise QMPCommandError(command, "libvirt", str(failure)) from err
        finally:
            if fd is not None:
                os.close(fd)
        return _parse_reply(command, text)

    async def read_dump_prefix(self, *, timeout_s: float = 10.0) -> bytes:
        """QEMU's ELF dump headers and notes, through libvirt's own dump job (see above)."""
        from qmpdump.libvirt.supported import dump_prefix  # noqa: PLC0415 - import cycle

        if self._dom is None or not self._alive:
            raise QMPDisconnected(f"{self.where}: not connected (the domain is not running)")
        return await dump_prefix(self.ref, self._dom, timeout_s=timeout_s)

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventQueue]:
        """Queue the named QEMU events (all, if none is named) while the block runs."""
        listener = _Queue(names or None)
        self._listeners.add(listener)
        try:
            yield EventQueue(listener)
        finally:
            self._listeners.discard(listener)

    async def pass_fd(self, fd: int, *, prefix: str = "qmpdump") -> str:
        """Hand ``fd`` to QEMU with ``getfd`` (``qemuMonitorCommandWithFiles``); its name."""
        fdname = f"{prefix}-{secrets.token_hex(6)}"
        self._stash.put(fd)
        await self.execute("getfd", {"fdname": fdname})
        return fdname

    async def disconnect(self) -> None:
        """Unsubscribe and close libvirt's connection. Idempotent."""
        import libvirt_qemu  # noqa: PLC0415 - optional extra

        self._alive = False
        self._connected = False
        self._stash.take()
        conn, self._conn = self._conn, None
        self._dom = None
        if conn is None:
            return
        libvirt = libvirt_module()
        with contextlib.suppress(libvirt.libvirtError):
            for callback in self._callbacks:
                libvirt_qemu.qemuMonitorEventDeregister(conn, callback)
            if self._lifecycle is not None:
                conn.domainEventDeregisterAny(self._lifecycle)
            conn.unregisterCloseCallback()
        self._callbacks.clear()
        self._lifecycle = None
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(conn.close)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()
