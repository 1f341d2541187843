"""The guest-physical layout: which RAM lies at each guest-physical address, and where it lives.

A :class:`Layout` is the list of RAM pieces of the system address space's FlatView (QEMU's
``info mtree -f``, ``softmmu/memory.c``), each joined with the memory backend object behind its
RAM region (``backends/hostmem*.c``), plus the virtio-mem devices (``hw/virtio/virtio-mem.c``).
A piece says: guest-physical range ``gpa``, RAM region ``region``, byte offset ``region_offset``
of the piece's first byte inside the region. For fd-backed backends (memfd, file) the region
offset is the offset in the backing file (QEMU 7.2 maps backends from file offset 0).

Pure: built from already parsed facts, no I/O. The QMP side (:mod:`qmpdump.qmp.probe`) collects
the facts; the host side (:mod:`qmpdump.host`) finds the populated extents.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from qmpdump.errors import LayoutError
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = ["Backend", "BackendType", "Layout", "Piece", "VirtioMem", "build_layout"]


class BackendType(StrEnum):
    """How a RAM region's memory is held on the host."""

    MEMFD = "memfd"  # memory-backend-memfd: an fd, reachable through /proc/PID/fd
    FILE = "file"  # memory-backend-file: mem-path
    RAM = "ram"  # memory-backend-ram: anonymous memory of QEMU
    #: RAM outside any backend object (pc.bios, pc.rom, vga.vram). QEMU 7.2 makes default main
    #: RAM ``pc.ram`` a memory-backend-ram object of its own, so that one is RAM, not this.
    ANONYMOUS = "anonymous"

    @property
    def has_fd(self) -> bool:
        """Whether the memory is a file whose holes SEEK_DATA/SEEK_HOLE can see."""
        return self in (BackendType.MEMFD, BackendType.FILE)


@dataclass(frozen=True, slots=True)
class Backend:
    """The host memory behind one RAM region.

    ``id`` is the memory backend object's id (``ram0``, ``mem-vmem0``, ``pc.ram``), or None for
    RAM that belongs to no backend object (then ``region`` alone names it, e.g. ``pc.bios``).
    """

    region: str
    type: BackendType
    size: int
    id: str | None = None
    mem_path: str | None = None
    share: bool | None = None


@dataclass(frozen=True, slots=True)
class Piece:
    """One guest-physical range of RAM and where its bytes are."""

    gpa: Range
    region: str
    region_offset: int
    backend: Backend
    readonly: bool = False

    @property
    def region_range(self) -> Range:
        """The same bytes, in the RAM region's (= backing file's) offset space."""
        return Range(self.region_offset, self.gpa.size)

    def gpa_of(self, region_offset: int) -> int:
        """The guest-physical address of a region offset inside this piece."""
        return self.gpa.start + (region_offset - self.region_offset)

    def region_offset_of(self, gpa: int) -> int:
        """The region (file) offset of a guest-physical address inside this piece."""
        return self.region_offset + (gpa - self.gpa.start)


@dataclass(frozen=True, slots=True)
class VirtioMem:
    """One virtio-mem device, as ``query-memory-devices`` reports it (sizes in bytes)."""

    id: str
    memaddr: int
    max_size: int
    block_size: int
    size: int
    requested_size: int
    memdev: str  # the memory backend object's id
    node: int = 0

    @property
    def region(self) -> Range:
        """The device's whole guest-physical region, plugged or not."""
        return Range(self.memaddr, self.max_size)


@dataclass(frozen=True)
class Layout:
    """Guest-physical RAM pieces in address order, their backends and the virtio-mem devices."""

    pieces: tuple[Piece, ...]
    devices: tuple[VirtioMem, ...] = ()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(p.gpa.start for p in self.pieces))

    @property
    def ram(self) -> RangeSet:
        """Every guest-physical byte that is RAM, plugged or not."""
        return RangeSet.from_ranges(p.gpa for p in self.pieces)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Each distinct backend once, in order of first appearance."""
        return tuple({p.backend.region: p.backend for p in self.pieces}.values())

    def piece_at(self, gpa: int) -> Piece | None:
        """The piece holding a guest-physical address, if any."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and self.pieces[i].gpa.contains(gpa):
            return self.pieces[i]
        return None

    def pieces_of(self, region: str) -> tuple[Piece, ...]:
        """The pieces that map parts of one RAM region."""
        return tuple(p for p in self.pieces if p.region == region)

    def device_for(self, region: str) -> VirtioMem | None:
        """The virtio-mem device whose memory backend is this region, if any."""
        return next((d for d in self.devices if d.memdev == region), None)

    def region_to_gpa(self, region: str, offsets: RangeSet) -> RangeSet:
        """Translate a set of region (file) offsets to guest-physical addresses.

        Offsets that no piece maps (e.g. the part of main RAM hidden below 1 MiB by PCI holes)
        are dropped: they are not guest-visible.
        """
        parts = [
            offsets.clip(p.region_range).shift(p.gpa.start - p.region_offset)
            for p in self.pieces_of(region)
        ]
        out = RangeSet.empty()
        for part in parts:
            out = out | part
        return out

    def gpa_to_region(self, region: str, gpas: RangeSet) -> RangeSet:
        """Translate guest-physical addresses inside one region's pieces to region offsets."""
        out = RangeSet.empty()
        for p in self.pieces_of(region):
            out = out | gpas.clip(p.gpa).shift(p.region_offset - p.gpa.start)
        return out


def build_layout(pieces: Iterable[Piece], devices: Sequence[VirtioMem] = ()) -> Layout:
    """Check and assemble a layout; raises LayoutError naming the first inconsistency.

    Checks: pieces do not overlap; each piece lies inside its region's size; each virtio-mem
    device's memory backend is mapped whole at its memaddr.
    """
    ordered = sorted(pieces, key=lambda p: p.gpa.start)
    for prev, cur in itertools.pairwise(ordered):
        if cur.gpa.start < prev.gpa.end:
            raise LayoutError(
                f"RAM pieces overlap: {prev.region} at {prev.gpa} and {cur.region} at {cur.gpa}"
            )
    for p in ordered:
        if p.region_offset + p.gpa.size > p.backend.size:
            raise LayoutError(
                f"{p.region} at {p.gpa} reaches offset {p.region_offset + p.gpa.size:#x}, "
                f"past the end of its {p.backend.size:#x}-byte region"
            )
    layout = Layout(tuple(ordered), tuple(devices))
    for dev in devices:
        mapped = layout.pieces_of(dev.memdev)
        if [(p.gpa, p.region_offset) for p in mapped] != [(dev.region, 0)]:
            raise LayoutError(
                f"virtio-mem {dev.id}: its backend {dev.memdev} is not mapped whole at "
                f"{dev.memaddr:#x} (max size {dev.max_size:#x})"
            )
    return layout
