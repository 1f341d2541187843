"""Plan an ELF64 core of populated guest memory: every header byte, and where each data byte goes.

Pure: no I/O. :func:`plan_core` takes the PT_NOTE payload (copied verbatim from QEMU's own dump:
NT_PRSTATUS and a ``QEMU`` CPU-state note per vCPU, then the guest's VMCOREINFO), the
guest-physical ranges to copy, and the ranges known to be zero, and returns a :class:`CorePlan`:
the bytes from offset 0 to the first data byte, and one :class:`Segment` per PT_LOAD. The caller
writes ``plan.header``, then copies each data segment's bytes to its ``file_offset``.

File layout (little-endian ELF64, System V gABI, ``elf.h``)::

    0                    ELF header (64 bytes)
    64                   program headers, 56 bytes each: PT_NOTE, then PT_LOADs in gpa order
    [64 + 56 * phnum]    section header 0, only with PN_XNUM (more than 0xfffe headers)
    ...                  PT_NOTE payload
    ...                  zero padding up to a multiple of ``data_align`` (4096)
    plan.header end      PT_LOAD data, contiguous, in gpa order

Choices, and where they come from:

* Program headers right after the ELF header, at 64, as QEMU did before 7.2 and as the kernel's
  ``crash_prepare_elf64_headers`` (``kernel/crash_core.c``) does: makedumpfile 1.7.2 rejects QEMU
  7.2's layout (section headers at 64, program headers at 192) and accepts this one
  (``shared/FACTS.md``).
* ``e_ehsize`` = 64. QEMU 7.2's ``prepare_elf64_header`` (``dump/dump.c``) stores
  ``sizeof(elf_header)`` of a *pointer*, i.e. 8; the gABI says "the ELF header's size in bytes".
* ``e_machine`` is the caller's, normally copied from QEMU's dump header together with the notes
  (EM_X86_64 = 62 is only the default).
* ``e_ident``: ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE (0), ABI version 0; ``e_type``
  ET_CORE, ``e_version`` EV_CURRENT, ``e_entry`` and ``e_flags`` 0 -- as QEMU's
  ``write_elf64_header``/``prepare_elf64_header``.
* PT_NOTE exactly as QEMU's ``write_elf64_note``: ``p_offset`` where the notes are,
  ``p_filesz == p_memsz == len(notes)``, and ``p_flags``, ``p_vaddr``, ``p_paddr``, ``p_align``
  all 0.
* PT_LOAD: ``p_paddr == p_vaddr == gpa`` (QEMU's ``write_elf64_load`` sets ``p_vaddr`` to
  ``p_paddr`` when there is no virtual address, i.e. with ``paging=false``),
  ``p_flags = PF_R | PF_W | PF_X`` as the kernel's ``crash_prepare_elf64_headers`` (what
  ``/proc/vmcore`` shows; QEMU leaves ``p_flags`` 0, and no reader here looks at it), and
  ``p_align = 0`` as both QEMU and the kernel: the gABI's "0 and 1 mean no alignment is
  required"; a page value would promise ``p_offset % p_align == p_vaddr % p_align``, which
  packed segments do not keep.
* Data segments are exact, ``p_filesz == p_memsz > 0``: volatility3's ELF layer
  (``framework/layers/elf.py``) skips every PT_LOAD where the two differ. Known-zero memory is
  described by separate PT_LOADs with ``p_filesz = 0`` and ``p_memsz = size`` (the gABI: bytes
  past ``p_filesz`` read as zero; crash and drgn honour that). Their ``p_offset`` is the end of
  the file's data (QEMU writes -1 there): never inside another segment's bytes, since
  makedumpfile's mmap reader maps ``p_offset + p_memsz`` and misread data otherwise (measured:
  pages dropped silently, once SIGBUS), and no bounds check fails on it.
  ``merge_zero_tail=True`` instead folds a zero range that follows a data range into that
  segment's ``p_memsz``, as QEMU's ``get_offset_range``
  does for a clamped block: fewer headers, but volatility3 then skips those segments.
* The program header count fits ``e_phnum`` (at most 0xfffe = 65534 by default): volatility3
  reads ``e_phnum`` only and knows no PN_XNUM. Over the cap, zero-fill segments go first (the
  smallest first; they only describe), then the data ranges with the smallest holes between
  them are joined (QEMU caps its count the other way, by dropping headers past the limit). The
  joined holes become data the caller must copy (as zeros where it has nothing):
  ``CorePlan.data`` is the set to copy.
* PN_XNUM only on explicit opt-in (``max_phdrs > 65534``) and only when the count reaches 0xffff:
  ``e_phnum = PN_XNUM``, ``e_shoff`` at section header 0 (right after the program headers,
  where QEMU's ``dump_begin`` writes it), ``e_shentsize = 64``, ``e_shnum = 1``,
  ``e_shstrndx = SHN_UNDEF``; section header 0 is all zero but ``sh_info`` = the real count, as
  QEMU's ``write_elf_section``. The gABI: "If the number of program headers is greater than or
  equal to PN_XNUM (0xffff), [e_phnum] has the value PN_XNUM. The actual number of program
  header table entries is contained in the sh_info field of the section header at index 0";
  ``sh_size`` of entry 0 stays 0 because ``e_shnum`` is not 0 (Linux's ``fill_extnum_info``
  stores 1 there; QEMU follows the gABI).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter
from typing import Final

from qmpdump.elf.format import (
    EHDR,
    EHDR_SIZE,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    ET_CORE,
    PHDR,
    PHDR_SIZE,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR,
    SHDR_SIZE,
    parse_program_headers,
    prefix_needed,
)
from qmpdump.errors import ElfFormatError
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = [
    "DEFAULT_MAX_PHDRS",
    "EM_AARCH64",
    "EM_X86_64",
    "PAGE_SIZE",
    "PF_R",
    "PF_W",
    "PF_X",
    "CorePlan",
    "Segment",
    "notes_payload",
    "plan_core",
    "segment_for",
]

#: ``e_machine`` values (gABI, ``elf.h``).
EM_X86_64: Final = 62
EM_AARCH64: Final = 183
#: Segment permission flags (``elf.h``).
PF_X: Final = 1
PF_W: Final = 2
PF_R: Final = 4
#: The alignment of the first data byte: page-aligned ``pread``/``sendfile``/``O_DIRECT`` I/O.
PAGE_SIZE: Final = 4096
#: The most program headers ``e_phnum`` holds without PN_XNUM (which volatility3 cannot read).
DEFAULT_MAX_PHDRS: Final = PN_XNUM - 1
#: ``sh_info`` of section header 0 is an Elf64_Word: the hard limit with PN_XNUM.
_MAX_XNUM_PHDRS: Final = 0xFFFF_FFFF

EV_CURRENT: Final = 1
ELFOSABI_NONE: Final = 0
_LOAD_FLAGS: Final = PF_R | PF_W | PF_X
_NHDR = struct.Struct("<III")  # Elf64_Nhdr: namesz, descsz, type


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD of the planned core.

    ``gpa`` is ``p_paddr`` (and ``p_vaddr``); ``size`` is ``p_memsz``, the guest bytes the segment
    describes. ``file_offset`` is where its bytes start in the core, or ``None`` for a zero-fill
    segment (``p_filesz = 0``). ``zero_tail`` (only with ``merge_zero_tail=True``) is how many
    bytes at the end of a data segment are zero and not in the file.
    """

    gpa: int
    size: int
    file_offset: int | None
    zero_tail: int = 0

    @property
    def end(self) -> int:
        """The first guest-physical address after the segment."""
        return self.gpa + self.size

    @property
    def filesz(self) -> int:
        """``p_filesz``: how many of the segment's bytes are stored in the file."""
        return 0 if self.file_offset is None else self.size - self.zero_tail

    @property
    def is_zero_fill(self) -> bool:
        """Whether the segment has no bytes in the file (reads as zeros)."""
        return self.file_offset is None


@dataclass(frozen=True, slots=True)
class CorePlan:
    """Everything needed to write the core, except the guest's bytes.

    ``header`` holds offsets ``[0, data_offset)``: ELF header, program headers, section header 0
    (PN_XNUM only), notes and padding. ``segments`` are the PT_LOADs in program-header order,
    which is gpa order; data segments' file offsets increase along it without gaps (unless
    planned with a ``placement``: then along that order). ``data`` is
    the set of gpa bytes the caller must copy, a superset of the requested data once holes were
    joined to respect the header cap; ``zero_fill`` the set described as zeros after dropping.
    ``phnum`` is the real program header count (PT_NOTE included).
    """

    header: bytes
    segments: tuple[Segment, ...]
    file_size: int
    data: RangeSet
    zero_fill: RangeSet
    phnum: int
    uses_pn_xnum: bool
    notes_offset: int
    #: bytes of notes at ``notes_offset`` (inside ``header`` unless planned ``notes_last``)
    notes_size: int = 0

    @property
    def data_offset(self) -> int:
        """The file offset of the first data byte (``len(header)``, aligned when there is data)."""
        return len(self.header)


def segment_for(plan: CorePlan, gpa: int) -> Segment | None:
    """Return the segment describing guest-physical byte ``gpa``, or ``None`` (bisection)."""
    index = bisect_right(plan.segments, gpa, key=attrgetter("gpa")) - 1
    if index >= 0 and gpa < plan.segments[index].end:
        return plan.segments[index]
    return None


def notes_payload(prefix: bytes) -> bytes:
    """Return the PT_NOTE bytes of a core whose first bytes ``prefix`` holds (e.g. QEMU's dump).

    Several PT_NOTE segments are concatenated in program-header order (QEMU writes one). Raises
    :class:`ElfFormatError` if ``prefix`` is not an ELF64 core or stops before its notes end.
    """
    need = prefix_needed(prefix)
    if need > len(prefix):
        raise ElfFormatError(
            f"the core's headers and notes need {need:#x} bytes, only {len(prefix):#x} given"
        )
    return b"".join(
        prefix[ph.offset : ph.offset + ph.filesz]
        for ph in parse_program_headers(prefix)
        if ph.type == PT_NOTE
    )


def _check_notes(notes: bytes) -> None:
    """Raise :class:`ElfFormatError` unless ``notes`` is a run of whole ELF note records.

    Records are a 12-byte header, then name and descriptor each padded to 4 bytes: the layout
    Linux and QEMU (``ELF_NOTE_SIZE`` in ``dump/dump.c``) use in ELF64 cores. Trailing zero
    padding shorter than a header is tolerated (readers such as pyelftools skip it).
    """
    offset = 0
    while offset + _NHDR.size <= len(notes):
        namesz, descsz, _type = _NHDR.unpack_from(notes, offset)
        record = _NHDR.size + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
        if offset + record > len(notes):
            raise ElfFormatError(
                f"the note at {offset:#x} needs {record:#x} bytes; the notes end at "
                f"{len(notes):#x}: not an ELF note payload"
            )
        offset += record
    if any(notes[offset:]):
        raise ElfFormatError(f"{len(notes) - offset} stray bytes after the last note")


def _join_smallest_holes(data: RangeSet, max_runs: int) -> RangeSet:
    """Return ``data`` with its smallest holes filled until it has at most ``max_runs`` runs.

    Exactly ``len(data) - max_runs`` holes are filled, the smallest ones; ties go to the lower
    address, so the result is deterministic and never joins more than it must (unlike
    :meth:`RangeSet.coalesce` with a threshold, which fills every hole of equal size).
    """
    runs = list(data)
    joins = len(runs) - max_runs
    if joins <= 0:
        return data
    holes = [after.start - before.end for before, after in pairwise(runs)]
    filled = set(sorted(range(len(holes)), key=holes.__getitem__)[:joins])
    merged: list[Range] = []
    start = runs[0].start
    for index, run in enumerate(runs):
        if index not in filled:  # hole after this run stays open: the merged run ends here
            merged.append(Range.from_bounds(start, run.end))
            if index + 1 < len(runs):
                start = runs[index + 1].start
    return RangeSet.from_ranges(merged)


def _keep_largest(ranges: RangeSet, count: int) -> RangeSet:
    """Return the ``count`` largest runs of ``ranges`` (ties: lower address first)."""
    if count >= len(ranges):
        return ranges
    if count <= 0:
        return RangeSet()
    runs = sorted(ranges, key=lambda rng: (-rng.size, rng.start))
    return RangeSet.from_ranges(runs[:count])


def _tails(data: RangeSet, zero_fill: RangeSet) -> RangeSet:
    """Return the zero-fill runs that start exactly where a data run ends."""
    ends = {rng.end for rng in data}
    return RangeSet.from_ranges(rng for rng in zero_fill if rng.start in ends)


def _elf_header(machine: int, phnum: int, xnum: bool) -> bytes:
    """Pack the ELF64 header (see the module docstring for each field's source)."""
    ident = ELF_MAGIC + bytes((ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE, 0))
    shoff = EHDR_SIZE + phnum * PHDR_SIZE if xnum else 0
    return EHDR.pack(
        ident.ljust(16, b"\0"),
        ET_CORE,
        machine,
        EV_CURRENT,
        0,  # e_entry
        EHDR_SIZE,  # e_phoff: right after this header
        shoff,
        0,  # e_flags
        EHDR_SIZE,  # e_ehsize
        PHDR_SIZE,
        PN_XNUM if xnum else phnum,
        SHDR_SIZE if xnum else 0,
        1 if xnum else 0,  # e_shnum
        0,  # e_shstrndx: SHN_UNDEF
    )


def plan_core(
    notes: bytes,
    data: RangeSet,
    zero_fill: RangeSet | None = None,
    *,
    machine: int = EM_X86_64,
    max_phdrs: int = DEFAULT_MAX_PHDRS,
    coalesce_gap: int | None = None,
    merge_zero_tail: bool = False,
    data_align: int = PAGE_SIZE,
    notes_last: bool = False,
    placement: Callable[[int], int] | None = None,
) -> CorePlan:
    """Plan an ELF64 ET_CORE holding ``notes``, the bytes of ``data`` and zeros for ``zero_fill``.

    ``data`` and ``zero_fill`` are guest-physical sets and must be disjoint. ``coalesce_gap``
    (bytes) fills every hole of at most that size between data runs first, trading a few copied
    bytes for fewer segments. ``max_phdrs`` caps the program header count, PT_NOTE included
    (at least 2); above 65534 it allows PN_XNUM (up to 0xffffffff). The first data byte sits at a
    multiple of ``data_align``. See the module docstring for every header field.

    Pass QEMU's own ``e_machine`` (``parse_header(prefix).machine``) rather than relying on the
    default: on x86 QEMU writes EM_386 (3) while vCPU 0 is not in long mode, e.g. at reset or
    in firmware (``x86_get_dump_info`` in ``target/i386/arch_dump.c``), and its notes follow
    that choice.

    ``notes_last`` puts the notes after the data instead of before it (PT_NOTE may lie anywhere):
    for a writer whose notes are final only after the data (the snapshot engine's notes of the
    instant), so that everything before them can be hashed while it is written. ``header`` then
    ends before the notes, which the caller writes at ``notes_offset``. ``placement`` orders the
    data in the file by ``placement(first gpa of each run)``, then gpa (default: gpa order):
    a writer that receives memory in another order can then hash the file as it fills it. The
    PT_LOADs stay in gpa order either way (as ELF requires; ``p_offset`` may go in any order).

    Raises ``ValueError`` for bad arguments or overlapping sets, and :class:`ElfFormatError` if
    ``notes`` is not a sequence of ELF note records.
    """
    zero_fill = RangeSet() if zero_fill is None else zero_fill
    if not 0 <= machine <= 0xFFFF:
        raise ValueError(f"e_machine must fit 16 bits, not {machine:#x}")
    if not 2 <= max_phdrs <= _MAX_XNUM_PHDRS:
        raise ValueError(f"max_phdrs must be in [2, {_MAX_XNUM_PHDRS:#x}], not {max_phdrs}")
    if coalesce_gap is not None and coalesce_gap < 0:
        raise ValueError(f"coalesce_gap must be >= 0, not {coalesce_gap:#x}")
    if data_align <= 0:
        raise ValueError(f"data_align must be > 0, not {data_align:#x}")
    overlap = data & zero_fill
    if overlap:
        first = next(iter(overlap))
        raise ValueError(
            f"data and zero_fill overlap at {first} ({overlap.total:#x} bytes in all); "
            "a byte is either copied or known to be zero"
        )
    _check_notes(notes)

    # 1. Holes the caller chose to fill, then as many more as the header cap needs. Filled
    #    holes are copied, so they leave the zero-fill description.
    if coalesce_gap:
        data = data.coalesce(coalesce_gap)
    budget = max_phdrs - 1  # PT_NOTE takes one
    data = _join_smallest_holes(data, budget)
    zero_fill = zero_fill - data

    # 2. Zero-fill segments get what is left of the budget; merged tails cost no header.
    tails = _tails(data, zero_fill) if merge_zero_tail else RangeSet()
    standalone = _keep_largest(zero_fill - tails, budget - len(data))
    zero_fill = tails | standalone

    # 3. Offsets. PT_LOADs go in gpa order; data is packed in the same order.
    phnum = 1 + len(data) + len(standalone)
    xnum = phnum >= PN_XNUM
    headers_end = EHDR_SIZE + phnum * PHDR_SIZE + (SHDR_SIZE if xnum else 0)
    before_data = headers_end if notes_last else headers_end + len(notes)
    data_offset = -(-before_data // data_align) * data_align if data else before_data
    data_bytes = sum(rng.size for rng in data)
    notes_offset = data_offset + data_bytes if notes_last else headers_end

    tail_at = {rng.start: rng.size for rng in tails}
    items = sorted(
        [(rng.start, rng.size, True) for rng in data]
        + [(rng.start, rng.size, False) for rng in standalone]
    )
    segments: list[Segment] = []
    phdrs = [PHDR.pack(PT_NOTE, 0, notes_offset, 0, 0, len(notes), len(notes), 0)]
    placed = sorted(data, key=lambda r: (placement(r.start), r.start)) if placement else list(data)
    offset_of: dict[int, int] = {}
    file_offset = data_offset
    for rng in placed:
        offset_of[rng.start] = file_offset
        file_offset += rng.size
    # Zero-fill segments point at the end of the file: no reader that sizes a read from
    # p_offset + p_memsz (makedumpfile's mmap path does) may land inside another segment's data.
    data_end = data_offset + data_bytes + (len(notes) if notes_last else 0)
    for gpa, size, is_data in items:
        if is_data:
            tail = tail_at.get(gpa + size, 0)
            at = offset_of[gpa]
            segments.append(Segment(gpa, size + tail, at, tail))
            phdrs.append(PHDR.pack(PT_LOAD, _LOAD_FLAGS, at, gpa, gpa, size, size + tail, 0))
        else:
            segments.append(Segment(gpa, size, None))
            phdrs.append(PHDR.pack(PT_LOAD, _LOAD_FLAGS, data_end, gpa, gpa, 0, size, 0))

    section0 = SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if xnum else b""
    header = b"".join(
        (
            _elf_header(machine, phnum, xnum),
            *phdrs,
            section0,
            b"" if notes_last else notes,
            bytes(data_offset - before_data),
        )
    )
    return CorePlan(
        header=header,
        segments=tuple(segments),
        file_size=file_offset + (len(notes) if notes_last else 0),
        data=data,
        zero_fill=zero_fill,
        phnum=phnum,
        uses_pn_xnum=xnum,
        notes_offset=notes_offset,
        notes_size=len(notes),
    )
