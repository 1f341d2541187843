"""Parse the guest's RAM map out of HMP ``info mtree -f`` text (pure: text in, entries out).

``info mtree -f`` prints every FlatView QEMU has rendered (QEMU 7.2 ``softmmu/memory.c``,
``mtree_info`` and ``mtree_print_flatview``)::

    FlatView #2
     AS "memory", root: system
     AS "cpu-memory-0", root: system
     Root memory region: system
      0000000000000000-00000000000bffff (prio 0, ram): ram0
      00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
      0000000000100000-000000001fffffff (prio 0, ram): ram0 @0000000000100000
      00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
      0000000100000000-000000011fffffff (prio 0, ram): ram0 @0000000020000000 KVM

Views are printed in hash-table order, which changes from run to run, so the guest's view is
found by its header: the one that lists ``AS "memory", root: system`` (``address_space_memory``,
the space ``dump-guest-memory`` walks). The ``cpu-smm-*`` views (root ``memory``) add SMRAM and
are not the guest's normal view.

A range line is ``FIRST-LAST (prio P, [nv-]KIND): REGION[ @OFFSET][ OWNER][ ACCEL...]``:

* ``FIRST``/``LAST``: the guest-physical range, both ends inclusive.
* ``KIND``: ``rom`` whenever the range is read-only, else the region's type: ``ramd`` (RAM
  device: host device memory such as a VFIO BAR), ``romd`` (ROM device in ROMD mode, e.g.
  ``system.flash0`` for pflash), ``rom`` (read-only RAM), ``ram``, ``i/o`` (MMIO callbacks).
  ``nv-`` marks a non-volatile range (an NVDIMM).
* ``REGION``: the name of the terminal region (aliases are already resolved); for a memory
  backend that is its id, or its QOM path (``/objects/ID``) on old machine types.
* ``@OFFSET``: the range's offset inside that region, printed only when it is not 0.
* ``OWNER``: with ``-o`` only, `` owner:{obj path=/objects/ram0}``, `` parent:{...}`` or
  `` orphan``; skipped. ``-d`` adds dispatch-tree lines after the ranges; skipped too.
* ``ACCEL``: under an accelerator with a ``has_memory`` hook (KVM) its name is appended once per
  address space of the view in which it maps the range (`` KVM``).

Only ``ram`` and ``rom`` ranges become :class:`MtreeEntry`; ``rom`` covers both real ROM regions
(``pc.bios``, ``pc.rom``, ``isa-bios``) and read-only windows onto RAM (PAM below 1 MiB, which
carry an ``@offset``). ``ramd``, ``romd``, ``i/o`` and every ``nv-`` range are skipped, which is
what ``dump-guest-memory`` does too (``softmmu/memory_mapping.c``,
``guest_phys_blocks_region_add``: not RAM, RAM device or non-volatile means not dumped).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

from qmpdump.errors import LayoutError

__all__ = ["MtreeEntry", "MtreeKind", "parse_system_flatview"]

#: The kinds of range that are guest RAM (RAM-backed and dumped by QEMU).
MtreeKind = Literal["ram", "rom"]

#: Every kind ``memory_region_type()`` (or a read-only range) can print, in QEMU 7.2.
_ALL_KINDS = ("ram", "rom", "romd", "ramd", "i/o")

#: Accelerator names appended after a range by ``mtree_print_flatview`` (``AccelClass.name`` of
#: the accelerators with a ``has_memory`` hook: only KVM in 7.2).
_ACCEL_SUFFIXES = frozenset({"KVM"})

_VIEW_HEADER = re.compile(r"^FlatView #(?P<number>\d+)\s*$")
_AS_LINE = re.compile(r'^\s*AS "(?P<name>.*)", root: (?P<root>.*?)(?:, alias (?P<alias>.*))?\s*$')
_RANGE_LINE = re.compile(
    r"^\s*(?P<first>[0-9a-fA-F]{1,16})-(?P<last>[0-9a-fA-F]{1,16})"
    r" \(prio (?P<prio>-?\d+), (?P<nv>nv-)?(?P<kind>[^)]+)\): (?P<rest>.*?)\s*$"
)
#: Anything that names a RAM kind in a priority bracket: a line QEMU meant as a RAM range.
_RAM_KIND_HINT = re.compile(r"\(\s*prio\b[^)]*,\s*(?:nv-)?(?:ram|rom)\s*\)")
_OFFSET_TOKEN = re.compile(r"^@(?P<offset>[0-9a-fA-F]{1,16})$")
#: What ``info mtree -f -o`` appends after the region (``mtree_print_mr_owner``).
_OWNER_SUFFIX = re.compile(r"(?: (?:owner|parent):\{(?:dev|obj) [^{}]*\}| orphan)+$")

_SYSTEM_AS = "memory"
_SYSTEM_ROOT = "system"
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class MtreeEntry:
    """One RAM range of the system FlatView: ``[gpa, gpa + size)`` maps ``region`` at ``offset``."""

    #: first guest-physical address of the range
    gpa: int
    #: bytes in the range (the text's end address is inclusive: ``last - first + 1``)
    size: int
    #: name of the RAM region behind the range (``pc.ram``, ``ram0``, ``mem-vmem0``, ``pc.bios``)
    region: str
    #: offset of ``gpa`` inside ``region`` (0 when the text shows no ``@offset``)
    offset: int
    #: ``ram``, or ``rom`` for a read-only range
    kind: MtreeKind
    #: the region's priority in its container
    priority: int
    #: 1-based line number in the text, for messages
    line_no: int

    @property
    def gpa_end(self) -> int:
        """First guest-physical address after the range."""
        return self.gpa + self.size


@dataclass(slots=True)
class _View:
    number: int
    line_no: int
    address_spaces: list[tuple[str, str]]
    range_lines: list[tuple[int, str]]


def _split_views(lines: list[str]) -> list[_View]:
    views: list[_View] = []
    current: _View | None = None
    for line_no, line in enumerate(lines, start=1):
        header = _VIEW_HEADER.match(line)
        if header:
            current = _View(int(header["number"]), line_no, [], [])
            views.append(current)
            continue
        if current is None:
            continue  # text before the first view: not ours to judge
        as_line = _AS_LINE.match(line)
        if as_line and not current.range_lines:
            current.address_spaces.append((as_line["name"], as_line["root"]))
        else:
            current.range_lines.append((line_no, line))
    return views


def _find_system_view(views: list[_View]) -> _View:
    system = [v for v in views if (_SYSTEM_AS, _SYSTEM_ROOT) in v.address_spaces]
    if not system:
        raise LayoutError(
            f'no FlatView lists AS "{_SYSTEM_AS}", root: {_SYSTEM_ROOT} among the {len(views)} '
            "views of the 'info mtree -f' text; is it the output of 'info mtree -f'?"
        )
    if len(system) > 1:
        where = ", ".join(f"#{v.number} (line {v.line_no})" for v in system)
        raise LayoutError(
            f'more than one FlatView lists AS "{_SYSTEM_AS}", root: {_SYSTEM_ROOT}: {where}.'
        )
    return system[0]


def _malformed(line_no: int, line: str, why: str) -> LayoutError:
    return LayoutError(f"info mtree -f, line {line_no}: {why}: {line.strip()!r}")


def _parse_region(rest: str, line_no: int, line: str) -> tuple[str, int]:
    """Split ``REGION[ @OFFSET][ OWNER...][ ACCEL...]`` from the right: names may hold spaces."""
    tokens = rest.split(" ")
    while len(tokens) > 1 and tokens[-1] in _ACCEL_SUFFIXES:
        tokens.pop()
    text = _OWNER_SUFFIX.sub("", " ".join(tokens))
    offset = 0
    head, space, last = text.rpartition(" ")
    token = _OFFSET_TOKEN.match(last) if space else None
    if token:
        offset = int(token["offset"], 16)
        text = head
    region = text.strip()
    if not region or _OFFSET_TOKEN.match(region):
        raise _malformed(line_no, line, "a RAM range without a region name")
    return region, offset


def _parse_range(line_no: int, line: str) -> MtreeEntry | None:
    match = _RANGE_LINE.match(line)
    if match is None:
        if _RAM_KIND_HINT.search(line):
            raise _malformed(line_no, line, "a RAM range line that does not parse")
        return None  # 'No rendered FlatView', dispatch-tree output, blank lines...
    kind = match["kind"]
    if kind not in _ALL_KINDS:
        if _RAM_KIND_HINT.search(line):
            raise _malformed(line_no, line, f"unknown kind {kind!r}")
        return None
    if match["nv"] or kind not in ("ram", "rom"):
        return None  # not guest RAM for a dump: see the module docstring
    first = int(match["first"], 16)
    last = int(match["last"], 16)
    if last < first:
        raise _malformed(line_no, line, "the range ends before it starts")
    region, offset = _parse_region(match["rest"], line_no, line)
    if offset + (last - first) >= _ADDRESS_LIMIT:
        raise _malformed(line_no, line, "the offset runs past 2^64")
    return MtreeEntry(
        gpa=first,
        size=last - first + 1,
        region=region,
        offset=offset,
        kind="ram" if kind == "ram" else "rom",
        priority=int(match["prio"]),
        line_no=line_no,
    )


def parse_system_flatview(text: str) -> list[MtreeEntry]:
    """The RAM ranges (``ram`` and ``rom``) of the system FlatView, in guest-physical order.

    ``text`` is what ``human-monitor-command "info mtree -f"`` returned (``\\r\\n`` or ``\\n``
    line ends). Lines that are not range lines are skipped.

    Raises :class:`LayoutError` when no view (or more than one) lists ``AS "memory", root:
    system``, when a line of that view that names a RAM kind does not parse, and when two of its
    RAM ranges overlap. A view with no rendered ranges gives an empty list.
    """
    view = _find_system_view(_split_views(text.splitlines()))
    entries = [
        entry
        for line_no, line in view.range_lines
        if (entry := _parse_range(line_no, line)) is not None
    ]
    entries.sort(key=lambda e: e.gpa)
    for before, after in itertools.pairwise(entries):
        if after.gpa < before.gpa_end:
            raise LayoutError(
                f"info mtree -f: RAM ranges overlap: line {before.line_no} "
                f"[{before.gpa:#x}, {before.gpa_end:#x}) {before.region} and line "
                f"{after.line_no} [{after.gpa:#x}, {after.gpa_end:#x}) {after.region}."
            )
    return entries
