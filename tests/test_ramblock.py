"""Tests of the ``info ramblock`` parser on text captured from QEMU 7.2 and 10.0.

Captures: ``tests/data/ramblock/7.2`` and ``tests/data/ramblock/10.0``, from the testbed's bare
VMs (README there). 10.0 adds the
``HVA`` and ``RO`` columns; the parser finds columns by the header's names. The broken inputs are
edits of a real capture, as QEMU cannot be made to print them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qmpdump.errors import LayoutError
from qmpdump.qmp.ramblock import RamBlock, parse_ramblocks, ramblock_for_region

DATA = Path(__file__).parent / "data" / "ramblock"
MiB = 1 << 20
KiB = 1 << 10


def capture(version: str, name: str) -> str:
    return (DATA / version / f"{name}.txt").read_bytes().decode()


#: pc-file-vmem2: name, used, total, read-only (10.0); the same on both versions.
PC_FILE_VMEM2 = [
    ("0000:00:02.0/mem-vmem0", 1024 * MiB, 1024 * MiB, False),
    ("ram0", 512 * MiB, 512 * MiB, False),
    ("0000:00:03.0/mem-vmem1", 512 * MiB, 512 * MiB, False),
    ("/rom@etc/acpi/tables", 128 * KiB, 2 * MiB, True),
    ("pc.bios", 256 * KiB, 256 * KiB, True),
    ("pc.rom", 128 * KiB, 128 * KiB, True),
    ("/rom@etc/table-loader", 4 * KiB, 64 * KiB, True),
    ("/rom@etc/acpi/rsdp", 4 * KiB, 4 * KiB, True),
]


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_every_block_with_its_sizes_on_both_versions(version: str) -> None:
    blocks = parse_ramblocks(capture(version, "pc-file-vmem2"))
    assert [(b.name, b.used, b.total) for b in blocks] == [w[:3] for w in PC_FILE_VMEM2]
    if version == "7.2":
        assert all(b.hva is None and b.readonly is None for b in blocks)
    else:
        assert [b.readonly for b in blocks] == [w[3] for w in PC_FILE_VMEM2]
        assert all(b.hva is not None and b.hva % 4096 == 0 for b in blocks)
        # The first line of the capture, by hand: HVA 0x00007f7b8bffe000.
        assert blocks[0].hva == 0x7F7B_8BFF_E000


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_regions_find_their_blocks_by_name_or_device_path(version: str) -> None:
    blocks = parse_ramblocks(capture(version, "q35-memfd-split-vmem"))
    vmem = ramblock_for_region(blocks, "mem-vmem0")
    assert vmem is not None
    assert vmem.name.endswith("/mem-vmem0")
    assert vmem.used == 2048 * MiB
    main = ramblock_for_region(blocks, "ram0")
    assert main is not None
    assert main.used == 1024 * MiB
    assert ramblock_for_region(blocks, "vmem0") is None


def test_columns_are_found_by_header_name_not_position() -> None:
    # A made-up future QEMU: the columns after PSize reordered, one more unknown column.
    text = (
        "      Block Name    PSize                HVA  RO              Total   Flags"
        "               Used             Offset\n"
        "          pc.ram    4 KiB 0x00007f0000000000  rw 0x0000000020000000  x 0x0000000010000000"
        " 0x0000000000000000\n"
    )
    assert parse_ramblocks(text) == [
        RamBlock(
            "pc.ram", used=0x1000_0000, total=0x2000_0000, hva=0x7F00_0000_0000, readonly=False
        )
    ]


def test_a_name_wider_than_the_column_and_2m_pages() -> None:
    real = capture("10.0", "pc-default")
    line = next(x for x in real.splitlines() if "pc.ram" in x)
    edited = line.replace("pc.ram", "a-very-long-device-path/with/a/region name").replace(
        "4 KiB", "2 MiB"
    )
    header = real.splitlines()[0]
    (block,) = parse_ramblocks(f"{header}\r\n{edited}\r\n")
    assert block.name == "a-very-long-device-path/with/a/region name"
    assert block.used == 512 * MiB


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("Used", "Usage"), "header lacks Used"),
        (lambda t: t.replace(" rw\r\n", "\r\n", 1), "4 values for the columns"),
        (lambda t: t.replace("0x0000000020000000", "0xNOTHEX0000000000", 1), "not a hex"),
        (lambda t: t.replace("4 KiB", "four", 1), "no page size"),
    ],
)
def test_a_line_that_does_not_fit_the_header_is_an_error(
    edit: Callable[[str], str], message: str
) -> None:
    with pytest.raises(LayoutError, match=message):
        parse_ramblocks(edit(capture("10.0", "pc-default")))
