"""Survey a VM's memory: layout over QMP, populated memory from the host, plugged ranges.

This is where the QMP side (:mod:`qmpdump.qmp`) and the host side (:mod:`qmpdump.host`) meet to
produce the pure :class:`~qmpdump.memmap.populated.Population`. Nothing here reads guest memory:

* RAM QEMU maps shared from a file (memfd, file with ``share=on``): SEEK_DATA/SEEK_HOLE on the
  file QEMU maps, found through ``/proc/PID/maps`` and ``/proc/PID/fd`` by device and inode;
* anonymous RAM (memory-backend-ram, default ``pc.ram``, ``pc.bios``): the ``PAGEMAP_SCAN``
  ioctl over QEMU's mapping, found with ``gpa2hva``;
* RAM QEMU maps private from a file (``share=off``): the union of both, the file's data and
  QEMU's copy-on-write pages (the guest's writes never reach the file);
* where QEMU's process can't be inspected, the region is reported unknown with the reason.

Each region also gets the source its bytes must be read from (:class:`ReadFrom`) and the proof
that this source holds the guest's bytes, taken from ``/proc/PID/maps``: a shared mapping of
that very file (device and inode), or QEMU's own address space. The pid itself is proven first
(:func:`qemu_pid`: QEMU's vCPU threads are its threads; a proxy's pid is not QEMU's). Without
that pid (QMP over TCP, a proxy), or for a mapping of an unexpected shape, nothing is proven and
the backend engine refuses.
Measured on QEMU 7.2 and 10.0 (README, "Which source holds the guest's bytes").

Only with ``exact_plug=True`` does a survey start (and at once abort) a QEMU dump to read the
exact plugged virtio-mem ranges; that pauses the VM for a few milliseconds
(:mod:`qmpdump.qmp.plugged`). A plain survey leaves the run state and the host's memory alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from qmpdump.errors import HostAccessError
from qmpdump.host.extents import data_extents, holes_are_exact, open_for_extents, punch_hole
from qmpdump.host.pagemap import scan_populated
from qmpdump.host.procfs import MappingKind, RegionMapping, mapped_file, read_maps, region_mapping
from qmpdump.memmap.layout import Backend, Layout
from qmpdump.memmap.populated import Population, RegionPopulation, Source, compute_population
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.plugged import dump_loads, read_dump_prefix
from qmpdump.qmp.probe import (
    VMFacts,
    read_layout,
    read_vm_facts,
    region_host_addresses,
    vcpu_thread_ids,
)
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport, VMSummary, build_report

__all__ = [
    "ReadFrom",
    "RegionAccess",
    "Survey",
    "foreign_threads",
    "probe_prefix_without_growth",
    "qemu_pid",
    "refill_holes",
    "region_population",
    "survey",
]


@dataclass(frozen=True, slots=True)
class Survey:
    """One look at a VM's memory."""

    facts: VMFacts
    population: Population
    #: where each inspectable RAM region's bytes are on the host
    access: Mapping[str, RegionAccess]

    @property
    def layout(self) -> Layout:
        """The guest-physical layout."""
        return self.population.layout

    def report(self) -> MapReport:
        """The JSON-ready map (schema ``qmpdump.map/1``)."""
        f = self.facts
        vm = VMSummary(
            address=f.address,
            pid=f.pid,
            name=f.name,
            qemu_version=f.qemu_version,
            qemu_package=f.qemu_package,
            run_state=f.run_state,
        )
        return build_report(vm, self.population)


class ReadFrom(StrEnum):
    """The source a region's bytes are read from, once proven to hold the guest's bytes."""

    #: the backing file, which QEMU maps shared (``MAP_SHARED``): every guest write reaches it
    FILE = "file"
    #: QEMU's own address space (``process_vm_readv``): what the guest sees, by definition
    PROCESS = "process"


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """Where a RAM region's bytes can be reached on the host, and why that source is right."""

    region: str
    #: QEMU's host virtual address of region offset 0 (None when QEMU's pid is unknown)
    hva: int | None
    #: a path that opens the backing file (fd-backed regions), else None
    path: str | None = None
    #: file offset of region offset 0 in that file
    file_offset: int = 0
    #: the source proven to hold the guest's bytes; None where none could be proven
    read_from: ReadFrom | None = None
    #: why :attr:`read_from` holds the guest's bytes, or why no source could be proven
    proof: str = ""


def _file_extents(backend: Backend, path: str, file_offset: int) -> RangeSet:
    """SEEK_DATA extents of ``backend``'s window of the file, in region offsets."""
    fd = open_for_extents(path)
    try:
        found = data_extents(fd, Range(file_offset, backend.size), name=path)
    finally:
        os.close(fd)
    return found.shift(-file_offset)


def _unknown(backend: Backend, reason: str) -> RegionPopulation:
    return RegionPopulation(backend.region, RangeSet.empty(), Source.UNKNOWN, reason)


#: Why nothing can be proven over TCP (no SO_PEERCRED).
NO_PID = "QEMU's pid is unknown (QMP over TCP), so how QEMU maps this region cannot be checked"


def _without_pid(backend: Backend, reason: str = NO_PID) -> tuple[RegionPopulation, RegionAccess]:
    """No proven pid: nothing can be proven. A shared file's ``mem-path`` still serves ``map``."""
    access = RegionAccess(backend.region, None, proof=reason)
    if backend.type.has_fd and backend.mem_path is not None and backend.share:
        access = RegionAccess(backend.region, None, backend.mem_path, proof=reason)
        found = _file_extents(backend, backend.mem_path, 0)
        return RegionPopulation(backend.region, found, Source.SEEK_DATA, reason), access
    return _unknown(backend, reason), access


def _scan(pid: int, hva: Range) -> tuple[RangeSet, bool]:
    """Populated pages of ``hva`` as offsets from its start, and whether the scan was exact."""
    scan = scan_populated(pid, hva)
    return scan.populated.shift(-hva.start), scan.exact


def _mapped_population(
    pid: int, backend: Backend, mapping: RegionMapping
) -> tuple[RegionPopulation, RegionAccess]:
    """The population of a region QEMU maps as ``mapping``, and the source proven to hold it."""
    region, hva = backend.region, mapping.hva.start
    if mapping.kind is MappingKind.ANONYMOUS:
        offsets, exact = _scan(pid, mapping.hva)
        proof = f"{mapping.describe()}: only QEMU's address space holds it"
        access = RegionAccess(region, hva, read_from=ReadFrom.PROCESS, proof=proof)
        if exact:
            return RegionPopulation(region, offsets, Source.PAGEMAP_SCAN), access
        note = "raw pagemap: pages mapped to the zero page count as data"
        return RegionPopulation(region, offsets, Source.PAGEMAP, note), access
    backing = mapped_file(pid, mapping.first, hva)
    file_offset = backing.file_offset
    found = _file_extents(backend, backing.path, file_offset)
    if mapping.kind is MappingKind.SHARED_FILE:
        proof = f"{mapping.describe()}, opened as {backing.path}: every guest write reaches it"
        access = RegionAccess(
            region, hva, backing.path, file_offset, read_from=ReadFrom.FILE, proof=proof
        )
        return RegionPopulation(region, found, Source.SEEK_DATA), access
    # MAP_PRIVATE: the guest's writes are QEMU's copy-on-write pages, the rest is the file's
    # content. Read QEMU's address space, and only where the file has data or QEMU has a
    # private page: a read fault on a file hole through a private mapping allocates memory.
    access = RegionAccess(region, hva, backing.path, file_offset)
    fd = open_for_extents(backing.path)
    try:
        exact_holes = holes_are_exact(fd, name=backing.path)
    finally:
        os.close(fd)
    if not exact_holes:
        reason = (
            f"{mapping.describe()}: SEEK_DATA cannot tell the holes of that filesystem "
            "(hugetlbfs?), and reading them through QEMU's private mapping would allocate memory"
        )
        return _unknown(backend, reason), replace(access, proof=reason)
    cow, exact = _scan(pid, mapping.hva)
    proof = (
        f"{mapping.describe()}: the guest's writes are QEMU's private copy-on-write pages, "
        "so its bytes are read from QEMU's address space (the file's data and QEMU's pages)"
    )
    access = replace(access, read_from=ReadFrom.PROCESS, proof=proof)
    source = Source.SEEK_DATA_AND_PAGEMAP_SCAN if exact else Source.PAGEMAP
    return RegionPopulation(region, found | cow, source), access


def region_population(
    pid: int | None, backend: Backend, hva: int | None, no_pid: str = NO_PID
) -> tuple[RegionPopulation, RegionAccess | None]:
    """The populated part of one RAM region, in region-offset space (blocking: run in a thread).

    Also proves which source holds the region's bytes (:class:`RegionAccess`): a file QEMU maps
    shared (``/proc/PID/maps``, identified by device and inode), or QEMU's own address space.
    Host errors do not fail the survey: the region is reported unknown, with the reason.
    ``no_pid`` says why ``pid`` is None.
    """
    try:
        if pid is None or hva is None:
            return _without_pid(backend, no_pid)
        try:
            mapping = region_mapping(read_maps(pid), Range(hva, backend.size))
        except ValueError as err:
            reason = f"unknown mapping type: {err}"
            return _unknown(backend, reason), RegionAccess(backend.region, hva, proof=reason)
        return _mapped_population(pid, backend, mapping)
    except HostAccessError as err:
        return _unknown(backend, str(err)), None


def foreign_threads(pid: int, thread_ids: Iterable[int]) -> list[int]:
    """The ``thread_ids`` that are not threads of process ``pid`` (``/proc/PID/task/TID``)."""
    return [tid for tid in thread_ids if not os.path.exists(f"/proc/{pid}/task/{tid}")]


async def qemu_pid(session: QMPSession, peer: int | None) -> tuple[int | None, str]:
    """The QMP peer's pid if it is QEMU's process, else None and why.

    ``SO_PEERCRED`` names whoever holds the other end of the socket: a proxy in between
    (libvirt's ``virt-qemu-qmp-proxy``, socat) is another process, and reading its memory as
    the guest's would be a wrong dump. The proof: every vCPU thread QEMU reports
    (``query-cpus-fast``) is a thread of that pid.
    """
    if peer is None:
        return None, NO_PID
    threads = await vcpu_thread_ids(session)
    foreign = foreign_threads(peer, threads)
    if not threads or foreign:
        what = f"vCPU thread {foreign[0]} is not one of its threads" if foreign else "no vCPUs"
        return None, (
            f"the QMP peer (pid {peer}) is not proven to be QEMU's process: {what} "
            "(a proxy between qmpdump and QEMU?)"
        )
    return peer, ""


#: How much of the first RAM piece QEMU's aborted probe dump may read (pipe + one page, rounded).
PROBE_READ_WINDOW = 64 * 1024


def _holes_to_restore(
    layout: Layout, regions: Mapping[str, RegionPopulation], access: Mapping[str, RegionAccess]
) -> tuple[RegionAccess, RangeSet] | None:
    """The hole pages of shmem memory that QEMU's probe dump would read first, if any."""
    if not layout.pieces:
        return None
    first = layout.pieces[0]
    where = access.get(first.region)
    found = regions.get(first.region)
    if where is None or where.path is None or found is None or not found.known:
        return None  # anonymous memory: a read maps the zero page, nothing is allocated
    window = Range(first.region_offset, min(PROBE_READ_WINDOW, first.gpa.size))
    holes = RangeSet.of(window.start, window.size) - found.offsets
    return (where, holes) if holes else None


def refill_holes(where: RegionAccess, holes: RangeSet) -> int:
    """Punch again the pages of ``holes`` that the probe allocated and that hold only zeros."""
    assert where.path is not None
    punched = 0
    fd = os.open(where.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for hole in holes:
            window = Range(hole.start + where.file_offset, hole.size)
            allocated = data_extents(fd, window, name=where.path)
            for run in allocated:
                if os.pread(fd, run.size, run.start).count(0) == run.size:
                    punch_hole(fd, run, name=where.path)
                    punched += run.size
    finally:
        os.close(fd)
    return punched


async def probe_prefix_without_growth(
    session: QMPSession,
    facts: VMFacts,
    layout: Layout,
    regions: Mapping[str, RegionPopulation],
    access: Mapping[str, RegionAccess],
) -> bytes:
    """QEMU's dump headers and notes (:func:`read_dump_prefix`), leaving host memory as it was.

    QEMU's aborted probe dump reads the first page(s) of the lowest RAM piece; on shmem that
    allocates them if they were holes (a booted guest always has data there; a VM that never
    ran may not). Then, and only then, the VM is paused for the probe so that those pages can
    be checked (still all zero) and punched out again before the guest could write them.
    """
    restore = _holes_to_restore(layout, regions, access)
    pause = restore is not None and facts.running
    if pause:
        await session.execute("stop")
    try:
        prefix = await read_dump_prefix(session, timeout_s=session.timeout_s)
        if restore is not None:
            await asyncio.to_thread(refill_holes, *restore)
    finally:
        if pause:
            await session.execute("cont")
    return prefix


async def survey(session: QMPSession, *, exact_plug: bool = False) -> Survey:
    """Survey the VM behind a connected QMP session."""
    facts = await read_vm_facts(session)
    layout = await read_layout(session)
    pid, no_pid = await qemu_pid(session, facts.pid)
    bases = await region_host_addresses(session, layout) if pid is not None else {}
    found = await asyncio.gather(
        *(
            asyncio.to_thread(region_population, pid, b, bases.get(b.region), no_pid)
            for b in layout.backends
        )
    )
    regions = {pop.region: pop for pop, _ in found}
    access = {a.region: a for _, a in found if a is not None}
    exact = None
    if exact_plug and layout.devices:
        prefix = await probe_prefix_without_growth(session, facts, layout, regions, access)
        loads = dump_loads(prefix)
        exact = {d.id: loads.clip(d.region) for d in layout.devices}
    population = compute_population(layout, regions, exact)
    return Survey(facts, population, access)
