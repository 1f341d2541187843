"""The supported path on a libvirt domain: no monitor passthrough, no taint.

* Dump: QEMU's own engine, asked for through libvirt
  (``virDomainCoreDumpWithFormat(path, format, VIR_DUMP_MEMORY_ONLY)``) into a FIFO that qmpdump
  creates in a private 0700 folder and reads itself: the bytes are relayed into the dump file
  (``.partial``, 0600, renamed when complete) and hashed on the way, as the QEMU engine does with
  its pipe. libvirt pauses a running domain for the dump and resumes it afterwards. Progress is
  libvirt's job statistics (``memory_processed``/``memory_total``, QEMU's ``query-dump``).
  libvirt 9.0 refuses ``abortJob`` for memory-only dumps ("cannot abort memory-only dump"), so a
  cancel closes our end of the FIFO: QEMU's next write fails (EPIPE), libvirt ends the job and
  resumes the domain.
* Map: the domain XML (:mod:`qmpdump.libvirt.domxml`) plus host facts on QEMU's process (pid from
  libvirt): each memory backend's mapping is found in ``/proc/PID/maps`` by its size, and its
  populated bytes counted with ``SEEK_DATA`` (memfd, file) or ``PAGEMAP_SCAN`` (anonymous). A
  backend whose mapping can't be told apart from another one of the same size, or whose file
  does not hold the guest's bytes (a private mapping), is reported unknown with the reason.
  Without QMP there is no guest-physical layout: the map lists regions, not address ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmpdump import __version__
from qmpdump.engines.base import EngineDetails, Progress
from qmpdump.engines.relay import RelayState, relay
from qmpdump.engines.run import DumpOutcome
from qmpdump.engines.sidecar import Sidecar
from qmpdump.engines.spec import DumpFormat, EngineName
from qmpdump.errors import (
    DomainNotRunning,
    DumpCancelled,
    DumpFailed,
    ElfFormatError,
    HostAccessError,
    LibvirtError,
    QEMUGone,
    UsageError,
)
from qmpdump.host.extents import data_extents, open_for_extents
from qmpdump.host.pagemap import scan_populated
from qmpdump.host.procfs import MapsEntry, find_mapping_file, read_maps
from qmpdump.libvirt.connection import (
    DomainRef,
    libvirt_module,
    open_domain,
    qemu_pid,
    translate,
)
from qmpdump.libvirt.domxml import DomainMemory, parse_domain_memory
from qmpdump.memmap.ranges import Range
from qmpdump.output import DumpFile, sidecar_path, write_error
from qmpdump.qmp.plugged import _read_prefix
from qmpdump.report import VMSummary
from qmpdump.sizes import format_size

__all__ = [
    "FORMATS",
    "STATE_NAMES",
    "RegionFacts",
    "SupportedMap",
    "dump_supported",
    "map_supported",
    "use_fifo_dir",
]

#: qmpdump's format names -> libvirt's ``VIR_DOMAIN_CORE_DUMP_FORMAT_*`` names
FORMATS = {
    "elf": "RAW",
    "kdump-zlib": "KDUMP_ZLIB",
    "kdump-lzo": "KDUMP_LZO",
    "kdump-snappy": "KDUMP_SNAPPY",
    "win-dmp": "WIN_DMP",
}
_POLL_S = 0.25
_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shut off"}
#: libvirt's ``virDomainState`` values by name
STATE_NAMES = _STATES


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class RegionFacts:
    """One memory backend of the domain and what the host shows of it."""

    backend: str
    role: str
    size: int
    source: str
    populated: int | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class SupportedMap:
    """What the supported path knows of a domain's memory."""

    vm: dict[str, Any]
    memory: DomainMemory
    regions: tuple[RegionFacts, ...]
    path: str = "supported"
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``qmpdump.libvirt-map/1``)."""
        mem = self.memory
        return {
            "schema": "qmpdump.libvirt-map/1",
            "monitor": self.path,
            "vm": self.vm,
            "memory": {
                "memory": mem.memory,
                "max_memory": mem.max_memory,
                "source": mem.source,
                "access": mem.access,
                "hugepages": mem.hugepages,
                "numa_cells": [asdict(c) for c in mem.cells],
                "devices": [asdict(d) for d in mem.devices],
            },
            "regions": [asdict(r) for r in self.regions],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """The map as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def _mappings_of(entries: list[MapsEntry], size: int) -> list[MapsEntry]:
    return [e for e in entries if e.end - e.start == size and "w" in e.perms]


@dataclass(frozen=True, slots=True)
class _Wanted:
    backend: str
    role: str
    size: int

    def facts(self, source: str, populated: int | None, note: str = "") -> RegionFacts:
        return RegionFacts(self.backend, self.role, self.size, source, populated, note)


def _backing_kind(mem: DomainMemory) -> str:
    return mem.source if mem.source in ("memfd", "file") else "anonymous"


def _file_facts(pid: int, entry: MapsEntry, want: _Wanted, kind: str) -> RegionFacts:
    backing = find_mapping_file(pid, entry.start)
    if backing is None:
        return want.facts(kind, None, "backing file not found")
    fd = open_for_extents(backing.path)
    try:
        found = data_extents(fd, Range(backing.file_offset, want.size), name=backing.path)
    finally:
        os.close(fd)
    return want.facts("seek_data", found.total)


def _region(
    pid: int | None, entries: list[MapsEntry], want: _Wanted, mem: DomainMemory
) -> RegionFacts:
    kind = _backing_kind(mem)
    if pid is None:
        return want.facts(kind, None, "QEMU's pid is unknown")
    anonymous = kind == "anonymous"
    candidates = [
        e
        for e in _mappings_of(entries, want.size)
        if bool(e.inode) != anonymous and (not anonymous or not e.path)
    ]
    if len(candidates) != 1:
        return want.facts(
            kind,
            None,
            f"{len(candidates)} mappings of this size in QEMU: which one is this backend's is "
            "only known through QMP (monitor passthrough)",
        )
    if not anonymous and mem.access != "shared":
        return want.facts(
            kind,
            None,
            "private mapping: the guest's writes are in QEMU's copy-on-write pages, "
            "not in the file",
        )
    try:
        if anonymous:
            scan = scan_populated(pid, Range(candidates[0].start, want.size))
            return want.facts("pagemap", scan.populated.total)
        return _file_facts(pid, candidates[0], want, kind)
    except HostAccessError as err:
        return want.facts(kind, None, str(err))


def _host_regions(pid: int | None, mem: DomainMemory) -> tuple[RegionFacts, ...]:
    entries: list[MapsEntry] = []
    if pid is not None:
        with contextlib.suppress(HostAccessError):
            entries = read_maps(pid)
    wanted = [_Wanted(c.backend, f"NUMA cell {c.id}", c.size) for c in mem.cells]
    if not mem.cells:
        main = mem.memory - sum(d.size for d in mem.devices)
        wanted.append(_Wanted("pc.ram", "main RAM", main))
    wanted += [_Wanted(d.backend, f"{d.model} {d.alias}", d.size) for d in mem.devices]
    return tuple(_region(pid, entries, want, mem) for want in wanted)


def _vm_summary(ref: DomainRef, conn: Any, dom: Any, pid: int | None) -> dict[str, Any]:
    version = conn.getVersion()
    state, _reason = dom.state()
    return {
        "address": ref.describe("supported"),
        "pid": pid,
        "name": ref.name,
        "qemu_version": f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
        "qemu_package": "",
        "run_state": _STATES.get(state, str(state)),
    }


def _read_map(ref: DomainRef) -> SupportedMap:
    libvirt = libvirt_module()
    conn, dom = open_domain(ref, read_only=True)
    try:
        if not dom.isActive():
            raise DomainNotRunning(f"libvirt {ref.uri} domain {ref.name}", "not running")
        mem = parse_domain_memory(dom.XMLDesc(0))
        pid = qemu_pid(ref.uri, ref.name, dom.UUIDString())
        vm = _vm_summary(ref, conn, dom, pid)
    except libvirt.libvirtError as err:
        raise translate(err, ref, "read the domain") from err
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    notes = []
    if not mem.virtio_mem:
        notes.append("no virtio-mem device")
    return SupportedMap(vm, mem, _host_regions(pid, mem), notes=tuple(notes))


async def map_supported(ref: DomainRef) -> SupportedMap:
    """The supported-path map of a running domain (read-only libvirt connection, no taint)."""
    return await asyncio.to_thread(_read_map, ref)


def render_supported(result: SupportedMap) -> str:
    """The human view of a supported-path map."""
    vm, mem = result.vm, result.memory
    lines = [
        f"VM {vm['name']}: QEMU {vm['qemu_version']}, pid {vm['pid'] or 'unknown'}, "
        f"{vm['run_state']}, {vm['address']}",
        f"memory {format_size(mem.memory)} (max {format_size(mem.max_memory or mem.memory)}), "
        f"backing {mem.source}, {mem.access}" + (", hugepages" if mem.hugepages else ""),
        "",
        f"{'backend':<16} {'role':<24} {'size':>9}  {'populated':>9}  source",
    ]
    for r in result.regions:
        data = format_size(r.populated) if r.populated is not None else "unknown"
        lines.append(
            f"{r.backend:<16} {r.role:<24} {format_size(r.size):>9}  {data:>9}  {r.source}"
            + (f" ({r.note})" if r.note else "")
        )
    for d in mem.virtio_mem:
        lines.append(
            f"\nvirtio-mem {d.alias}: max {format_size(d.size)}, block "
            f"{format_size(d.block_size or 0)}, plugged {format_size(d.current_size or 0)} "
            f"(requested {format_size(d.requested_size or 0)}), node {d.node}"
        )
    lines += [f"note: {n}" for n in result.notes]
    lines.append("guest-physical layout: not available without QMP (use --monitor passthrough)")
    return "\n".join(lines) + "\n"


#: where the FIFOs go (None: ``$TMPDIR``); see :func:`use_fifo_dir`
_fifo_dir: Path | None = None


def use_fifo_dir(folder: Path | None) -> None:
    """Make the dump FIFOs in ``folder``: libvirtd opens them by path, in its own mount
    namespace, so a daemon whose systemd unit has ``PrivateTmp=yes`` puts them in its state
    folder (which libvirtd sees) instead of its private ``/tmp``."""
    global _fifo_dir  # noqa: PLW0603 - one setting for the process
    _fifo_dir = folder


class _Fifo:
    """A FIFO in a private folder: our read end, and a write end we hold until libvirt is done
    (a reader alone would see end-of-file before libvirt's writer opens)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="qmpdump-fifo-", dir=_fifo_dir))
        self.path = self.folder / "dump.fifo"
        os.mkfifo(self.path, 0o600)
        self.read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.hold_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def release_writer(self) -> None:
        fd, self.hold_fd = self.hold_fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        self.release_writer()
        fd, self.read_fd = self.read_fd, -1
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(self.folder, ignore_errors=True)


async def dump_supported(
    ref: DomainRef,
    target: Path,
    *,
    fmt: str = "elf",
    fix_elf_header: bool = True,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    monitor: str = "supported",
) -> DumpOutcome:
    """QEMU's dump of a libvirt domain through ``virDomainCoreDumpWithFormat``, into ``target``.

    ``monitor`` is the mode the operator chose, for the sidecar (with passthrough, QEMU's dump
    still goes through this API: :mod:`qmpdump.qmp.passthrough`).
    """
    libvirt = libvirt_module()
    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r} is not one libvirt offers ({', '.join(FORMATS)})")
    dump_format = getattr(libvirt, f"VIR_DOMAIN_CORE_DUMP_FORMAT_{FORMATS[fmt]}", None)
    if dump_format is None:
        raise UsageError(f"this libvirt-python has no {fmt} dump format")
    cancel = cancel or asyncio.Event()
    # No libvirt event loop here: this path needs no events, and libvirt objects freed after
    # the asyncio loop closed would call into it (libvirtaio) at exit.
    before = await map_supported(ref)
    conn, dom = await asyncio.to_thread(open_domain, ref)
    try:
        return await _dump(
            ref,
            dom,
            target,
            before,
            fmt=fmt,
            dump_format=dump_format,
            fix_elf=fix_elf_header and fmt == "elf",
            overwrite=overwrite,
            progress=progress,
            cancel=cancel,
            monitor=monitor,
        )
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(conn.close)


async def _stream(
    ref: DomainRef,
    dom: Any,
    output: DumpFile,
    state: RelayState,
    *,
    dump_format: int,
    fix_elf: bool,
    progress: Callable[[Progress], None] | None,
    cancel: asyncio.Event,
) -> int:
    """libvirt -> FIFO -> relay thread -> output; returns libvirt's total (0 if unknown)."""
    libvirt = libvirt_module()
    fifo = _Fifo()
    copier = asyncio.create_task(
        asyncio.to_thread(relay, fifo.read_fd, output.fd, state, fix_elf=fix_elf),
        name="libvirt-dump-relay",
    )

    def core_dump() -> None:
        dom.coreDumpWithFormat(str(fifo.path), dump_format, libvirt.VIR_DUMP_MEMORY_ONLY)

    dumper = asyncio.create_task(asyncio.to_thread(core_dump), name="libvirt-core-dump")
    total = 0
    try:
        while not (await asyncio.wait([dumper], timeout=_POLL_S))[0]:
            if cancel.is_set():
                raise DumpCancelled("the dump was cancelled")
            if copier.done():
                break  # the relay failed (disk full): handled below
            total = await _report(dom, state, progress, total)
        if dumper.done():
            try:
                dumper.result()
            except libvirt.libvirtError as err:
                raise await _dump_error(ref, dom, err) from err
        fifo.release_writer()  # libvirt's writer is gone: our reader now sees the end
        await asyncio.wait([copier])
        try:
            copier.result()
        except OSError as err:
            raise write_error(err, output.final) from err
        if not state.eof:
            raise DumpFailed("the dump stream from libvirt ended early")
    except BaseException:
        state.stop.set()
        await asyncio.wait([copier])
        fifo.close()  # libvirt's writer gets EPIPE: QEMU's dump fails, libvirt resumes
        await asyncio.wait([dumper])
        if not dumper.cancelled():
            dumper.exception()  # retrieved: the error being raised already says what happened
        raise
    finally:
        fifo.close()
    return total


async def dump_prefix(ref: DomainRef, dom: Any, *, timeout_s: float = 10.0) -> bytes:
    """The ELF header, program headers and notes of QEMU's dump, through libvirt's dump job.

    The FIFO is closed as soon as the prefix is read: libvirt's I/O helper dies of SIGPIPE,
    QEMU's next write fails, libvirt ends the job and resumes a domain it paused. QEMU has read
    at most what the pipes and the helper's buffer held (about a MiB of the lowest RAM).
    """
    libvirt = libvirt_module()
    fifo = _Fifo()

    def core_dump() -> None:
        dom.coreDumpWithFormat(
            str(fifo.path), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY
        )

    dumper = asyncio.create_task(asyncio.to_thread(core_dump), name="libvirt-probe-dump")
    try:
        return await _read_prefix(fifo.read_fd, timeout_s)
    except ElfFormatError as err:
        if dumper.done() and (failure := dumper.exception()) is not None:
            raise await _dump_error(ref, dom, failure) from err
        raise
    finally:
        fifo.close()
        await asyncio.wait([dumper])
        if not dumper.cancelled():
            dumper.exception()  # expected: libvirt reports the dump failed (broken pipe)


async def _dump(
    ref: DomainRef,
    dom: Any,
    target: Path,
    before: SupportedMap,
    *,
    fmt: str,
    dump_format: int,
    fix_elf: bool,
    overwrite: bool,
    progress: Callable[[Progress], None] | None,
    cancel: asyncio.Event,
    monitor: str,
) -> DumpOutcome:
    was_running = before.vm["run_state"] == "running"
    with DumpFile.create(target, overwrite=overwrite) as output:
        state = RelayState()
        started = time.time()
        t0 = time.monotonic()
        total = await _stream(
            ref,
            dom,
            output,
            state,
            dump_format=dump_format,
            fix_elf=fix_elf,
            progress=progress,
            cancel=cancel,
        )
        duration = time.monotonic() - t0
        if progress is not None:
            done = total or state.written
            progress(Progress(written=state.written, completed=done, total=done))
        after_state = await asyncio.to_thread(dom.state)
        record = _record(
            before,
            fmt=fmt,
            fix_elf=fix_elf,
            total=total,
            state=state,
            started=started,
            duration=duration,
            was_running=was_running,
            after_state=after_state[0],
            monitor=monitor,
        )
        path = await asyncio.to_thread(output.commit, record.to_json())
    return DumpOutcome(
        path=path,
        sidecar=sidecar_path(path),
        size=state.written,
        sha256=state.sha256,
        engine=EngineName.QEMU,
        format=DumpFormat(fmt),
        duration_s=duration,
        paused_s=duration if was_running else None,
        record=record,
    )


class LibvirtDumpDetails(EngineDetails):
    """The sidecar's ``request`` for QEMU's dump through libvirt's API."""

    #: the monitor mode the operator chose (QEMU's dump goes through libvirt's API in both)
    monitor: str
    dump_path: str = "libvirt-api"
    elf_header_fixed: bool
    #: libvirt's job statistics ``memory_total``: guest bytes the dump covers (0: unknown)
    libvirt_total: int
    #: libvirt's state of the domain after the dump
    run_state_after: str


def _record(
    before: SupportedMap,
    *,
    fmt: str,
    fix_elf: bool,
    total: int,
    state: RelayState,
    started: float,
    duration: float,
    was_running: bool,
    after_state: int,
    monitor: str,
) -> Sidecar:
    """The sidecar of a dump through libvirt's API."""
    return Sidecar(
        qmpdump_version=__version__,
        vm=VMSummary(**before.vm),
        engine=EngineName.QEMU,
        engine_reason=f"monitor {monitor}: QEMU's dump through libvirt's API "
        "(virDomainCoreDumpWithFormat, memory only)",
        format=DumpFormat(fmt),
        request=LibvirtDumpDetails(
            format=fmt,
            monitor=monitor,
            elf_header_fixed=fix_elf,
            libvirt_total=total,
            run_state_after=_STATES.get(after_state, str(after_state)),
        ),
        started=_iso(started),
        ended=_iso(started + duration),
        duration_s=round(duration, 6),
        bytes=state.written,
        sha256=state.sha256,
        # libvirt pauses a running domain for the whole dump and reports no timestamps.
        paused_s=round(duration, 6) if was_running else None,
        map=before.to_dict(),
    )


async def _report(
    dom: Any, state: RelayState, progress: Callable[[Progress], None] | None, total: int
) -> int:
    libvirt = libvirt_module()
    try:
        stats = await asyncio.to_thread(dom.jobStats)
    except libvirt.libvirtError:
        return total
    total = int(stats.get("memory_total", total) or total)
    if progress is not None and total:
        processed = int(stats.get("memory_processed", 0))
        progress(Progress(written=state.written, completed=processed, total=total))
    return total


async def _dump_error(ref: DomainRef, dom: Any, err: BaseException) -> Exception:
    libvirt = libvirt_module()
    try:
        active = await asyncio.to_thread(dom.isActive)
    except libvirt.libvirtError:
        active = False
    if not active:
        return QEMUGone(f"libvirt {ref.uri} domain {ref.name} stopped during the dump")
    if not isinstance(err, Exception):
        return DumpFailed(f"the dump through libvirt ended: {err!r}")
    failure = translate(err, ref, "virDomainCoreDumpWithFormat")
    if type(failure) is not LibvirtError:
        return failure
    return DumpFailed(f"libvirt reports the dump failed: {failure}")
