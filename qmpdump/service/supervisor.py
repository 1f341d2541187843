"""One QMP connection per VM, kept up: connect, follow events, reconnect with backoff.

The supervisor owns the daemon's only QMP session with its VM (QEMU serves one client per
monitor socket); dump jobs borrow it. While connected it follows ``STOP``, ``RESUME``,
and ``SHUTDOWN`` to keep the run state current.
When QEMU goes away (or its socket is not there yet) the supervisor says why, waits, and tries
again, doubling the delay from ``reconnect_min_s`` up to ``reconnect_max_s``.

An ``on_connect`` hook runs on each new session before anyone else may use it (before
:meth:`VMSupervisor.wait_connected` returns it): the daemon resumes a VM it left paused there,
so that no dump ever starts on a VM that is about to be resumed under it.

Jobs and map requests use a VM through :meth:`VMSupervisor.dump` and :meth:`VMSupervisor.map`;
:mod:`qmpdump.service.sources` has the supervisors that connect on demand only, and those of
libvirt domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from qmpdump.engines.base import PauseHooks, ProgressCallback
from qmpdump.engines.run import DumpOutcome, run_dump
from qmpdump.engines.spec import DumpSpec
from qmpdump.errors import QmpdumpError, Unavailable
from qmpdump.qmp.events import Event
from qmpdump.qmp.probe import read_vm_facts
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.service.config import DaemonConfig, ResolvedVM
from qmpdump.service.views import ConnectionState
from qmpdump.survey import survey

__all__ = ["VMSupervisor"]

log = logging.getLogger(__name__)

_RUN_STATE_OF = {"STOP": "paused", "RESUME": "running", "SHUTDOWN": "shutdown"}
#: The events a supervisor follows.
VM_EVENTS = tuple(_RUN_STATE_OF)


class VMSupervisor:
    """Keeps one VM's QMP session up; :meth:`run` is a long-lived task."""

    def __init__(
        self,
        vm: ResolvedVM,
        daemon: DaemonConfig,
        *,
        on_connect: Callable[[QMPSession], Awaitable[None]] | None = None,
    ) -> None:
        self.vm = vm
        self.daemon = daemon
        self.on_connect = on_connect
        self.state = ConnectionState.DISCONNECTED
        self.reason: str | None = "not connected yet"
        self.session: QMPSession | None = None
        self.run_state: str | None = None
        self.qemu_version: str | None = None
        self.pid: int | None = None
        self.connected_since: float | None = None
        self.connects = 0
        self._up = asyncio.Event()

    def require_session(self) -> QMPSession:
        """The live session; Unavailable when the VM is not connected."""
        session = self.session
        if session is None or not session.connected:
            raise Unavailable(f"VM {self.vm.name} is not connected: {self.reason or 'down'}")
        return session

    async def wait_connected(self, timeout_s: float) -> QMPSession:
        """Wait up to ``timeout_s`` for a connection; Unavailable after that."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        return self.require_session()

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[QMPSession]:
        """The VM's session for one job or map request (waits up to ``qmp_timeout_s``)."""
        yield await self.wait_connected(self.daemon.qmp_timeout_s)

    async def map(self) -> MapReport:
        """A fresh memory map (a map request)."""
        return (await survey(self.require_session())).report()

    async def dump(
        self,
        target: Path,
        spec: DumpSpec,
        *,
        progress: ProgressCallback | None,
        hooks: PauseHooks,
        timeout_s: float,
    ) -> DumpOutcome:
        """One dump of the VM into ``target`` (a job)."""
        async with self.borrow() as session:
            return await run_dump(
                session, target, spec, progress=progress, hooks=hooks, timeout_s=timeout_s
            )

    def new_session(self, timeout_s: float) -> QMPSession:
        """A not yet connected session with the VM."""
        return QMPSession(self.vm.qmp_address, timeout_s=timeout_s, name=f"qmpdump-{self.vm.name}")

    async def run(self) -> None:
        """Connect, follow, reconnect: until cancelled."""
        delay = self.daemon.reconnect_min_s
        while True:
            self.state = ConnectionState.CONNECTING
            try:
                await self._session_once()
                delay = self.daemon.reconnect_min_s  # it was up: start backing off afresh
            except QmpdumpError as err:
                self.reason = str(err)
                log.info("VM %s: %s", self.vm.name, err)
            finally:
                self._down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.daemon.reconnect_max_s)

    def _down(self) -> None:
        self._up.clear()
        self.state = ConnectionState.DISCONNECTED
        self.connected_since = None
        self.run_state = None
        self.session = None

    async def _session_once(self) -> None:
        session = self.new_session(self.daemon.qmp_timeout_s)
        await session.connect()
        try:
            with session.listen(*VM_EVENTS) as listener:
                facts = await read_vm_facts(session)
                if self.on_connect is not None:
                    await self.on_connect(session)  # the listener follows what it changes
                self.session = session
                self.pid = facts.pid
                self.qemu_version = facts.qemu_version
                self.run_state = facts.run_state
                self.state = ConnectionState.CONNECTED
                self.reason = None
                self.connected_since = time.time()
                self.connects += 1
                self._up.set()
                log.info(
                    "VM %s: connected (QEMU %s, pid %s)",
                    self.vm.name,
                    facts.qemu_version,
                    facts.pid,
                )
                while session.connected:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            self._take(await listener.get())
                self.reason = "QEMU closed the QMP connection"
        finally:
            self.session = None
            await session.disconnect()

    def _take(self, event: Event) -> None:
        if event.event in _RUN_STATE_OF:
            self.run_state = _RUN_STATE_OF[event.event]
