"""Check that a dump shows the guest's consistency writer at one instant (``genstamp.c``).

The writer passes over its buffer's pages in order, stamping generation ``g`` into each page's
head and then its tail. In an image of one instant, every page has head == tail (no torn page),
and reading the pages in index order the generations are ``G`` up to the writer's position and
``G - 1`` from there on: at most one boundary, a step of exactly one. A dump copied while the
writer ran (the backend engine's ``--live``) breaks that: torn pages, several boundaries, jumps.

:func:`check_cut` is pure (page stamps in, verdict out); :func:`stamps_in_core` scans an ELF core
through its PT_LOADs for the writer's pages.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Final

from qmpdump.elf.format import PT_LOAD, parse_program_headers, prefix_needed

__all__ = ["MAGIC", "CutVerdict", "Stamp", "check_cut", "stamps_in_core"]

MAGIC: Final = b"QDGENST1"
PAGE: Final = 4096
_HEAD = struct.Struct("<8sQQQ")
_TAIL = struct.Struct("<Q")
_CHUNK: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class Stamp:
    """One writer page as the dump holds it."""

    run: int
    index: int
    head: int
    tail: int
    gpa: int


@dataclass(frozen=True, slots=True)
class CutVerdict:
    """What the checker found; ``ok`` when the pages show one clean cut."""

    ok: bool
    reason: str
    pages: int
    torn: int
    boundaries: int
    generations: tuple[int, ...]


def check_cut(stamps: Iterable[Stamp], expected_pages: int | None = None) -> CutVerdict:
    """Whether the writer's pages show one instant (see the module docstring).

    Only the run with the most pages counts (a buffer of an earlier run may linger in freed
    memory). ``expected_pages``: the buffer's size in pages, when known (all must be there).
    """
    stamps = list(stamps)
    if not stamps:
        return CutVerdict(False, "no page of the writer in the dump", 0, 0, 0, ())
    run = Counter(s.run for s in stamps).most_common(1)[0][0]
    by_index: dict[int, Stamp] = {}
    for s in stamps:
        if s.run != run:
            continue
        if s.index in by_index:
            return CutVerdict(False, f"page {s.index} appears twice", len(by_index), 0, 0, ())
        by_index[s.index] = s
    pages = [by_index[i] for i in sorted(by_index)]
    torn = sum(1 for s in pages if s.head != s.tail)
    gens = [s.head for s in pages]
    boundaries = sum(1 for a, b in pairwise(gens) if a != b)
    distinct = tuple(sorted(set(gens), reverse=True))
    verdict = CutVerdict(True, "one clean cut", len(pages), torn, boundaries, distinct)
    problems = []
    if expected_pages is not None and len(pages) != expected_pages:
        problems.append(f"{len(pages)} of {expected_pages} pages found")
    if pages and pages[-1].index + 1 != len(pages):
        problems.append(f"page indexes have gaps (highest {pages[-1].index}, {len(pages)} found)")
    if torn:
        problems.append(f"{torn} torn pages (head and tail differ)")
    if boundaries > 1:
        problems.append(f"{boundaries} generation boundaries")
    if len(distinct) > 2 or (len(distinct) == 2 and distinct[0] - distinct[1] != 1):
        problems.append(f"generations {list(distinct[:6])} are not one step apart")
    if boundaries == 1 and gens[0] < gens[-1]:
        problems.append("the older generation comes first")
    if problems:
        return CutVerdict(False, "; ".join(problems), len(pages), torn, boundaries, distinct)
    return verdict


def stamps_in_core(path: Path) -> list[Stamp]:
    """Every writer page stored in an ELF core (blocking; reads the data segments once)."""
    found: list[Stamp] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        prefix = b""
        while (need := prefix_needed(prefix)) > len(prefix):
            prefix = os.pread(fd, need, 0)
        for ph in parse_program_headers(prefix):
            if ph.type != PT_LOAD or ph.filesz == 0:
                continue
            for at in range(0, ph.filesz, _CHUNK):
                size = min(_CHUNK, ph.filesz - at)
                chunk = os.pread(fd, size, ph.offset + at)
                pos = chunk.find(MAGIC)
                while pos >= 0:
                    gpa = ph.paddr + at + pos
                    if gpa % PAGE == 0 and pos + PAGE <= len(chunk):
                        _magic, run, index, head = _HEAD.unpack_from(chunk, pos)
                        (tail,) = _TAIL.unpack_from(chunk, pos + PAGE - 8)
                        found.append(Stamp(run, index, head, tail, gpa))
                    pos = chunk.find(MAGIC, pos + 1)
    finally:
        os.close(fd)
    return found
