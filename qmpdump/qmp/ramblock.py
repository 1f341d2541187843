"""Parse HMP ``info ramblock`` (pure): the size of every RAM block, backend or not.

QEMU 7.2 prints (``softmmu/physmem.c``, ``ram_block_format``)::

                  Block Name    PSize              Offset               Used              Total
                      pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000
      0000:00:01.0/mem-vmem0    4 KiB  0x0000000020000000 0x0000000080000000 0x0000000080000000

The block name is the RAM block's idstr: the memory region's name, prefixed with the owning
device's path when it has one. The sizes of regions that are no memory backend object (``pc.bios``,
``pc.rom``) are known only from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RamBlock", "parse_ramblocks", "ramblock_for_region"]

_LINE = re.compile(
    r"^\s*(?P<name>\S.*?)\s+(?P<psize>\d+(?:\.\d+)?\s*[KMGT]?i?B)\s+"
    r"0x(?P<offset>[0-9a-fA-F]+)\s+0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)(?:\s+\S+)*\s*$"
)


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One RAM block: idstr and its used size (bytes)."""

    name: str
    used: int
    total: int


def parse_ramblocks(text: str) -> list[RamBlock]:
    """Every RAM block in ``info ramblock`` text; the header and unknown lines are skipped."""
    blocks = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            blocks.append(RamBlock(m["name"], int(m["used"], 16), int(m["total"], 16)))
    return blocks


def ramblock_for_region(blocks: list[RamBlock], region: str) -> RamBlock | None:
    """The block of a memory region name (exact idstr, or ``DEVICE-PATH/region``)."""
    for block in blocks:
        if block.name == region or block.name.endswith("/" + region):
            return block
    return None
