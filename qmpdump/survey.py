"""Survey a VM's memory: layout over QMP, populated memory from the host, plugged ranges.

This is where the QMP side (:mod:`qmpdump.qmp`) and the host side (:mod:`qmpdump.host`) meet to
produce the pure :class:`~qmpdump.memmap.populated.Population`. Nothing here reads guest memory:

* fd-backed RAM (memfd, file): SEEK_DATA/SEEK_HOLE on the file QEMU maps, found through
  ``/proc/PID/maps`` and ``/proc/PID/fd`` by device and inode (or ``mem-path`` when QEMU's pid is
  unknown, over TCP);
* anonymous RAM (memory-backend-ram, default ``pc.ram``, ``pc.bios``): the ``PAGEMAP_SCAN``
  ioctl over QEMU's mapping, found with ``gpa2hva``;
* where QEMU's process can't be inspected, the region is reported unknown with the reason.

Only with ``exact_plug=True`` does a survey start (and at once abort) a QEMU dump to read the
exact plugged virtio-mem ranges; that pauses the VM for a few milliseconds
(:mod:`qmpdump.qmp.plugged`). A plain survey leaves the run state and the host's memory alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

from qmpdump.errors import HostAccessError
from qmpdump.host.extents import data_extents, open_for_extents, punch_hole
from qmpdump.host.pagemap import scan_populated
from qmpdump.host.procfs import find_mapping_file
from qmpdump.memmap.layout import Backend, Layout
from qmpdump.memmap.populated import Population, RegionPopulation, Source, compute_population
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.plugged import dump_loads, read_dump_prefix
from qmpdump.qmp.probe import VMFacts, read_layout, read_vm_facts, region_host_addresses
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport, VMSummary, build_report

__all__ = [
    "RegionAccess",
    "Survey",
    "probe_prefix_without_growth",
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


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """Where a RAM region's bytes can be reached on the host."""

    region: str
    #: QEMU's host virtual address of region offset 0 (None when QEMU's pid is unknown)
    hva: int | None
    #: a path that opens the backing file (fd-backed regions), else None
    path: str | None = None
    #: file offset of region offset 0 in that file
    file_offset: int = 0


def _file_population(backend: Backend, access: RegionAccess) -> RegionPopulation:
    assert access.path is not None
    fd = open_for_extents(access.path)
    try:
        window = Range(access.file_offset, backend.size)
        found = data_extents(fd, window, name=access.path)
    finally:
        os.close(fd)
    return RegionPopulation(backend.region, found.shift(-access.file_offset), Source.SEEK_DATA)


def locate_region(pid: int | None, backend: Backend, hva: int | None) -> RegionAccess:
    """Find the file behind a region, if it has one (blocking: run in a thread)."""
    if pid is None or hva is None:
        return RegionAccess(backend.region, None, backend.mem_path)
    backing = find_mapping_file(pid, hva)
    if backing is None:
        return RegionAccess(backend.region, hva)
    return RegionAccess(backend.region, hva, backing.path, backing.file_offset)


def region_population(
    pid: int | None, backend: Backend, hva: int | None
) -> tuple[RegionPopulation, RegionAccess | None]:
    """The populated part of one RAM region, in region-offset space (blocking: run in a thread).

    Host errors do not fail the survey: the region is reported unknown, with the reason.
    """
    try:
        access = locate_region(pid, backend, hva)
        if access.path is not None:
            return _file_population(backend, access), access
        if pid is None or access.hva is None:
            note = "QEMU's pid is unknown (QMP over TCP)"
            return RegionPopulation(backend.region, RangeSet.empty(), Source.UNKNOWN, note), access
        scan = scan_populated(pid, Range(access.hva, backend.size))
        source = Source.PAGEMAP_SCAN if scan.exact else Source.PAGEMAP
        note = "" if scan.exact else "raw pagemap: pages mapped to the zero page count as data"
        offsets = scan.populated.shift(-access.hva)
        return RegionPopulation(backend.region, offsets, source, note), access
    except HostAccessError as err:
        return RegionPopulation(backend.region, RangeSet.empty(), Source.UNKNOWN, str(err)), None


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
    bases = await region_host_addresses(session, layout) if facts.pid is not None else {}
    found = await asyncio.gather(
        *(
            asyncio.to_thread(region_population, facts.pid, b, bases.get(b.region))
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
