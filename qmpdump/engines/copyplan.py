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

__all__ = ["CopyOp", "copy_ops"]


@dataclass(frozen=True, slots=True)
class CopyOp:
    """Copy ``size`` bytes of RAM region ``region`` at ``region_offset`` to ``file_offset``."""

    file_offset: int
    size: int
    region: str
    region_offset: int


def copy_ops(plan: CorePlan, layout: Layout, wanted: RangeSet) -> list[CopyOp]:
    """The copy operations for a core plan, in file order."""
    ops: list[CopyOp] = []
    for seg in plan.segments:
        if seg.file_offset is None or seg.filesz == 0:
            continue
        for part in wanted.clip(Range(seg.gpa, seg.filesz)):
            gpa = part.start
            while gpa < part.end:
                piece = layout.piece_at(gpa)
                if piece is None:
                    raise LayoutError(f"{gpa:#x} is to be copied but is no RAM of the layout")
                end = min(part.end, piece.gpa.end)
                ops.append(
                    CopyOp(
                        file_offset=seg.file_offset + (gpa - seg.gpa),
                        size=end - gpa,
                        region=piece.region,
                        region_offset=piece.region_offset_of(gpa),
                    )
                )
                gpa = end
    return ops
