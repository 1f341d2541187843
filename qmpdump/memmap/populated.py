"""Populated memory: which guest-physical bytes really hold data on the host.

Inputs are per RAM region, in region (= backing file) offset space, as the host side found them
(:mod:`qmpdump.host`): SEEK_DATA extents for fd-backed RAM, PAGEMAP_SCAN pages for anonymous
RAM, or "unknown" with a reason where QEMU's memory could not be inspected. This module turns them
into guest-physical sets and a per-virtio-mem-device summary.

virtio-mem (``hw/virtio/virtio-mem.c``) discards unplugged blocks (``ram_block_discard_range``:
a hole punch on file and memfd backends, MADV_DONTNEED on anonymous ones), so populated memory
inside a device is always plugged. QMP does not expose the plug bitmap; when the exact plugged
ranges are known (from the program headers of QEMU's own dump, see
:mod:`qmpdump.qmp.plugged`) they are used, otherwise the plugged set is *inferred*: the blocks
that hold data, which is a subset of the plugged blocks.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from qmpdump.memmap.layout import Layout, VirtioMem
from qmpdump.memmap.ranges import RangeSet

__all__ = [
    "DevicePopulation",
    "Population",
    "RegionPopulation",
    "Source",
    "compute_population",
]


class Source(StrEnum):
    """How a region's populated set was found."""

    SEEK_DATA = "seek_data"  # lseek SEEK_DATA/SEEK_HOLE on the backing file: exact, 4 KiB pages
    PAGEMAP_SCAN = "pagemap_scan"  # PAGEMAP_SCAN ioctl, zero-page mappings excluded: exact
    #: a private file mapping (``share=off``): the file's SEEK_DATA extents united with QEMU's
    #: copy-on-write pages of the mapping (PAGEMAP_SCAN): exact
    SEEK_DATA_AND_PAGEMAP_SCAN = "seek_data+pagemap_scan"
    PAGEMAP = "pagemap"  # raw pagemap: may count pages mapped to the zero page (a superset)
    UNKNOWN = "unknown"  # QEMU's memory could not be inspected; see the note


@dataclass(frozen=True, slots=True)
class RegionPopulation:
    """The populated part of one RAM region, in region-offset space."""

    region: str
    offsets: RangeSet
    source: Source
    note: str = ""

    @property
    def exact(self) -> bool:
        """True when ``offsets`` is exactly the populated memory (not a superset, not unknown)."""
        return self.source in (
            Source.SEEK_DATA,
            Source.PAGEMAP_SCAN,
            Source.SEEK_DATA_AND_PAGEMAP_SCAN,
        )

    @property
    def known(self) -> bool:
        """False when the region could not be inspected at all."""
        return self.source is not Source.UNKNOWN


@dataclass(frozen=True, slots=True)
class DevicePopulation:
    """What one virtio-mem device holds."""

    device: VirtioMem
    #: guest-physical plugged ranges; exact, or inferred from the blocks with data
    plugged: RangeSet
    plugged_exact: bool
    #: guest-physical populated ranges inside the device region (page granular)
    populated: RangeSet
    #: the device blocks that hold any data
    blocks_with_data: RangeSet


@dataclass(frozen=True, slots=True)
class Population:
    """Populated memory of a whole VM, in guest-physical space."""

    layout: Layout
    regions: Mapping[str, RegionPopulation]
    #: guest-physical bytes known to hold data
    populated: RangeSet
    #: guest-physical RAM whose population is unknown (treat as populated when reading)
    unknown: RangeSet
    devices: tuple[DevicePopulation, ...]

    @property
    def exact(self) -> bool:
        """Whether every RAM region's population is exactly known."""
        return not self.unknown and all(r.exact for r in self.regions.values())


def _device_population(
    device: VirtioMem, populated: RangeSet, exact_plugged: RangeSet | None
) -> DevicePopulation:
    region = device.region
    inside = populated.clip(region)
    blocks = inside.align_out(device.block_size).clip(region)
    if exact_plugged is not None:
        return DevicePopulation(device, exact_plugged.clip(region), True, inside, blocks)
    return DevicePopulation(device, blocks, False, inside, blocks)


def compute_population(
    layout: Layout,
    regions: Mapping[str, RegionPopulation],
    exact_plugged: Mapping[str, RangeSet] | None = None,
) -> Population:
    """Combine per-region populations into guest-physical sets and per-device summaries.

    ``exact_plugged`` maps a virtio-mem device id to its plugged guest-physical ranges when
    they are exactly known. A region missing from ``regions`` counts as unknown.
    """
    populated = RangeSet.empty()
    unknown = RangeSet.empty()
    for backend in layout.backends:
        found = regions.get(backend.region)
        if found is None or not found.known:
            for piece in layout.pieces_of(backend.region):
                unknown = unknown | RangeSet.of(piece.gpa.start, piece.gpa.size)
            continue
        populated = populated | layout.region_to_gpa(backend.region, found.offsets)
    plugged = exact_plugged or {}
    devices = tuple(_device_population(d, populated, plugged.get(d.id)) for d in layout.devices)
    return Population(layout, dict(regions), populated, unknown, devices)
