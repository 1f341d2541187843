"""Parse the RAM part of a QEMU migration stream (pure: reads bytes from a file-like object).

What a ``migrate`` writes, as QEMU 10.0 builds it (``migration/savevm.c``, ``migration/ram.c``,
``migration/vmstate.c``; all integers big-endian)::

    be32 0x5145564d ("QEVM"), be32 3                       qemu_savevm_state_header
    [0x07 CONFIGURATION: be32 len, machine type, subsections]
    sections until 0x00 EOF:
      0x01 START | 0x04 FULL: be32 section_id, u8 len + idstr, be32 instance_id, be32 version_id
      0x02 PART  | 0x03 END:  be32 section_id
      ... the section's body ...
      [0x7e FOOTER: be32 section_id]                         when section footers are on

The ``ram`` section (an iterable one: START in setup, PARTs while iterating, END at completion) is
a run of records, each a be64 of ``page offset | flags`` (flags in the low 12 bits: x86's 4 KiB
target page), then, unless ``CONTINUE`` is set, the RAM block's idstr (u8 len + bytes):

* ``MEM_SIZE`` (0x04), START only: the offset field is the total size; then each block's u8 len +
  idstr and be64 used length, until the sizes add up to the total. Capabilities add fields per
  block (``postcopy-ram``: a page size; ``ignore-shared``: an address; ``mapped-ram``: more):
  this parser is used with none of them and refuses the capabilities that add any.
* ``ZERO`` (0x02): a u8 fill byte (0 in every QEMU since 2.x): the page is all zeros.
* ``PAGE`` (0x08): 4096 bytes of the page.
* ``EOS`` (0x10): the end of this section's body.
* ``XBZRLE`` (0x40), ``COMPRESS_PAGE`` (0x100), ``MULTIFD_FLUSH`` (0x200) belong to capabilities
  qmpdump never enables: an error.

Device sections (FULL) carry VMState without a length: they cannot be skipped without knowing the
device's description. A background snapshot (``bg_migration_thread`` in
``migration/migration.c``) sends, in order: the header, the configuration, the setup of every
iterable section (``ram`` START with its block list, and the VMState of devices marked
``early_setup``: ``virtio-mem-device-early``, decoded here), then the RAM pages (PART sections;
pages the guest is about to write go first), then the device state it stashed at the snapshot
point (FULL sections, EOF, the JSON description). There is no ``ram`` END section:
``bg_migration_completion`` writes the stashed device state as soon as
``qemu_savevm_state_iterate`` reports all RAM sent, and only while the migration is still active
(a failed or cancelled snapshot just stops). So the first FULL section after the pages began
proves that every page was sent: :meth:`MigrationStream.records` yields :class:`RamDone` there
(or at a ``ram`` END section, which a classic migration sends) and stops; the caller drains the
rest.

``virtio-mem-device-early`` (``hw/virtio/virtio-mem.c``): be64 addr, be64 region size, be64
block size, be32 node (``vmstate_virtio_mem_sanity_checks``), be64 plugged size, then the plug
bitmap as be64 words (``VMSTATE_BITMAP``, one bit per block). Unplugged blocks' pages are not in
the stream (``ram_discard_manager``): the bitmap says which ranges the stream covers.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from qmpdump.errors import MigrationStreamError

__all__ = [
    "PAGE_SIZE",
    "EarlyVirtioMem",
    "MigrationStream",
    "Page",
    "PageSink",
    "RamBlockInfo",
    "RamBlocks",
    "RamDone",
    "Record",
    "RunSink",
]

MAGIC: Final = 0x5145564D
VERSION: Final = 3
PAGE_SIZE: Final = 4096
_FLAG_MASK: Final = PAGE_SIZE - 1

# Section types (savevm.c)
VM_EOF: Final = 0x00
SECTION_START: Final = 0x01
SECTION_PART: Final = 0x02
SECTION_END: Final = 0x03
SECTION_FULL: Final = 0x04
SUBSECTION: Final = 0x05
VMDESCRIPTION: Final = 0x06
CONFIGURATION: Final = 0x07
COMMAND: Final = 0x08
SECTION_FOOTER: Final = 0x7E

# RAM record flags (ram.c)
FLAG_ZERO: Final = 0x02
FLAG_MEM_SIZE: Final = 0x04
FLAG_PAGE: Final = 0x08
FLAG_EOS: Final = 0x10
FLAG_CONTINUE: Final = 0x20
FLAG_XBZRLE: Final = 0x40
FLAG_COMPRESS_PAGE: Final = 0x100
FLAG_MULTIFD_FLUSH: Final = 0x200
_KNOWN_FLAGS: Final = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_EARLY_VMEM = struct.Struct(">QQQIQ")
_EARLY_VMEM_NAME: Final = "virtio-mem-device-early"
_CHUNK: Final = 1 << 20
#: a zero page continuing the current block: be64 offset | ZERO | CONTINUE, u8 fill 0
_ZERO_RECORD: Final = 9
_ZERO_CONTINUE: Final = FLAG_ZERO | FLAG_CONTINUE
#: a data page continuing the current block: be64 offset | PAGE | CONTINUE, the 4096 bytes
_DATA_RECORD: Final = 8 + PAGE_SIZE
_DATA_CONTINUE: Final = FLAG_PAGE | FLAG_CONTINUE


class PageSink(Protocol):
    """Receives pages from :meth:`MigrationStream.feed`; ``data`` None means all zero."""

    def page(self, block: str, offset: int, data: bytes | None, /) -> None: ...


class RunSink(PageSink, Protocol):
    """A sink that also takes runs of pages at once: ``count`` pages from ``offset``, all zero,
    or ``data`` holding their ``count * 4096`` bytes."""

    def zero_run(self, block: str, offset: int, count: int, /) -> None: ...

    def data_run(self, block: str, offset: int, count: int, data: bytes, /) -> None: ...


class Readable(Protocol):
    """What the parser reads from: ``read(n)`` returns up to ``n`` bytes, fewer only at the end."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One RAM block of the stream: QEMU's idstr and its used length (bytes)."""

    idstr: str
    used_length: int


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """The block list of the ``ram`` section's setup (the first RAM record)."""

    blocks: tuple[RamBlockInfo, ...]


@dataclass(frozen=True, slots=True)
class EarlyVirtioMem:
    """A ``virtio-mem-device-early`` section: which blocks of the device are plugged."""

    idstr: str
    addr: int
    region_size: int
    block_size: int
    node: int
    size: int
    #: the plugged ranges, as (start, size) in bytes from ``addr``, in order
    plugged: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Page:
    """One 4 KiB page of block ``block`` at byte ``offset``; ``data`` None means all zero."""

    block: str
    offset: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class RamDone:
    """QEMU has sent every page: device state (or the ``ram`` END section) came next."""


Record = RamBlocks | EarlyVirtioMem | Page | RamDone


class MigrationStream:
    """A pull parser over one migration stream (see the module docstring for the format)."""

    def __init__(self, source: Readable) -> None:
        self._src = source
        self._ram_section: int | None = None
        self._blocks: dict[str, RamBlockInfo] = {}
        self._block: str | None = None
        # Read in large chunks, parsed from a buffer: per-record calls into the source would
        # cost more than the records (a page record is 8 + 4096 bytes, a zero page 9).
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]

    @property
    def position(self) -> int:
        """Bytes of the stream parsed so far (for error messages and tests)."""
        return self._base + self._pos

    def leftover(self) -> bytes:
        """Bytes read from the source but not parsed (the start of what follows the RAM)."""
        return self._buf[self._pos :]

    # -- primitives -------------------------------------------------------------------------
    def _fill(self, size: int) -> None:
        """Make ``size`` bytes available at ``self._pos``, or raise at the stream's end."""
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        self._base += self._pos
        while have < size:
            chunk = self._src.read(max(size - have, _CHUNK))
            if not chunk:
                self._buf, self._pos = b"".join(parts), 0
                raise MigrationStreamError(
                    f"the migration stream ended at byte {self._base + have:#x}, "
                    f"{size - have} bytes short of a complete record"
                )
            parts.append(chunk)
            have += len(chunk)
        self._buf, self._pos = b"".join(parts), 0

    def _read(self, size: int) -> bytes:
        if self._pos + size > len(self._buf):
            self._fill(size)
        data = self._buf[self._pos : self._pos + size]
        self._pos += size
        return data

    def _unread(self, _byte: int) -> None:
        self._pos -= 1  # the byte just read is still in the buffer

    def _u8(self) -> int:
        if self._pos + 1 > len(self._buf):
            self._fill(1)
        value = self._buf[self._pos]
        self._pos += 1
        return value

    def _be32(self) -> int:
        if self._pos + 4 > len(self._buf):
            self._fill(4)
        value: int = _BE32.unpack_from(self._buf, self._pos)[0]
        self._pos += 4
        return value

    def _be64(self) -> int:
        if self._pos + 8 > len(self._buf):
            self._fill(8)
        value: int = _BE64.unpack_from(self._buf, self._pos)[0]
        self._pos += 8
        return value

    def _string(self) -> str:
        return self._read(self._u8()).decode("ascii", "replace")

    def _fail(self, what: str) -> MigrationStreamError:
        return MigrationStreamError(f"{what} (at byte {self.position:#x} of the stream)")

    # -- structure --------------------------------------------------------------------------
    def records(self) -> Iterator[Record]:
        """Yield the RAM block list, early device sections, pages, and :class:`RamDone` last.

        Stops at the first device section after the pages (or the ``ram`` END section); what
        follows is not read.
        """
        return self._walk(None)

    def feed(self, sink: PageSink) -> Iterator[Record]:
        """As :meth:`records`, but pages go to ``sink.page`` as they are parsed (no object per
        page: the snapshot engine's hot path) and only the other records are yielded."""
        return self._walk(sink)

    def _walk(self, sink: PageSink | None) -> Iterator[Record]:
        self._header()
        iterating = False  # a PART section was seen: the setup is over
        while True:
            kind = self._u8()
            if kind == SECTION_FULL and iterating:
                # The device state QEMU stashed at the snapshot point follows the last page.
                yield RamDone()
                return
            if kind in (SECTION_START, SECTION_FULL):
                yield from self._named_section(kind)
            elif kind in (SECTION_PART, SECTION_END):
                section_id = self._be32()
                if section_id != self._ram_section:
                    raise self._fail(f"section {section_id} continues, but it is not ram")
                iterating = True
                if sink is None:
                    yield from self._ram_body(setup=False)
                else:
                    self._pages(sink)
                self._footer(section_id)
                if kind == SECTION_END:
                    yield RamDone()
                    return
            elif kind == COMMAND:
                self._be16_command()
            elif kind == VM_EOF:
                raise self._fail("the stream ended (EOF section) before the ram section did")
            else:
                raise self._fail(f"unexpected section type {kind:#04x}")

    def _named_section(self, kind: int) -> Iterator[Record]:
        """A START or FULL section during the setup: ``ram``'s block list, or early VMState."""
        section_id = self._be32()
        idstr = self._string()
        self._be32()  # instance_id
        version = self._be32()
        if kind == SECTION_START:
            if idstr != "ram":
                raise self._fail(f"iterable section {idstr!r} is not supported (only ram)")
            if version != 4:
                raise self._fail(f"ram section version {version} (only 4 is known)")
            self._ram_section = section_id
            yield from self._ram_body(setup=True)
        else:
            yield self._full_section(idstr)
        self._footer(section_id)

    def _header(self) -> None:
        magic, version = self._be32(), self._be32()
        if magic != MAGIC:
            raise self._fail(f"not a QEMU migration stream (magic {magic:#010x})")
        if version != VERSION:
            raise self._fail(f"migration stream version {version} (only {VERSION} is known)")
        first = self._read(1)[0]
        if first != CONFIGURATION:
            # No configuration section (old machine types): give the byte back.
            self._unread(first)
            return
        self._read(self._be32())  # machine type name
        while True:
            peek = self._read(1)[0]
            if peek != SUBSECTION:
                self._unread(peek)
                return
            name = self._string()
            self._be32()  # version
            if name == "configuration/capabilities":
                for _ in range(self._be32()):
                    self._string()
            elif name == "configuration/uuid":
                self._read(16)
            else:
                raise self._fail(f"unknown configuration subsection {name!r}")

    def _footer(self, section_id: int) -> None:
        kind = self._u8()
        if kind != SECTION_FOOTER:
            # Machine types without footers (send-section-footer=off): give the byte back.
            self._unread(kind)
            return
        got = self._be32()
        if got != section_id:
            raise self._fail(f"footer of section {got}, expected {section_id}")

    def _be16_command(self) -> None:
        head = self._read(4)
        length = int.from_bytes(head[2:4], "big")
        self._read(length)

    def _full_section(self, idstr: str) -> EarlyVirtioMem:
        if not idstr.endswith(_EARLY_VMEM_NAME):
            raise self._fail(
                f"device section {idstr!r} comes before the RAM pages: its state has no length, "
                "and qmpdump cannot skip it"
            )
        addr, region_size, block_size, node, size = _EARLY_VMEM.unpack(self._read(_EARLY_VMEM.size))
        if block_size <= 0 or region_size % block_size:
            raise self._fail(f"{idstr}: block size {block_size:#x}, region {region_size:#x}")
        nbits = region_size // block_size
        words = self._read(8 * -(-nbits // 64))
        plugged: list[tuple[int, int]] = []
        for bit in range(nbits):
            word = int.from_bytes(words[8 * (bit // 64) : 8 * (bit // 64) + 8], "big")
            if word >> (bit % 64) & 1:
                start = bit * block_size
                if plugged and plugged[-1][0] + plugged[-1][1] == start:
                    plugged[-1] = (plugged[-1][0], plugged[-1][1] + block_size)
                else:
                    plugged.append((start, block_size))
        return EarlyVirtioMem(idstr, addr, region_size, block_size, node, size, tuple(plugged))

    def _ram_body(self, *, setup: bool) -> Iterator[Record]:
        while True:
            header = self._be64()
            flags = header & _FLAG_MASK
            offset = header & ~_FLAG_MASK
            if flags & ~_KNOWN_FLAGS:
                raise self._fail(
                    f"RAM record flags {flags:#x}: compression, XBZRLE or multifd are not supported"
                )
            if flags & FLAG_EOS:
                return
            if flags & FLAG_MEM_SIZE:
                if not setup:
                    raise self._fail("a RAM block list outside the ram section's setup")
                yield self._block_list(total=offset)
                continue
            if not flags & FLAG_CONTINUE:
                self._block = self._string()
                if self._block not in self._blocks:
                    raise self._fail(f"a page of RAM block {self._block!r}, not in the block list")
            elif self._block is None:
                raise self._fail("a CONTINUE record before any RAM block was named")
            block = self._blocks[self._block]
            if offset + PAGE_SIZE > block.used_length:
                raise self._fail(
                    f"page {offset:#x} lies past the end of {block.idstr} ({block.used_length:#x})"
                )
            if flags & FLAG_ZERO:
                fill = self._u8()
                yield Page(block.idstr, offset, None if fill == 0 else bytes([fill]) * PAGE_SIZE)
            elif flags & FLAG_PAGE:
                yield Page(block.idstr, offset, self._read(PAGE_SIZE))
            else:
                raise self._fail(f"RAM record without a page (flags {flags:#x})")

    def _pages(self, sink: PageSink) -> None:
        """The records of one PART section, straight to ``sink`` (same checks as _ram_body)."""
        blocks = self._blocks
        deliver = sink.page
        while True:
            header = self._be64()
            flags = header & _FLAG_MASK
            if flags == FLAG_EOS:
                return
            offset = header - flags
            if flags & ~(FLAG_ZERO | FLAG_PAGE | FLAG_CONTINUE):
                raise self._fail(f"RAM record flags {flags:#x} inside the pages")
            if not flags & FLAG_CONTINUE:
                self._block = self._string()
            name = self._block
            block = blocks.get(name) if name is not None else None
            if block is None:
                raise self._fail(f"a page of RAM block {name!r}, not in the block list")
            if offset + PAGE_SIZE > block.used_length:
                raise self._fail(
                    f"page {offset:#x} lies past the end of {name} ({block.used_length:#x})"
                )
            if flags & FLAG_ZERO:
                fill = self._u8()
                deliver(block.idstr, offset, None if fill == 0 else bytes([fill]) * PAGE_SIZE)
                if fill == 0:
                    self._zeros_after(block, offset, sink)
            elif flags & FLAG_PAGE:
                deliver(block.idstr, offset, self._read(PAGE_SIZE))
                self._data_after(block, offset, sink)
            else:
                raise self._fail(f"RAM record without a page (flags {flags:#x})")

    def _zeros_after(self, block: RamBlockInfo, offset: int, sink: PageSink) -> None:
        """Deliver the run of zero pages that follows the zero page at ``offset``, if any."""
        most = (block.used_length - offset) // PAGE_SIZE - 1
        start = offset + PAGE_SIZE
        run = self._run(start, most, _ZERO_RECORD, _ZERO_CONTINUE) if most > 0 else 0
        if not run:
            return
        self._pos += _ZERO_RECORD * run
        runs = getattr(sink, "zero_run", None)
        if runs is not None:
            runs(block.idstr, start, run)
            return
        for at in range(start, start + run * PAGE_SIZE, PAGE_SIZE):
            sink.page(block.idstr, at, None)

    def _data_after(self, block: RamBlockInfo, offset: int, sink: PageSink) -> None:
        """Deliver the run of data pages that follows the data page at ``offset``, if any."""
        most = (block.used_length - offset) // PAGE_SIZE - 1
        start = offset + PAGE_SIZE
        run = self._run(start, most, _DATA_RECORD, _DATA_CONTINUE) if most > 0 else 0
        if not run:
            return
        at = self._pos
        buf = self._buf
        self._pos += _DATA_RECORD * run
        runs = getattr(sink, "data_run", None)
        if runs is not None:
            view = memoryview(buf)
            data = b"".join(
                view[p + 8 : p + _DATA_RECORD]
                for p in range(at, at + run * _DATA_RECORD, _DATA_RECORD)
            )
            runs(block.idstr, start, run, data)
            return
        for i in range(run):
            p = at + i * _DATA_RECORD
            sink.page(block.idstr, start + i * PAGE_SIZE, buf[p + 8 : p + _DATA_RECORD])

    def _run(self, start: int, most: int, size: int, flags: int) -> int:
        """How many records at the cursor continue the current block in order at ``start``,
        ``start + 4096``, ..., each of ``size`` bytes with exactly ``flags`` (at most ``most``;
        only what is already buffered).

        QEMU sends memory in order, a record per page: this finds a run with a few byte-string
        comparisons instead of a Python step per page. A quick look at the next record first
        (most runs of one), then galloping and a bisection: the cost is proportional to the run.
        """
        pos, buf = self._pos, self._buf
        avail = min((len(buf) - pos) // size, most)
        if (
            avail < 1
            or buf[pos + 7] != flags & 0xFF
            or (size == _ZERO_RECORD and buf[pos + 8] != 0)
            or int.from_bytes(buf[pos : pos + 8], "big") != start | flags
        ):
            return 0
        good, count = 1, 2
        while count <= avail and self._is_run(start, good, count, size, flags):
            good, count = count, count * 2
        bad = min(count, avail + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            if self._is_run(start, good, mid, size, flags):
                good = mid
            else:
                bad = mid
        return good

    def _is_run(self, start: int, first: int, count: int, size: int, flags: int) -> bool:
        """Whether records ``first`` to ``count - 1`` after the cursor are those of the run."""
        at = self._pos + first * size
        chunk = self._buf[at : at + size * (count - first)]
        n = count - first
        if size == _ZERO_RECORD and chunk[8::size] != bytes(n):
            return False
        base = start + first * PAGE_SIZE
        headers = array("Q", range(base | flags, base + n * PAGE_SIZE, PAGE_SIZE))
        if sys.byteorder == "little":
            headers.byteswap()
        expected = headers.tobytes()
        return all(chunk[j::size] == expected[j::8] for j in range(8))

    def _block_list(self, total: int) -> RamBlocks:
        blocks: list[RamBlockInfo] = []
        seen = 0
        while seen < total:
            idstr = self._string()
            used = self._be64()
            if used <= 0 or used % PAGE_SIZE:
                raise self._fail(f"RAM block {idstr!r} of {used:#x} bytes")
            blocks.append(RamBlockInfo(idstr, used))
            seen += used
        if seen != total:
            raise self._fail(f"RAM blocks add up to {seen:#x}, the stream said {total:#x}")
        self._blocks = {b.idstr: b for b in blocks}
        return RamBlocks(tuple(blocks))
