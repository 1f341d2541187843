"""ELF64 core file structures: the header, program headers and notes, read from bytes.

Follows the System V gABI (``elf.h``): ELF64 header (64 bytes), program header (56 bytes),
note records (namesz, descsz, type, 4-byte aligned name and desc), and the PN_XNUM extension
(e_phnum == 0xffff: the real count is in section header 0's ``sh_info``).

QEMU's ``dump-guest-memory`` (``dump/dump.c``) writes little-endian ELF64 cores for x86_64; in
7.2 it puts the section header table at 64 and the program headers after it, so the prefix to
read is "up to the end of the program headers and of the notes", wherever those lie.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qmpdump.errors import ElfFormatError

__all__ = [
    "EHDR_SIZE",
    "ELF_MAGIC",
    "PHDR_SIZE",
    "PN_XNUM",
    "PT_LOAD",
    "PT_NOTE",
    "ElfFormatError",
    "ElfHeader",
    "ProgramHeader",
    "parse_header",
    "parse_program_headers",
    "phdr_count",
    "prefix_needed",
]

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
EHDR_SIZE = EHDR.size  # 64
PHDR_SIZE = PHDR.size  # 56
SHDR_SIZE = SHDR.size  # 64


@dataclass(frozen=True, slots=True)
class ElfHeader:
    """The fields of the ELF64 header qmpdump uses."""

    type: int
    machine: int
    phoff: int
    shoff: int
    flags: int
    phentsize: int
    phnum: int  # as stored; PN_XNUM means "see section header 0"
    shentsize: int
    shnum: int


@dataclass(frozen=True, slots=True)
class ProgramHeader:
    """One ELF64 program header."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def parse_header(data: bytes) -> ElfHeader:
    """Read the ELF64 header at the start of ``data``."""
    if len(data) < EHDR_SIZE:
        raise ElfFormatError(f"an ELF64 header needs {EHDR_SIZE} bytes, got {len(data)}")
    (
        ident,
        etype,
        machine,
        _ver,
        _entry,
        phoff,
        shoff,
        flags,
        _eh,
        phentsize,
        phnum,
        shentsize,
        shnum,
        _shstrndx,
    ) = EHDR.unpack_from(data)
    if ident[:4] != ELF_MAGIC:
        raise ElfFormatError("not an ELF file (bad magic)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ElfFormatError("not a little-endian ELF64 file")
    if phnum and phentsize != PHDR_SIZE:
        raise ElfFormatError(f"program header size {phentsize}, expected {PHDR_SIZE}")
    return ElfHeader(etype, machine, phoff, shoff, flags, phentsize, phnum, shentsize, shnum)


def phdr_count(header: ElfHeader, data: bytes) -> int | None:
    """The number of program headers, or None if section header 0 is not in ``data`` yet."""
    if header.phnum != PN_XNUM:
        return header.phnum
    if header.shoff + SHDR_SIZE > len(data):
        return None
    sh_info = SHDR.unpack_from(data, header.shoff)[7]
    return int(sh_info)


def prefix_needed(data: bytes) -> int:
    """How many leading bytes of the core are needed to read all headers and notes.

    Call with what has been read so far; the answer grows as more structures become visible
    (the header first, then the section header for PN_XNUM, then the program headers, whose
    PT_NOTE entries say where the notes end). When the result is <= len(data), all is there.
    """
    if len(data) < EHDR_SIZE:
        return EHDR_SIZE
    header = parse_header(data)
    need = EHDR_SIZE
    if header.phnum == PN_XNUM:
        need = max(need, header.shoff + SHDR_SIZE)
    phnum = phdr_count(header, data)
    if phnum is None:
        return need
    phdrs_end = header.phoff + phnum * PHDR_SIZE
    need = max(need, phdrs_end)
    if len(data) < phdrs_end:
        return need
    for ph in parse_program_headers(data):
        if ph.type == PT_NOTE:
            need = max(need, ph.offset + ph.filesz)
    return need


def parse_program_headers(data: bytes) -> list[ProgramHeader]:
    """All program headers of a core whose prefix ``data`` holds them."""
    header = parse_header(data)
    phnum = phdr_count(header, data)
    if phnum is None or header.phoff + phnum * PHDR_SIZE > len(data):
        raise ElfFormatError("the program headers lie past the bytes given")
    return [
        ProgramHeader(*PHDR.unpack_from(data, header.phoff + i * PHDR_SIZE)) for i in range(phnum)
    ]
