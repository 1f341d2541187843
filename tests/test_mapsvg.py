"""Tests of qmpdump.mapsvg: the SVG picture of a memory map, read back with an XML parser.

Plain unit tests on reports built by hand: the renderer is pure, so a real VM adds nothing that
the report does not already carry. The builders model a q35 VM as QEMU 7.2 lays it out (see
tests/data/mtree/q35-memfd-split-vmem.txt and q35-default-split-after-bios.txt) and a synthetic
1 TiB virtio-mem device with half a million populated extents for the scale test.
"""

from __future__ import annotations

import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence

import pytest

from qmpdump.mapsvg import COLUMNS, MIN_PIECE_COLUMNS, _human, _pct, render_svg
from qmpdump.memmap.layout import BackendType
from qmpdump.memmap.populated import Source
from qmpdump.memmap.ranges import RangeSet
from qmpdump.report import (
    GpaRange,
    MapReport,
    RangeEntry,
    RegionEntry,
    Totals,
    VirtioMemEntry,
    VMSummary,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

NS = "{http://www.w3.org/2000/svg}"


# -- builders ----------------------------------------------------------------------------------


def piece(
    gpa: int,
    size: int,
    region: str = "ram0",
    *,
    backend_type: BackendType = BackendType.MEMFD,
    backend: str | None = "",
    region_offset: int | None = None,
    readonly: bool = False,
    populated_size: int | None = 0,
) -> RangeEntry:
    """A RAM piece; ``backend=""`` means "named like the region"."""
    offset = gpa if region_offset is None else region_offset
    return RangeEntry(
        gpa=gpa,
        size=size,
        region=region,
        backend=region if backend == "" else backend,
        backend_type=backend_type,
        region_offset=offset,
        file_offset=offset if backend_type.has_fd else None,
        readonly=readonly,
        populated_size=populated_size,
    )


def gpa_ranges(ranges: Iterable[tuple[int, int]]) -> list[GpaRange]:
    # model_construct: half a million validated models would dominate the scale test's setup.
    return [GpaRange.model_construct(gpa=gpa, size=size) for gpa, size in ranges]


def device(
    memaddr: int,
    max_size: int,
    plugged: Sequence[tuple[int, int]],
    *,
    block_size: int = 2 * MiB,
    populated: RangeSet | None = None,
    ident: str = "vmem0",
    memdev: str = "mem-vmem0",
) -> VirtioMemEntry:
    size = sum(s for _, s in plugged)
    held = (populated or RangeSet()) & RangeSet.of(memaddr, max_size)
    return VirtioMemEntry(
        id=ident,
        memaddr=memaddr,
        max_size=max_size,
        block_size=block_size,
        size=size,
        requested_size=size,
        memdev=memdev,
        node=0,
        plugged=gpa_ranges(plugged),
        plugged_exact=True,
        populated_size=held.total,
        blocks_with_data=gpa_ranges((r.start, r.size) for r in held.align_out(block_size)),
    )


def report(
    ranges: Sequence[RangeEntry],
    populated: Sequence[tuple[int, int]] = (),
    *,
    unknown: Sequence[tuple[int, int]] = (),
    devices: Sequence[VirtioMemEntry] = (),
    name: str | None = "guest",
) -> MapReport:
    """A report whose regions and totals follow from its pieces and sets."""
    regions: dict[str, RegionEntry] = {}
    for p in ranges:
        known = p.populated_size is not None
        regions.setdefault(
            p.region,
            RegionEntry(
                region=p.region,
                backend=p.backend,
                backend_type=p.backend_type,
                size=p.size,
                mem_path=f"/dev/shm/{p.region}" if p.backend_type is BackendType.FILE else None,
                population_source=Source.SEEK_DATA if known else Source.UNKNOWN,
                exact=known,
                note="" if known else "not inspected",
                populated_size=None,
            ),
        )
    pop = gpa_ranges(populated)
    return MapReport(
        vm=VMSummary(
            address="/run/qmpdump/guest.qmp",
            pid=4242,
            name=name,
            qemu_version="7.2.22",
            qemu_package="Debian 1:7.2+dfsg-7+deb12u18",
            run_state="running",
        ),
        ranges=list(ranges),
        regions=list(regions.values()),
        virtio_mem=list(devices),
        populated=pop,
        unknown=gpa_ranges(unknown),
        totals=Totals(
            ram_size=sum(p.size for p in ranges),
            populated_size=sum(s for _, s in populated),
            unknown_size=sum(s for _, s in unknown),
            virtio_mem_max_size=sum(d.max_size for d in devices),
            virtio_mem_plugged_size=sum(d.size for d in devices),
            virtio_mem_populated_size=sum(d.populated_size for d in devices),
            populated_extents=len(pop),
        ),
    )


def q35_report(seed: int = 7) -> MapReport:
    """A q35 guest after BIOS: 1 GiB of memfd RAM split at 512 MiB, and a 2 GiB virtio-mem."""
    rng = random.Random(seed)  # noqa: S311 (reproducible test data)
    vmem_at, vmem_size = 0x140000000, 2 * GiB
    plugged = [(vmem_at, 256 * MiB), (vmem_at + 512 * MiB, 64 * MiB)]
    extents: list[tuple[int, int]] = [(0, 0x9F000), (0xC0000, 0x40000)]
    # A kernel at 16 MiB, a page cache that thins out towards the top of each RAM range.
    extents.append((16 * MiB, 40 * MiB))
    for lo, hi in ((64 * MiB, 512 * MiB), (0x100000000, 0x120000000)):
        gpa = lo
        while gpa < hi:
            density = 1 - (gpa - lo) / (hi - lo)
            size = rng.randrange(1, 64) * 4 * KiB
            if rng.random() < density:
                extents.append((gpa, min(size, hi - gpa)))
            gpa += size + rng.randrange(1, 256) * 4 * KiB
    for at, size in plugged:
        gpa = at
        while gpa < at + size:
            size_ = min(rng.randrange(1, 512) * 4 * KiB, at + size - gpa)
            extents.append((gpa, size_))
            gpa += size_ + rng.randrange(1, 512) * 4 * KiB
    populated = RangeSet.from_ranges(extents)
    pieces = [
        piece(0, 0xC3000),
        piece(0xC3000, 0x25000, readonly=True),
        piece(0xE8000, 0x8000),
        piece(0xF0000, 0x10000, readonly=True),
        piece(0x100000, 0x1FF00000),
        piece(
            0xFFFC0000,
            256 * KiB,
            "pc.bios",
            backend_type=BackendType.ANONYMOUS,
            backend=None,
            region_offset=0,
            readonly=True,
            populated_size=None,
        ),
        piece(0x100000000, 512 * MiB, region_offset=0x20000000),
        piece(vmem_at, vmem_size, "mem-vmem0", backend_type=BackendType.FILE, region_offset=0),
    ]
    pieces = [with_population(p, populated) for p in pieces]
    return report(
        pieces,
        [(r.start, r.size) for r in populated],
        unknown=[(0xFFFC0000, 256 * KiB)],
        devices=[device(vmem_at, vmem_size, plugged, populated=populated)],
        name="web-01",
    )


def with_population(p: RangeEntry, populated: RangeSet) -> RangeEntry:
    """The piece with the populated size the set gives it (unknown pieces stay unknown)."""
    if p.populated_size is None:
        return p
    window = RangeSet.of(p.gpa, p.size)
    return p.model_copy(update={"populated_size": (populated & window).total})


def tib_report(extents: int = 512 * 1024, seed: int = 1) -> MapReport:
    """2 GiB of boot RAM plus a 1 TiB virtio-mem device holding ``extents`` populated extents.

    The device plugs about 60% of its 2 MiB blocks (all at the start, patchy in the middle,
    none at the end); each extent lies in its own 512 KiB slot of a plugged block.
    """
    rng = random.Random(seed)  # noqa: S311 (reproducible test data)
    vmem_at, vmem_size, block = 0x140000000, TiB, 2 * MiB
    blocks = vmem_size // block
    plugged_blocks = [
        b for b in range(blocks) if rng.random() < max(0.0, min(1.0, 1.6 - 2.2 * b / blocks))
    ]
    plugged = RangeSet.from_ranges((vmem_at + b * block, block) for b in plugged_blocks)
    slots = [4 * b + quarter for b in plugged_blocks for quarter in range(4)]
    chosen = sorted(rng.sample(slots, min(extents, len(slots))))
    ext = []
    for slot in chosen:
        pages = rng.randrange(1, 128)
        start = rng.randrange(0, 128 - pages + 1)
        ext.append((vmem_at + slot * 512 * KiB + start * 4 * KiB, pages * 4 * KiB))
    populated = [(0, 0x9F000), (MiB, 300 * MiB), *ext]
    vmem_pop = sum(s for _, s in ext)
    pieces = [
        piece(0, 0xA0000, "pc.ram", backend_type=BackendType.RAM, populated_size=0x9F000),
        piece(
            0x100000,
            2 * GiB - MiB,
            "pc.ram",
            backend_type=BackendType.RAM,
            populated_size=300 * MiB,
        ),
        piece(
            vmem_at,
            vmem_size,
            "mem-vmem0",
            backend_type=BackendType.MEMFD,
            region_offset=0,
            populated_size=vmem_pop,
        ),
    ]
    return report(
        pieces,
        populated,
        devices=[
            device(
                vmem_at,
                vmem_size,
                [(r.start, r.size) for r in plugged],
                block_size=block,
                populated=RangeSet.from_ranges(ext),
            )
        ],
        name="big-vmem",
    )


# -- reading the picture back ------------------------------------------------------------------


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 (our own output, not untrusted input)


def texts(root: ET.Element) -> str:
    return "\n".join("".join(t.itertext()) for t in root.iter(f"{NS}text"))


def lane(root: ET.Element, start: int) -> ET.Element:
    for group in root.iter(f"{NS}g"):
        if group.get("class") == "lane" and group.get("data-start") == f"{start:#x}":
            return group
    raise AssertionError(f"no lane starts at {start:#x}")


def rects(group: ET.Element, cls: str) -> list[ET.Element]:
    return [r for r in group.iter(f"{NS}rect") if r.get("class") == cls]


def span(r: ET.Element) -> tuple[float, float]:
    x = float(r.get("x", "nan"))
    return x, x + float(r.get("width", "nan"))


def covered(parts: Iterable[ET.Element]) -> list[tuple[float, float]]:
    """The x intervals the rects cover, merged."""
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(span(r) for r in parts):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


# -- tests -------------------------------------------------------------------------------------


def test_output_is_an_svg_document_with_a_size() -> None:
    root = parse(render_svg(q35_report()))
    assert root.tag == f"{NS}svg"
    assert int(root.get("width", "0")) > COLUMNS
    assert int(root.get("height", "0")) > 200


def test_every_region_and_the_header_facts_appear_as_text() -> None:
    root = parse(render_svg(q35_report()))
    shown = texts(root)
    for name in ("ram0", "pc.bios", "mem-vmem0", "web-01", "7.2.22", "running", "vmem0"):
        assert name in shown
    assert "[0x100000000, 0x120000000)" in shown  # the gpa range of high RAM
    assert "512 MiB" in shown
    # The hole between low RAM and the BIOS is named with its range and size.
    assert "[0x20000000, 0xfffc0000)" in shown


def test_tiny_pieces_next_to_a_large_one_keep_a_visible_width() -> None:
    pieces = [
        piece(0, 4 * KiB, "tiny.a"),
        piece(4 * KiB, 64 * KiB, "small.b"),
        piece(0xC0000, 256 * KiB, "rom.c", backend_type=BackendType.ANONYMOUS, backend=None),
        piece(0x100000, GiB, "big"),
        piece(0x100000 + GiB, 4 * KiB, "after.d"),
    ]
    root = parse(render_svg(report(pieces)))
    shown = texts(root)
    widths = {
        r.get("data-region"): span(r) for r in root.iter(f"{NS}rect") if r.get("class") == "piece"
    }
    for p in pieces:
        assert p.region in shown
        lo, hi = widths[p.region]
        assert hi - lo >= MIN_PIECE_COLUMNS, p.region


def test_a_half_populated_lane_is_dark_over_exactly_its_first_half() -> None:
    base = 4 * GiB
    root = parse(render_svg(report([piece(base, GiB)], [(base, GiB // 2)])))
    group = lane(root, base)
    (bar,) = rects(group, "piece")
    x0, x1 = span(bar)
    assert x1 - x0 == COLUMNS
    data = rects(group, "populated")
    assert data
    ((lo, hi),) = covered(data)
    assert lo == x0
    assert abs(hi - (x0 + COLUMNS / 2)) <= 1
    # Fully populated columns get the full bar height in the backend's dark colour.
    full = max(float(r.get("height", "0")) for r in data)
    assert all(float(r.get("height", "0")) == full for r in data)
    assert full >= float(bar.get("height", "0")) - 2
    assert {r.get("fill") for r in data} != {bar.get("fill")}


def test_a_partly_populated_column_gets_a_partial_bar() -> None:
    base = 0
    size = COLUMNS * 4 * MiB  # one column = 4 MiB
    # Column 10 is a quarter populated, column 20 one page: both show, neither full height.
    populated = [(10 * 4 * MiB, MiB), (20 * 4 * MiB, 4 * KiB), (30 * 4 * MiB, 4 * MiB)]
    root = parse(render_svg(report([piece(base, size)], populated)))
    data = {
        span(r)[0] - span(rects(lane(root, base), "piece")[0])[0]: r
        for r in rects(lane(root, base), "populated")
    }
    assert set(data) == {10, 20, 30}
    heights = {col: float(r.get("height", "0")) for col, r in data.items()}
    assert 0 < heights[20] < heights[10] < heights[30]


def test_virtio_mem_draws_plugged_blocks_unlike_unplugged_ones() -> None:
    at, size = 0x140000000, 8 * GiB
    dev = device(at, size, [(at, 2 * GiB)])
    pieces = [piece(0, GiB, "pc.ram"), piece(at, size, "mem-vmem0", region_offset=0)]
    root = parse(render_svg(report(pieces, devices=[dev])))
    group = lane(root, at)
    (base,) = rects(group, "unplugged")
    plugged = rects(group, "plugged")
    x0, x1 = span(base)
    assert x1 - x0 == COLUMNS
    ((lo, hi),) = covered(plugged)
    assert lo == x0
    assert abs(hi - (x0 + COLUMNS / 4)) <= 1
    assert {r.get("fill") for r in plugged}.isdisjoint({base.get("fill")})
    assert all(r.get("fill-opacity") == "1" for r in plugged)
    assert "plugged 2 GiB of 8 GiB" in texts(root)


def test_unknown_population_is_hatched() -> None:
    p = piece(
        0, 64 * MiB, "pc.ram", backend_type=BackendType.ANONYMOUS, backend=None, populated_size=None
    )
    root = parse(render_svg(report([p], unknown=[(0, 64 * MiB)])))
    hatched = rects(lane(root, 0), "unknown")
    assert covered(hatched) == [(24.0, 24.0 + COLUMNS)]
    assert all(r.get("fill") == "url(#unknown)" for r in hatched)
    assert "population unknown" in texts(root)


def test_special_characters_round_trip_through_the_parser() -> None:
    odd = "a<b&c"
    vm = 'vm "quoted" & <tagged>'
    pieces = [
        piece(0, 128 * KiB, odd, backend_type=BackendType.ANONYMOUS, backend=None),
        piece(MiB, GiB, "x&y"),
    ]
    root = parse(render_svg(report(pieces, name=vm)))
    shown = texts(root)
    assert odd in shown
    assert vm in shown
    assert "x&y" in shown
    assert any(r.get("data-region") == odd for r in root.iter(f"{NS}rect"))
    titles = "".join("".join(t.itertext()) for t in root.iter(f"{NS}title"))
    assert odd in titles


def test_unsorted_overlapping_ranges_are_normalised() -> None:
    populated = [(GiB // 2, GiB // 2), (0, GiB // 2), (GiB // 4, GiB // 4)]
    root = parse(render_svg(report([piece(0, GiB)], populated)))
    assert covered(rects(lane(root, 0), "populated")) == [(24.0, 24.0 + COLUMNS)]


def test_many_small_pieces_each_keep_the_minimum_width() -> None:
    # 40 pieces of 4 KiB, 12 KiB apart: they fill two shared lanes.
    pieces = [piece(i * 16 * KiB, 4 * KiB, f"rom{i}") for i in range(40)]
    root = parse(render_svg(report(pieces)))
    widths = [span(r) for r in root.iter(f"{NS}rect") if r.get("class") == "piece"]
    assert len(widths) == 40
    assert all(hi - lo >= MIN_PIECE_COLUMNS for lo, hi in widths)
    assert "rom39" in texts(root)


def test_pieces_smaller_than_their_columns_or_empty_do_not_break_it() -> None:
    pieces = [
        piece(0, 100, "crumb", populated_size=50),
        piece(GiB, 0, "nothing"),
        piece(2 * GiB, 300, "odd"),
    ]
    root = parse(render_svg(report(pieces, [(0, 50)])))
    assert covered(rects(lane(root, 0), "populated")) == [(24.0, 24.0 + COLUMNS / 2)]
    assert "nothing" not in texts(root)


def test_a_report_without_ram_still_renders() -> None:
    root = parse(render_svg(report([])))
    assert "no RAM" in texts(root)


def test_a_tib_device_with_half_a_million_extents_renders_small_and_fast() -> None:
    big = tib_report()
    assert len(big.populated) >= 512 * 1024
    started = time.perf_counter()
    svg = render_svg(big)
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0
    assert len(svg.encode()) < 2_000_000
    root = parse(svg)
    assert sum(1 for _ in root.iter()) < 20_000
    group = lane(root, 0x140000000)
    assert rects(group, "plugged")
    assert rects(group, "populated")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (4 * KiB, "4 KiB"),
        (0x25000, "148 KiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (TiB, "1 TiB"),
        (123456789, "118 MiB"),
    ],
)
def test_human_sizes(size: int, text: str) -> None:
    assert _human(size) == text


@pytest.mark.parametrize(
    ("part", "whole", "text"),
    [
        (0, 10, "0%"),
        (10, 10, "100%"),
        (1, 10**6, "<0.1%"),
        (999_999, 10**6, ">99.9%"),
        (1, 8, "12.5%"),
        (1, 2, "50%"),
    ],
)
def test_percentages_never_round_to_the_ends(part: int, whole: int, text: str) -> None:
    assert _pct(part, whole) == text
