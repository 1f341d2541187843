"""The memory map as a stable JSON document (``qmpdump map --json``, and later the API).

Schema ``qmpdump.map/1``. Every address and size is an integer number of bytes; every list of
ranges is sorted by ``gpa`` and holds no overlaps. Fields are only ever added within one schema
version; a change of meaning bumps the version. The models are strict (``extra="forbid"``):
this is a format qmpdump owns.

Top level:

``schema``
    ``"qmpdump.map/1"``.
``vm``
    ``address`` (QMP socket or host:port), ``pid`` (QEMU's, or null over TCP), ``name``,
    ``qemu_version``, ``qemu_package``, ``run_state`` (at the time of the survey).
``ranges``
    one per guest-physical RAM piece: ``gpa``, ``size``, ``region`` (RAM region name),
    ``backend`` (memory backend object id, e.g. ``ram0``, or null for RAM outside any backend
    such as ``pc.bios``), ``backend_type`` (memfd, file, ram, anonymous), ``region_offset``,
    ``file_offset`` (offset in the backing file for memfd/file backends, else null),
    ``readonly``, ``populated_size`` (bytes of this piece that hold data, null if unknown).
``regions``
    one per RAM region: ``region``, ``backend``, ``backend_type``, ``size``, ``mem_path``,
    ``population_source`` (seek_data, pagemap_scan, pagemap, unknown), ``exact``, ``note``,
    ``populated_size``.
``virtio_mem``
    per device: ``id``, ``memaddr``, ``max_size``, ``block_size``, ``size`` (plugged, from QEMU),
    ``requested_size``, ``memdev``, ``node``, ``plugged`` (ranges), ``plugged_exact`` (true when
    read from QEMU's dump headers, false when inferred from the blocks that hold data),
    ``populated_size``, ``blocks_with_data`` (ranges).
``populated``
    guest-physical ranges that hold data (page granular).
``unknown``
    guest-physical RAM whose population could not be determined.
``totals``
    ``ram_size``, ``populated_size``, ``unknown_size``, ``virtio_mem_max_size``,
    ``virtio_mem_plugged_size``, ``virtio_mem_populated_size``, ``populated_extents``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qmpdump.memmap.layout import BackendType
from qmpdump.memmap.populated import Population, Source
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = ["SCHEMA", "MapReport", "VMSummary", "build_report"]

SCHEMA: Literal["qmpdump.map/1"] = "qmpdump.map/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpaRange(_Strict):
    """A guest-physical range."""

    gpa: int
    size: int


class VMSummary(_Strict):
    """Who the VM is."""

    address: str
    pid: int | None
    name: str | None
    qemu_version: str
    qemu_package: str
    run_state: str


class RangeEntry(_Strict):
    """One guest-physical RAM piece."""

    gpa: int
    size: int
    region: str
    backend: str | None
    backend_type: BackendType
    region_offset: int
    file_offset: int | None
    readonly: bool
    populated_size: int | None


class RegionEntry(_Strict):
    """One RAM region and how its population was found."""

    region: str
    backend: str | None
    backend_type: BackendType
    size: int
    mem_path: str | None
    population_source: Source
    exact: bool
    note: str
    populated_size: int | None


class VirtioMemEntry(_Strict):
    """One virtio-mem device."""

    id: str
    memaddr: int
    max_size: int
    block_size: int
    size: int
    requested_size: int
    memdev: str
    node: int
    plugged: list[GpaRange]
    plugged_exact: bool
    populated_size: int
    blocks_with_data: list[GpaRange]


class Totals(_Strict):
    """Sums over the whole VM."""

    ram_size: int
    populated_size: int
    unknown_size: int
    virtio_mem_max_size: int
    virtio_mem_plugged_size: int
    virtio_mem_populated_size: int
    populated_extents: int


class MapReport(_Strict):
    """The whole memory map of one VM at one moment."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_id: Literal["qmpdump.map/1"] = Field(default=SCHEMA, alias="schema")
    vm: VMSummary
    ranges: list[RangeEntry]
    regions: list[RegionEntry]
    virtio_mem: list[VirtioMemEntry]
    populated: list[GpaRange]
    unknown: list[GpaRange]
    totals: Totals

    def to_json(self) -> str:
        """The JSON document (``schema`` first)."""
        return self.model_dump_json(indent=2, by_alias=True)


def _ranges(ranges: Iterable[Range]) -> list[GpaRange]:
    return [GpaRange(gpa=r.start, size=r.size) for r in ranges]


def build_report(vm: VMSummary, population: Population) -> MapReport:
    """The JSON-ready report of a population (pure)."""
    layout = population.layout
    ranges = []
    for p in layout.pieces:
        region = population.regions.get(p.region)
        known = region is not None and region.known
        ranges.append(
            RangeEntry(
                gpa=p.gpa.start,
                size=p.gpa.size,
                region=p.region,
                backend=p.backend.id,
                backend_type=p.backend.type,
                region_offset=p.region_offset,
                file_offset=p.region_offset if p.backend.type.has_fd else None,
                readonly=p.readonly,
                populated_size=population.populated.clip(p.gpa).total if known else None,
            )
        )
    regions = []
    for b in layout.backends:
        found = population.regions.get(b.region)
        regions.append(
            RegionEntry(
                region=b.region,
                backend=b.id,
                backend_type=b.type,
                size=b.size,
                mem_path=b.mem_path,
                population_source=found.source if found else Source.UNKNOWN,
                exact=found.exact if found else False,
                note=found.note if found else "not inspected",
                populated_size=found.offsets.total if found and found.known else None,
            )
        )
    devices = [
        VirtioMemEntry(
            id=d.device.id,
            memaddr=d.device.memaddr,
            max_size=d.device.max_size,
            block_size=d.device.block_size,
            size=d.device.size,
            requested_size=d.device.requested_size,
            memdev=d.device.memdev,
            node=d.device.node,
            plugged=_ranges(d.plugged),
            plugged_exact=d.plugged_exact,
            populated_size=d.populated.total,
            blocks_with_data=_ranges(d.blocks_with_data),
        )
        for d in population.devices
    ]
    ram: RangeSet = layout.ram
    totals = Totals(
        ram_size=ram.total,
        populated_size=population.populated.total,
        unknown_size=population.unknown.total,
        virtio_mem_max_size=sum(d.device.max_size for d in population.devices),
        virtio_mem_plugged_size=sum(d.device.size for d in population.devices),
        virtio_mem_populated_size=sum(d.populated.total for d in population.devices),
        populated_extents=len(population.populated),
    )
    return MapReport(
        vm=vm,
        ranges=ranges,
        regions=regions,
        virtio_mem=devices,
        populated=_ranges(population.populated),
        unknown=_ranges(population.unknown),
        totals=totals,
    )
