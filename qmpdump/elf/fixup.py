"""Rewrite the header of QEMU 7.2's ELF dumps so that makedumpfile can read them (pure).

QEMU 7.2 (``dump/dump.c``) writes its section header table right after the ELF header
(``e_shoff = 64``) and the program headers after that, and sets ``e_ehsize`` to 8 instead of 64.
makedumpfile 1.7.2 then fails ("Can't get the number of PT_LOAD"). The fix swaps the two
tables, which have no offsets into each other, and corrects ``e_ehsize``; the file keeps its
size and every other byte, so all ``p_offset`` values stay valid.
"""

from __future__ import annotations

from qmpdump.elf.format import EHDR, EHDR_SIZE, PHDR_SIZE, SHDR_SIZE, parse_header, phdr_count

__all__ = ["fix_qemu_header"]


def fix_qemu_header(prefix: bytes) -> bytes:
    """Return ``prefix`` with program headers moved right after the ELF header.

    ``prefix`` must hold at least the ELF header and both tables. A header already laid out
    that way (or one not matching QEMU's layout) comes back with only ``e_ehsize`` fixed.
    """
    header = parse_header(prefix)
    fields = list(EHDR.unpack_from(prefix))
    fields[8] = EHDR_SIZE  # e_ehsize
    phnum = phdr_count(header, prefix) or 0
    phdrs_size = phnum * PHDR_SIZE
    shdrs_size = header.shnum * SHDR_SIZE
    qemu_layout = (
        header.shoff == EHDR_SIZE
        and header.phoff == EHDR_SIZE + shdrs_size
        and header.shentsize in (0, SHDR_SIZE)
        and len(prefix) >= header.phoff + phdrs_size
    )
    if not qemu_layout or phnum == 0:
        return EHDR.pack(*fields) + prefix[EHDR_SIZE:]
    phdrs = prefix[header.phoff : header.phoff + phdrs_size]
    shdrs = prefix[header.shoff : header.shoff + shdrs_size]
    fields[5] = EHDR_SIZE  # e_phoff
    fields[6] = EHDR_SIZE + phdrs_size  # e_shoff
    return EHDR.pack(*fields) + phdrs + shdrs + prefix[header.phoff + phdrs_size :]
