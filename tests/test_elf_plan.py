"""Tests of qmpdump.elf.plan: planned cores read back by pyelftools, readelf and a vol3-like reader.

Property tests draw random data and zero-fill sets (on byte, odd and page grids, low and high in
the 64-bit space) and random note payloads, build the whole core image in memory (header plus a
pattern that encodes each byte's gpa) and read it back with pyelftools, whose parser is
independent of ours. A small reader modelled on volatility3's ``Elf64Layer`` checks the default
layout stays readable by a tool that knows only ``e_phnum`` and exact PT_LOADs. The ``bare``
test takes its notes from a real QEMU dump, because the notes' shape is QEMU's, not ours.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from array import array
from bisect import bisect_right
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpdump.elf.format import PN_XNUM, PT_LOAD, PT_NOTE, parse_header, parse_program_headers
from qmpdump.elf.plan import (
    DEFAULT_MAX_PHDRS,
    EM_AARCH64,
    EM_X86_64,
    PAGE_SIZE,
    PF_R,
    PF_W,
    PF_X,
    CorePlan,
    notes_payload,
    plan_core,
    segment_for,
)
from qmpdump.errors import ElfFormatError
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.plugged import read_dump_prefix
from qmpdump.testbed.vm import Backend, MiB, VMSpec, launch

NT_PRSTATUS = 1
UNITS = (1, 7, PAGE_SIZE)
BASES = (0, 1 << 32, (1 << 52) - (1 << 24))


# ---------------------------------------------------------------- helpers


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note record as Linux and QEMU write them in ELF64 cores (4-byte padding)."""
    name_z = name + b"\0"

    def pad(raw: bytes) -> bytes:
        return raw + bytes(-len(raw) % 4)

    return struct.pack("<III", len(name_z), len(desc), ntype) + pad(name_z) + pad(desc)


def pattern(gpa: int, size: int) -> bytes:
    """Bytes that name their own address: the 8-byte little-endian gpa of each aligned word."""
    first = gpa & ~7
    words = array("Q", range(first, gpa + size, 8)).tobytes()
    return words[gpa - first : gpa - first + size]


def build_image(plan: CorePlan) -> bytes:
    """The whole core as the copy would write it: header, then each data segment's bytes."""
    image = bytearray(plan.header)
    for seg in plan.segments:
        if seg.file_offset is not None:
            assert seg.file_offset == len(image)
            image += pattern(seg.gpa, seg.filesz)
    return bytes(image)


def runs(ranges: RangeSet) -> list[tuple[int, int]]:
    return [(rng.start, rng.size) for rng in ranges]


def holes(ranges: RangeSet) -> list[Range]:
    return [Range.from_bounds(a.end, b.start) for a, b in pairwise(ranges)]


class Vol3StyleReader:
    """Physical reads the way volatility3's ``Elf64Layer`` does them.

    Like ``framework/layers/elf.py``: loop over ``range(e_phnum)`` (no PN_XNUM), keep a PT_LOAD
    only if ``p_filesz == p_memsz > 0``, map ``[p_paddr, p_paddr + p_memsz)`` to
    ``p_offset``; everything else is unreadable.
    """

    def __init__(self, image: bytes) -> None:
        (e_phoff,) = struct.unpack_from("<Q", image, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", image, 0x36)
        self.image = image
        self.segments: list[tuple[int, int, int]] = []
        for index in range(e_phnum):
            p_type, _f, p_offset, _v, p_paddr, p_filesz, p_memsz, _a = struct.unpack_from(
                "<IIQQQQQQ", image, e_phoff + index * e_phentsize
            )
            if p_type == PT_LOAD and p_filesz == p_memsz and p_filesz > 0:
                self.segments.append((p_paddr, p_offset, p_memsz))
        self.segments.sort()

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray()
        while size:
            index = bisect_right(self.segments, (gpa, 1 << 64, 0)) - 1
            if index < 0 or gpa >= self.segments[index][0] + self.segments[index][2]:
                raise KeyError(f"{gpa:#x} is not mapped")
            start, offset, length = self.segments[index]
            chunk = min(size, start + length - gpa)
            out += self.image[offset + gpa - start : offset + gpa - start + chunk]
            gpa += chunk
            size -= chunk
        return bytes(out)


def check_plan(
    plan: CorePlan,
    image: bytes,
    *,
    notes: bytes,
    data: RangeSet,
    zero_fill: RangeSet,
    machine: int = EM_X86_64,
    merge_zero_tail: bool = False,
) -> None:
    """Everything the plan promises, read back through pyelftools and the plan's own fields."""
    elf = ELFFile(io.BytesIO(image))
    hdr: Any = elf.header
    assert hdr["e_ident"]["EI_CLASS"] == "ELFCLASS64"
    assert hdr["e_ident"]["EI_DATA"] == "ELFDATA2LSB"
    assert hdr["e_ident"]["EI_OSABI"] == "ELFOSABI_SYSV"
    assert hdr["e_type"] == "ET_CORE"
    assert elf["e_machine"] == ("EM_X86_64" if machine == EM_X86_64 else "EM_AARCH64")
    assert hdr["e_version"] == "EV_CURRENT"
    assert (hdr["e_ehsize"], hdr["e_phentsize"], hdr["e_phoff"]) == (64, 56, 64)
    assert elf.num_segments() == plan.phnum
    assert plan.uses_pn_xnum == (hdr["e_phnum"] == PN_XNUM)
    shdrs = 64 if plan.uses_pn_xnum else 0
    assert plan.notes_offset == 64 + 56 * plan.phnum + shdrs

    segs = list(elf.iter_segments())
    note_seg = segs[0]
    assert note_seg["p_type"] == "PT_NOTE"
    assert note_seg["p_offset"] == plan.notes_offset
    assert note_seg["p_filesz"] == note_seg["p_memsz"] == len(notes)
    assert (note_seg["p_flags"], note_seg["p_vaddr"], note_seg["p_paddr"]) == (0, 0, 0)
    assert note_seg.data() == notes
    assert all(seg["p_type"] == "PT_LOAD" for seg in segs[1:])

    loads = segs[1:]
    assert [(s["p_paddr"], s["p_memsz"]) for s in loads] == [(s.gpa, s.size) for s in plan.segments]
    for before, after in pairwise(loads):
        assert before["p_paddr"] + before["p_memsz"] <= after["p_paddr"]
    data_segs = [s for s in loads if s["p_filesz"] > 0]
    zero_segs = [s for s in loads if s["p_filesz"] == 0]
    for seg in loads:
        assert seg["p_vaddr"] == seg["p_paddr"]
        assert seg["p_flags"] == PF_R | PF_W | PF_X
        assert seg["p_align"] == 0
        assert seg["p_memsz"] > 0
        assert seg["p_offset"] <= plan.file_size
    if not merge_zero_tail:
        assert all(s["p_filesz"] == s["p_memsz"] for s in data_segs)

    stored = RangeSet.from_ranges((s["p_paddr"], s["p_filesz"]) for s in data_segs)
    assert stored == plan.data
    assert sum(s["p_filesz"] for s in data_segs) == plan.data.total  # no two overlap
    assert data - plan.data == RangeSet()
    described_zero = RangeSet.from_ranges(
        (s["p_paddr"] + s["p_filesz"], s["p_memsz"] - s["p_filesz"])
        for s in loads
        if s["p_memsz"] > s["p_filesz"]
    )
    assert described_zero == plan.zero_fill
    assert plan.zero_fill - zero_fill == RangeSet()
    assert not plan.zero_fill & plan.data
    assert len(zero_segs) == len([s for s in plan.segments if s.is_zero_fill])

    # Data is packed in gpa order from the first page boundary after the notes.
    offset = plan.data_offset
    if data_segs:
        assert offset % PAGE_SIZE == 0
        assert plan.notes_offset + len(notes) <= offset < plan.notes_offset + len(notes) + PAGE_SIZE
    for seg in data_segs:
        assert seg["p_offset"] == offset
        assert seg.data() == pattern(seg["p_paddr"], seg["p_filesz"])
        offset += seg["p_filesz"]
    assert plan.file_size == offset == len(image) == len(plan.header) + plan.data.total

    # Our own reader agrees, and the bisect lookup finds every segment's first and last byte.
    assert [(p.paddr, p.memsz, p.filesz) for p in parse_program_headers(plan.header)[1:]] == [
        (s.gpa, s.size, s.filesz) for s in plan.segments
    ]
    starts = {planned.gpa for planned in plan.segments}
    for planned in plan.segments:
        assert segment_for(plan, planned.gpa) == planned
        assert segment_for(plan, planned.end - 1) == planned
        if planned.end not in starts:
            assert segment_for(plan, planned.end) is None


# ---------------------------------------------------------------- strategies


@st.composite
def range_sets(draw: st.DrawFn) -> tuple[RangeSet, RangeSet]:
    """A data set and a disjoint zero-fill set, on one grid, from one base address."""
    unit = draw(st.sampled_from(UNITS))
    base = draw(st.sampled_from(BASES))
    pairs = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 12)), max_size=24)
    data = RangeSet.from_ranges((base + s * unit, n * unit) for s, n in draw(pairs))
    zero = RangeSet.from_ranges((base + s * unit, n * unit) for s, n in draw(pairs))
    return data, zero - data


note_payloads = st.lists(
    st.tuples(
        st.sampled_from((b"CORE", b"QEMU", b"VMCOREINFO")),
        st.integers(0, 0x20),
        st.binary(max_size=48),
    ),
    max_size=4,
).map(lambda records: b"".join(note(*record) for record in records))


# ---------------------------------------------------------------- properties


@given(
    notes=note_payloads,
    sets=range_sets(),
    max_phdrs=st.one_of(st.just(DEFAULT_MAX_PHDRS), st.integers(2, 10)),
    coalesce_gap=st.one_of(st.none(), st.integers(0, 3 * PAGE_SIZE)),
    machine=st.sampled_from((EM_X86_64, EM_AARCH64)),
)
def test_planned_core_reads_back_with_every_byte_at_its_gpa(
    notes: bytes,
    sets: tuple[RangeSet, RangeSet],
    max_phdrs: int,
    coalesce_gap: int | None,
    machine: int,
) -> None:
    data, zero = sets
    plan = plan_core(
        notes, data, zero, machine=machine, max_phdrs=max_phdrs, coalesce_gap=coalesce_gap
    )
    image = build_image(plan)
    check_plan(plan, image, notes=notes, data=data, zero_fill=zero, machine=machine)
    assert plan.phnum <= max_phdrs
    assert not plan.uses_pn_xnum
    if coalesce_gap:
        assert all(hole.size > coalesce_gap for hole in holes(plan.data))

    # A volatility3-style reader finds every copied byte at its gpa, and nothing else.
    reader = Vol3StyleReader(image)
    for rng in plan.data:
        assert reader.read(rng.start, rng.size) == pattern(rng.start, rng.size)
        if not plan.data.contains(rng.end):
            with pytest.raises(KeyError):
                reader.read(rng.end, 1)


@given(sets=range_sets(), max_phdrs=st.integers(2, 10))
def test_header_cap_drops_small_zero_fill_first_then_joins_the_smallest_holes(
    sets: tuple[RangeSet, RangeSet], max_phdrs: int
) -> None:
    data, zero = sets
    plan = plan_core(b"", data, zero, max_phdrs=max_phdrs)
    budget = max_phdrs - 1
    if len(data) + len(zero) <= budget:
        assert (plan.data, plan.zero_fill) == (data, zero)
        assert plan.phnum == 1 + len(data) + len(zero)
    elif len(data) <= budget:
        # Data untouched; the zero-fill runs kept are the largest ones.
        assert plan.data == data
        assert plan.phnum == max_phdrs
        kept = [rng.size for rng in plan.zero_fill]
        dropped = [rng.size for rng in zero - plan.zero_fill]
        assert len(kept) == budget - len(data)
        assert min(kept, default=1 << 64) >= max(dropped, default=0)
    else:
        # Exactly enough holes joined, and none wider than a hole left open.
        assert len(plan.data) == budget
        assert plan.zero_fill == RangeSet()
        assert plan.phnum == max_phdrs
        opened = RangeSet.from_ranges(holes(plan.data))
        filled = [hole.size for hole in holes(data) if not opened.covers(hole)]
        assert len(filled) == len(data) - budget
        assert max(filled) <= min((hole.size for hole in holes(plan.data)), default=1 << 64)
        assert plan.data.bounds == data.bounds


@given(notes=note_payloads, sets=range_sets())
def test_merged_zero_tails_extend_data_segments(
    notes: bytes, sets: tuple[RangeSet, RangeSet]
) -> None:
    data, zero = sets
    plan = plan_core(notes, data, zero, merge_zero_tail=True)
    check_plan(
        plan, build_image(plan), notes=notes, data=data, zero_fill=zero, merge_zero_tail=True
    )
    assert plan.zero_fill == zero
    data_ends = {rng.end for rng in data}
    for seg in plan.segments:
        if seg.zero_tail:
            assert seg.file_offset is not None
            assert seg.gpa + seg.filesz in data_ends
        if seg.is_zero_fill:
            assert seg.gpa not in data_ends  # a standalone zero run never follows data directly


# ---------------------------------------------------------------- worked examples


def test_default_layout_keeps_zero_fill_separate_and_exact() -> None:
    notes = note(b"CORE", NT_PRSTATUS, bytes(336)) + note(b"QEMU", 0, bytes(0x1B8))
    data = RangeSet.from_ranges([(0x1000, 0x2000), (0x1_0000_0000, 0x1000)])
    zero = RangeSet.from_ranges([(0x3000, 0x5000), (0x10_0000, 0x1000)])
    plan = plan_core(notes, data, zero)
    assert [(s.gpa, s.size, s.file_offset) for s in plan.segments] == [
        (0x1000, 0x2000, 0x1000),
        (0x3000, 0x5000, None),
        (0x10_0000, 0x1000, None),
        (0x1_0000_0000, 0x1000, 0x3000),
    ]
    assert plan.phnum == 5
    assert plan.notes_offset == 64 + 5 * 56
    assert plan.file_size == 0x4000
    image = build_image(plan)
    header = parse_header(image)
    assert (header.phoff, header.phnum, header.shoff, header.shnum) == (64, 5, 0, 0)
    check_plan(plan, image, notes=notes, data=data, zero_fill=zero)
    reader = Vol3StyleReader(image)
    assert reader.read(0x2FF8, 8) == struct.pack("<Q", 0x2FF8)
    with pytest.raises(KeyError):
        reader.read(0x3000, 1)  # zero-fill is invisible to volatility3, but described for drgn


def test_no_data_means_no_padding() -> None:
    notes = note(b"CORE", NT_PRSTATUS, bytes(8))
    plan = plan_core(notes, RangeSet(), RangeSet.of(0, PAGE_SIZE))
    assert plan.file_size == len(plan.header) == plan.notes_offset + len(notes)
    assert [(s.gpa, s.size, s.file_offset) for s in plan.segments] == [(0, PAGE_SIZE, None)]


def test_default_cap_stays_below_pn_xnum_and_opting_in_uses_it() -> None:
    data = RangeSet.from_ranges((2 * i, 1) for i in range(DEFAULT_MAX_PHDRS))
    plan = plan_core(b"", data)
    assert (plan.phnum, plan.uses_pn_xnum, len(plan.data)) == (DEFAULT_MAX_PHDRS, False, 65533)
    assert parse_header(plan.header).phnum == 0xFFFE
    # One header more than e_phnum holds plainly: exactly PN_XNUM, so the extension is needed.
    plan = plan_core(b"", data, max_phdrs=PN_XNUM)
    assert (plan.phnum, plan.uses_pn_xnum, plan.data) == (PN_XNUM, True, data)
    fits = RangeSet.from_ranges((2 * i, 1) for i in range(DEFAULT_MAX_PHDRS - 1))
    plan = plan_core(b"", fits, max_phdrs=1 << 20)
    assert (plan.phnum, plan.uses_pn_xnum) == (DEFAULT_MAX_PHDRS, False)


@settings(deadline=None)
@given(st.just(70_000))
def test_pn_xnum_core_with_70000_segments_reads_back(count: int) -> None:
    notes = note(b"CORE", NT_PRSTATUS, bytes(336))
    data = RangeSet.from_ranges((0x1_0000_0000 + 2 * i, 1) for i in range(count))
    plan = plan_core(notes, data, RangeSet.of(0, 0x1000), max_phdrs=100_000)
    assert (plan.phnum, plan.uses_pn_xnum) == (count + 2, True)
    image = build_image(plan)
    header = parse_header(image)
    assert (header.phnum, header.shnum, header.shentsize) == (PN_XNUM, 1, 64)
    assert header.shoff == 64 + 56 * plan.phnum
    # pyelftools follows PN_XNUM to section header 0's sh_info.
    elf = ELFFile(io.BytesIO(image))
    section0: Any = elf.get_section(0)
    assert section0["sh_type"] == "SHT_NULL"
    assert (section0["sh_info"], section0["sh_size"], section0["sh_offset"]) == (plan.phnum, 0, 0)
    check_plan(plan, image, notes=notes, data=data, zero_fill=RangeSet.of(0, 0x1000))
    assert len(parse_program_headers(image)) == plan.phnum


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"overlap at \[0x1000, 0x2000\)"):
        plan_core(b"", RangeSet.of(0, 0x2000), RangeSet.of(0x1000, 0x2000))
    with pytest.raises(ElfFormatError, match="not an ELF note payload"):
        plan_core(note(b"CORE", 1, bytes(16))[:-4], RangeSet.of(0, 1))
    with pytest.raises(ElfFormatError, match="stray bytes"):
        plan_core(note(b"CORE", 1, b"") + b"\x01", RangeSet.of(0, 1))
    with pytest.raises(ValueError, match="max_phdrs"):
        plan_core(b"", RangeSet.of(0, 1), max_phdrs=1)
    with pytest.raises(ValueError, match="max_phdrs"):
        plan_core(b"", RangeSet.of(0, 1), max_phdrs=1 << 32)
    with pytest.raises(ValueError, match="e_machine"):
        plan_core(b"", RangeSet.of(0, 1), machine=1 << 16)
    with pytest.raises(ValueError, match="coalesce_gap"):
        plan_core(b"", RangeSet.of(0, 1), coalesce_gap=-1)


def readelf_check(path: Path, plan: CorePlan) -> str:
    """Run binutils' readelf on a core; assert it reads headers, segments and notes cleanly.

    Only ``-h -l -n``: ``-S`` warns about section 0's ``sh_info`` under PN_XNUM, which is the
    very convention QEMU and Linux use, so it says nothing about our file.
    """
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("binutils' readelf is not installed")
    out = subprocess.run(
        [readelf, "--wide", "-h", "-l", "-n", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not out.stderr, out.stderr
    count = f"{PN_XNUM} ({plan.phnum})" if plan.uses_pn_xnum else str(plan.phnum)
    assert f"Number of program headers:         {count}\n" in out.stdout
    loads = [line for line in out.stdout.splitlines() if line.lstrip().startswith("LOAD ")]
    assert len(loads) == len(plan.segments)
    return out.stdout


def test_readelf_accepts_the_core(tmp_path: Path) -> None:
    notes = note(b"CORE", NT_PRSTATUS, bytes(336)) + note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n")
    data = RangeSet.from_ranges([(0x1000, 0x3000), (0x10_0000, 0x10)])
    many = RangeSet.from_ranges((2 * i, 1) for i in range(PN_XNUM))
    for name, plan in (
        ("plain", plan_core(notes, data, RangeSet.of(0x8000, 0x8000))),
        ("xnum", plan_core(notes, many, max_phdrs=1 << 20)),
    ):
        path = tmp_path / f"{name}.core"
        path.write_bytes(build_image(plan))
        out = readelf_check(path, plan)
        assert "NT_PRSTATUS" in out
        assert "VMCOREINFO" in out


# ---------------------------------------------------------------- real QEMU


def _write_core(plan: CorePlan, ram: Path, core: Path) -> None:
    """Copy each data segment from main RAM's backing file (gpa == file offset below 512 MiB)."""
    with ram.open("rb") as src, core.open("wb") as dst:
        dst.write(plan.header)
        for seg in plan.segments:
            if seg.file_offset is not None:
                assert dst.tell() == seg.file_offset
                src.seek(seg.gpa)
                dst.write(src.read(seg.filesz))
        assert dst.tell() == plan.file_size


@pytest.mark.bare
async def test_core_with_qemu_notes_reads_back(tmp_path: Path) -> None:
    spec = VMSpec(name="bare-elf-plan", guest=False, ram_backend=Backend.FILE, cpus=2)
    marker_gpa = 16 * MiB + 0x123
    marker = b"QMPDUMP-ELF-PLAN"
    async with launch(spec) as vm:
        assert vm.qmp is not None
        with vm.backing_file("ram0").open("r+b") as ram:
            ram.seek(marker_gpa)
            ram.write(marker)
        prefix = await read_dump_prefix(vm.qmp)
        text = await vm.qmp.hmp(f"xp /16xb {marker_gpa:#x}")
        seen = [tok for line in text.splitlines() for tok in line.split(":", 1)[1].split()]
        assert bytes(int(tok, 16) for tok in seen) == marker  # QEMU sees it at that gpa
        qemu_phdrs = parse_program_headers(prefix)
        notes = notes_payload(prefix)
        data = RangeSet.from_ranges([(1 * MiB, 2 * PAGE_SIZE), (16 * MiB, PAGE_SIZE)])
        zero = RangeSet.of(32 * MiB, 64 * MiB)
        plan = plan_core(notes, data, zero, machine=parse_header(prefix).machine)
        core = tmp_path / "qmpdump.core"
        _write_core(plan, vm.backing_file("ram0"), core)
    assert vm.proc.returncode is not None  # the context manager stopped QEMU

    # QEMU's dump: one PT_NOTE, then PT_LOADs for RAM; our core keeps its notes byte for byte.
    assert [ph.type for ph in qemu_phdrs].count(PT_NOTE) == 1
    assert notes == prefix[qemu_phdrs[0].offset : qemu_phdrs[0].offset + qemu_phdrs[0].filesz]
    with core.open("rb") as f:
        elf = ELFFile(f)
        # QEMU picks e_machine from the first vCPU: EM_386 (3) while it is not in long mode,
        # as here at reset (target/i386/arch_dump.c); the plan copies QEMU's value.
        assert elf["e_machine"] == "EM_386"
        segs = list(elf.iter_segments())
        note_seg: Any = segs[0]
        assert note_seg.data() == notes
        kinds = [n["n_type"] for n in note_seg.iter_notes()]
        assert kinds.count("NT_PRSTATUS") == spec.cpus
        assert sum(1 for n in note_seg.iter_notes() if n["n_name"] == "QEMU") == spec.cpus
        by_gpa = {seg["p_paddr"]: seg for seg in segs[1:]}
        block = by_gpa[16 * MiB].data()
        assert block[0x123 : 0x123 + len(marker)] == marker
        assert by_gpa[32 * MiB]["p_filesz"] == 0
        assert by_gpa[32 * MiB]["p_memsz"] == 64 * MiB
    reader = Vol3StyleReader(core.read_bytes())
    assert reader.read(marker_gpa, len(marker)) == marker
    assert readelf_check(core, plan).count("NT_PRSTATUS") == spec.cpus


@settings(max_examples=40, deadline=None)
@given(sets=range_sets(), max_phdrs=st.integers(2, 10))
def test_notes_last_puts_the_notes_after_the_data_and_nothing_else_moves(
    sets: tuple[RangeSet, RangeSet], max_phdrs: int
) -> None:
    """The snapshot engine's layout: every data byte at the same gpa, the notes at the end."""
    data, zero = sets
    notes = note(b"CORE", 1, bytes(336)) + note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n")
    first = plan_core(notes, data, zero, max_phdrs=max_phdrs)
    last = plan_core(notes, data, zero, max_phdrs=max_phdrs, notes_last=True)
    assert last.notes_size == first.notes_size == len(notes)
    assert last.file_size == first.file_size + len(notes) - (first.data_offset - last.data_offset)
    assert notes not in last.header
    assert [(s.gpa, s.size, s.file_offset is None) for s in last.segments] == [
        (s.gpa, s.size, s.file_offset is None) for s in first.segments
    ]
    image = build_image(last)
    assert len(image) == last.notes_offset
    image += notes
    assert len(image) == last.file_size
    elf = ELFFile(io.BytesIO(image))
    (note_seg,) = [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    assert isinstance(note_seg, NoteSegment)
    assert [n["n_name"] for n in note_seg.iter_notes()] == ["CORE", "VMCOREINFO"]
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_filesz"] == 0:
            assert seg["p_offset"] == len(image)  # zero-fill points past every byte
        elif seg["p_type"] == "PT_LOAD":
            start = seg["p_paddr"]
            assert seg.data() == pattern(start, seg["p_filesz"])


@settings(max_examples=40, deadline=None)
@given(sets=range_sets(), max_phdrs=st.integers(2, 10), cut=st.integers(0, 1 << 22))
def test_placement_orders_the_data_in_the_file_and_every_byte_stays_at_its_gpa(
    sets: tuple[RangeSet, RangeSet], max_phdrs: int, cut: int
) -> None:
    """The snapshot engine's placement: memory above ``cut`` first (the order QEMU streams
    its RAM blocks in), program headers still in gpa order, each byte found at its gpa."""
    data, zero = sets
    notes = note(b"CORE", 1, bytes(336))
    plan = plan_core(
        notes, data, zero, max_phdrs=max_phdrs, notes_last=True, placement=lambda g: g < cut
    )
    loads = [s for s in plan.segments if s.file_offset is not None]
    by_file = sorted(loads, key=lambda s: s.file_offset or 0)
    assert [s.gpa >= cut for s in by_file] == sorted((s.gpa >= cut for s in by_file), reverse=True)
    at = plan.data_offset
    for seg in by_file:  # packed without gaps in placement order
        assert seg.file_offset == at
        at += seg.filesz
    assert at == plan.notes_offset
    image = bytearray(plan.header) + bytes(plan.file_size - len(plan.header))
    for seg in loads:
        assert seg.file_offset is not None
        image[seg.file_offset : seg.file_offset + seg.filesz] = pattern(seg.gpa, seg.filesz)
    image[plan.notes_offset :] = notes
    elf = ELFFile(io.BytesIO(bytes(image)))
    gpas = [seg["p_paddr"] for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
    assert gpas == sorted(gpas)
    for phdr in elf.iter_segments():
        if phdr["p_type"] == "PT_LOAD" and phdr["p_filesz"]:
            assert phdr.data() == pattern(phdr["p_paddr"], phdr["p_filesz"])
