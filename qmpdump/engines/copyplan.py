"""Which bytes to copy from where into which place of the core (pure).

An ELF plan (:mod:`qmpdump.elf.plan`) says where each guest-physical data segment lies in the
file; the layout (:mod:`qmpdump.memmap.layout`) says which RAM region holds each guest-physical
byte. A copy operation joins them: "``size`` bytes of region R from offset O go to file offset F".
Only ``wanted`` bytes (populated, or of unknown population) are copied; the rest of a data
segment (holes the planner joined to save program headers) is left as a hole in the output,
which reads as zeros, as it is in the guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpdump.elf.plan import CorePlan
from qmpdump.errors import LayoutError
from qmpdump.memmap.layout import Layout
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = ["CopyOp", "RegionRun", "copy_ops", "region_runs"]


@dataclass(frozen=True, slots=True)
class CopyOp:
    """Copy ``size`` bytes of RAM region ``region`` at ``region_offset`` to ``file_offset``."""

    file_offset: int
    size: int
    region: str
    region_offset: int


@dataclass(frozen=True, slots=True)
class RegionRun:
    """``size`` guest-physical bytes at ``gpa`` are region ``region`` at ``region_offset``."""

    gpa: int
    size: int
    region: str
    region_offset: int


def region_runs(layout: Layout, gpas: RangeSet) -> list[RegionRun]:
    """Split guest-physical ranges where the RAM piece (and so the region) changes."""
    runs: list[RegionRun] = []
    for part in gpas:
        gpa = part.start
        while gpa < part.end:
            piece = layout.piece_at(gpa)
            if piece is None:
                raise LayoutError(f"{gpa:#x} is to be read but is no RAM of the layout")
            end = min(part.end, piece.gpa.end)
            runs.append(RegionRun(gpa, end - gpa, piece.region, piece.region_offset_of(gpa)))
            gpa = end
    return runs


def copy_ops(plan: CorePlan, layout: Layout, wanted: RangeSet) -> list[CopyOp]:
    """The copy operations for a core plan, in file order."""
    ops: list[CopyOp] = []
    for seg in plan.segments:
        if seg.file_offset is None or seg.filesz == 0:
            continue
        for run in region_runs(layout, wanted.clip(Range(seg.gpa, seg.filesz))):
            ops.append(
                CopyOp(
                    file_offset=seg.file_offset + (run.gpa - seg.gpa),
                    size=run.size,
                    region=run.region,
                    region_offset=run.region_offset,
                )
            )
    return ops
