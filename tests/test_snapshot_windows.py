"""The snapshot engine's pure mapping: stream block offsets -> guest-physical -> core offsets.

Property: for random layouts (a block mapped in one or two pieces), random coverage and a
random populated set, every page offset of a block lands in exactly one window, and the
window's answer equals the direct computation (piece lookup, coverage test, plan segment).
"""

from __future__ import annotations

from bisect import bisect_right

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpdump.elf.plan import plan_core, segment_for
from qmpdump.engines.snapshot import block_windows
from qmpdump.errors import MigrationStreamError
from qmpdump.memmap.layout import Backend, BackendType, Piece, build_layout
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.migstream import RamBlockInfo, RamBlocks

P = 4096


def _pages(draw: st.DrawFn, limit: int) -> RangeSet:
    picks = draw(st.lists(st.integers(0, limit - 1), max_size=12))
    return RangeSet.from_ranges((p * P, P) for p in picks)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Backend, list[Piece], RangeSet, RangeSet]:
    pages = draw(st.integers(4, 32))
    backend = Backend("ram0", BackendType.RAM, pages * P, "ram0")
    split = draw(st.integers(1, pages - 1))
    hole = draw(st.integers(0, 8)) * P
    pieces = [
        Piece(Range(0, split * P), "ram0", 0, backend),
        Piece(Range(split * P + hole, (pages - split) * P), "ram0", split * P, backend),
    ]
    ram = RangeSet.from_ranges(p.gpa for p in pieces)
    coverage = ram - _pages(draw, pages + 8)
    data = coverage & _pages(draw, pages + 8)
    return backend, pieces, coverage, data


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_windows_agree_with_a_direct_lookup(
    case: tuple[Backend, list[Piece], RangeSet, RangeSet],
) -> None:
    backend, pieces, coverage, data = case
    layout = build_layout(pieces)
    plan = plan_core(b"", data, coverage - data)
    blocks = RamBlocks((RamBlockInfo("0000:00:02.0/ram0", backend.size),))
    windows = block_windows(layout, blocks, coverage, plan)["0000:00:02.0/ram0"]
    starts = [w.start for w in windows]
    for offset in range(0, backend.size, P):
        i = bisect_right(starts, offset) - 1
        w = windows[i]
        assert w.start <= offset < w.end
        piece = next(p for p in pieces if p.region_offset <= offset < p.region_offset + p.gpa.size)
        gpa = piece.gpa_of(offset)
        assert w.gpa + (offset - w.start) == gpa
        assert w.covered == coverage.contains(gpa)
        seg = segment_for(plan, gpa)
        if w.covered and data.contains(gpa):
            assert seg is not None
            assert seg.file_offset is not None
            assert w.file_offset + (offset - w.start) == seg.file_offset + gpa - seg.gpa
        else:
            assert w.file_offset == -1


def test_a_region_without_its_block_is_an_error() -> None:
    backend = Backend("ram0", BackendType.RAM, 8 * P, "ram0")
    layout = build_layout([Piece(Range(0, 8 * P), "ram0", 0, backend)])
    plan = plan_core(b"", RangeSet(), RangeSet.of(0, 8 * P))
    with pytest.raises(MigrationStreamError, match="matches 0 blocks"):
        block_windows(layout, RamBlocks((RamBlockInfo("pc.ram", 8 * P),)), layout.ram, plan)
    with pytest.raises(MigrationStreamError, match="bytes in the stream"):
        block_windows(layout, RamBlocks((RamBlockInfo("ram0", 4 * P),)), layout.ram, plan)
