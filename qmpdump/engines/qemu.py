"""Engine 1: QEMU's own ``dump-guest-memory``, driven properly.

QEMU writes the dump (``dump/dump.c``) into a pipe whose write end qmpdump opened and passed over
QMP (``getfd``, ``protocol: "fd:NAME"``), so QEMU needs no access to the dump folder. qmpdump
relays the pipe into the output file (:mod:`qmpdump.engines.relay`): byte progress, a sha256 on
the way, the ELF header fix for makedumpfile, and cancel (closing the pipe makes QEMU's next write
fail with EPIPE; the dump ends ``failed`` and QEMU restores the run state).

QEMU 7.2 writes kdump formats only in makedumpfile's *flattened* layout, into a pipe or a file
alike (measured: a seekable fd changes nothing). ``seekable=True`` asks for the standard layout,
which crash and makedumpfile read directly. Where QEMU offers the matching ``kdump-raw-*`` format
(QEMU 8.2 and later; 10.0 here), QEMU writes that layout itself into a sealable memfd
(:mod:`qmpdump.engines.sealsink`: it refuses a pipe, and sealing is how a cancel stops it) that
is copied into the file once QEMU is done. Elsewhere (7.2) the relay places each flattened record
at its offset (:func:`qmpdump.engines.relay.unflatten`, what ``makedumpfile -R`` does) and the
file is hashed once complete. Cancel and progress work the same on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmpdump.engines.relay import CHUNK, RelayState, relay, unflatten
from qmpdump.engines.sealsink import SealSink
from qmpdump.errors import (
    DumpBusy,
    DumpCancelled,
    DumpError,
    DumpFailed,
    QEMUGone,
    QMPCommandError,
    QMPDisconnected,
    QMPTimeout,
    UsageError,
)
from qmpdump.output import DumpFile, write_error
from qmpdump.qmp.models import DumpCapability, DumpQueryResult, StatusInfo, parse_reply
from qmpdump.qmp.plugged import dump_busy, wait_out_save_vm
from qmpdump.qmp.session import QMPSession

__all__ = ["Progress", "QemuDumpRequest", "QemuDumpResult", "dump_with_qemu", "qemu_formats"]

PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size's default: fewer wake-ups per MiB
POLL_S = 0.25
#: QEMU's formats that write the standard kdump layout themselves (QEMU 8.2, qapi/dump.json)
RAW_KDUMP_PREFIX = "kdump-raw-"


@dataclass(frozen=True, slots=True)
class QemuDumpRequest:
    """What to ask ``dump-guest-memory`` for."""

    format: str = "elf"
    paging: bool = False
    begin: int | None = None
    length: int | None = None
    #: rewrite QEMU 7.2's ELF header so that makedumpfile reads it (ELF only)
    fix_elf_header: bool = True
    #: kdump in the standard layout, reassembled from QEMU's flattened stream (hashed after)
    seekable: bool = False

    def check(self, formats: list[str]) -> None:
        """Reject a request QEMU would refuse, before anything starts."""
        if self.format not in formats:
            raise UsageError(
                f"QEMU offers the formats {', '.join(formats)}; {self.format!r} is not one"
            )
        if (self.begin is None) != (self.length is None):
            raise UsageError("begin and length go together")
        if self.begin is not None and self.format != "elf":
            raise UsageError("begin/length are for the elf format only")
        if self.length is not None and self.length <= 0:
            raise UsageError("length must be positive")
        if self.paging and self.format != "elf":
            raise UsageError("paging is for the elf format only")
        if self.seekable and not self.format.startswith("kdump"):
            raise UsageError("seekable (the standard kdump layout) is for the kdump formats only")

    @property
    def standard_layout(self) -> bool:
        """Whether a kdump comes out in the standard layout (else makedumpfile's flattened)."""
        return self.seekable or self.format.startswith(RAW_KDUMP_PREFIX)

    def qemu_format(self, formats: list[str]) -> str:
        """The format to ask QEMU for: a seekable ``kdump-X`` is QEMU's own ``kdump-raw-X``
        where QEMU offers it, so that QEMU writes the standard layout itself."""
        if self.seekable and self.format.startswith("kdump-") and not self.is_raw(self.format):
            raw = RAW_KDUMP_PREFIX + self.format.removeprefix("kdump-")
            if raw in formats:
                return raw
        return self.format

    @staticmethod
    def is_raw(fmt: str) -> bool:
        """Whether QEMU writes ``fmt`` only into a seekable file (``kdump-raw-*``)."""
        return fmt.startswith(RAW_KDUMP_PREFIX)

    def arguments(self, fdname: str, qemu_format: str | None = None) -> dict[str, Any]:
        """The ``dump-guest-memory`` arguments (``qemu_format``: see :meth:`qemu_format`)."""
        args: dict[str, Any] = {
            "paging": self.paging,
            "protocol": f"fd:{fdname}",
            "detach": True,
            "format": qemu_format or self.format,
        }
        if self.begin is not None:
            args["begin"] = self.begin
            args["length"] = self.length
        return args


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a dump stands: bytes written to the file, and QEMU's own counters."""

    written: int
    completed: int
    total: int


@dataclass(frozen=True, slots=True)
class QemuDumpResult:
    """A finished dump (already committed by the caller)."""

    size: int
    sha256: str
    #: seconds the VM was paused by the dump (None if it was not running)
    paused_s: float | None
    total: int
    #: the format QEMU was asked for (``kdump-raw-*`` for a seekable kdump where offered)
    qemu_format: str = ""


async def qemu_formats(session: QMPSession) -> list[str]:
    """The formats this QEMU's ``dump-guest-memory`` offers."""
    raw = await session.execute("query-dump-guest-memory-capability")
    return parse_reply(DumpCapability, raw, "query-dump-guest-memory-capability").formats


def _event_time(event: dict[str, Any]) -> float:
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


class _Watch:
    """Follows one dump: DUMP_COMPLETED, STOP/RESUME for the paused time, QEMU's liveness."""

    def __init__(self, session: QMPSession) -> None:
        self.session = session
        self.completed: dict[str, Any] | None = None
        self.stop_at: float | None = None
        self.resume_at: float | None = None
        self.done = asyncio.Event()

    def take(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "DUMP_COMPLETED":
            self.completed = event
            self.done.set()
        elif name == "STOP" and self.stop_at is None:
            self.stop_at = _event_time(event)
        elif name == "RESUME" and self.stop_at is not None:
            self.resume_at = _event_time(event)

    @property
    def paused_s(self) -> float | None:
        if self.stop_at is None or self.resume_at is None:
            return None
        return max(0.0, self.resume_at - self.stop_at)


async def _pass_fd(session: QMPSession, fd: int) -> str:
    fdname = f"qmpdump-{secrets.token_hex(6)}"
    session.client.send_fd_scm(fd)
    await session.execute("getfd", {"fdname": fdname})
    return fdname


async def _closefd(session: QMPSession, fdname: str) -> None:
    with contextlib.suppress(QMPCommandError, QMPDisconnected, QMPTimeout):
        await session.execute("closefd", {"fdname": fdname}, timeout_s=2.0)


async def dump_with_qemu(
    session: QMPSession,
    output: DumpFile,
    request: QemuDumpRequest,
    *,
    progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    timeout_s: float = 3600.0,
) -> QemuDumpResult:
    """Run one ``dump-guest-memory`` into ``output`` (not committed here: the caller does).

    Raises a :class:`~qmpdump.errors.DumpError` subclass on every failure; the run state of
    the VM is then what it was before.
    """
    formats = await qemu_formats(session)
    request.check(formats)
    qemu_format = request.qemu_format(formats)
    status = parse_reply(StatusInfo, await session.execute("query-status"), "query-status")
    if status.status == "inmigrate":
        raise DumpError("the VM is in incoming migration: its memory is not complete yet")
    current = parse_reply(DumpQueryResult, await session.execute("query-dump"), "query-dump")
    if current.status == "active":
        raise DumpBusy("QEMU is already running a dump of this VM")
    run = _QemuDump(
        session,
        output,
        request=request,
        progress=progress,
        cancel=cancel or asyncio.Event(),
        timeout_s=timeout_s,
        qemu_format=qemu_format,
    )
    with session.listen("DUMP_COMPLETED", "STOP", "RESUME") as listener:
        pump = asyncio.create_task(_pump(listener, run.watch), name="dump-events")
        try:
            if request.is_raw(qemu_format):
                size, digest = await run.sealed()
            else:
                size, digest = await run.piped()
        finally:
            # Still listening: QEMU sends RESUME after DUMP_COMPLETED, and before the
            # query-status reply that shows the VM running again.
            if run.started:
                await wait_out_save_vm(session, status.running)
            pump.cancel()
            await asyncio.wait([pump])
            for event in listener.clear():
                run.watch.take(dict(event))
    return QemuDumpResult(
        size=size,
        sha256=digest,
        paused_s=run.watch.paused_s,
        total=run.total,
        qemu_format=qemu_format,
    )


async def _pump(listener: Any, watch: _Watch) -> None:
    while True:
        watch.take(dict(await listener.get()))


def _result_of(event: dict[str, Any]) -> tuple[str, str]:
    data = event.get("data", {})
    result = data.get("result", {})
    return str(result.get("status", "")), str(data.get("error", ""))


def _hash_file(fd: int) -> tuple[int, str]:
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return offset, hasher.hexdigest()


class _QemuDump:
    """One dump in flight."""

    def __init__(
        self,
        session: QMPSession,
        output: DumpFile,
        *,
        request: QemuDumpRequest,
        progress: Callable[[Progress], None] | None,
        cancel: asyncio.Event,
        timeout_s: float,
        qemu_format: str,
    ) -> None:
        self.session = session
        self.output = output
        self.request = request
        self.qemu_format = qemu_format
        self.progress = progress
        self.cancel = cancel
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.watch = _Watch(session)
        self.total = 0
        #: QEMU accepted dump-guest-memory (so it paused a running VM and will resume it)
        self.started = False

    async def _start(self, fd: int) -> None:
        fdname = await _pass_fd(self.session, fd)
        try:
            await self.session.execute(
                "dump-guest-memory", self.request.arguments(fdname, self.qemu_format)
            )
        except QMPCommandError as err:
            await _closefd(self.session, fdname)
            if dump_busy(err):
                raise DumpBusy(f"QEMU is already dumping: {err.description}") from err
            raise DumpFailed(f"QEMU refused the dump: {err.description}") from err
        except QMPDisconnected as err:
            raise QEMUGone("the QMP connection dropped as the dump started") from err
        self.started = True

    def _check_alive(self) -> None:
        if not self.session.connected:
            raise QEMUGone("QEMU went away during the dump (QMP connection closed)")
        if time.monotonic() > self.deadline:
            raise DumpFailed(f"the dump did not finish within {self.timeout_s:g} s")

    async def _report(self, written: int) -> None:
        try:
            raw = await self.session.execute("query-dump", timeout_s=5.0)
        except (QMPDisconnected, QMPTimeout):
            return
        query = parse_reply(DumpQueryResult, raw, "query-dump")
        self.total = query.total
        if self.progress is not None:
            self.progress(Progress(written, query.completed, query.total))

    async def _verdict(self, timeout_s: float) -> None:
        """Wait for DUMP_COMPLETED and raise unless it says completed."""
        limit = time.monotonic() + timeout_s
        while self.watch.completed is None:
            if not self.session.connected:
                raise QEMUGone("QEMU went away during the dump (QMP connection closed)")
            if time.monotonic() > limit:
                raise QEMUGone(f"no DUMP_COMPLETED within {timeout_s:g} s of the end of the data")
            await asyncio.sleep(0.02)
        status, error = _result_of(self.watch.completed)
        if status != "completed":
            raise DumpFailed(f"QEMU reports the dump {status or 'failed'}: {error or 'no reason'}")

    def _relay_work(self, read_fd: int, state: RelayState) -> Callable[[], None]:
        """The blocking copy for this request: sequential relay, or kdump reassembly."""
        if self.request.seekable:
            return functools.partial(unflatten, read_fd, self.output.fd, state)
        fix = self.request.fix_elf_header and self.request.format == "elf"
        return functools.partial(relay, read_fd, self.output.fd, state, fix_elf=fix)

    async def piped(self) -> tuple[int, str]:
        """QEMU -> pipe -> relay thread -> file."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only costs wake-ups
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(read_fd, False)
        try:
            await self._start(write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # QEMU holds its own copy now
        state = RelayState()
        work = self._relay_work(read_fd, state)
        copier = asyncio.create_task(asyncio.to_thread(work), name="dump-relay")
        try:
            while not (await asyncio.wait([copier], timeout=POLL_S))[0]:
                if self.cancel.is_set():
                    raise DumpCancelled("the dump was cancelled")
                self._check_alive()
                await self._report(state.written)
            try:
                copier.result()
            except OSError as err:
                raise write_error(err, self.output.final) from err
            except ValueError as err:
                raise DumpFailed(f"QEMU's dump stream is not as expected: {err}") from err
        except BaseException:
            state.stop.set()
            await asyncio.wait([copier])
            os.close(read_fd)  # QEMU's next write fails: the dump stops, the VM runs again
            read_fd = -1
            with contextlib.suppress(DumpError):
                await self._verdict(10.0)
            raise
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        # End of data: QEMU closed its end. Now its verdict.
        await self._verdict(30.0)
        return await self._finish(state)

    async def sealed(self) -> tuple[int, str]:
        """QEMU -> sealable memfd (kdump-raw-*: a seekable fd) -> file, once QEMU is done."""
        sink = SealSink.create()
        try:
            await self._start(sink.fd)
            try:
                while self.watch.completed is None:
                    if self.cancel.is_set():
                        raise DumpCancelled("the dump was cancelled")
                    self._check_alive()
                    await self._report(sink.size())
                    await self._until_completed(POLL_S)
                await self._verdict(0.0)
            except BaseException:
                sink.seal()  # QEMU's next write fails: the dump stops, the VM runs again
                with contextlib.suppress(DumpError):
                    await self._verdict(10.0)
                raise
            # QEMU is done and the VM runs again; the copy costs no pause.
            stop = threading.Event()
            copier = asyncio.create_task(
                asyncio.to_thread(sink.copy_into, self.output.fd, stop), name="dump-copy"
            )
            try:
                while not (await asyncio.wait([copier], timeout=POLL_S))[0]:
                    if self.cancel.is_set():
                        raise DumpCancelled("the dump was cancelled")
                size, digest = copier.result()
            except OSError as err:
                raise write_error(err, self.output.final) from err
            finally:
                stop.set()
                await asyncio.wait([copier])
        finally:
            sink.close()
        if self.progress is not None:
            done = self.total or size
            self.progress(Progress(size, done, done))
        return size, digest

    async def _until_completed(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, less if DUMP_COMPLETED arrives."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.watch.done.wait(), timeout_s)

    async def _finish(self, state: RelayState) -> tuple[int, str]:
        """Size and sha256 of the complete file; the last progress report."""
        size, digest = state.written, state.sha256
        if self.request.seekable:  # written out of order: hash the whole file now
            if not state.eof:
                raise DumpFailed("QEMU's flattened kdump stream ended before its end marker")
            size, digest = await asyncio.to_thread(_hash_file, self.output.fd)
        if self.progress is not None:
            done = self.total or size
            self.progress(Progress(size, done, done))
        return size, digest
