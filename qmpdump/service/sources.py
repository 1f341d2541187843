"""VMs the daemon reaches other than through a QMP connection of its own, kept up.

* :class:`OnDemandSupervisor` -- a ``[[vm]]``/``[[discover]]`` with ``connect = "on-demand"``:
  the socket is shared with other tools, so the daemon holds no connection. A job or a map
  request connects, uses the session, and disconnects when done (a job and a map request at the
  same time share one session). QEMU serves one client per QMP socket and leaves a second one
  waiting for its greeting (and, once its listen backlog is full, refuses with EAGAIN): a
  greeting that does not come within :data:`ON_DEMAND_GREETING_S` means another client holds
  the socket; the connect is retried with backoff
  (``reconnect_min_s`` doubled up to ``reconnect_max_s``) for up to ``[daemon]
  on_demand_wait_s``, and the VM's ``reason`` says that the socket is busy. What events would
  have told a connected supervisor (run state, a pause the daemon journalled) is read again on
  every connect (the ``on_connect`` hook).
* :class:`LibvirtSupervisor` -- a running libvirt domain that a ``[[libvirt]]`` entry found.
  ``monitor = "passthrough"``: the session is :class:`~qmpdump.qmp.passthrough.LibvirtQMPSession`,
  kept up like a socket's; jobs of QEMU's engine (and non-ELF formats) still go through
  libvirt's dump API (libvirt 9.0 crashes on a dump it did not start). ``monitor =
  "supported"``: no QMP at all; the state is polled through a read-only libvirt connection,
  the map is :func:`~qmpdump.libvirt.supported.map_supported`, a dump is
  :func:`~qmpdump.libvirt.supported.dump_supported` (QEMU's engine through libvirt's API).
* :class:`LibvirtWatcher` -- one ``[[libvirt]]`` entry followed through
  :class:`~qmpdump.libvirt.watch.DomainWatch`: it tells the daemon which domains appear and
  disappear, and reconnects to libvirtd with backoff (a fresh watch lists the running domains
  again, so a change missed while disconnected is caught up).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from qmpdump.engines.base import PauseHooks, ProgressCallback
from qmpdump.engines.run import DumpOutcome, run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName, Mode
from qmpdump.errors import (
    DumpFailed,
    QMPConnectError,
    QmpdumpError,
    QMPTimeout,
    Unavailable,
    UnsafeThroughLibvirt,
    UsageError,
)
from qmpdump.libvirt.connection import DomainRef
from qmpdump.qmp.probe import read_vm_facts
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.service.config import Config, DaemonConfig, ResolvedVM
from qmpdump.service.supervisor import VMSupervisor
from qmpdump.service.views import ConnectionState, LibvirtMapView
from qmpdump.survey import survey

__all__ = ["LibvirtSupervisor", "LibvirtWatcher", "OnDemandSupervisor", "make_supervisor"]

log = logging.getLogger(__name__)

#: How long QEMU may take to greet an on-demand connection before the socket counts as busy.
ON_DEMAND_GREETING_S = 3.0
#: How often the state of a domain in supported mode is read.
_POLL_S = 2.0

OnConnect = Callable[[QMPSession], Awaitable[None]]


def make_supervisor(
    vm: ResolvedVM, settings: DaemonConfig, *, on_connect: OnConnect | None = None
) -> VMSupervisor:
    """The supervisor for a VM, as its configuration says."""
    if vm.libvirt is not None:
        return LibvirtSupervisor(vm, settings, on_connect=on_connect)
    if vm.on_demand:
        return OnDemandSupervisor(vm, settings, on_connect=on_connect)
    return VMSupervisor(vm, settings, on_connect=on_connect)


def _backlog_full(err: QMPConnectError) -> bool:
    """Whether connect() failed because QEMU's listen backlog is full (EAGAIN on a UNIX
    socket): connections wait there while another client holds the monitor."""
    cause = err.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.EAGAIN


class OnDemandSupervisor(VMSupervisor):
    """A VM whose QMP socket is connected only while a job or a map request uses it."""

    greeting_s = ON_DEMAND_GREETING_S

    def __init__(
        self, vm: ResolvedVM, daemon: DaemonConfig, *, on_connect: OnConnect | None = None
    ) -> None:
        super().__init__(vm, daemon, on_connect=on_connect)
        self.reason = "on demand: connected only for a job or a map request"
        self._lock = asyncio.Lock()
        self._users = 0
        #: connects that found the socket busy (for the VM's view and the tests)
        self.busy_retries = 0

    async def run(self) -> None:
        """Nothing to keep up: the connection is made per request."""
        await asyncio.Event().wait()

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[QMPSession]:
        """Connect (or share the session already open), yield it, disconnect when the last
        user is done."""
        async with self._lock:
            if self._users == 0 or self.session is None or not self.session.connected:
                await self._connect_retrying()
            session = self.session
            assert session is not None
            self._users += 1
        try:
            yield session
        finally:
            self._users -= 1
            if self._users == 0:
                await self._release()

    async def map(self) -> MapReport:
        async with self.borrow() as session:
            return (await survey(session)).report()

    async def _connect_retrying(self) -> None:
        wait_s = self.daemon.on_demand_wait_s
        deadline = time.monotonic() + wait_s
        delay = self.daemon.reconnect_min_s
        attempt = 0
        self.state = ConnectionState.CONNECTING
        while True:
            attempt += 1
            try:
                try:
                    await self._connect_once()
                    return
                except QMPConnectError as err:
                    if not _backlog_full(err):
                        raise
                    raise QMPTimeout("connect (the socket's backlog is full)", 0.0) from err
            except QMPTimeout as err:  # no greeting: another client holds the socket
                self.busy_retries += 1
                self.reason = (
                    f"the QMP socket is busy with another client (attempt {attempt}; QEMU "
                    "serves one client at a time)"
                )
                log.info("VM %s: %s", self.vm.name, self.reason)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._idle()
                    raise Unavailable(
                        f"VM {self.vm.name}: its QMP socket stayed busy with another client "
                        f"for {wait_s:g} s ({attempt} attempts)"
                    ) from err
            except QmpdumpError as err:
                self.reason = str(err)
                self._idle()
                raise Unavailable(f"VM {self.vm.name} is not reachable: {err}") from err
            except BaseException:
                self._idle()
                raise
            await asyncio.sleep(min(delay, max(left, 0.0)))
            delay = min(delay * 2, self.daemon.reconnect_max_s)

    async def _connect_once(self) -> None:
        session = self.new_session(min(self.greeting_s, self.daemon.qmp_timeout_s))
        await session.connect()
        session.timeout_s = self.daemon.qmp_timeout_s
        try:
            # Nothing followed the VM while disconnected: read its state afresh, and let the
            # hook resume a pause the daemon journalled, before the request uses the session.
            facts = await read_vm_facts(session)
            if self.on_connect is not None:
                await self.on_connect(session)
        except BaseException:
            await session.disconnect()
            raise
        self.session = session
        self.pid = facts.pid
        self.qemu_version = facts.qemu_version
        self.run_state = facts.run_state
        self.state = ConnectionState.CONNECTED
        self.reason = None
        self.connected_since = time.time()
        self.connects += 1
        log.info("VM %s: connected on demand (pid %s)", self.vm.name, facts.pid)

    async def _release(self) -> None:
        session, self.session = self.session, None
        self._idle()
        if session is not None:
            await session.disconnect()
            log.info("VM %s: disconnected (on demand)", self.vm.name)

    def _idle(self) -> None:
        self.state = ConnectionState.DISCONNECTED
        self.connected_since = None
        self.run_state = None  # not followed while disconnected: read again on connect
        if self.reason is None:
            self.reason = "on demand: connected only for a job or a map request"


class LibvirtSupervisor(VMSupervisor):
    """A running libvirt domain, in the monitor mode of its ``[[libvirt]]`` entry."""

    def __init__(
        self, vm: ResolvedVM, daemon: DaemonConfig, *, on_connect: OnConnect | None = None
    ) -> None:
        super().__init__(vm, daemon, on_connect=on_connect)
        assert vm.libvirt is not None
        self.where = vm.libvirt
        from qmpdump.libvirt.supported import use_fifo_dir  # noqa: PLC0415 - optional extra

        use_fifo_dir(daemon.state_dir)  # not the unit's private /tmp: libvirtd opens the FIFO
        self.ref = DomainRef(vm.libvirt.uri, vm.libvirt.domain)

    @property
    def passthrough(self) -> bool:
        """Whether QMP goes through libvirt's monitor passthrough."""
        return self.where.monitor == "passthrough"

    def new_session(self, timeout_s: float) -> QMPSession:
        from qmpdump.qmp.passthrough import LibvirtQMPSession  # noqa: PLC0415 - optional extra

        return LibvirtQMPSession(self.ref, timeout_s=timeout_s, name=f"qmpdump-{self.vm.name}")

    async def run(self) -> None:
        if self.passthrough:
            await super().run()
        else:
            await self._follow_supported()

    async def _follow_supported(self) -> None:
        """Supported mode: libvirt's read-only API says whether the domain runs, and its state."""
        from qmpdump.libvirt.connection import (  # noqa: PLC0415 - optional extra
            libvirt_module,
            open_domain,
            qemu_pid,
            translate,
        )
        from qmpdump.libvirt.supported import STATE_NAMES  # noqa: PLC0415 - optional extra

        libvirt = libvirt_module()
        delay = self.daemon.reconnect_min_s
        while True:
            self.state = ConnectionState.CONNECTING
            conn: Any = None
            try:
                conn, dom = await asyncio.to_thread(open_domain, self.ref, read_only=True)
                version = await asyncio.to_thread(conn.getVersion)
                uuid = await asyncio.to_thread(dom.UUIDString)
                self.qemu_version = (
                    f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
                )
                self.pid = await asyncio.to_thread(qemu_pid, self.ref.uri, self.ref.name, uuid)
                self.connected_since = time.time()
                self.connects += 1
                while True:
                    state, _reason = await asyncio.to_thread(dom.state)
                    self.run_state = STATE_NAMES.get(state, str(state))
                    self.state = ConnectionState.CONNECTED
                    self.reason = None
                    delay = self.daemon.reconnect_min_s
                    await asyncio.sleep(_POLL_S)
            except libvirt.libvirtError as err:
                self.reason = str(translate(err, self.ref, "read the domain"))
            except QmpdumpError as err:
                self.reason = str(err)
            finally:
                self._down()
                if conn is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        await asyncio.to_thread(conn.close)
            log.info("VM %s: %s", self.vm.name, self.reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.daemon.reconnect_max_s)

    async def map(self) -> MapReport | LibvirtMapView:  # type: ignore[override]
        if self.passthrough:
            return await super().map()
        from qmpdump.libvirt.supported import map_supported  # noqa: PLC0415 - optional extra

        return LibvirtMapView((await map_supported(self.ref)).to_dict())

    async def dump(
        self,
        target: Path,
        spec: DumpSpec,
        *,
        progress: ProgressCallback | None,
        hooks: PauseHooks,
        timeout_s: float,
    ) -> DumpOutcome:
        through_api = not self.passthrough or (
            spec.engine is EngineName.QEMU or spec.format is not DumpFormat.ELF
        )
        if not through_api:
            try:
                async with self.borrow() as session:
                    return await run_dump(
                        session, target, spec, progress=progress, hooks=hooks, timeout_s=timeout_s
                    )
            except UnsafeThroughLibvirt:
                pass  # auto chose QEMU's engine: libvirt's dump API takes it (as the CLI does)
        return await self._dump_through_api(target, spec, progress, timeout_s)

    async def _dump_through_api(
        self,
        target: Path,
        spec: DumpSpec,
        progress: ProgressCallback | None,
        timeout_s: float,
    ) -> DumpOutcome:
        from qmpdump.libvirt.supported import dump_supported  # noqa: PLC0415 - optional extra

        if spec.engine is EngineName.BACKEND or spec.mode is Mode.LIVE:
            raise UsageError(
                f"VM {self.vm.name}: the backend engine and live dumps need "
                'monitor = "passthrough" in its [[libvirt]] entry'
            )
        try:
            async with asyncio.timeout(timeout_s) as limit:
                return await dump_supported(
                    self.ref,
                    target,
                    fmt=spec.format.value,
                    fix_elf_header=spec.fix_elf_header,
                    progress=progress,
                    monitor=self.where.monitor,
                )
        except TimeoutError as err:
            if limit.expired():
                raise DumpFailed(f"the dump did not finish within {timeout_s:g} s") from err
            raise


class LibvirtWatcher:
    """Follows the running domains of one ``[[libvirt]]`` entry; :meth:`run` is a long-lived
    task that calls ``appear`` and ``gone`` as domains start and stop (``appear`` says False
    when the daemon has a VM of that name already: the domain is then not this entry's)."""

    def __init__(
        self,
        config: Config,
        index: int,
        *,
        appear: Callable[[ResolvedVM], bool],
        gone: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self.index = index
        self.entry = config.libvirt[index]
        self.appear = appear
        self.gone = gone
        #: domains of this entry that are VMs now
        self.domains: set[str] = set()
        self.reason: str | None = "not connected yet"

    async def run(self) -> None:
        """Watch, reconnect with backoff: until cancelled."""
        from qmpdump.libvirt.watch import DomainWatch  # noqa: PLC0415 - optional extra

        settings = self.config.daemon
        delay = settings.reconnect_min_s
        while True:
            try:
                async with DomainWatch(self.entry.uri, self.entry.domains) as watch:
                    self.reason = None
                    delay = settings.reconnect_min_s
                    for name in sorted(self.domains - set(watch.running)):
                        await self._gone(name, "not running after libvirtd came back")
                    for name in sorted(watch.running):
                        self._appear(name)
                    log.info(
                        "libvirt[%d] %s: %d running domain(s)",
                        self.index,
                        self.entry.uri,
                        len(watch.running),
                    )
                    while True:
                        change = await watch.next()
                        if change.running:
                            self._appear(change.name)
                        else:
                            await self._gone(change.name, f"the domain {change.reason}")
            except QmpdumpError as err:
                self.reason = str(err)
                log.warning("libvirt[%d]: %s (retrying in %g s)", self.index, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.reconnect_max_s)

    def _appear(self, name: str) -> None:
        if name in self.domains:
            return
        vm = self.config.libvirt_vm(self.index, name)
        if vm is None:
            log.warning("libvirt[%d]: domain %r is not a valid VM name: skipped", self.index, name)
            return
        if self.appear(vm):
            self.domains.add(name)

    async def _gone(self, name: str, reason: str) -> None:
        if name in self.domains:
            self.domains.discard(name)
            await self.gone(name, reason)
