"""Tests of the ``info mtree -f`` parser and the QMP reply models.

Unit tests run on text captured from real QEMU 7.2 (``tests/data/mtree``, see its README for the
command lines); the few inputs QEMU cannot be made to print here (a region name with spaces, a
``ramd`` range, broken lines) are built by editing a real capture, and say so. The ``bare`` tests
launch real QEMU stopped at reset and check the parsed layout against what the command line asks
for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from qmpdump.errors import LayoutError
from qmpdump.qmp.models import (
    DumpCapability,
    DumpQueryResult,
    MemdevInfo,
    ObjectPropertyInfo,
    StatusInfo,
    VersionInfo,
    VirtioMemInfo,
    parse_memory_devices,
)
from qmpdump.qmp.mtree import MtreeEntry, parse_system_flatview
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.vm import Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

KiB = 1 << 10
DATA = Path(__file__).parent / "data" / "mtree"
BIOS_GPA = 0xFFFC_0000  # pc.bios: the last 256 KiB below 4 GiB
HIGH_RAM_GPA = 4 * GiB


class Want(NamedTuple):
    """The fields of an entry a test pins down."""

    gpa: int
    size: int
    region: str
    offset: int = 0
    kind: str = "ram"
    priority: int = 0

    @classmethod
    def of(cls, entry: MtreeEntry) -> Want:
        return cls(entry.gpa, entry.size, entry.region, entry.offset, entry.kind, entry.priority)


def ram(gpa: int, size: int, region: str, offset: int = 0, priority: int = 0) -> Want:
    return Want(gpa, size, region, offset, "ram", priority)


def rom(gpa: int, size: int, region: str, offset: int = 0, priority: int = 0) -> Want:
    return Want(gpa, size, region, offset, "rom", priority)


def read_capture(name: str) -> str:
    # bytes, so that the CRLF line ends QEMU sent survive
    return (DATA / f"{name}.txt").read_bytes().decode()


def parse(text: str) -> list[Want]:
    return [Want.of(e) for e in parse_system_flatview(text)]


def at_reset(main: str, below_4g: int) -> list[Want]:
    """Main RAM and firmware below 4 GiB of a VM stopped at reset (PAM not programmed yet)."""
    return [
        ram(0x0, 0xC0000, main),
        rom(0xC0000, 0x20000, "pc.rom", priority=1),
        rom(0xE0000, 0x20000, "pc.bios", 0x20000),  # isa-bios: alias of pc.bios's last 128 KiB
        ram(0x100000, below_4g - 0x100000, main, 0x100000),
        rom(BIOS_GPA, 256 * KiB, "pc.bios"),
    ]


def after_seabios(main: str, below_4g: int) -> list[Want]:
    """The same once SeaBIOS (QEMU 7.2's, no option ROM) programmed PAM: read-only RAM pieces."""
    return [
        ram(0x0, 0xC3000, main),
        rom(0xC3000, 0x25000, main, 0xC3000),
        ram(0xE8000, 0x8000, main, 0xE8000),
        rom(0xF0000, 0x10000, main, 0xF0000),
        ram(0x100000, below_4g - 0x100000, main, 0x100000),
        rom(BIOS_GPA, 256 * KiB, "pc.bios"),
    ]


# Hand-checked against each capture's system FlatView.
EXPECTED: dict[str, list[Want]] = {
    "q35-default": at_reset("pc.ram", 512 * MiB),
    "q35-default-split-after-bios": [
        *after_seabios("pc.ram", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "pc.ram", 512 * MiB),
    ],
    "q35-ram": at_reset("ram0", 512 * MiB),
    "q35-memfd-split-vmem": [
        *at_reset("ram0", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "ram0", 512 * MiB),
        ram(0x1_4000_0000, 2 * GiB, "mem-vmem0"),
    ],
    "q35-memfd-split-vmem-dispatch": [  # 'info mtree -f -d'
        *at_reset("ram0", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "ram0", 512 * MiB),
        ram(0x1_4000_0000, 2 * GiB, "mem-vmem0"),
    ],
    "q35-memfd-split-vmem-owners": [  # 'info mtree -f -o'
        *at_reset("ram0", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "ram0", 512 * MiB),
        ram(0x1_4000_0000, 2 * GiB, "mem-vmem0"),
    ],
    "q35-file-split": [
        *at_reset("ram0", 768 * MiB),
        ram(HIGH_RAM_GPA, 256 * MiB, "ram0", 768 * MiB),
    ],
    "pc-default": at_reset("pc.ram", 512 * MiB),
    "pc-ram-split": [
        *at_reset("ram0", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "ram0", 512 * MiB),
    ],
    "pc-memfd-after-bios": after_seabios("ram0", 512 * MiB),
    "pc-file-vmem2": [
        *at_reset("ram0", 512 * MiB),
        ram(0x1_0000_0000, 1 * GiB, "mem-vmem0"),
        ram(0x1_4000_0000, 512 * MiB, "mem-vmem1"),
    ],
    "q35-pflash": [
        # with a pflash drive the firmware is system.flash0 (romd, not RAM: skipped) and the
        # 128 KiB below 1 MiB are a separate read-only RAM region, isa-bios
        ram(0x0, 0xC0000, "pc.ram"),
        rom(0xC0000, 0x20000, "pc.rom", priority=1),
        rom(0xE0000, 0x20000, "isa-bios", priority=1),
        ram(0x100000, 512 * MiB - 0x100000, "pc.ram", 0x100000),
    ],
    "pc-dimm-nvdimm-pmem": [
        *at_reset("pc.ram", 512 * MiB),
        ram(0x1_0000_0000, 128 * MiB, "d0"),  # pc-dimm
        # 0x108000000-0x117ffffff: nvdimm nv0, "nv-ram": skipped as dump-guest-memory does
        ram(0x1_1800_0000, 128 * MiB, "pm0"),  # virtio-pmem
        ram(0x1_2000_0000, 1 * GiB, "vm0"),  # virtio-mem
    ],
    "q35-kvm-split-vmem": [
        *at_reset("pc.ram", 512 * MiB),
        ram(HIGH_RAM_GPA, 512 * MiB, "pc.ram", 512 * MiB),
        ram(0x1_4000_0000, 2 * GiB, "mem-vmem0"),
    ],
    "q35-vga-cont": [
        # 0xa0000-0xbffff is vga-lowmem (i/o) in the system view, pc.ram in the cpu-smm views
        ram(0x0, 0xA0000, "pc.ram"),
        rom(0xC0000, 0xA000, "pc.ram", 0xC0000),  # the VGA BIOS, shadowed
        ram(0xCA000, 0x3000, "pc.ram", 0xCA000),
        rom(0xCD000, 0x1B000, "pc.ram", 0xCD000),
        ram(0xE8000, 0x8000, "pc.ram", 0xE8000),
        rom(0xF0000, 0x10000, "pc.ram", 0xF0000),
        ram(0x100000, 512 * MiB - 0x100000, "pc.ram", 0x100000),
        ram(0xFD00_0000, 16 * MiB, "vga.vram", priority=1),
        rom(BIOS_GPA, 256 * KiB, "pc.bios"),
    ],
    "q35-canonical-path": [
        *at_reset("/objects/ram0", 512 * MiB),
        ram(0x1_0000_0000, 1 * GiB, "/objects/mem-vmem0"),
    ],
}

# Where the system FlatView stood in each capture ("FlatView #N"): the parser must not care.
SYSTEM_VIEW_POSITION = {
    "q35-default": 0,
    "q35-default-split-after-bios": 2,
    "q35-ram": 1,
    "q35-memfd-split-vmem": 1,
    "q35-memfd-split-vmem-dispatch": 4,
    "q35-memfd-split-vmem-owners": 4,
    "q35-file-split": 0,
    "pc-default": 0,
    "pc-ram-split": 1,
    "pc-memfd-after-bios": 1,
    "pc-file-vmem2": 3,
    "q35-pflash": 3,
    "pc-dimm-nvdimm-pmem": 0,
    "q35-kvm-split-vmem": 1,
    "q35-vga-cont": 2,
    "q35-canonical-path": 2,
}


# --- unit tests on real captures ---------------------------------------------------------------


def test_every_capture_has_expectations() -> None:
    # NAME.txt is a capture of `info mtree -f`; NAME.ramblock.txt and the like are its companions.
    captured = {p.stem for p in DATA.glob("*.txt") if "." not in p.stem}
    assert captured == set(EXPECTED) == set(SYSTEM_VIEW_POSITION)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_gives_expected_entries(name: str) -> None:
    assert parse(read_capture(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_system_view_position(name: str) -> None:
    lines = read_capture(name).splitlines()
    header = None
    for line in lines:
        if line.startswith("FlatView #"):
            header = line
        if line.strip() == 'AS "memory", root: system':
            break
    assert header == f"FlatView #{SYSTEM_VIEW_POSITION[name]}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_line_numbers_point_at_the_range(name: str) -> None:
    lines = read_capture(name).splitlines()
    for entry in parse_system_flatview(read_capture(name)):
        line = lines[entry.line_no - 1]
        assert line.strip().startswith(f"{entry.gpa:016x}-{entry.gpa_end - 1:016x} ")
        assert f"): {entry.region}" in line


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_entries_are_sorted_and_disjoint(name: str) -> None:
    entries = parse_system_flatview(read_capture(name))
    for before, after in itertools.pairwise(entries):
        assert before.gpa_end <= after.gpa


def test_lf_line_ends_parse_the_same() -> None:
    text = read_capture("q35-memfd-split-vmem")
    assert "\r\n" in text  # QEMU's HMP output over QMP ends lines with CRLF
    assert parse(text.replace("\r\n", "\n")) == EXPECTED["q35-memfd-split-vmem"]


def test_cpu_smm_views_are_not_the_system_view() -> None:
    text = read_capture("q35-vga-cont")
    assert 'AS "cpu-smm-0", root: memory' in text
    # In the SMM views, pc.ram shows through at 0xa0000; the guest's normal view has VGA there.
    assert "0000000000000000-00000000000bffff (prio 0, ram): pc.ram" in text
    entries = parse_system_flatview(text)
    assert not any(e.gpa <= 0xA0000 < e.gpa_end for e in entries)


def test_kvm_suffix_is_not_part_of_the_region_name() -> None:
    text = read_capture("q35-kvm-split-vmem")
    assert "(prio 0, rom): pc.bios @0000000000020000 KVM" in text
    assert {e.region for e in parse_system_flatview(text)} == {
        "pc.ram",
        "pc.rom",
        "pc.bios",
        "mem-vmem0",
    }


def test_owner_suffixes_are_not_part_of_the_region_name() -> None:
    text = read_capture("q35-memfd-split-vmem-owners")
    assert "ram0 @0000000020000000 owner:{obj path=/objects/ram0}" in text
    assert "pc.bios @0000000000020000 parent:{obj path=/machine/unattached}" in text
    text = text.replace("owner:{obj path=/objects/ram0}", "owner:{obj path=/objects/ram0} KVM")
    assert parse(text) == EXPECTED["q35-memfd-split-vmem-owners"]


def _views(text: str) -> list[str]:
    """Split a capture into its FlatView blocks (each with its trailing blank line)."""
    blocks: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("FlatView #") or not blocks:
            blocks.append("")
        blocks[-1] += line
    return blocks


def test_system_view_found_wherever_it_stands() -> None:
    # Constructed from a real capture: its views reordered (every rotation).
    blocks = _views(read_capture("q35-vga-cont"))
    for shift in range(len(blocks)):
        rotated = "".join(blocks[shift:] + blocks[:shift])
        assert parse(rotated) == EXPECTED["q35-vga-cont"]


# --- unit tests on edited captures: what QEMU cannot be made to print here ---------------------

BASE = "q35-memfd-split-vmem"
HIGH_LINE = "  0000000100000000-000000011fffffff (prio 0, ram): ram0 @0000000020000000"


def edited(old: str, new: str, name: str = BASE) -> str:
    text = read_capture(name)
    assert text.count(old) == 3  # the system view and the two cpu-smm views
    head, sep, tail = text.partition('AS "memory", root: system')
    assert sep
    return head + sep + tail.replace(old, new, 1)


def line_no_of(text: str, needle: str) -> int:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if 'AS "memory", root: system' in ln)
    return next(i for i, ln in enumerate(lines) if i > start and needle in ln) + 1


def test_region_name_with_spaces_and_at_signs() -> None:
    text = edited(
        HIGH_LINE,
        "  0000000100000000-000000011fffffff (prio 0, ram): my ram @ 4G /rom@x @0000000020000000",
    )
    high = [e for e in parse_system_flatview(text) if e.gpa == HIGH_RAM_GPA]
    assert [Want.of(e) for e in high] == [
        ram(HIGH_RAM_GPA, 512 * MiB, "my ram @ 4G /rom@x", 512 * MiB)
    ]


def test_region_name_with_spaces_no_offset_and_accelerator() -> None:
    text = edited(HIGH_LINE, "  0000000100000000-000000011fffffff (prio 0, ram): odd name KVM KVM")
    high = [e for e in parse_system_flatview(text) if e.gpa == HIGH_RAM_GPA]
    assert [Want.of(e) for e in high] == [ram(HIGH_RAM_GPA, 512 * MiB, "odd name")]


@pytest.mark.parametrize(
    "kind", ["ramd", "romd", "i/o", "nv-ram", "nv-rom", "nv-romd", "nv-ramd", "nv-i/o"]
)
def test_non_ram_kinds_are_skipped(kind: str) -> None:
    text = edited(HIGH_LINE, HIGH_LINE.replace("(prio 0, ram)", f"(prio 0, {kind})"))
    assert HIGH_RAM_GPA not in {e.gpa for e in parse_system_flatview(text)}


def test_rom_window_onto_ram_keeps_offset() -> None:
    text = edited(HIGH_LINE, HIGH_LINE.replace("(prio 0, ram)", "(prio 0, rom)"))
    high = [e for e in parse_system_flatview(text) if e.gpa == HIGH_RAM_GPA]
    assert [Want.of(e) for e in high] == [rom(HIGH_RAM_GPA, 512 * MiB, "ram0", 512 * MiB)]


def test_negative_priority() -> None:
    text = edited(HIGH_LINE, HIGH_LINE.replace("prio 0", "prio -1"))
    high = [e for e in parse_system_flatview(text) if e.gpa == HIGH_RAM_GPA]
    assert high[0].priority == -1


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("  0000000100000000-000000011fffffff (prio 0, ram): ", "without a region name"),
        ("  0000000100000000-000000011fffffff (prio 0, ram): @0000000020000000", "region name"),
        ("  00000001000000zz-000000011fffffff (prio 0, ram): ram0", "does not parse"),
        ("  0000000100000000-00000000ffffffff (prio 0, ram): ram0", "ends before it starts"),
        ("  0000000100000000-000000011fffffff (prio x, ram): ram0", "does not parse"),
        ("  0000000100000000 (prio 0, rom): ram0", "does not parse"),
        ("  10000000100000000-1000000011fffffff (prio 0, ram): ram0", "does not parse"),
        ("  0000000100000000-000000011fffffff (prio 0, ram): ram0 @fffffffff0000001", "2^64"),
    ],
)
def test_malformed_ram_line_names_line(line: str, why: str) -> None:
    text = edited(HIGH_LINE, line)
    line_no = line_no_of(text, line.strip()[:16])
    with pytest.raises(LayoutError, match=re.escape(why)) as caught:
        parse_system_flatview(text)
    assert f"line {line_no}:" in str(caught.value)
    assert line.strip() in str(caught.value)


def test_malformed_line_in_other_view_is_ignored() -> None:
    text = read_capture(BASE).replace(HIGH_LINE, "  garbage (prio 0, ram): ram0", 1)
    assert text.index("garbage") < text.index('AS "memory", root: system')  # a cpu-smm view
    assert parse(text) == EXPECTED[BASE]


def test_overlapping_ranges_raise() -> None:
    text = edited(HIGH_LINE, HIGH_LINE + "\r\n  0000000110000000-000000012fffffff (prio 0, ram): x")
    with pytest.raises(LayoutError, match="overlap"):
        parse_system_flatview(text)


def test_no_system_view_raises() -> None:
    blocks = _views(read_capture(BASE))
    without = "".join(b for b in blocks if 'AS "memory", root: system' not in b)
    assert "FlatView #" in without
    with pytest.raises(LayoutError, match='AS "memory", root: system'):
        parse_system_flatview(without)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n",
        'FlatView #0\n AS "memory", root: memory\n Root memory region: memory\n',
    ],
)
def test_text_without_system_view_raises(text: str) -> None:
    with pytest.raises(LayoutError, match="no FlatView"):
        parse_system_flatview(text)


def test_two_system_views_raise() -> None:
    blocks = _views(read_capture(BASE))
    system = next(b for b in blocks if 'AS "memory", root: system' in b)
    with pytest.raises(LayoutError, match="more than one"):
        parse_system_flatview("".join(blocks) + system)


def test_system_view_without_ranges_is_empty() -> None:
    text = 'FlatView #0\n AS "memory", root: system\n Root memory region: system\n'
    assert parse_system_flatview(text + "  No rendered FlatView\n\n") == []


# --- models on captured replies ----------------------------------------------------------------


def load_devices(name: str) -> Any:
    return json.loads((DATA / f"{name}.devices.json").read_text())


def test_parse_memory_devices_keeps_only_virtio_mem() -> None:
    raw = load_devices("pc-dimm-nvdimm-pmem")
    assert [d["type"] for d in raw] == ["dimm", "nvdimm", "virtio-pmem", "virtio-mem"]
    assert parse_memory_devices(raw) == [
        VirtioMemInfo(
            id="vmem0",
            memaddr=0x1_2000_0000,
            size=0,
            max_size=1 * GiB,
            block_size=2 * MiB,
            requested_size=0,
            node=0,
            memdev="/objects/vm0",
        )
    ]


def test_parse_memory_devices_two_devices() -> None:
    devices = parse_memory_devices(load_devices("pc-file-vmem2"))
    assert [
        (d.id, d.memaddr, d.max_size, d.block_size, d.requested_size, d.memdev_id) for d in devices
    ] == [
        ("vmem0", 0x1_0000_0000, 1 * GiB, 2 * MiB, 256 * MiB, "mem-vmem0"),
        ("vmem1", 0x1_4000_0000, 512 * MiB, 4 * MiB, 0, "mem-vmem1"),
    ]


def test_parse_memory_devices_is_lenient() -> None:
    vmem = load_devices("q35-memfd-split-vmem")[0]
    del vmem["data"]["id"]  # optional in QAPI
    vmem["data"]["new-member"] = 1
    raw = [{"type": "hv-balloon", "data": {"memaddr": 1}}, {"type": "sgx-epc"}, vmem]
    [device] = parse_memory_devices(raw)
    assert device.id is None
    assert device.block_size == 2 * MiB
    assert parse_memory_devices([]) == []


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"type": "virtio-mem"},
        [{"data": {}}],
        [{"type": "virtio-mem", "data": {"memaddr": 0, "size": 0}}],
        [{"type": "virtio-mem", "data": {**load_devices(BASE)[0]["data"], "block-size": "big"}}],
    ],
)
def test_parse_memory_devices_rejects_bad_replies(raw: object) -> None:
    with pytest.raises(LayoutError, match="query-memory-devices"):
        parse_memory_devices(raw)


def test_models_accept_underscored_names() -> None:
    info = VirtioMemInfo(
        memaddr=0,
        size=0,
        max_size=2 * MiB,
        block_size=2 * MiB,
        requested_size=0,
        memdev="/objects/m",
    )
    assert info.model_dump(by_alias=True)["max-size"] == 2 * MiB
    assert info.memdev_id == "m"


# --- real QEMU ---------------------------------------------------------------------------------

LIVE_SPECS = {
    "q35-default": VMSpec(guest=False, machine="q35", ram_size=512 * MiB),
    "q35-default-split": VMSpec(guest=False, machine="q35", ram_size=1 * GiB, below_4g=512 * MiB),
    "q35-ram": VMSpec(guest=False, machine="q35", ram_backend=Backend.RAM, ram_size=512 * MiB),
    "q35-memfd-split-vmem": VMSpec(
        guest=False,
        machine="q35",
        ram_backend=Backend.MEMFD,
        ram_size=1 * GiB,
        below_4g=512 * MiB,
        virtio_mem=(VirtioMemSpec(),),
    ),
    "q35-file-split": VMSpec(
        guest=False, machine="q35", ram_backend=Backend.FILE, ram_size=1 * GiB, below_4g=768 * MiB
    ),
    "pc-default-split": VMSpec(guest=False, machine="pc", ram_size=1 * GiB, below_4g=512 * MiB),
    "pc-ram-vmem": VMSpec(
        guest=False,
        machine="pc",
        ram_backend=Backend.RAM,
        ram_size=512 * MiB,
        virtio_mem=(VirtioMemSpec(backend=Backend.RAM, max_size=1 * GiB),),
    ),
    "pc-memfd-split": VMSpec(
        guest=False, machine="pc", ram_backend=Backend.MEMFD, ram_size=1 * GiB, below_4g=256 * MiB
    ),
    "pc-file-vmem2": VMSpec(
        guest=False,
        machine="pc",
        ram_backend=Backend.FILE,
        ram_size=512 * MiB,
        virtio_mem=(
            VirtioMemSpec(id="vmem0", backend=Backend.MEMFD, max_size=1 * GiB),
            VirtioMemSpec(
                id="vmem1",
                backend=Backend.FILE,
                max_size=512 * MiB,
                block_size=4 * MiB,
                requested_size=0,
            ),
        ),
    ),
}


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


class MainRam(NamedTuple):
    region: str
    below_4g: int
    above_4g: int


def main_ram(spec: VMSpec) -> MainRam:
    """Main RAM's region name and its bytes below and above 4 GiB (for RAM under 2 GiB)."""
    assert spec.ram_size < 2 * GiB  # above that QEMU moves the split by itself
    below = min(spec.ram_size, spec.below_4g or spec.ram_size)
    return MainRam(spec.main_memdev or "pc.ram", below, spec.ram_size - below)


def expected_layout(spec: VMSpec) -> list[Want]:
    """What a VM of this spec stopped at reset maps, from its spec alone (QEMU 7.2, x86)."""
    main = main_ram(spec)
    want = at_reset(main.region, main.below_4g)
    if main.above_4g:
        want.append(ram(HIGH_RAM_GPA, main.above_4g, main.region, main.below_4g))
    # pc_memory_init: device memory starts at the first GiB boundary after high RAM, and
    # virtio-mem devices are placed first-fit in command-line order, aligned to their block.
    gpa = round_up(HIGH_RAM_GPA + main.above_4g, GiB)
    for dev in spec.virtio_mem:
        gpa = round_up(gpa, dev.block_size)
        want.append(ram(gpa, dev.max_size, dev.memdev))
        gpa += dev.max_size
    return want


def check_devices(spec: VMSpec, devices: list[VirtioMemInfo], entries: list[MtreeEntry]) -> None:
    by_region = {e.region: e for e in entries}
    assert [d.id for d in devices] == [d.id for d in spec.virtio_mem]
    for dev_spec, dev in zip(spec.virtio_mem, devices, strict=True):
        assert dev.block_size == dev_spec.block_size
        assert dev.max_size == dev_spec.max_size
        assert dev.requested_size == dev_spec.requested_size
        assert dev.size == 0  # no guest driver in a bare VM: nothing plugged
        assert dev.memdev == f"/objects/{dev_spec.memdev}"
        entry = by_region[dev.memdev_id]
        assert (entry.gpa, entry.size, entry.offset, entry.kind) == (
            dev.memaddr,
            dev.max_size,
            0,
            "ram",
        )


def session(qmp: QMPSession | None) -> QMPSession:
    assert qmp is not None
    return qmp


@pytest.mark.bare
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(LIVE_SPECS))
async def test_live_layout(name: str) -> None:
    spec = LIVE_SPECS[name]
    async with launch(spec) as vm:
        qmp = session(vm.qmp)
        text = await qmp.hmp("info mtree -f")
        raw_devices = await qmp.execute("query-memory-devices")
    entries = parse_system_flatview(text)
    assert [Want.of(e) for e in entries] == expected_layout(spec)
    check_devices(spec, parse_memory_devices(raw_devices), entries)


@pytest.mark.bare
@pytest.mark.timeout(30)
async def test_live_dispatch_and_owner_options_give_same_entries() -> None:
    spec = LIVE_SPECS["pc-file-vmem2"]
    async with launch(spec) as vm:
        qmp = session(vm.qmp)
        texts = [await qmp.hmp(f"info mtree {options}") for options in ("-f", "-f -d", "-f -o")]
    plain, dispatch, owners = (parse(text) for text in texts)
    assert plain == dispatch == owners == expected_layout(spec)


@pytest.mark.bare
@pytest.mark.timeout(30)
async def test_live_layout_after_bios_programs_pam() -> None:
    spec = LIVE_SPECS["q35-memfd-split-vmem"]
    main = main_ram(spec).region
    async with launch(spec) as vm:
        qmp = session(vm.qmp)
        await qmp.execute("cont")
        deadline = time.monotonic() + 15.0
        while True:
            entries = parse_system_flatview(await qmp.hmp("info mtree -f"))
            if any(e.region == main and e.kind == "rom" for e in entries):
                # SeaBIOS shadowed itself into main RAM (PAM read-write), then locked it
                # read-only at the end of POST
                break
            assert time.monotonic() < deadline, "SeaBIOS did not lock PAM in 15 s"
            await asyncio.sleep(0.1)
        await qmp.execute("stop")
        entries = parse_system_flatview(await qmp.hmp("info mtree -f"))
    low = [e for e in entries if e.gpa < 0x100000]
    # every piece below 1 MiB is main RAM at offset == gpa, read-only or not, without a gap
    assert all(e.region == main and e.offset == e.gpa for e in low)
    assert {e.kind for e in low} == {"ram", "rom"}
    assert [e.gpa for e in low] == [0, *(e.gpa_end for e in low[:-1])]
    assert low[-1].gpa_end == 0x100000
    rest = [Want.of(e) for e in entries if e.gpa >= 0x100000]
    assert rest == expected_layout(spec)[3:]


@pytest.mark.bare
@pytest.mark.timeout(30)
async def test_live_reply_models() -> None:
    spec = LIVE_SPECS["q35-memfd-split-vmem"]
    async with launch(spec) as vm:
        qmp = session(vm.qmp)
        status = StatusInfo.model_validate(await qmp.execute("query-status"))
        version = VersionInfo.model_validate(await qmp.execute("query-version"))
        capability = DumpCapability.model_validate(
            await qmp.execute("query-dump-guest-memory-capability")
        )
        dump = DumpQueryResult.model_validate(await qmp.execute("query-dump"))
        memdevs = [MemdevInfo.model_validate(m) for m in await qmp.execute("query-memdev")]
        properties = [
            ObjectPropertyInfo.model_validate(p)
            for p in await qmp.execute("qom-list", {"path": "/objects/ram0"})
        ]
    assert (status.running, status.status) == (False, "prelaunch")
    assert version.qemu.as_tuple() >= (7, 2, 0)
    assert str(version.qemu).startswith(f"{version.qemu.major}.")
    assert "elf" in capability.formats
    assert (dump.status, dump.completed, dump.total) == ("none", 0, 0)
    sizes = {m.id: m.size for m in memdevs}
    assert sizes == {"ram0": 1 * GiB, "mem-vmem0": 2 * GiB}
    assert all(m.share for m in memdevs)
    assert {"size": "int", "share": "bool"}.items() <= {p.name: p.type for p in properties}.items()
