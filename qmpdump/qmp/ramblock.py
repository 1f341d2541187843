"""Parse HMP ``info ramblock`` (pure): size, and where QEMU says so host address, of every RAM block.

QEMU 7.2 prints (``softmmu/physmem.c``, ``ram_block_format``)::

                  Block Name    PSize              Offset               Used              Total
                      pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000

QEMU 10.0 (``system/physmem.c``) adds QEMU's host virtual address and the block's access::

                  Block Name    PSize              Offset               Used              Total                HVA  RO
                      pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000 0x00007fef57fff000  rw

So columns are found by the header's names, never by position: a data line is the block name,
the page size (``4 KiB``, two words) and then one word per header column after ``PSize``.
``x-query-ramblock`` (QMP) returns the same text, so there is no structured form to prefer.

The block name is the RAM block's idstr: the memory region's name, prefixed with the owning
device's path when it has one. The sizes of regions that are no memory backend object (``pc.bios``,
``pc.rom``) are known only from here.
"""  # noqa: E501

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpdump.errors import LayoutError

__all__ = ["RamBlock", "parse_ramblocks", "ramblock_for_region"]

_HEADER = re.compile(r"^\s*Block Name\s+PSize\s+(?P<rest>.*?)\s*$")
_PSIZE = re.compile(r"\s(?P<psize>\d+(?:\.\d+)?\s*[KMGTPE]?i?B)\s")
#: Columns a block line must have (7.2 and later): used size and allocated size.
_REQUIRED = ("Offset", "Used", "Total")


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAM block: idstr, used and allocated size (bytes), and what newer QEMU adds.

    ``hva`` is QEMU's host virtual address of the block's first byte and ``readonly`` whether
    the block is mapped read-only (QEMU 10.0's ``HVA`` and ``RO`` columns); None where the
    QEMU does not print them.
    """

    name: str
    used: int
    total: int
    hva: int | None = None
    readonly: bool | None = None


def _hex(value: str, column: str, line_no: int) -> int:
    try:
        return int(value, 16)
    except ValueError:
        raise LayoutError(
            f"info ramblock line {line_no}: column {column} is {value!r}, not a hex number"
        ) from None


def parse_ramblocks(text: str) -> list[RamBlock]:
    """Every RAM block in ``info ramblock`` text, its columns found by the header's names.

    Lines before the header and blank lines are skipped; a block line whose column count does
    not match the header is an error (:class:`LayoutError`), never guessed at.
    """
    columns: list[str] | None = None
    blocks = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        header = _HEADER.match(line)
        if header:
            columns = header["rest"].split()
            missing = [c for c in _REQUIRED if c not in columns]
            if missing:
                raise LayoutError(f"info ramblock header lacks {', '.join(missing)}: {line!r}")
            continue
        if columns is None:
            continue
        psize = _PSIZE.search(line)
        if psize is None:
            raise LayoutError(f"info ramblock line {line_no}: no page size: {line.strip()!r}")
        name = line[: psize.start()].strip()
        values = line[psize.end() :].split()
        if not name or len(values) != len(columns):
            raise LayoutError(
                f"info ramblock line {line_no}: {len(values)} values for the columns "
                f"{' '.join(columns)}: {line.strip()!r}"
            )
        row = dict(zip(columns, values, strict=True))
        access = row.get("RO")
        blocks.append(
            RamBlock(
                name=name,
                used=_hex(row["Used"], "Used", line_no),
                total=_hex(row["Total"], "Total", line_no),
                hva=_hex(row["HVA"], "HVA", line_no) if "HVA" in row else None,
                readonly=None if access is None else access.lower() == "ro",
            )
        )
    return blocks


def ramblock_for_region(blocks: list[RamBlock], region: str) -> RamBlock | None:
    """The block of a memory region name (exact idstr, or ``DEVICE-PATH/region``)."""
    for block in blocks:
        if block.name == region or block.name.endswith("/" + region):
            return block
    return None
