"""The kdump-compressed ("diskdump") file format as makedumpfile writes it, header version 6.

Pure: struct layouts, constants and packing; no I/O. Field names and meanings follow
makedumpfile's ``diskdump_mod.h`` (``struct disk_dump_header``, ``struct kdump_sub_header``,
``page_desc_t``) and QEMU's ``include/sysemu/dump.h`` (``DiskDumpHeader64``,
``KdumpSubHeader64``, ``PageDescriptor``), little-endian, for 64-bit guests. The standard
(seekable) layout, in blocks of ``block_size`` (the guest's page size)::

    block 0                      disk_dump_header
    block 1                      kdump_sub_header, then the ELF notes (sub_hdr_size blocks)
    block 1 + sub_hdr_size       1st bitmap (bitmap_blocks / 2 blocks), then the 2nd bitmap
    block 1 + sub + bitmap       page descriptors, one per bit set in the 2nd bitmap, pfn order
    after them                   page data, where each descriptor's ``offset`` says

Bit ``pfn`` of a bitmap is bit ``pfn % 8`` of byte ``pfn // 8`` (least significant first).
The 1st bitmap holds the pages that exist in RAM, the 2nd those in the dump; a page in the
1st but not the 2nd is "excluded" (readers say so, or read zeros when told to).

This module never writes the flattened format (``makedumpfile -F``); it writes none at all:
see :mod:`qmpdump.kdump.plan` for the layout and :mod:`qmpdump.engines.kdump_writer`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qmpdump.errors import ElfFormatError

__all__ = [
    "DUMP_DH_COMPRESSED_LZO",
    "DUMP_DH_COMPRESSED_SNAPPY",
    "DUMP_DH_COMPRESSED_ZLIB",
    "DUMP_DH_COMPRESSED_ZSTD",
    "DUMP_LEVEL_EXCLUDE_ZERO",
    "HEADER",
    "HEADER_VERSION",
    "KDUMP_SIGNATURE",
    "PAGE_DESC",
    "SUB_HEADER",
    "DiskDumpHeader",
    "KdumpSubHeader",
    "Utsname",
    "VmcoreInfo",
    "find_note",
    "init_uts_ns_gpa",
    "pack_header",
    "pack_sub_header",
    "parse_vmcoreinfo",
    "utsname_from_memory",
]

KDUMP_SIGNATURE: Final = b"KDUMP   "
#: makedumpfile's current version; v6 added the 64-bit pfn fields of the sub header.
HEADER_VERSION: Final = 6
#: ``page_desc_t.flags`` and ``disk_dump_header.status``: the codec (``diskdump_mod.h``).
DUMP_DH_COMPRESSED_ZLIB: Final = 0x1
DUMP_DH_COMPRESSED_LZO: Final = 0x2
DUMP_DH_COMPRESSED_SNAPPY: Final = 0x4
DUMP_DH_COMPRESSED_ZSTD: Final = 0x20
#: makedumpfile's dump level bit 1: zero pages excluded (``DL_EXCLUDE_ZERO``).
DUMP_LEVEL_EXCLUDE_ZERO: Final = 1

_UTS_LEN: Final = 65
#: ``struct disk_dump_header`` on a 64-bit host: signature, header_version, new_utsname
#: (6 x 65 bytes), 6 bytes of alignment, ``struct timeval`` (tv_sec, tv_usec), then ten 32-bit
#: fields. QEMU spells the padding and the timeval as ``char timestamp[22]``: 464 bytes in all.
HEADER: Final = struct.Struct("<8si65s65s65s65s65s65s6xqqIiiIIIIIIi")
#: ``struct kdump_sub_header`` (64-bit): 104 bytes.
SUB_HEADER: Final = struct.Struct("<QiiQQQQQQQQQQQ")
#: ``page_desc_t``: offset, size, flags, page_flags: 24 bytes.
PAGE_DESC: Final = struct.Struct("<QIIQ")

_NHDR: Final = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Utsname:
    """``struct new_utsname``: each field is NUL-padded to 65 bytes (64 characters at most)."""

    sysname: str = "Linux"
    nodename: str = ""
    release: str = ""
    version: str = ""
    machine: str = ""
    domainname: str = ""

    def packed(self) -> tuple[bytes, ...]:
        """The six fields as 65-byte NUL-terminated arrays (longer values are cut at 64)."""
        return tuple(
            value.encode("utf-8", "replace")[: _UTS_LEN - 1]
            for value in (
                self.sysname,
                self.nodename,
                self.release,
                self.version,
                self.machine,
                self.domainname,
            )
        )


@dataclass(frozen=True, slots=True)
class DiskDumpHeader:
    """``struct disk_dump_header`` (block 0)."""

    utsname: Utsname
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    nr_cpus: int
    status: int
    timestamp_s: int = 0
    timestamp_us: int = 0
    total_ram_blocks: int = 0
    device_blocks: int = 0
    written_blocks: int = 0
    current_cpu: int = 0
    header_version: int = HEADER_VERSION


@dataclass(frozen=True, slots=True)
class KdumpSubHeader:
    """``struct kdump_sub_header`` (block 1); offsets are absolute file offsets."""

    phys_base: int
    dump_level: int
    offset_vmcoreinfo: int
    size_vmcoreinfo: int
    offset_note: int
    size_note: int
    max_mapnr: int
    split: int = 0
    start_pfn: int = 0
    end_pfn: int = 0
    offset_eraseinfo: int = 0
    size_eraseinfo: int = 0


def pack_header(h: DiskDumpHeader) -> bytes:
    """Pack the disk dump header. ``max_mapnr`` is clamped to 32 bits there (the full value is
    in the sub header's ``max_mapnr_64``, as makedumpfile and QEMU do)."""
    return HEADER.pack(
        KDUMP_SIGNATURE,
        h.header_version,
        *h.utsname.packed(),
        h.timestamp_s,
        h.timestamp_us,
        h.status,
        h.block_size,
        h.sub_hdr_size,
        h.bitmap_blocks,
        min(h.max_mapnr, 0xFFFF_FFFF),
        h.total_ram_blocks,
        h.device_blocks,
        h.written_blocks,
        h.current_cpu,
        h.nr_cpus,
    )


def pack_sub_header(k: KdumpSubHeader) -> bytes:
    """Pack the kdump sub header (v6): the obsolete 32-bit ``start_pfn``/``end_pfn`` get the
    64-bit values clamped, as makedumpfile does for split dumps (both 0 otherwise)."""
    clamp = 0xFFFF_FFFF
    return SUB_HEADER.pack(
        k.phys_base & 0xFFFF_FFFF_FFFF_FFFF,  # unsigned long; VMCOREINFO prints it signed
        k.dump_level,
        k.split,
        min(k.start_pfn, clamp),
        min(k.end_pfn, clamp),
        k.offset_vmcoreinfo,
        k.size_vmcoreinfo,
        k.offset_note,
        k.size_note,
        k.offset_eraseinfo,
        k.size_eraseinfo,
        k.start_pfn,
        k.end_pfn,
        k.max_mapnr,
    )


@dataclass(frozen=True, slots=True)
class NoteRef:
    """Where a note's descriptor lies inside a note payload."""

    desc_offset: int
    desc_size: int


def find_note(notes: bytes, name: bytes) -> NoteRef | None:
    """The first note named ``name`` in an ELF64 note payload, or ``None``.

    Records are a 12-byte header, then the name and the descriptor, each padded to 4 bytes
    (``ELF_NOTE_SIZE`` in QEMU's ``dump/dump.c``). Raises :class:`ElfFormatError` on a record
    that runs past the payload.
    """
    offset = 0
    while offset + _NHDR.size <= len(notes):
        namesz, descsz, _type = _NHDR.unpack_from(notes, offset)
        name_at = offset + _NHDR.size
        desc_at = name_at + -(-namesz // 4) * 4
        end = desc_at + -(-descsz // 4) * 4
        if end > len(notes):
            raise ElfFormatError(f"the note at {offset:#x} runs past the notes' end")
        if notes[name_at : name_at + namesz].rstrip(b"\0") == name:
            return NoteRef(desc_at, descsz)
        offset = end
    return None


@dataclass(frozen=True, slots=True)
class VmcoreInfo:
    """What the writer needs of the guest's VMCOREINFO (``kernel/crash_core.c``)."""

    osrelease: str
    page_size: int
    phys_base: int | None
    #: ``SYMBOL(init_uts_ns)``: where the kernel keeps its utsname (kernel virtual address)
    init_uts_ns: int | None
    #: ``NUMBER(...)``/``SYMBOL(...)``/``OFFSET(...)`` and the rest, as text
    entries: dict[str, str]


def parse_vmcoreinfo(text: bytes) -> VmcoreInfo:
    """Read the ``KEY=VALUE`` lines of a VMCOREINFO note's descriptor.

    ``NUMBER(phys_base)`` is printed in decimal by ``VMCOREINFO_NUMBER`` (``%ld``) and
    ``SYMBOL(...)`` in hex (``%lx``); ``PAGESIZE`` in decimal. A missing ``PAGESIZE`` means 4096.
    """
    entries: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            entries[key.strip()] = value.strip().rstrip("\0")
    page_size = _int(entries.get("PAGESIZE"), 10) or 4096
    return VmcoreInfo(
        osrelease=entries.get("OSRELEASE", ""),
        page_size=page_size,
        phys_base=_int(entries.get("NUMBER(phys_base)"), 10),
        init_uts_ns=_int(entries.get("SYMBOL(init_uts_ns)"), 16),
        entries=entries,
    )


#: x86_64's ``__START_KERNEL_map``: kernel text and data virtual = physical + this - phys_base
X86_64_START_KERNEL_MAP: Final = 0xFFFF_FFFF_8000_0000
#: Bytes to read at ``init_uts_ns`` to find its ``name`` (``struct new_utsname``) at one of
#: the offsets it has had: 0 (Linux 5.11 and later), or after a 4-byte ``struct kref``.
UTS_READ_SIZE: Final = 8 + 6 * _UTS_LEN
_UTS_OFFSETS: Final = (0, 4, 8)


def init_uts_ns_gpa(info: VmcoreInfo) -> int | None:
    """The guest-physical address of ``init_uts_ns`` on x86_64, or ``None`` if unknown.

    It lies in the kernel image, mapped at ``__START_KERNEL_map`` shifted by ``phys_base``
    (``__phys_addr_symbol`` in ``arch/x86/include/asm/page_64.h``).
    """
    if info.init_uts_ns is None or info.phys_base is None:
        return None
    if info.init_uts_ns < X86_64_START_KERNEL_MAP:
        return None
    return info.init_uts_ns - X86_64_START_KERNEL_MAP + info.phys_base


def utsname_from_memory(blob: bytes, osrelease: str) -> Utsname | None:
    """The kernel's ``struct new_utsname`` from the bytes at ``init_uts_ns``, or ``None``.

    Accepted only where it says sysname ``Linux`` and the release VMCOREINFO gives: never a
    header filled from bytes that are not what we think they are.
    """
    for offset in _UTS_OFFSETS:
        fields = []
        for index in range(6):
            at = offset + index * _UTS_LEN
            raw = blob[at : at + _UTS_LEN]
            if len(raw) < _UTS_LEN or b"\0" not in raw:
                break
            fields.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
        if len(fields) == 6 and fields[0] == "Linux" and osrelease and fields[2] == osrelease:
            return Utsname(*fields)
    return None


def _int(value: str | None, base: int) -> int | None:
    if value is None:
        return None
    try:
        return int(value, base)
    except ValueError:
        return None
