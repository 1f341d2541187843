"""One QEMU ``dump-guest-memory`` into a pipe of ours: the only code that starts one.

:func:`guest_dump` owns the whole exchange (``qapi/dump.json``, ``dump/dump.c``):

1. ``query-status`` (was the VM running?) and ``query-dump`` (is a dump running already?);
2. a pipe (or, for the formats QEMU writes only into a seekable file, ``kdump-raw-*``, a
   sealable memfd: :mod:`qmpdump.qmp.sealsink`); its write end passed to QEMU (``SCM_RIGHTS`` +
   ``getfd``) and closed here;
3. ``dump-guest-memory`` with ``protocol: "fd:NAME"``, ``detach: true``; a refusal releases the
   fd (``closefd``) and becomes :class:`~qmpdump.errors.DumpBusy` or
   :class:`~qmpdump.errors.DumpFailed`;
4. while the caller reads the pipe: ``DUMP_COMPLETED``, ``STOP`` and ``RESUME`` as typed events,
   and the time QEMU kept the VM paused (their own timestamps);
5. on exit: the read end closed or the memfd sealed (QEMU's next write fails with EPIPE or
   EPERM, the dump ends ``failed`` and QEMU restores the run state), ``DUMP_COMPLETED``
   awaited, and ``save-vm`` waited out -- QEMU sends RESUME after DUMP_COMPLETED and before
   ``query-status`` shows the VM running.

Every error is qmpdump's (:mod:`qmpdump.errors`). No ``cont``: QEMU restores the run state itself
(``dump_cleanup``); a VM paused afterwards was paused by someone else, whose decision that is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from qmpdump.errors import (
    DumpBusy,
    DumpError,
    DumpFailed,
    QEMUGone,
    QMPCommandError,
    QMPDisconnected,
    QMPTimeout,
    UnsafeThroughLibvirt,
)
from qmpdump.host.libvirt_owner import libvirt_domain_of
from qmpdump.qmp.events import DumpCompleted, Event, paused_seconds
from qmpdump.qmp.models import DumpQueryResult, parse_reply
from qmpdump.qmp.probe import query_status
from qmpdump.qmp.sealsink import SealSink
from qmpdump.qmp.session import EventQueue, QMPSession

__all__ = ["DumpArguments", "GuestDump", "dump_busy", "guest_dump", "wait_out_save_vm"]

F_SETPIPE_SZ = 1031  # fcntl.h; Python exposes it only as fcntl.F_SETPIPE_SZ on 3.10+ Linux
#: /proc/sys/fs/pipe-max-size's default: fewer wake-ups per MiB
DEFAULT_PIPE_SIZE = 1 << 20
#: how long exit waits for DUMP_COMPLETED after closing the pipe early (QEMU answers in about
#: 2 ms when it runs; a hung one must not hold up a cancel or Ctrl-C: issue 11, item 10)
_ABORT_WAIT_S = 1.5
#: and then for the run state to leave ``save-vm``
_ABORT_SETTLE_S = 0.4
_EVENTS = ("DUMP_COMPLETED", "STOP", "RESUME")


@dataclass(frozen=True, slots=True)
class DumpArguments:
    """What to ask ``dump-guest-memory`` for (``begin``/``length``/``paging``: ELF only)."""

    format: str = "elf"
    paging: bool = False
    begin: int | None = None
    length: int | None = None

    def qmp(self, fdname: str) -> dict[str, Any]:
        """The command's arguments, writing to the passed fd ``fdname``."""
        args: dict[str, Any] = {
            "paging": self.paging,
            "protocol": f"fd:{fdname}",
            "detach": True,
            "format": self.format,
        }
        if self.begin is not None:
            args["begin"] = self.begin
            args["length"] = self.length
        return args


def dump_busy(err: QMPCommandError) -> bool:
    """Whether QEMU refused a dump because one is running (7.2: "There is a dump in process,
    please wait.")."""
    return any(s in err.description for s in ("in process", "in progress", "already"))


async def wait_out_save_vm(
    session: QMPSession, was_running: bool, *, deadline_s: float = 5.0
) -> None:
    """Return once QEMU has left ``save-vm`` after a dump (it resumes the VM it paused), or
    after ``deadline_s``: a hung QEMU must not hold up a cancel (QEMU restores the run state
    itself once it finishes the failed dump)."""
    if not was_running or not session.connected:
        return
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    with contextlib.suppress(QMPDisconnected, QMPTimeout, QMPCommandError):
        while (left := end - loop.time()) > 0:
            status = await session.execute("query-status", timeout_s=left)
            if status.get("status") != "save-vm":
                return
            await asyncio.sleep(0.025)


@dataclass(eq=False)
class GuestDump:
    """A running ``dump-guest-memory``: read :attr:`read_fd` (non-blocking) until end of file,
    or, with a seekable target, wait for :meth:`finished` and copy :attr:`sink`."""

    session: QMPSession
    read_fd: int
    was_running: bool
    #: the DUMP_COMPLETED/STOP/RESUME events heard so far
    events: list[Event] = field(default_factory=list)
    completed: DumpCompleted | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, event: Event) -> None:
        """Record one event (the listener's pump calls this)."""
        self.events.append(event)
        if event.event == "DUMP_COMPLETED" and self.completed is None:
            self.completed = DumpCompleted.model_validate(event.data)
            self._done.set()

    @property
    def paused_s(self) -> float | None:
        """Seconds QEMU kept the VM paused (STOP to RESUME), None if it did not pause it."""
        return paused_seconds(self.events)

    #: the sealable memfd QEMU writes into instead of the pipe (``seekable=True``)
    sink: SealSink | None = None

    def close_pipe(self) -> None:
        """Close our read end (or seal the memfd): QEMU's next write fails and the dump stops.

        Idempotent."""
        if self.sink is not None:
            self.sink.close()
            self.read_fd = -1
        elif self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    async def query(self) -> DumpQueryResult | None:
        """QEMU's counters now (``query-dump``); None if QEMU does not answer in time."""
        try:
            raw = await self.session.execute("query-dump", timeout_s=5.0)
        except (QMPDisconnected, QMPTimeout):
            return None
        return parse_reply(DumpQueryResult, raw, "query-dump")

    def check_alive(self) -> None:
        """Raise :class:`QEMUGone` if the QMP connection has closed."""
        if not self.session.connected:
            raise QEMUGone("QEMU went away during the dump (QMP connection closed)")

    async def finished(self, timeout_s: float) -> DumpCompleted:
        """Wait for DUMP_COMPLETED; :class:`QEMUGone` if QEMU goes, QMPTimeout after
        ``timeout_s``."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + timeout_s
        while self.completed is None:
            self.check_alive()
            if loop.time() > limit:
                raise QMPTimeout("DUMP_COMPLETED", timeout_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._done.wait()
        return self.completed

    async def verdict(self, timeout_s: float) -> DumpCompleted:
        """:meth:`finished`, raising :class:`DumpFailed` unless QEMU says completed."""
        try:
            done = await self.finished(timeout_s)
        except QMPTimeout as err:
            raise QEMUGone(
                f"no DUMP_COMPLETED within {timeout_s:g} s of the end of the data"
            ) from err
        if not done.succeeded:
            raise DumpFailed(
                f"QEMU reports the dump {done.result.status or 'failed'}: "
                f"{done.error or 'no reason'}"
            )
        return done


async def _precheck(session: QMPSession) -> bool:
    status = await query_status(session)
    if status.status == "inmigrate":
        raise DumpError("the VM is in incoming migration: its memory is not complete yet")
    current = parse_reply(DumpQueryResult, await session.execute("query-dump"), "query-dump")
    if current.status == "active":
        raise DumpBusy("QEMU is already running a dump of this VM")
    return status.running


async def _pump(queue: EventQueue, dump: GuestDump) -> None:
    while True:
        dump.take(await queue.get())


async def _start(session: QMPSession, write_fd: int, args: DumpArguments) -> None:
    fdname = await session.pass_fd(write_fd)
    try:
        await session.execute("dump-guest-memory", args.qmp(fdname))
    except QMPCommandError as err:
        await session.close_fd(fdname)
        if dump_busy(err):
            raise DumpBusy(f"QEMU is already dumping: {err.description}") from err
        raise DumpFailed(f"QEMU refused the dump: {err.description}") from err
    except QMPDisconnected as err:
        raise QEMUGone("the QMP connection dropped as the dump started") from err


async def _refuse_under_libvirt(session: QMPSession) -> None:
    """No dump of a libvirt domain's QEMU through a QMP socket beside libvirt's monitor.

    QEMU sends DUMP_COMPLETED on every monitor, and libvirt 9.0's libvirtd segfaults on one that
    ends a dump it did not start (measured: a dump through a second ``-qmp`` socket kills
    libvirtd). ``--libvirt DOMAIN`` dumps such a VM through libvirt's API instead.
    """
    if session.pid is None:
        return
    domain = await asyncio.to_thread(libvirt_domain_of, session.pid)
    if domain is not None:
        raise UnsafeThroughLibvirt(
            "dump-guest-memory",
            "qmpdump",
            f"QEMU pid {session.pid} runs libvirt domain {domain!r}, and libvirtd crashes on the "
            "DUMP_COMPLETED event of a dump it did not start; use --libvirt "
            f"{domain} (QEMU's dump through libvirt's API)",
        )


@contextlib.asynccontextmanager
async def guest_dump(
    session: QMPSession,
    args: DumpArguments,
    *,
    pipe_size: int = DEFAULT_PIPE_SIZE,
    seekable: bool = False,
) -> AsyncIterator[GuestDump]:
    """Start ``dump-guest-memory`` into a new pipe; yield it; stop and settle it on exit.

    ``seekable``: QEMU writes into a sealable memfd (:mod:`qmpdump.qmp.sealsink`) instead, for
    the formats QEMU writes only into a seekable file (``kdump-raw-*``); sealing it stops QEMU
    as closing the pipe does.

    On exit (normal, error or cancel) the pipe is closed, QEMU's DUMP_COMPLETED awaited (up to
    10 s when the pipe was closed early) and ``save-vm`` waited out: the VM's run state is then
    what it was before. The caller judges success with :meth:`GuestDump.verdict` inside the
    block, after reading to end of file.
    """
    await _refuse_under_libvirt(session)
    was_running = await _precheck(session)
    sink: SealSink | None = None
    if seekable:
        sink = SealSink.create()
        read_fd, write_fd = sink.fd, os.dup(sink.fd)
    else:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # a smaller pipe only costs wake-ups
                fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), pipe_size)
            os.set_blocking(read_fd, False)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
    dump = GuestDump(session, read_fd, was_running, sink=sink)
    with session.listen(*_EVENTS) as queue:
        pump = asyncio.create_task(_pump(queue, dump), name="dump-events")
        try:
            try:
                await _start(session, write_fd, args)
            finally:
                os.close(write_fd)  # QEMU holds its own copy now (or none: refused)
            try:
                yield dump
            finally:
                dump.close_pipe()
                # Cut short after a cancel or a failure (QEMU may be hung): within about 2 s.
                early = dump.completed is None
                if early:
                    with contextlib.suppress(DumpError, QMPTimeout):
                        await dump.finished(_ABORT_WAIT_S)
                # Still listening: the RESUME comes after DUMP_COMPLETED.
                await wait_out_save_vm(
                    session, was_running, deadline_s=_ABORT_SETTLE_S if early else 5.0
                )
        finally:
            dump.close_pipe()
            pump.cancel()
            await asyncio.wait([pump])
            for event in queue.drain():
                dump.take(event)
