"""Engine 1: QEMU's own ``dump-guest-memory``, driven properly.

QEMU writes the dump (``dump/dump.c``) into a pipe qmpdump passed over QMP
(:func:`qmpdump.qmp.guestdump.guest_dump`), so QEMU needs no access to the dump folder. qmpdump
relays the pipe into the output (:mod:`qmpdump.engines.relay`): a sha256 on the way, the ELF
header fix for makedumpfile, and cancel (closing the pipe makes QEMU's next write fail with
EPIPE; the dump ends ``failed`` and QEMU restores the run state).

Progress is QEMU's own ``query-dump`` counters (guest bytes done of guest bytes to dump), so a
compressed dump that writes a few percent of the guest's memory still goes 0 to 100 %.

QEMU 7.2 writes kdump formats only in makedumpfile's *flattened* layout, into a pipe or a file
alike (measured: a seekable fd changes nothing). ``seekable`` asks for the standard layout,
which crash and makedumpfile read directly. Where QEMU offers the matching ``kdump-raw-*`` format
(QEMU 8.2 and later; 10.0 here), QEMU writes that layout itself, into a sealable memfd (it refuses
a pipe; sealing is how a cancel stops it: :mod:`qmpdump.qmp.sealsink`) that is copied into the
output once QEMU is done. Elsewhere (7.2) the relay places each flattened record at its offset
(:func:`qmpdump.engines.relay.unflatten`, what ``makedumpfile -R`` does) and the file is hashed
once complete. A ``kdump-raw-*`` format asked for by name takes the memfd path too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable

from qmpdump.engines.base import EngineDetails, EngineJob, EngineResult, Progress
from qmpdump.engines.relay import CHUNK, RelayState, relay, unflatten
from qmpdump.engines.spec import ENGINE_TRAITS, DumpFormat, DumpSpec, EngineName, EngineTraits
from qmpdump.engines.threads import run_threads
from qmpdump.errors import DumpFailed, QMPTimeout, UsageError
from qmpdump.output import write_error
from qmpdump.qmp.guestdump import DumpArguments, guest_dump
from qmpdump.qmp.models import DumpCapability, parse_reply
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey

__all__ = ["ENGINE", "QemuDetails", "QemuEngine", "qemu_formats"]

POLL_S = 0.25
#: QEMU's formats that write the standard kdump layout themselves, only into a seekable file
RAW_KDUMP_PREFIX = "kdump-raw-"


class QemuDetails(EngineDetails):
    """The sidecar's ``request`` for QEMU's engine."""

    paging: bool
    begin: int | None
    length: int | None
    elf_header_fixed: bool
    kdump_layout: str
    #: the format QEMU was asked for: ``kdump-raw-*`` for a seekable kdump where QEMU offers it
    qemu_format: str
    #: QEMU's ``query-dump`` total: guest bytes the dump covers
    qemu_total: int


async def qemu_formats(session: QMPSession) -> list[str]:
    """The formats this QEMU's ``dump-guest-memory`` offers."""
    raw = await session.execute("query-dump-guest-memory-capability")
    return parse_reply(DumpCapability, raw, "query-dump-guest-memory-capability").formats


def _hash_file(fd: int) -> tuple[int, str]:
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return offset, hasher.hexdigest()


def qemu_format_for(spec: DumpSpec, offered: list[str]) -> str:
    """The format to ask QEMU for: a seekable ``kdump-X`` is QEMU's own ``kdump-raw-X`` where
    QEMU offers it, so that QEMU writes the standard layout itself."""
    fmt = spec.format.value
    if spec.seekable and spec.format.is_kdump and not fmt.startswith(RAW_KDUMP_PREFIX):
        raw = RAW_KDUMP_PREFIX + fmt.removeprefix("kdump-")
        if raw in offered:
            return raw
    return fmt


def _relay_work(spec: DumpSpec, read_fd: int, out_fd: int, state: RelayState) -> Callable[[], None]:
    """The blocking copy for this spec: sequential relay, or kdump reassembly."""
    if spec.seekable:
        return functools.partial(unflatten, read_fd, out_fd, state)
    fix = spec.fix_elf_header and spec.format is DumpFormat.ELF
    return functools.partial(relay, read_fd, out_fd, state, fix_elf=fix)


class QemuEngine:
    """QEMU's ``dump-guest-memory`` into our pipe, relayed into the output."""

    traits: EngineTraits = ENGINE_TRAITS[EngineName.QEMU]

    def assess(self, before: Survey) -> tuple[bool, str]:
        """QEMU can always dump its own VM."""
        return True, "QEMU dumps its own VM"

    async def run(self, job: EngineJob) -> EngineResult:
        spec = job.spec
        offered = await qemu_formats(job.session)
        if spec.format.value not in offered:
            raise UsageError(
                f"QEMU offers the formats {', '.join(offered)}; {spec.format.value!r} is not one"
            )
        qemu_format = qemu_format_for(spec, offered)
        raw = qemu_format.startswith(RAW_KDUMP_PREFIX)
        args = DumpArguments(
            format=qemu_format, paging=spec.paging, begin=spec.begin, length=spec.length
        )
        if raw:
            return await self._run_sealed(job, args)
        total = 0
        async with guest_dump(job.session, args) as dump:
            state = RelayState()

            async def tick() -> None:
                nonlocal total
                dump.check_alive()
                query = await dump.query()
                if query is not None:
                    total = query.total
                    job.report(Progress(state.written, query.completed, query.total))

            try:
                await run_threads(
                    [_relay_work(spec, dump.read_fd, job.output.fd, state)],
                    stop=state.stop,
                    every_s=POLL_S,
                    tick=tick,
                )
            except OSError as err:
                raise write_error(err, job.output.final) from err
            except ValueError as err:
                raise DumpFailed(f"QEMU's dump stream is not as expected: {err}") from err
            # End of data: QEMU closed its end. Now its verdict.
            done = await dump.verdict(30.0)
            total = done.result.total or total
        size, digest = await self._finish(job, state)
        job.report(Progress(size, total or size, total or size))
        details = QemuDetails(
            format=spec.format.value,
            paging=spec.paging,
            begin=spec.begin,
            length=spec.length,
            elf_header_fixed=spec.fix_elf_header and spec.format is DumpFormat.ELF,
            kdump_layout="standard" if spec.seekable else "flattened",
            qemu_format=qemu_format,
            qemu_total=total,
        )
        return EngineResult(size, digest, dump.paused_s, details, job.before)

    @staticmethod
    async def _run_sealed(job: EngineJob, args: DumpArguments) -> EngineResult:
        """QEMU writes a ``kdump-raw-*`` dump into a sealable memfd; copied once QEMU is done.

        A cancel leaves the ``guest_dump`` block, which seals the memfd: QEMU's next write fails
        and it resumes the VM. The copy runs after QEMU has resumed it: it costs no pause.
        """
        async with guest_dump(job.session, args, seekable=True) as dump:
            sink = dump.sink
            assert sink is not None
            total = 0
            while dump.completed is None:
                dump.check_alive()
                query = await dump.query()
                if query is not None:
                    total = query.total
                    job.report(Progress(sink.size(), query.completed, query.total))
                with contextlib.suppress(QMPTimeout):
                    await dump.finished(POLL_S)
            done = await dump.verdict(0.0)
            total = done.result.total or total
            stop = threading.Event()
            try:
                ((size, digest),) = await run_threads(
                    [functools.partial(sink.copy_into, job.output.fd, stop)],
                    stop=stop,
                    every_s=POLL_S,
                )
            except OSError as err:
                raise write_error(err, job.output.final) from err
        job.report(Progress(size, total or size, total or size))
        spec = job.spec
        details = QemuDetails(
            format=spec.format.value,
            paging=spec.paging,
            begin=spec.begin,
            length=spec.length,
            elf_header_fixed=False,
            kdump_layout="standard",
            qemu_format=args.format,
            qemu_total=total,
        )
        return EngineResult(size, digest, dump.paused_s, details, job.before)

    @staticmethod
    async def _finish(job: EngineJob, state: RelayState) -> tuple[int, str]:
        """Size and sha256 of the complete output."""
        if not job.spec.seekable:
            return state.written, state.sha256
        if not state.eof:  # written out of order: hash the whole file now
            raise DumpFailed("QEMU's flattened kdump stream ended before its end marker")
        return await asyncio.to_thread(_hash_file, job.output.fd)


ENGINE = QemuEngine()
