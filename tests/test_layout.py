"""Tests of the guest-physical layout, populated memory and the survey: properties and real QEMU.

The pure core (:mod:`qmpdump.memmap.layout`, :mod:`qmpdump.memmap.populated`) is checked with
hypothesis against a bitmask model (bit b set iff byte b is in a set; ``mask_of``/``runs_of``
from ``tests.test_ranges``): translating region offsets to guest-physical addresses is then a
shift of each piece's window of bits, which shares no code with :class:`RangeSet`'s bisections.

The ``bare`` tests ask real QEMU 7.2 (stopped at reset) and derive every expectation from the VM
spec and from QEMU's x86 memory map (``hw/i386/pc.c`` ``pc_memory_init``, ``hw/i386/x86.c``
``x86_bios_rom_init``), never from qmpdump's output:

* main RAM is one region, mapped at gpa 0 from region offset 0 up to the 4 GiB split point
  ``below`` (``max-ram-below-4g``), except ``[0xc0000, 0x100000)`` where ``pc.rom`` (128 KiB of
  option ROM space) and the last 128 KiB of ``pc.bios`` (``isa-bios``) sit; the rest of main
  RAM, from region offset ``below``, is mapped at 4 GiB;
* ``pc.bios`` is SeaBIOS's 256 KiB image, mapped at ``4 GiB - 256 KiB`` and aliased (its upper
  half) at ``0xe0000``;
* device memory starts at the first 1 GiB boundary at or above the end of main RAM above 4 GiB,
  and the first virtio-mem device is placed there.

Populated memory is checked page for page: bytes are written from the host at known region
offsets (``pwrite`` on file and memfd backends, ``process_vm_writev`` into anonymous RAM, where
transparent huge pages are accounted for exactly as ``tests/test_host.py`` does), and the
survey must report exactly those pages at the guest-physical addresses the spec gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpdump.errors import LayoutError
from qmpdump.host.extents import data_extents
from qmpdump.host.pagemap import PAGE_SIZE, scan_populated
from qmpdump.host.procfs import find_mapping, find_mapping_file
from qmpdump.memmap.layout import Backend, BackendType, Layout, Piece, VirtioMem, build_layout
from qmpdump.memmap.populated import (
    RegionPopulation,
    Source,
    compute_population,
)
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.probe import read_layout, region_host_addresses
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import survey
from qmpdump.testbed.vm import VM, GiB, MiB, VirtioMemSpec, VMSpec
from qmpdump.testbed.vm import Backend as VMBackend

from .conftest import VMFactory
from .test_host import (
    anon_fault_granules,
    fault_extent,
    gpa2hva,
    guest_bytes,
    kib,
    pages_of,
    poke,
    shmem_page_granule,
    smaps_fields,
)
from .test_ranges import mask_of, runs_of

FOUR_GIB = 4 * GiB

# ================================================================ pure: strategies and model

REGION_NAMES = ("alpha", "beta", "gamma")
#: Grids: single bytes, an odd stride, pages. Offsets and gpas are multiples of the unit.
UNITS = (1, 3, PAGE_SIZE)
MAX_PIECES = 7
MAX_SIZE_STEPS = 12
MAX_GAP_STEPS = 6

PROPERTY_SETTINGS = settings(deadline=None, max_examples=150)


def as_set(mask: int) -> RangeSet:
    """The model's bitmask as a RangeSet."""
    return RangeSet.from_ranges(runs_of(mask))


def window_bits(mask: int, start: int, size: int) -> int:
    """Bits ``[start, start + size)`` of ``mask``, moved down to bit 0."""
    return (mask >> start) & ((1 << size) - 1)


def model_region_to_gpa(pieces: Iterable[Piece], region: str, offsets: int) -> int:
    """Model: each piece of ``region`` shows its window of region offsets at its gpa."""
    out = 0
    for p in pieces:
        if p.region == region:
            out |= window_bits(offsets, p.region_offset, p.gpa.size) << p.gpa.start
    return out


def model_gpa_to_region(pieces: Iterable[Piece], region: str, gpas: int) -> int:
    """Model: each piece of ``region`` carries its window of gpas back to its region offsets."""
    out = 0
    for p in pieces:
        if p.region == region:
            out |= window_bits(gpas, p.gpa.start, p.gpa.size) << p.region_offset
    return out


def model_piece_at(pieces: Iterable[Piece], gpa: int) -> Piece | None:
    """Brute force: the first piece whose range holds ``gpa``."""
    return next((p for p in pieces if p.gpa.start <= gpa < p.gpa.end), None)


@dataclass(frozen=True)
class Drawn:
    """A drawn layout and how it was built."""

    unit: int
    pieces: tuple[Piece, ...]  # in the (shuffled) order handed to build_layout
    #: True when no two pieces of one region map a common region offset
    injective: bool
    span: int  # every gpa and region offset drawn lies below this

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(sorted({p.region for p in self.pieces}))


@st.composite
def drawn_layouts(draw: st.DrawFn) -> Drawn:
    """Non-overlapping gpa ranges mapping offsets of a few regions.

    Injective layouts give every piece of a region its own region offsets (drawn in one order,
    laid out in gpa in another); the others draw offsets freely, so that a region offset may
    show at several gpas (as ``pc.bios`` does at ``0xe0000`` and ``0xfffe0000``).
    """
    unit = draw(st.sampled_from(UNITS))
    injective = draw(st.booleans())
    count = draw(st.integers(1, MAX_PIECES))
    specs = [
        (
            draw(st.integers(0, len(REGION_NAMES) - 1)),
            draw(st.integers(1, MAX_SIZE_STEPS)) * unit,
        )
        for _ in range(count)
    ]
    offsets: list[int] = []
    cursor = dict.fromkeys(range(len(REGION_NAMES)), 0)
    for region, size in specs:
        if injective:
            offset = cursor[region] + draw(st.integers(0, MAX_GAP_STEPS)) * unit
            cursor[region] = offset + size
        else:
            offset = draw(st.integers(0, 2 * MAX_SIZE_STEPS)) * unit
        offsets.append(offset)
    # Region sizes: sometimes exactly the last mapped byte, sometimes more.
    sizes = {
        r: max((o + s for (rr, s), o in zip(specs, offsets, strict=True) if rr == r), default=unit)
        + draw(st.integers(0, 3)) * unit
        for r in range(len(REGION_NAMES))
    }
    types = list(BackendType)
    backends = {
        r: Backend(
            region=REGION_NAMES[r],
            type=draw(st.sampled_from(types)),
            size=sizes[r],
            id=REGION_NAMES[r],
        )
        for r in range(len(REGION_NAMES))
    }
    order = draw(st.permutations(range(count)))
    gpa = 0
    placed: list[Piece] = []
    for index in order:
        region, size = specs[index]
        gpa += draw(st.integers(0, MAX_GAP_STEPS)) * unit  # 0: pieces touch
        placed.append(
            Piece(Range(gpa, size), REGION_NAMES[region], offsets[index], backends[region])
        )
        gpa += size
    shuffled = draw(st.permutations(placed))
    span = max(gpa, *sizes.values()) + MAX_GAP_STEPS * unit
    return Drawn(unit, tuple(shuffled), injective, span)


@st.composite
def byte_sets(draw: st.DrawFn, span: int, max_ranges: int = 6) -> RangeSet:
    """Arbitrary byte ranges below ``span`` (not aligned to any grid)."""
    ranges = []
    for _ in range(draw(st.integers(0, max_ranges))):
        start = draw(st.integers(0, span - 1))
        ranges.append(Range(start, draw(st.integers(1, max(1, span - start)))))
    return RangeSet.from_ranges(ranges)


# ================================================================ pure: Layout


@PROPERTY_SETTINGS
@given(st.data())
def test_layout_sorts_pieces_and_piece_at_agrees_with_brute_force(data: st.DataObject) -> None:
    drawn = data.draw(drawn_layouts())
    layout = build_layout(drawn.pieces)
    assert list(layout.pieces) == sorted(drawn.pieces, key=lambda p: p.gpa.start)
    assert layout.ram == as_set(mask_of(p.gpa for p in drawn.pieces))
    # Every piece boundary, one byte either side, and random addresses up to past the end.
    probes = {0, drawn.span, *data.draw(st.lists(st.integers(0, drawn.span), max_size=20))}
    for p in drawn.pieces:
        probes |= {p.gpa.start - 1, p.gpa.start, p.gpa.end - 1, p.gpa.end}
    for gpa in sorted(probes - {-1}):
        assert layout.piece_at(gpa) is model_piece_at(drawn.pieces, gpa), hex(gpa)
    for region in drawn.regions:
        assert set(layout.pieces_of(region)) == {p for p in drawn.pieces if p.region == region}
        assert [p.region for p in layout.pieces_of(region)] == [region] * len(
            layout.pieces_of(region)
        )
    assert {b.region for b in layout.backends} == set(drawn.regions)
    for p in drawn.pieces:
        mid = p.gpa.start + p.gpa.size // 2
        assert p.gpa_of(p.region_offset_of(mid)) == mid
        assert p.region_range == Range(p.region_offset, p.gpa.size)


@PROPERTY_SETTINGS
@given(st.data())
def test_gpa_to_region_and_back_matches_the_model(data: st.DataObject) -> None:
    drawn = data.draw(drawn_layouts())
    layout = build_layout(drawn.pieces)
    for region in drawn.regions:
        gpas = data.draw(byte_sets(drawn.span))
        mapped_gpas = mask_of(p.gpa for p in layout.pieces_of(region))
        offsets = layout.gpa_to_region(region, gpas)
        assert offsets == as_set(model_gpa_to_region(drawn.pieces, region, mask_of(gpas)))
        back = layout.region_to_gpa(region, offsets)
        model_back = as_set(model_region_to_gpa(drawn.pieces, region, mask_of(offsets)))
        assert back == model_back
        if drawn.injective:
            # One gpa per region offset: the round trip gives exactly what the region maps.
            assert back == as_set(mask_of(gpas) & mapped_gpas)
        else:
            # Aliases can only add gpas, never lose one.
            assert mask_of(back) & mask_of(gpas) == mask_of(gpas) & mapped_gpas


@PROPERTY_SETTINGS
@given(st.data())
def test_region_to_gpa_and_back_matches_the_model(data: st.DataObject) -> None:
    drawn = data.draw(drawn_layouts())
    layout = build_layout(drawn.pieces)
    for region in drawn.regions:
        offsets = data.draw(byte_sets(drawn.span))
        mapped_offsets = mask_of(p.region_range for p in layout.pieces_of(region))
        gpas = layout.region_to_gpa(region, offsets)
        assert gpas == as_set(model_region_to_gpa(drawn.pieces, region, mask_of(offsets)))
        assert gpas.total >= (mask_of(offsets) & mapped_offsets).bit_count()
        # Whether or not offsets are aliased, the way back gives the offsets some piece maps.
        assert layout.gpa_to_region(region, gpas) == as_set(mask_of(offsets) & mapped_offsets)
    # A region no piece maps translates to nothing either way.
    assert layout.region_to_gpa("nowhere", RangeSet.of(0, drawn.span)) == RangeSet()
    assert layout.gpa_to_region("nowhere", RangeSet.of(0, drawn.span)) == RangeSet()


def test_an_aliased_region_offset_shows_at_every_gpa_that_maps_it() -> None:
    """``pc.bios`` as QEMU 7.2 maps it: whole below 4 GiB, its upper half again at 0xe0000."""
    bios = Backend(region="pc.bios", type=BackendType.ANONYMOUS, size=256 * 1024)
    layout = build_layout(
        [
            Piece(Range(0xFFFC0000, 0x40000), "pc.bios", 0, bios, readonly=True),
            Piece(Range(0xE0000, 0x20000), "pc.bios", 0x20000, bios, readonly=True),
        ]
    )
    isa = RangeSet.of(0xE0000 + 0x100, 0x10)
    offsets = layout.gpa_to_region("pc.bios", isa)
    assert offsets == RangeSet.of(0x20100, 0x10)
    assert layout.region_to_gpa("pc.bios", offsets) == RangeSet.from_ranges(
        [(0xE0100, 0x10), (0xFFFE0100, 0x10)]
    )
    assert layout.region_to_gpa("pc.bios", RangeSet.of(0, 0x20000)) == RangeSet.of(
        0xFFFC0000, 0x20000
    )


def _backend(region: str, size: int) -> Backend:
    return Backend(region=region, type=BackendType.MEMFD, size=size, id=region)


@PROPERTY_SETTINGS
@given(st.data())
def test_build_layout_rejects_overlapping_pieces(data: st.DataObject) -> None:
    drawn = data.draw(drawn_layouts())
    victim = data.draw(st.sampled_from(drawn.pieces))
    # A copy of the victim moved by less than its size (either way) overlaps it, and still
    # fits its region: only the overlap is wrong.
    size = victim.gpa.size
    start = data.draw(st.integers(max(0, victim.gpa.start - size + 1), victim.gpa.end - 1))
    intruder = Piece(Range(start, size), victim.region, victim.region_offset, victim.backend)
    assert intruder.gpa.overlaps(victim.gpa)
    pieces = [*drawn.pieces, intruder]
    with pytest.raises(LayoutError, match="RAM pieces overlap"):
        build_layout(data.draw(st.permutations(pieces)))


@PROPERTY_SETTINGS
@given(st.data())
def test_build_layout_rejects_a_piece_past_its_region(data: st.DataObject) -> None:
    drawn = data.draw(drawn_layouts())
    victim = data.draw(st.sampled_from(drawn.pieces))
    # Exactly to the end is fine; one byte (or more) past it is not.
    too_far = data.draw(st.integers(1, 3 * drawn.unit))
    end_offset = victim.backend.size - victim.gpa.size
    fits = Piece(victim.gpa, victim.region, end_offset, victim.backend)
    build_layout([fits if p is victim else p for p in drawn.pieces])
    beyond = Piece(victim.gpa, victim.region, end_offset + too_far, victim.backend)
    with pytest.raises(LayoutError, match=f"{victim.region} at .* past the end") as caught:
        build_layout([beyond if p is victim else p for p in drawn.pieces])
    assert f"{victim.backend.size:#x}-byte region" in str(caught.value)


VMEM_GPA = 0x1_0000_0000
VMEM_SIZE = 0x4000_0000
VMEM_BLOCK = 2 * MiB
MAIN = _backend("ram0", 0x2000_0000)
VMEM = _backend("mem-vmem0", VMEM_SIZE)
MAIN_PIECE = Piece(Range(0, 0x2000_0000), "ram0", 0, MAIN)


def _vmem(**changes: int) -> VirtioMem:
    fields = {
        "memaddr": VMEM_GPA,
        "max_size": VMEM_SIZE,
        "block_size": VMEM_BLOCK,
        "size": 0,
        "requested_size": 0,
    }
    fields.update(changes)
    return VirtioMem(id="vmem0", memdev="mem-vmem0", **fields)


def test_build_layout_accepts_a_virtio_mem_region_mapped_whole() -> None:
    whole = Piece(Range(VMEM_GPA, VMEM_SIZE), "mem-vmem0", 0, VMEM)
    layout = build_layout([whole, MAIN_PIECE], [_vmem()])
    assert layout.device_for("mem-vmem0") == _vmem()
    assert layout.device_for("ram0") is None
    assert layout.pieces == (MAIN_PIECE, whole)


@pytest.mark.parametrize(
    ("pieces", "device"),
    [
        pytest.param([], _vmem(), id="memdev-not-mapped"),
        pytest.param(
            [Piece(Range(VMEM_GPA + VMEM_BLOCK, VMEM_SIZE - VMEM_BLOCK), "mem-vmem0", 0, VMEM)],
            _vmem(),
            id="mapped-elsewhere",
        ),
        pytest.param(
            [Piece(Range(VMEM_GPA, VMEM_SIZE - VMEM_BLOCK), "mem-vmem0", 0, VMEM)],
            _vmem(),
            id="mapped-short",
        ),
        pytest.param(
            [Piece(Range(VMEM_GPA, VMEM_BLOCK), "mem-vmem0", VMEM_BLOCK, VMEM)],
            _vmem(max_size=VMEM_BLOCK),
            id="mapped-from-an-offset",
        ),
        pytest.param(
            [
                Piece(Range(VMEM_GPA, VMEM_BLOCK), "mem-vmem0", 0, VMEM),
                Piece(
                    Range(VMEM_GPA + VMEM_BLOCK, VMEM_SIZE - VMEM_BLOCK),
                    "mem-vmem0",
                    VMEM_BLOCK,
                    VMEM,
                ),
            ],
            _vmem(),
            id="mapped-in-two-pieces",
        ),
        pytest.param(
            [Piece(Range(VMEM_GPA, VMEM_SIZE), "mem-vmem0", 0, VMEM)],
            _vmem(memaddr=VMEM_GPA + 0x4000_0000),
            id="memaddr-differs",
        ),
        pytest.param(
            [Piece(Range(VMEM_GPA, VMEM_SIZE), "mem-vmem0", 0, VMEM)],
            _vmem(max_size=2 * VMEM_SIZE),
            id="device-larger-than-its-mapping",
        ),
    ],
)
def test_build_layout_rejects_a_virtio_mem_region_not_mapped_whole(
    pieces: list[Piece], device: VirtioMem
) -> None:
    with pytest.raises(LayoutError, match=r"virtio-mem vmem0: its backend mem-vmem0 is not mapped"):
        build_layout([MAIN_PIECE, *pieces], [device])


# ================================================================ pure: compute_population


@dataclass(frozen=True)
class DrawnPopulation:
    drawn: Drawn
    layout: Layout
    regions: dict[str, RegionPopulation]
    exact_plugged: dict[str, RangeSet] | None


@st.composite
def drawn_populations(draw: st.DrawFn) -> DrawnPopulation:
    """A random layout plus virtio-mem devices, and per-region populations of every kind."""
    drawn = draw(drawn_layouts())
    unit = drawn.unit
    block = draw(st.sampled_from((1, 2, 4, 8))) * unit
    gpa = -(-drawn.span // block) * block
    pieces = list(drawn.pieces)
    devices = []
    for index in range(draw(st.integers(0, 2))):
        gpa += draw(st.integers(0, 2)) * block
        max_size = draw(st.integers(1, 6)) * block
        memdev = f"mem-vmem{index}"
        backend = Backend(
            region=memdev, type=draw(st.sampled_from(list(BackendType))), size=max_size
        )
        pieces.append(Piece(Range(gpa, max_size), memdev, 0, backend))
        devices.append(
            VirtioMem(
                id=f"vmem{index}",
                memaddr=gpa,
                max_size=max_size,
                block_size=block,
                size=0,
                requested_size=0,
                memdev=memdev,
            )
        )
        gpa += max_size
    layout = build_layout(draw(st.permutations(pieces)), devices)
    regions: dict[str, RegionPopulation] = {}
    for backend in layout.backends:
        kind = draw(st.sampled_from(("missing", *Source)))
        if kind == "missing":
            continue
        # Offsets may run past the region's end (a file longer than the region): dropped.
        # An unknown region's offsets must be ignored, so those get some too.
        offsets = draw(byte_sets(backend.size + 2 * unit))
        regions[backend.region] = RegionPopulation(backend.region, offsets, Source(kind))
    exact_plugged = None
    if draw(st.booleans()):
        exact_plugged = {d.id: draw(byte_sets(gpa + block)) for d in devices if draw(st.booleans())}
    return DrawnPopulation(drawn, layout, regions, exact_plugged)


def block_model(device: VirtioMem, populated: int) -> int:
    """Model: the device blocks holding at least one populated byte, block by block."""
    out = 0
    for index in range(device.max_size // device.block_size):
        start = device.memaddr + index * device.block_size
        if window_bits(populated, start, device.block_size):
            out |= ((1 << device.block_size) - 1) << start
    return out


@PROPERTY_SETTINGS
@given(drawn_populations())
def test_compute_population_matches_the_model(case: DrawnPopulation) -> None:
    layout = case.layout
    population = compute_population(layout, case.regions, case.exact_plugged)
    known = {r for r, found in case.regions.items() if found.source is not Source.UNKNOWN}
    model_populated = 0
    model_unknown = 0
    for backend in layout.backends:
        if backend.region in known:
            offsets = mask_of(case.regions[backend.region].offsets)
            model_populated |= model_region_to_gpa(layout.pieces, backend.region, offsets)
        else:
            model_unknown |= mask_of(p.gpa for p in layout.pieces_of(backend.region))
    ram = mask_of(layout.ram)
    assert population.populated == as_set(model_populated)
    assert mask_of(population.populated) & ~ram == 0, "populated bytes outside RAM"
    assert population.unknown == as_set(model_unknown)
    assert not population.populated & population.unknown
    assert population.layout is layout
    assert dict(population.regions) == case.regions
    if all(b.region in case.regions for b in layout.backends):
        assert population.exact == all(r.exact for r in case.regions.values())

    exact_plugged = case.exact_plugged or {}
    assert [d.device for d in population.devices] == list(layout.devices)
    for dev in population.devices:
        device = dev.device
        region = mask_of([device.region])
        inside = mask_of(population.populated) & region
        assert dev.populated == as_set(inside)
        blocks = mask_of(dev.blocks_with_data)
        assert inside & ~blocks == 0, "populated outside the blocks with data"
        assert blocks & ~region == 0, "blocks with data outside the device"
        assert blocks == block_model(device, inside)
        for run in dev.blocks_with_data:
            assert (run.start - device.memaddr) % device.block_size == 0
            assert run.size % device.block_size == 0
        if device.id in exact_plugged:
            assert dev.plugged_exact
            assert dev.plugged == as_set(mask_of(exact_plugged[device.id]) & region)
        else:
            assert not dev.plugged_exact
            assert dev.plugged == dev.blocks_with_data


def test_compute_population_puts_missing_and_unknown_regions_in_unknown() -> None:
    vmem = Piece(Range(VMEM_GPA, VMEM_SIZE), "mem-vmem0", 0, VMEM)
    layout = build_layout([MAIN_PIECE, vmem], [_vmem()])
    unknown = RegionPopulation("ram0", RangeSet(), Source.UNKNOWN, "QEMU's pid is unknown")
    population = compute_population(layout, {"ram0": unknown})
    assert population.populated == RangeSet()
    assert population.unknown == RangeSet.from_ranges([MAIN_PIECE.gpa, vmem.gpa])
    (dev,) = population.devices
    # Nothing is known to hold data in the device, so nothing is inferred to be plugged.
    assert (dev.plugged, dev.plugged_exact, dev.blocks_with_data) == (RangeSet(), False, RangeSet())


def test_population_with_a_missing_region_is_not_exact() -> None:
    vmem = Piece(Range(VMEM_GPA, VMEM_SIZE), "mem-vmem0", 0, VMEM)
    layout = build_layout([MAIN_PIECE, vmem], [_vmem()])
    main = RegionPopulation("ram0", RangeSet.of(0, PAGE_SIZE), Source.SEEK_DATA)
    population = compute_population(layout, {"ram0": main})
    assert population.unknown == RangeSet.from_ranges([vmem.gpa])
    assert not population.exact


# ================================================================ real QEMU: what the spec says

PC_ROM = Range(0xC0000, 0x20000)  # option ROM space (PC_ROM_SIZE), pc.rom
ISA_BIOS = Range(0xE0000, 0x20000)  # the last 128 KiB of pc.bios, aliased below 1 MiB
BIOS_SIZE = 256 * 1024  # SeaBIOS bios-256k.bin
BIOS = Range(FOUR_GIB - BIOS_SIZE, BIOS_SIZE)
ONE_MIB = 0x100000
BIOS_GPAS = RangeSet.from_ranges([ISA_BIOS, BIOS])
#: QEMU's own RAM regions outside any memory backend object.
ROM_PIECES = {
    (PC_ROM.start, PC_ROM.size, "pc.rom", 0),
    (ISA_BIOS.start, ISA_BIOS.size, "pc.bios", BIOS_SIZE - ISA_BIOS.size),
    (BIOS.start, BIOS.size, "pc.bios", 0),
}

RAM_SIZE = 1 * GiB
SPLIT = 512 * MiB
DEVICE = VirtioMemSpec(id="vmem0", max_size=1 * GiB, block_size=2 * MiB, requested_size=0)

_HOST_TYPES = {
    VMBackend.DEFAULT: BackendType.RAM,
    VMBackend.RAM: BackendType.RAM,
    VMBackend.MEMFD: BackendType.MEMFD,
    VMBackend.FILE: BackendType.FILE,
}


@dataclass(frozen=True)
class SpecMap:
    """Where QEMU 7.2's x86 machines put main RAM and the first virtio-mem device, from a spec."""

    spec: VMSpec

    @property
    def region(self) -> str:
        # Without -machine memory-backend=, QEMU makes a memory-backend-ram object with the
        # machine's default RAM id (hw/core/machine.c create_default_memdev): /objects/pc.ram.
        return self.spec.main_memdev or "pc.ram"

    @property
    def below(self) -> int:
        """Bytes of main RAM below 4 GiB."""
        # Without max-ram-below-4g, q35 and pc keep RAM under 2 GiB wholly below 4 GiB.
        assert self.spec.ram_size < 2 * GiB
        below = self.spec.below_4g
        return self.spec.ram_size if below is None else min(below, self.spec.ram_size)

    @property
    def above(self) -> int:
        return self.spec.ram_size - self.below

    def pieces(self) -> list[tuple[int, int, int]]:
        """``(gpa, region_offset, size)`` of every main-RAM piece at reset."""
        out = [(0, 0, PC_ROM.start), (ONE_MIB, ONE_MIB, self.below - ONE_MIB)]
        if self.above:
            out.append((FOUR_GIB, self.below, self.above))
        return out

    @property
    def gpas(self) -> RangeSet:
        return RangeSet.from_ranges((gpa, size) for gpa, _, size in self.pieces())

    def to_gpa(self, offsets: RangeSet) -> RangeSet:
        """Main-RAM region offsets to the gpas that show them (offsets hidden by ROM vanish)."""
        out = RangeSet()
        for gpa, offset, size in self.pieces():
            out |= offsets.clip(Range(offset, size)).shift(gpa - offset)
        return out

    def fragments(self, offset: int, data: bytes) -> list[tuple[int, bytes]]:
        """The guest-visible parts of ``data`` written at a main-RAM region offset."""
        out = []
        for gpa, start, size in self.pieces():
            lo, hi = max(offset, start), min(offset + len(data), start + size)
            if lo < hi:
                out.append((gpa + lo - start, data[lo - offset : hi - offset]))
        return out

    @property
    def device_gpa(self) -> int:
        """memaddr of the first virtio-mem device: device memory starts at the 1 GiB boundary
        at or above the end of RAM above 4 GiB (``pc_memory_init``)."""
        return -(-(FOUR_GIB + self.above) // GiB) * GiB


def spec_for(
    name: str,
    machine: str,
    main: VMBackend,
    below: int | None,
    device: VMBackend,
    *,
    requested_size: int = 0,
) -> VMSpec:
    """A bare VM: 1 GiB of main RAM and one 1 GiB virtio-mem device with 2 MiB blocks."""
    return VMSpec(
        name=name,
        guest=False,
        machine=machine,
        ram_backend=main,
        ram_size=RAM_SIZE,
        below_4g=below,
        virtio_mem=(replace(DEVICE, backend=device, requested_size=requested_size),),
    )


def qmp(vm: VM) -> QMPSession:
    """The testbed's connected session (bare VMs always have one)."""
    assert vm.qmp is not None
    return vm.qmp


async def backing_path(vm: VM, backend: VMBackend, memdev: str, gpa: int) -> str:
    """A path that opens the file behind a file or memfd backend whose offset 0 is at ``gpa``."""
    if backend is VMBackend.FILE:
        return str(vm.backing_file(memdev))
    found = find_mapping_file(vm.pid, await gpa2hva(vm, gpa))
    assert found is not None, f"{memdev} at {gpa:#x} is not file-backed"
    assert found.file_offset == 0  # QEMU 7.2 maps backends from file offset 0
    return found.path


@contextmanager
def opened(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def main_writes(below: int, ram_size: int) -> list[tuple[int, bytes]]:
    """Writes at main-RAM region offsets, each showing one thing about the mapping."""
    return [
        (0x0, b"GPA-ZERO"),
        (0x9FFFC, b"STRADDLE"),  # two pages, both below the ROM window
        (0xD0000, b"HIDDEN!!"),  # under pc.rom: region data no gpa shows
        (ONE_MIB + 5, b"ONE-MIB!"),
        (below - 4, b"SPLITTER"),  # the last page below 4 GiB and the first above
        (below + 0x123456, b"ABOVE-4G"),
        (ram_size - 1, b"Z"),
    ]


def device_writes(max_size: int) -> list[tuple[int, bytes]]:
    """Writes at virtio-mem region offsets: blocks 0, 1 and 2 (a straddle), and the last."""
    return [
        (0x10, b"VMEM0000"),
        (4 * MiB - 4, b"STRADDLE"),
        (max_size - 1, b"V"),
    ]


def device_blocks(memaddr: int, max_size: int) -> RangeSet:
    """The 2 MiB blocks :func:`device_writes` touch, at gpa."""
    block = DEVICE.block_size
    return RangeSet.from_ranges(
        [(memaddr, block), (memaddr + block, 2 * block), (memaddr + max_size - block, block)]
    )


def spelled_out_main(where: SpecMap, granule: int) -> RangeSet:
    """What :func:`main_writes` populate, at gpa, written out by hand for 4 KiB and 2 MiB."""
    below, above = where.below, where.above
    if granule == PAGE_SIZE:
        return RangeSet.from_ranges(
            [
                (0x0, PAGE_SIZE),
                (0x9F000, 2 * PAGE_SIZE),
                (ONE_MIB, PAGE_SIZE),
                (below - PAGE_SIZE, PAGE_SIZE),
                (FOUR_GIB, PAGE_SIZE),
                (FOUR_GIB + 0x123000, PAGE_SIZE),
                (FOUR_GIB + above - PAGE_SIZE, PAGE_SIZE),
            ]
        )
    assert granule == 2 * MiB
    # The huge page at offset 0 holds gpa 0 to the ROM window and 1 MiB to 2 MiB.
    return RangeSet.from_ranges(
        [
            (0x0, PC_ROM.start),
            (ONE_MIB, ONE_MIB),
            (below - granule, granule),
            (FOUR_GIB, granule),
            (FOUR_GIB + above - granule, granule),
        ]
    )


async def assert_guest_sees(vm: VM, where: SpecMap, writes: Sequence[tuple[int, bytes]]) -> None:
    """QEMU reads each guest-visible part of the main-RAM writes at the spec's gpa."""
    for offset, data in writes:
        parts = where.fragments(offset, data)
        if not parts:  # hidden under the ROM window: the gpa shows pc.rom instead
            assert await guest_bytes(vm, offset, len(data)) != data
        for gpa, part in parts:
            assert await guest_bytes(vm, gpa, len(part)) == part, hex(gpa)


# ================================================================ real QEMU: the layout

LAYOUT_CASES = [
    pytest.param(machine, main, below, id=f"{machine}-{main}-{'split' if below else 'whole'}")
    for machine in ("q35", "pc")
    for main in VMBackend
    for below in (None, SPLIT)
]


@pytest.mark.bare
@pytest.mark.parametrize(("machine", "main", "below"), LAYOUT_CASES)
async def test_read_layout_matches_the_spec(
    vm_factory: VMFactory, machine: str, main: VMBackend, below: int | None
) -> None:
    device = VMBackend.MEMFD if main in (VMBackend.FILE, VMBackend.RAM) else VMBackend.FILE
    spec = spec_for(f"layout-{machine}-{main}", machine, main, below, device)
    vm = await vm_factory(spec)
    where = SpecMap(spec)
    layout = await read_layout(qmp(vm))

    # Main RAM: one region, every piece where the spec puts it, nothing read-only.
    main_pieces = layout.pieces_of(where.region)
    assert [(p.gpa.start, p.region_offset, p.gpa.size) for p in main_pieces] == where.pieces()
    assert not any(p.readonly for p in main_pieces)
    fd_backed = main in (VMBackend.MEMFD, VMBackend.FILE)
    main_backend = Backend(
        region=where.region,
        type=_HOST_TYPES[main],
        size=RAM_SIZE,
        id=where.region,
        mem_path=str(vm.backing_file("ram0")) if main is VMBackend.FILE else None,
        share=fd_backed,
    )
    assert {p.backend for p in main_pieces} == {main_backend}
    assert layout.region_to_gpa(where.region, RangeSet.of(0, RAM_SIZE)) == where.gpas
    hidden = RangeSet.of(PC_ROM.start, ONE_MIB - PC_ROM.start)
    assert layout.gpa_to_region(where.region, where.gpas) == RangeSet.of(0, RAM_SIZE) - hidden

    # QEMU's own ROM regions: anonymous, read-only, pc.bios whole below 4 GiB and aliased.
    roms = [p for p in layout.pieces if p.region in ("pc.rom", "pc.bios")]
    assert {(p.gpa.start, p.gpa.size, p.region, p.region_offset) for p in roms} == ROM_PIECES
    for p in roms:
        assert p.readonly
        size = PC_ROM.size if p.region == "pc.rom" else BIOS_SIZE
        assert p.backend == Backend(region=p.region, type=BackendType.ANONYMOUS, size=size)

    # The virtio-mem device: its region whole at the memaddr the spec gives.
    device_region = Range(where.device_gpa, DEVICE.max_size)
    assert layout.devices == (
        VirtioMem(
            id=DEVICE.id,
            memaddr=where.device_gpa,
            max_size=DEVICE.max_size,
            block_size=DEVICE.block_size,
            size=0,
            requested_size=0,
            memdev=DEVICE.memdev,
            node=0,
        ),
    )
    (device_piece,) = layout.pieces_of(DEVICE.memdev)
    assert (device_piece.gpa, device_piece.region_offset) == (device_region, 0)
    assert not device_piece.readonly
    assert device_piece.backend == Backend(
        region=DEVICE.memdev,
        type=_HOST_TYPES[device],
        size=DEVICE.max_size,
        id=DEVICE.memdev,
        mem_path=str(vm.backing_file(DEVICE.memdev)) if device is VMBackend.FILE else None,
        share=True,
    )
    assert layout.device_for(DEVICE.memdev) == layout.devices[0]

    # Nothing else is RAM.
    assert {b.region for b in layout.backends} == {where.region, "pc.rom", "pc.bios", DEVICE.memdev}
    assert layout.ram == where.gpas | RangeSet.from_ranges([PC_ROM, ISA_BIOS, BIOS, device_region])

    # gpa -> region -> gpa: every piece comes back whole, plus the gpas that alias its offsets.
    for p in layout.pieces:
        offsets = layout.gpa_to_region(p.region, RangeSet.of(p.gpa.start, p.gpa.size))
        assert offsets == RangeSet.of(p.region_offset, p.gpa.size)
        aliases = RangeSet()
        for q in layout.pieces_of(p.region):
            shared = q.region_range.intersection(p.region_range)
            if shared is not None:
                aliases |= RangeSet.of(q.gpa_of(shared.start), shared.size)
        assert layout.region_to_gpa(p.region, offsets) == aliases
        if p.region != "pc.bios":
            assert aliases == RangeSet.of(p.gpa.start, p.gpa.size)
    isa_offsets = layout.gpa_to_region("pc.bios", RangeSet.of(ISA_BIOS.start, ISA_BIOS.size))
    assert layout.region_to_gpa("pc.bios", isa_offsets) == RangeSet.from_ranges(
        [ISA_BIOS, Range(FOUR_GIB - ISA_BIOS.size, ISA_BIOS.size)]
    )

    # Host addresses: one base per region, and HMP agrees at both ends of every piece.
    bases = await region_host_addresses(qmp(vm), layout)
    assert set(bases) == {b.region for b in layout.backends}
    for p in layout.pieces:
        for gpa in (p.gpa.start, p.gpa.end - 1):
            assert await gpa2hva(vm, gpa) == bases[p.region] + p.region_offset_of(gpa), hex(gpa)


# ================================================================ real QEMU: populated memory


@pytest.mark.bare
async def test_a_bare_vm_at_reset_holds_only_the_bios(vm_factory: VMFactory) -> None:
    """QEMU at reset copied SeaBIOS into pc.bios and nothing else: pc.rom (no option ROMs with
    -nodefaults), main RAM and the virtio-mem device are holes."""
    spec = spec_for("reset", "q35", VMBackend.DEFAULT, SPLIT, VMBackend.FILE)
    vm = await vm_factory(spec)
    result = await survey(qmp(vm))
    population = result.population
    assert population.populated == BIOS_GPAS
    assert population.unknown == RangeSet()
    assert population.exact
    offsets = {name: found.offsets for name, found in population.regions.items()}
    assert offsets == {
        "pc.ram": RangeSet(),
        "pc.rom": RangeSet(),
        "pc.bios": RangeSet.of(0, BIOS_SIZE),
        DEVICE.memdev: RangeSet(),
    }
    sources = {name: found.source for name, found in population.regions.items()}
    assert sources == {
        "pc.ram": Source.PAGEMAP_SCAN,
        "pc.rom": Source.PAGEMAP_SCAN,
        "pc.bios": Source.PAGEMAP_SCAN,
        DEVICE.memdev: Source.SEEK_DATA,
    }
    # The BIOS really is SeaBIOS's 256 KiB image: its last bytes are the reset vector's page.
    bios_image = Path("/usr/share/seabios/bios-256k.bin")
    if bios_image.exists():
        tail = bios_image.read_bytes()[-16:]
        assert await guest_bytes(vm, FOUR_GIB - 16, 16) == tail


FD_CASES = [
    pytest.param("q35", VMBackend.FILE, VMBackend.FILE, id="q35-file-ram-file-vmem"),
    pytest.param("pc", VMBackend.MEMFD, VMBackend.MEMFD, id="pc-memfd-ram-memfd-vmem"),
]


@pytest.mark.bare
@pytest.mark.parametrize(("machine", "main", "device"), FD_CASES)
async def test_survey_reports_exactly_the_pages_written_to_fd_backed_ram(
    vm_factory: VMFactory, machine: str, main: VMBackend, device: VMBackend
) -> None:
    spec = spec_for(f"pop-{machine}-{main}", machine, main, SPLIT, device)
    vm = await vm_factory(spec)
    where = SpecMap(spec)
    granule = shmem_page_granule()
    device_region = Range(where.device_gpa, DEVICE.max_size)
    main_path = await backing_path(vm, main, "ram0", 0)
    device_path = await backing_path(vm, device, DEVICE.memdev, device_region.start)
    writes = main_writes(where.below, RAM_SIZE)
    vmem_writes = device_writes(DEVICE.max_size)

    with opened(main_path) as main_fd, opened(device_path) as device_fd:
        # At reset QEMU has written neither file: both are holes from end to end.
        assert data_extents(main_fd) == RangeSet()
        assert data_extents(device_fd) == RangeSet()
        assert (await survey(qmp(vm))).population.populated == BIOS_GPAS
        for offset, data in writes:
            os.pwrite(main_fd, data, offset)
        for offset, data in vmem_writes:
            os.pwrite(device_fd, data, offset)

    main_offsets = pages_of(writes).align_out(granule)
    expected_main = where.to_gpa(main_offsets)
    assert expected_main == spelled_out_main(where, granule)
    expected_device = pages_of(vmem_writes).align_out(granule).shift(device_region.start)
    blocks = device_blocks(device_region.start, DEVICE.max_size)

    result = await survey(qmp(vm))
    population = result.population
    assert population.populated & where.gpas == expected_main
    assert population.populated.clip(device_region) == expected_device
    assert population.populated == expected_main | expected_device | BIOS_GPAS
    assert population.unknown == RangeSet()
    main_found = population.regions["ram0"]
    assert (main_found.source, main_found.offsets) == (Source.SEEK_DATA, main_offsets)
    (dev,) = population.devices
    assert dev.populated == expected_device
    assert dev.blocks_with_data == blocks
    assert (dev.plugged, dev.plugged_exact) == (blocks, False)

    # The JSON report says the same: the hidden page counts for the region, not for any gpa.
    doc = json.loads(result.report().to_json())
    assert doc["schema"] == "qmpdump.map/1"
    assert doc["totals"]["populated_size"] == (expected_main | expected_device).total + (
        BIOS_GPAS.total
    )
    per_range = sum(r["populated_size"] for r in doc["ranges"] if r["region"] == "ram0")
    assert per_range == expected_main.total
    (ram0,) = (r for r in doc["regions"] if r["region"] == "ram0")
    assert ram0["populated_size"] == main_offsets.total == expected_main.total + PAGE_SIZE
    assert ram0["mem_path"] == (main_path if main is VMBackend.FILE else None)

    await assert_guest_sees(vm, where, writes)
    for offset, data in vmem_writes:
        assert await guest_bytes(vm, device_region.start + offset, len(data)) == data


@pytest.mark.bare
@pytest.mark.parametrize("main", [VMBackend.DEFAULT, VMBackend.RAM])
async def test_survey_reports_exactly_the_pages_written_to_anonymous_ram(
    vm_factory: VMFactory, main: VMBackend
) -> None:
    spec = spec_for(f"pop-anon-{main}", "q35", main, SPLIT, VMBackend.RAM)
    vm = await vm_factory(spec)
    where = SpecMap(spec)
    device_region = Range(where.device_gpa, DEVICE.max_size)
    base = await gpa2hva(vm, 0)
    device_base = await gpa2hva(vm, device_region.start)
    assert await gpa2hva(vm, FOUR_GIB) == base + where.below  # one block across the split
    main_window = Range(base, RAM_SIZE)
    device_window = Range(device_base, DEVICE.max_size)
    main_vma = find_mapping(vm.pid, base)
    device_vma = find_mapping(vm.pid, device_base)
    assert main_vma.is_anonymous
    assert device_vma.is_anonymous
    assert main_vma.hva_range.intersection(main_window) == main_window

    # At reset QEMU has written neither region.
    assert scan_populated(vm.pid, main_window).populated == RangeSet()
    assert scan_populated(vm.pid, device_window).populated == RangeSet()
    main_granule, _ = anon_fault_granules(vm.pid, base)
    device_granule, _ = anon_fault_granules(vm.pid, device_base)

    writes = main_writes(where.below, RAM_SIZE)
    vmem_writes = device_writes(DEVICE.max_size)
    for offset, data in writes:
        poke(vm.pid, base + offset, data)
    for offset, data in vmem_writes:
        poke(vm.pid, device_base + offset, data)
    # What the kernel populated, in host addresses (whole huge pages where they fit the VMA),
    # then in region offsets, then at the spec's gpas.
    main_hva = fault_extent(
        pages_of((base + o, d) for o, d in writes), main_granule, main_vma.hva_range
    )
    device_hva = fault_extent(
        pages_of((device_base + o, d) for o, d in vmem_writes), device_granule, device_vma.hva_range
    )
    main_offsets = main_hva.clip(main_window).shift(-base)
    expected_main = where.to_gpa(main_offsets)
    expected_device = device_hva.clip(device_window).shift(device_region.start - device_base)
    if main_granule == PAGE_SIZE or base % main_granule == 0:
        assert expected_main == spelled_out_main(where, main_granule)
    # The kernel's own count agrees (independent of PAGEMAP_SCAN).
    assert kib(smaps_fields(vm.pid, base)["Anonymous"]) == main_hva.total

    population = (await survey(qmp(vm))).population
    assert population.populated & where.gpas == expected_main
    assert population.populated.clip(device_region) == expected_device
    assert population.populated == expected_main | expected_device | BIOS_GPAS
    main_found = population.regions[where.region]
    assert (main_found.source, main_found.offsets) == (Source.PAGEMAP_SCAN, main_offsets)
    (dev,) = population.devices
    assert dev.populated == expected_device
    # 2 MiB huge pages or 4 KiB pages: either way the same three-and-a-bit blocks hold data.
    assert dev.blocks_with_data == device_blocks(device_region.start, DEVICE.max_size)
    assert (dev.plugged, dev.plugged_exact) == (dev.blocks_with_data, False)
    await assert_guest_sees(vm, where, writes)


# ================================================================ real QEMU: surveys change nothing

SURVEY_CASES = [
    pytest.param(VMBackend.FILE, VMBackend.MEMFD, id="file-ram-memfd-vmem"),
    pytest.param(VMBackend.MEMFD, VMBackend.FILE, id="memfd-ram-file-vmem"),
    pytest.param(VMBackend.DEFAULT, VMBackend.FILE, id="anon-ram-file-vmem"),
]


@pytest.mark.bare
@pytest.mark.parametrize(("main", "device"), SURVEY_CASES)
async def test_survey_changes_no_populated_extent_and_no_run_state(
    vm_factory: VMFactory, main: VMBackend, device: VMBackend
) -> None:
    """Neither a plain survey nor an ``exact_plug`` one changes host memory or the run state.

    The exact-plug probe starts QEMU's ELF dump into a one-page pipe and closes it after the
    headers (qmpdump.qmp.plugged). QEMU's dump then reads guest RAM from gpa 0, and a read of
    a shmem hole allocates it: measured on QEMU 7.2, in about one probe in eight the page at
    gpa 0 got allocated (``query-dump`` then says ``completed: 4096``). The survey punches such
    pages out again when they were holes before and hold only zeros (qmpdump.survey), so the
    probe is repeated here until that case has surely happened at least once in expectation.
    Anonymous RAM read by QEMU maps the zero page, which is not data.
    """
    spec = spec_for(f"still-{main}", "q35", main, SPLIT, device, requested_size=128 * MiB)
    vm = await vm_factory(spec)
    where = SpecMap(spec)
    device_region = Range(where.device_gpa, DEVICE.max_size)
    base = await gpa2hva(vm, 0)
    device_path = await backing_path(vm, device, DEVICE.memdev, device_region.start)
    main_path = None if main is VMBackend.DEFAULT else await backing_path(vm, main, "ram0", 0)

    # Some data away from gpa 0, so that "unchanged" is not just "still empty".
    if main_path is None:
        poke(vm.pid, base + 0x200000, b"KNOWN!!!")
    else:
        with opened(main_path) as fd:
            os.pwrite(fd, b"KNOWN!!!", 0x200000)
    with opened(device_path) as fd:
        os.pwrite(fd, b"KNOWN!!!", 0x400000)

    def host_view() -> dict[str, RangeSet]:
        """Populated region offsets as the kernel reports them, without qmpdump's survey."""
        with opened(device_path) as fd:
            device_data = data_extents(fd)
        if main_path is None:
            main_data = scan_populated(vm.pid, Range(base, RAM_SIZE)).populated.shift(-base)
        else:
            with opened(main_path) as fd:
                main_data = data_extents(fd)
        return {"main": main_data, "device": device_data}

    async def run_state() -> str:
        status = await qmp(vm).execute("query-status")
        return str(status["status"])

    before = host_view()
    assert before["main"]
    assert before["device"] == RangeSet.of(0x400000, PAGE_SIZE)
    assert await run_state() == "prelaunch"

    plain = await survey(qmp(vm))
    again = await survey(qmp(vm))
    assert host_view() == before
    assert await run_state() == "prelaunch"
    assert plain.facts.run_state == "prelaunch"
    assert again.population.populated == plain.population.populated

    for _ in range(24):
        exact = await survey(qmp(vm), exact_plug=True)
        assert await run_state() == "prelaunch"
        assert exact.facts.run_state == "prelaunch"
        dump = await qmp(vm).execute("query-dump")
        assert dump["status"] == "failed"  # the probe's dump, stopped by the closed pipe
        (dev,) = exact.population.devices
        # Nothing is plugged in a VM that never ran, whatever the requested size.
        assert (dev.plugged, dev.plugged_exact) == (RangeSet(), True)
        assert dev.device.requested_size == 128 * MiB
        assert exact.population.populated == plain.population.populated
        assert host_view() == before
    later = await survey(qmp(vm))
    assert later.population.populated == plain.population.populated
