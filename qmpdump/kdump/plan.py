"""Plan a kdump-compressed file of populated guest memory: headers, bitmaps, page order (pure).

:func:`plan_kdump` takes QEMU's note payload (NT_PRSTATUS and QEMU CPU state per vCPU, the
guest's VMCOREINFO), the guest-physical RAM that exists (``ram``: QEMU's PT_LOAD coverage,
unplugged virtio-mem left out) and the part of it to read (``runs``: populated or unknown
memory, already located in RAM regions), and returns a :class:`KdumpPlan`: every header byte,
the 1st bitmap, and the pages to read in the order their data is written (pfn order). Only the
2nd bitmap, the page descriptors and the page data depend on what the pages hold; the writer
(:mod:`qmpdump.engines.kdump_writer`) fills them in the plan's order, so the output does not
depend on which compression thread finishes first.

Zero pages (RAM not populated on the host, and populated pages whose bytes are all zero):

* ``ZeroPages.EXCLUDE_HOLES`` (default): RAM the host never populated is left out of the 2nd
  bitmap (readers report it as excluded; crash and libkdumpfile can be told to read it as
  zeros); populated pages found all zero point at one zero page stored raw at the start of the
  page data. Descriptors cost 24 bytes per populated page, whatever the size of the RAM.
* ``ZeroPages.EXCLUDE``: every zero page is left out, as makedumpfile's dump level 1
  (``DL_EXCLUDE_ZERO``). Smallest, but makedumpfile 1.7.2 refuses to read any excluded page
  (``readpage_kdump_compressed``: "pfn is excluded"), and kernel structures that span a zero
  page exist: on the test guest ``--dump-dmesg`` fails on the printk ring's descriptors.
* ``ZeroPages.SHARED``: every RAM page is dumped; zero pages' descriptors all point at the one
  zero page, as QEMU's ``write_dump_pages`` and makedumpfile at dump level 0 do. Costs 24 bytes
  per RAM page: 6 GiB of descriptors for a plugged but empty 1 TiB virtio-mem device, 24 MiB
  for the 4 GiB reference VM (measured: 71 MiB against 51 MiB for the default, zlib).

Header fields, and where they come from (makedumpfile ``write_kdump_header``, QEMU
``create_header64``):

* ``block_size`` = the guest page size (VMCOREINFO ``PAGESIZE``); every area starts on a block.
* ``sub_hdr_size`` = blocks holding the sub header followed by the notes (QEMU puts the notes
  right after the sub header: ``offset_note`` = block_size + 104).
* ``bitmap_blocks`` = 2 x the blocks of one bitmap of ``max_mapnr`` bits.
* ``max_mapnr`` = the pfn after the last RAM page; the 32-bit header field is clamped, the full
  value is the sub header's ``max_mapnr_64`` (v6).
* ``nr_cpus`` = the NT_PRSTATUS notes (one per vCPU in QEMU's dump).
* ``status`` = the codec's ``DUMP_DH_COMPRESSED_*`` flag (makedumpfile sets it for the codec
  chosen, QEMU likewise).
* ``total_ram_blocks``, ``device_blocks``, ``written_blocks``, ``current_cpu``: 0, as both
  makedumpfile and QEMU leave them (diskdump-era fields no reader of kdump files uses).
* ``utsname``: sysname ``Linux``, release from VMCOREINFO ``OSRELEASE``, machine from the ELF
  machine; the caller may pass the kernel's own (``init_uts_ns``) for the rest. QEMU fills
  only ``machine``.
* sub header: ``phys_base`` from VMCOREINFO ``NUMBER(phys_base)`` (0 when absent, as QEMU on
  non-x86), ``dump_level`` 1 when every zero page is excluded (else 0), ``split`` 0,
  ``offset_vmcoreinfo``/``size_vmcoreinfo`` the VMCOREINFO note's descriptor inside the notes,
  ``offset_note``/``size_note`` the notes, no erase info, ``max_mapnr_64``.
* Holes between RAM ranges are in neither bitmap.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from qmpdump.elf.plan import EM_AARCH64, EM_X86_64
from qmpdump.errors import ElfFormatError
from qmpdump.kdump.format import (
    DUMP_LEVEL_EXCLUDE_ZERO,
    PAGE_DESC,
    SUB_HEADER,
    DiskDumpHeader,
    KdumpSubHeader,
    Utsname,
    VmcoreInfo,
    find_note,
    pack_header,
    pack_sub_header,
    parse_vmcoreinfo,
)
from qmpdump.memmap.ranges import RangeSet

__all__ = [
    "DEFAULT_BATCH_PAGES",
    "Batch",
    "KdumpPlan",
    "LocatedRun",
    "ZeroPages",
    "ZeroSpan",
    "plan_kdump",
    "set_bits",
    "vmcoreinfo_of",
]

#: Pages per unit of work of a compression thread (1 MiB of 4 KiB pages).
DEFAULT_BATCH_PAGES: Final = 256
_MACHINES: Final = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}
_NT_PRSTATUS: Final = 1
_NHDR: Final = struct.Struct("<III")


class ZeroPages(enum.StrEnum):
    """What becomes of zero pages (see the module docstring)."""

    EXCLUDE = "exclude"
    SHARED = "shared"
    EXCLUDE_HOLES = "exclude-holes"

    @property
    def shares_read_zeros(self) -> bool:
        """Whether all-zero pages read from the host point at the shared zero page."""
        return self is not ZeroPages.EXCLUDE

    @property
    def shares_holes(self) -> bool:
        """Whether RAM pages the host does not hold point at the shared zero page."""
        return self is ZeroPages.SHARED


class LocatedRun(Protocol):
    """Guest-physical bytes ``[gpa, gpa + size)`` are RAM region ``region`` at ``region_offset``."""

    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def region(self) -> str: ...
    @property
    def region_offset(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Batch:
    """``pages`` pages from ``pfn`` on, to read from ``region`` at ``region_offset``."""

    pfn: int
    pages: int
    region: str
    region_offset: int


@dataclass(frozen=True, slots=True)
class ZeroSpan:
    """``pages`` RAM pages from ``pfn`` on that the host does not hold (zero)."""

    pfn: int
    pages: int


@dataclass(frozen=True, slots=True)
class KdumpPlan:
    """Everything about the file that does not depend on the pages' bytes.

    ``prefix`` is blocks 0 to the 1st bitmap (header, sub header, notes, padding). The 2nd
    bitmap starts at ``bitmap_offset + bitmap_size``; descriptors at ``desc_offset``; page data
    at ``data_offset`` (with ``ZeroPages.SHARED``, the zero page first). ``items`` are the
    batches to read and, between them, the RAM pages the host does not hold, in pfn order.
    """

    prefix: bytes
    bitmap1: bytes
    block_size: int
    bitmap_offset: int
    bitmap_size: int
    desc_offset: int
    data_offset: int
    max_mapnr: int
    zero_pages: ZeroPages
    codec_flag: int
    items: tuple[Batch | ZeroSpan, ...]
    ram_pages: int
    read_pages: int

    @property
    def bitmap2_offset(self) -> int:
        """Where the 2nd bitmap starts."""
        return self.bitmap_offset + self.bitmap_size

    @property
    def zero_desc(self) -> bytes:
        """The descriptor every zero page gets with ``ZeroPages.SHARED``: the raw zero page."""
        return PAGE_DESC.pack(self.data_offset, self.block_size, 0, 0)

    @property
    def first_page_offset(self) -> int:
        """Where the first data page goes (after the shared zero page, if any)."""
        shared = self.zero_pages.shares_read_zeros
        return self.data_offset + (self.block_size if shared else 0)

    def batches(self) -> Iterator[Batch]:
        """The batches alone, in order."""
        return (item for item in self.items if isinstance(item, Batch))


def set_bits(bitmap: bytearray, start: int, count: int) -> None:
    """Set bits ``[start, start + count)`` of ``bitmap`` (bit n is bit n % 8 of byte n // 8)."""
    end = start + count
    while start < end and start % 8:
        bitmap[start // 8] |= 1 << (start % 8)
        start += 1
    full = (end - start) // 8
    if full > 0:
        bitmap[start // 8 : start // 8 + full] = b"\xff" * full
        start += full * 8
    while start < end:
        bitmap[start // 8] |= 1 << (start % 8)
        start += 1


def _blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _count_prstatus(notes: bytes) -> int:
    nhdr = _NHDR
    offset = count = 0
    while offset + nhdr.size <= len(notes):
        namesz, descsz, ntype = nhdr.unpack_from(notes, offset)
        name = notes[offset + nhdr.size : offset + nhdr.size + namesz].rstrip(b"\0")
        if ntype == _NT_PRSTATUS and name == b"CORE":
            count += 1
        offset += nhdr.size + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return count


def vmcoreinfo_of(notes: bytes) -> VmcoreInfo | None:
    """The guest's VMCOREINFO from a note payload, or ``None`` when the guest gave none."""
    ref = find_note(notes, b"VMCOREINFO")
    if ref is None:
        return None
    return parse_vmcoreinfo(notes[ref.desc_offset : ref.desc_offset + ref.desc_size])


def _page_ranges(ranges: RangeSet, page: int) -> RangeSet:
    """``ranges`` rounded out to whole pages."""
    return RangeSet.from_ranges(
        (r.start // page * page, -(-r.end // page) * page - r.start // page * page) for r in ranges
    )


def _batches(runs: Sequence[LocatedRun], page: int, batch_pages: int) -> list[Batch]:
    out: list[Batch] = []
    for run in sorted(runs, key=lambda r: r.gpa):
        if run.gpa % page or run.size % page or run.region_offset % page:
            raise ValueError(
                f"run at {run.gpa:#x} (+{run.size:#x}, {run.region}@{run.region_offset:#x}) "
                f"is not page-aligned ({page:#x})"
            )
        pfn, pages, offset = run.gpa // page, run.size // page, run.region_offset
        while pages:
            take = min(pages, batch_pages - (pfn % batch_pages))
            out.append(Batch(pfn, take, run.region, offset))
            pfn, pages, offset = pfn + take, pages - take, offset + take * page
    return out


def plan_kdump(
    notes: bytes,
    ram: RangeSet,
    runs: Sequence[LocatedRun],
    *,
    codec_flag: int,
    zero_pages: ZeroPages = ZeroPages.EXCLUDE_HOLES,
    machine: int = EM_X86_64,
    utsname: Utsname | None = None,
    timestamp_s: int = 0,
    batch_pages: int = DEFAULT_BATCH_PAGES,
) -> KdumpPlan:
    """Plan a kdump-compressed file (see the module docstring for each field).

    ``ram``: the guest-physical RAM that exists (1st bitmap). ``runs``: the part of it to read,
    page-aligned, located in RAM regions (must lie inside ``ram``). ``utsname``: the kernel's
    own when the caller could read it; by default one made from VMCOREINFO and ``machine``.

    Raises ``ValueError`` for bad arguments, :class:`ElfFormatError` for bad notes.
    """
    if batch_pages <= 0:
        raise ValueError(f"batch_pages must be > 0, not {batch_pages}")
    info = vmcoreinfo_of(notes)
    page = info.page_size if info is not None else 4096
    if page <= 0 or page & (page - 1):
        raise ElfFormatError(f"VMCOREINFO gives a page size of {page}, not a power of two")
    ram = _page_ranges(ram, page)
    batches = _batches(runs, page, batch_pages)
    read = RangeSet.from_ranges((b.pfn * page, b.pages * page) for b in batches)
    if read - ram:
        first = next(iter(read - ram))
        raise ValueError(f"pages to read lie outside RAM, first at {first}")
    if not ram:
        raise ValueError("no RAM to dump")

    max_mapnr = max(r.end for r in ram) // page
    bitmap_size = _blocks(_blocks(max_mapnr, 8), page) * page
    bitmap1 = bytearray(bitmap_size)
    for r in ram:
        set_bits(bitmap1, r.start // page, r.size // page)

    sub_at = page  # DISKDUMP_HEADER_BLOCKS = 1
    note_at = sub_at + SUB_HEADER.size
    sub_hdr_blocks = _blocks(SUB_HEADER.size + len(notes), page)
    bitmap_offset = (1 + sub_hdr_blocks) * page
    desc_offset = bitmap_offset + 2 * bitmap_size
    ram_pages = ram.total // page
    read_pages = read.total // page
    # Descriptors for every page that may be dumped: exact when zero pages are shared; an upper
    # bound when they are excluded (which pages are zero is known only once read): the space
    # left over stays a hole in the file.
    max_dumped = ram_pages if zero_pages.shares_holes else read_pages
    data_offset = _blocks(desc_offset + PAGE_DESC.size * max_dumped, page) * page

    vmcoreinfo = find_note(notes, b"VMCOREINFO")
    if utsname is None:
        utsname = Utsname(
            release=info.osrelease if info is not None else "",
            machine=_MACHINES.get(machine, ""),
        )
    header = pack_header(
        DiskDumpHeader(
            utsname=utsname,
            block_size=page,
            sub_hdr_size=sub_hdr_blocks,
            bitmap_blocks=2 * bitmap_size // page,
            max_mapnr=max_mapnr,
            nr_cpus=_count_prstatus(notes),
            status=codec_flag,
            timestamp_s=timestamp_s,
        )
    )
    sub = pack_sub_header(
        KdumpSubHeader(
            phys_base=(info.phys_base or 0) if info is not None else 0,
            dump_level=DUMP_LEVEL_EXCLUDE_ZERO if zero_pages is ZeroPages.EXCLUDE else 0,
            offset_vmcoreinfo=0 if vmcoreinfo is None else note_at + vmcoreinfo.desc_offset,
            size_vmcoreinfo=0 if vmcoreinfo is None else vmcoreinfo.desc_size,
            offset_note=note_at,
            size_note=len(notes),
            max_mapnr=max_mapnr,
        )
    )
    prefix = header.ljust(page, b"\0") + (sub + notes).ljust(sub_hdr_blocks * page, b"\0")

    items: list[Batch | ZeroSpan] = []
    holes = ram - read
    hole_iter = iter(holes)
    hole = next(hole_iter, None)
    for batch in batches:
        while hole is not None and hole.start < batch.pfn * page:
            items.append(ZeroSpan(hole.start // page, hole.size // page))
            hole = next(hole_iter, None)
        items.append(batch)
    while hole is not None:
        items.append(ZeroSpan(hole.start // page, hole.size // page))
        hole = next(hole_iter, None)

    return KdumpPlan(
        prefix=prefix,
        bitmap1=bytes(bitmap1),
        block_size=page,
        bitmap_offset=bitmap_offset,
        bitmap_size=bitmap_size,
        desc_offset=desc_offset,
        data_offset=data_offset,
        max_mapnr=max_mapnr,
        zero_pages=zero_pages,
        codec_flag=codec_flag,
        items=tuple(items),
        ram_pages=ram_pages,
        read_pages=read_pages,
    )
