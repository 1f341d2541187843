"""The kdump-compressed planner, struct packing, codecs and writer, field by field (pure, fast).

Offsets and sizes are checked against makedumpfile's ``diskdump_mod.h`` and QEMU's
``include/sysemu/dump.h`` (``DiskDumpHeader64`` is 464 bytes: ``timestamp`` is spelled
``char[22]`` there, 6 bytes of alignment and a 16-byte timeval). The writer runs on a file
source made here, since its real sources (QEMU's RAM) are covered by the guest-tier reader
tests (``test_kdump_readers.py``); here the point is every byte of a small file, and that the
readers' view of it (bitmaps, descriptor ranks, decompression) gives the bytes back.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpdump.elf.plan import EM_X86_64
from qmpdump.engines.copier import FileSource, Stopped
from qmpdump.engines.kdump_writer import write_kdump
from qmpdump.kdump.codecs import CODECS, auto_codec, codec_for_format
from qmpdump.kdump.format import (
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    HEADER,
    PAGE_DESC,
    SUB_HEADER,
    UTS_READ_SIZE,
    find_note,
    init_uts_ns_gpa,
    parse_vmcoreinfo,
    utsname_from_memory,
)
from qmpdump.kdump.plan import Batch, KdumpPlan, ZeroPages, ZeroSpan, plan_kdump, set_bits
from qmpdump.memmap.ranges import RangeSet

PAGE = 4096


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note record, name and descriptor padded to 4 bytes."""
    name0 = name + b"\0"
    padded = name0 + bytes(-len(name0) % 4) + desc + bytes(-len(desc) % 4)
    return struct.pack("<III", len(name0), len(desc), ntype) + padded


VMCOREINFO = (
    b"OSRELEASE=6.1.0-test-amd64\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a13620\n"
    b"NUMBER(phys_base)=-861929472\n"
)
NOTES = (
    note(b"CORE", 1, bytes(336))
    + note(b"QEMU", 0, bytes(432))
    + note(b"CORE", 1, bytes(336))
    + note(b"QEMU", 0, bytes(432))
    + note(b"VMCOREINFO", 0, VMCOREINFO)
)


@dataclass(frozen=True)
class Run:
    gpa: int
    size: int
    region: str
    region_offset: int


def test_struct_sizes_match_makedumpfile_and_qemu() -> None:
    assert HEADER.size == 464
    assert SUB_HEADER.size == 104
    assert PAGE_DESC.size == 24
    codecs = (
        DUMP_DH_COMPRESSED_ZLIB,
        DUMP_DH_COMPRESSED_LZO,
        DUMP_DH_COMPRESSED_SNAPPY,
        DUMP_DH_COMPRESSED_ZSTD,
    )
    assert codecs == (1, 2, 4, 0x20)


def test_vmcoreinfo_parsing() -> None:
    info = parse_vmcoreinfo(VMCOREINFO)
    assert info.osrelease == "6.1.0-test-amd64"
    assert info.page_size == PAGE
    assert info.phys_base == -861929472
    assert info.init_uts_ns == 0xFFFFFFFF82A13620
    ref = find_note(NOTES, b"VMCOREINFO")
    assert ref is not None
    assert NOTES[ref.desc_offset : ref.desc_offset + ref.desc_size] == VMCOREINFO
    assert find_note(NOTES, b"NOPE") is None


def _plan(zero_pages: ZeroPages = ZeroPages.EXCLUDE_HOLES, **kw: object) -> KdumpPlan:
    # RAM: [0, 640 KiB) and [1 MiB, 3 MiB); a hole between (in neither bitmap).
    ram = RangeSet.from_ranges([(0, 0xA0000), (0x100000, 0x200000)])
    runs = [Run(0x1000, 0x3000, "ram0", 0x1000), Run(0x100000, 0x2000, "ram1", 0)]
    return plan_kdump(
        NOTES,
        ram,
        runs,
        codec_flag=DUMP_DH_COMPRESSED_ZLIB,
        zero_pages=zero_pages,
        machine=EM_X86_64,
        timestamp_s=1_700_000_000,
        **kw,  # type: ignore[arg-type]
    )


def test_disk_dump_header_field_by_field() -> None:
    plan = _plan()
    f = HEADER.unpack_from(plan.prefix)
    assert f[0] == b"KDUMP   "
    assert f[1] == 6  # header_version
    uts = [v.rstrip(b"\0") for v in f[2:8]]
    assert uts == [b"Linux", b"", b"6.1.0-test-amd64", b"", b"x86_64", b""]
    assert f[8:10] == (1_700_000_000, 0)  # timestamp
    status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr = f[10:15]
    assert status == DUMP_DH_COMPRESSED_ZLIB
    assert block_size == PAGE
    # sub header (104) + notes, in whole blocks
    assert sub_hdr_size == -(-(104 + len(NOTES)) // PAGE) == 1
    assert max_mapnr == 0x300000 // PAGE == 768  # the pfn after the last RAM page
    # one bitmap of 768 bits = 96 bytes, rounded to a block; two of them
    assert bitmap_blocks == 2
    assert f[15:19] == (0, 0, 0, 0)  # total_ram_blocks, device_blocks, written, current_cpu
    assert f[19] == 2  # nr_cpus: the NT_PRSTATUS notes
    assert plan.prefix[HEADER.size : PAGE] == bytes(PAGE - HEADER.size)


def test_sub_header_field_by_field() -> None:
    plan = _plan()
    k = SUB_HEADER.unpack_from(plan.prefix, PAGE)
    phys_base, dump_level, split, start32, end32 = k[:5]
    assert phys_base == (-861929472) & (2**64 - 1)
    assert dump_level == 0  # exclude-holes: not every zero page is excluded
    assert (split, start32, end32) == (0, 0, 0)
    off_vmci, size_vmci, off_note, size_note, off_erase, size_erase = k[5:11]
    assert off_note == PAGE + 104
    assert size_note == len(NOTES)
    assert plan.prefix[off_note : off_note + size_note] == NOTES
    assert plan.prefix[off_vmci : off_vmci + size_vmci] == VMCOREINFO
    assert (off_erase, size_erase) == (0, 0)
    assert k[11:] == (0, 0, 768)  # start_pfn_64, end_pfn_64, max_mapnr_64
    assert len(plan.prefix) == 2 * PAGE
    assert SUB_HEADER.unpack_from(_plan(ZeroPages.EXCLUDE).prefix, PAGE)[1] == 1


def test_layout_offsets_and_first_bitmap() -> None:
    plan = _plan()
    assert plan.bitmap_offset == 2 * PAGE  # after the header and the sub-header block
    assert plan.bitmap_size == PAGE
    assert plan.bitmap2_offset == 3 * PAGE
    assert plan.desc_offset == 4 * PAGE
    # descriptors reserved for every page read (3 + 2), rounded to a block
    assert plan.read_pages == 5
    assert plan.data_offset == 5 * PAGE
    assert plan.ram_pages == 0xA0 + 0x200
    bits = [(plan.bitmap1[p // 8] >> (p % 8)) & 1 for p in range(plan.max_mapnr)]
    expected = [1 if p < 0xA0 or 0x100 <= p < 0x300 else 0 for p in range(plan.max_mapnr)]
    assert bits == expected
    shared = _plan(ZeroPages.SHARED)
    assert shared.data_offset == -(-(4 * PAGE + 24 * shared.ram_pages) // PAGE) * PAGE
    assert shared.zero_desc == PAGE_DESC.pack(shared.data_offset, PAGE, 0, 0)


def test_items_interleave_batches_and_holes_in_pfn_order() -> None:
    plan = _plan(batch_pages=2)
    assert plan.items == (
        ZeroSpan(0, 1),
        Batch(1, 1, "ram0", 0x1000),  # batches end on multiples of batch_pages
        Batch(2, 2, "ram0", 0x2000),
        ZeroSpan(4, 0xA0 - 4),
        Batch(0x100, 2, "ram1", 0),
        ZeroSpan(0x102, 0x300 - 0x102),
    )


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="outside RAM"):
        plan_kdump(
            NOTES,
            RangeSet.of(0, PAGE),
            [Run(PAGE, PAGE, "r", 0)],
            codec_flag=1,
        )
    with pytest.raises(ValueError, match="page-aligned"):
        plan_kdump(NOTES, RangeSet.of(0, 4 * PAGE), [Run(100, PAGE, "r", 0)], codec_flag=1)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=12))
def test_set_bits_matches_a_bit_model(ranges: list[tuple[int, int]]) -> None:
    bitmap = bytearray(40)
    model = [0] * 320
    for start, count in ranges:
        set_bits(bitmap, start, count)
        for bit in range(start, start + count):
            model[bit] = 1
    assert [(bitmap[b // 8] >> (b % 8)) & 1 for b in range(320)] == model


# ---------------------------------------------------------------- the writer, and reading back


@pytest.fixture
def source() -> Iterator[tuple[FileSource, bytes]]:
    """A 1 MiB "RAM region": text, random (incompressible) and zero pages."""
    pages = []
    rnd = os.urandom(PAGE * 8)
    for i in range(256):
        kind = i % 4
        if i >= 224:  # a fill: stored once, every descriptor of the run points at it
            pages.append(b"\xff" * PAGE)
        elif kind == 0:
            pages.append(bytes(PAGE))
        elif kind == 1:
            pages.append(
                (b"page %d " % i) * (PAGE // len(b"page %d " % i))
                + bytes(PAGE % len(b"page %d " % i))
            )
        elif kind == 2:
            pages.append(rnd[(i % 8) * PAGE : (i % 8 + 1) * PAGE])
        else:
            pages.append(bytes(100) + b"x" + bytes(PAGE - 101))
    data = b"".join(pages)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        yield FileSource(f.fileno()), data


def read_back(path: Path, decompress: dict[int, object]) -> tuple[dict[int, bytes], set[int]]:
    """A minimal reader as crash and libkdumpfile read: (pfn -> bytes of dumped pages, the
    pfns in the 1st bitmap only)."""
    blob = path.read_bytes()
    h = HEADER.unpack_from(blob)
    block, sub, bitmap_blocks = h[11], h[12], h[13]
    max_mapnr = SUB_HEADER.unpack_from(blob, block)[13]
    half = bitmap_blocks * block // 2
    b1 = blob[(1 + sub) * block :][:half]
    b2 = blob[(1 + sub) * block + half :][:half]
    desc_at = (1 + sub + bitmap_blocks) * block
    pages: dict[int, bytes] = {}
    excluded: set[int] = set()
    rank = 0
    for pfn in range(max_mapnr):
        in1 = (b1[pfn // 8] >> (pfn % 8)) & 1
        in2 = (b2[pfn // 8] >> (pfn % 8)) & 1
        assert in1 or not in2, f"pfn {pfn:#x} dumped but not RAM"
        if not in2:
            if in1:
                excluded.add(pfn)
            continue
        offset, size, flags, page_flags = PAGE_DESC.unpack_from(blob, desc_at + 24 * rank)
        rank += 1
        assert page_flags == 0
        raw = blob[offset : offset + size]
        if flags:
            raw = decompress[flags](raw)  # type: ignore[operator]
        else:
            assert size == block
        assert len(raw) == block
        pages[pfn] = raw
    return pages, excluded


def _desc_of(blob: bytes, pfn: int) -> tuple[int, int, int, int]:
    """The page descriptor of a dumped pfn: its rank in the 2nd bitmap."""
    h = HEADER.unpack_from(blob)
    block, sub, bitmap_blocks = h[11], h[12], h[13]
    half = bitmap_blocks * block // 2
    b2 = blob[(1 + sub) * block + half :][:half]
    rank = sum(bin(byte).count("1") for byte in b2[: pfn // 8])
    rank += bin(b2[pfn // 8] & ((1 << (pfn % 8)) - 1)).count("1")
    desc_at = (1 + sub + bitmap_blocks) * block + 24 * rank
    fields: tuple[int, int, int, int] = PAGE_DESC.unpack_from(blob, desc_at)
    return fields


def _decompressors() -> dict[int, object]:
    import cramjam  # noqa: PLC0415
    import lzo  # noqa: PLC0415
    from backports import zstd  # noqa: PLC0415

    return {
        DUMP_DH_COMPRESSED_ZLIB: zlib.decompress,
        DUMP_DH_COMPRESSED_LZO: lambda b: lzo.decompress(b, False, PAGE),
        DUMP_DH_COMPRESSED_SNAPPY: lambda b: bytes(cramjam.snappy.decompress_raw(b)),
        DUMP_DH_COMPRESSED_ZSTD: zstd.decompress,
    }


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("zero_pages", list(ZeroPages))
def test_written_file_reads_back_page_for_page(
    tmp_path: Path, source: tuple[FileSource, bytes], codec: str, zero_pages: ZeroPages
) -> None:
    src, data = source
    # RAM: 2 MiB at 0 (pfn 0..511); the host holds [256 KiB, 1 MiB + 256 KiB) = the region.
    ram = RangeSet.of(0, 0x200000)
    runs = [Run(0x40000, len(data), "r", 0)]
    c = CODECS[codec]
    plan = plan_kdump(NOTES, ram, runs, codec_flag=c.flag, zero_pages=zero_pages, batch_pages=16)
    out = tmp_path / "dump.kdump"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        result = write_kdump(plan, {"r": src}, fd, c, threads=3)
    finally:
        os.close(fd)
    assert result.file_size == out.stat().st_size
    pages, excluded = read_back(out, _decompressors())
    zero = bytes(PAGE)
    read_pfns = range(0x40, 0x40 + 256)
    for pfn in range(512):
        want = data[(pfn - 0x40) * PAGE : (pfn - 0x40 + 1) * PAGE] if pfn in read_pfns else zero
        if pfn in pages:
            assert pages[pfn] == want, f"pfn {pfn:#x}"
        else:
            assert pfn in excluded
            assert want == zero
    zero_read = sum(1 for pfn in read_pfns if pfn % 4 == 0 and pfn < 0x40 + 224)
    assert result.zero_read_pages == zero_read == 56
    expected_dumped = {
        ZeroPages.SHARED: 512,
        ZeroPages.EXCLUDE_HOLES: 256,
        ZeroPages.EXCLUDE: 256 - zero_read,
    }[zero_pages]
    assert result.dumped_pages == len(pages) == expected_dumped
    # The fill is stored once per batch of 16 pages (two batches hold it).
    blob = out.read_bytes()
    fill = [pfn for pfn in pages if pfn >= 0x40 + 224 and pfn in read_pfns]
    offsets = {_desc_of(blob, pfn)[0] for pfn in fill}
    assert len(fill) == 32
    assert len(offsets) == 2
    # Incompressible pages are stored raw; the header names the codec.
    assert HEADER.unpack_from(out.read_bytes())[10] == c.flag


def test_output_does_not_depend_on_thread_timing(
    tmp_path: Path, source: tuple[FileSource, bytes]
) -> None:
    src, data = source
    ram = RangeSet.of(0, len(data))
    plan = plan_kdump(
        NOTES, ram, [Run(0, len(data), "r", 0)], codec_flag=1, batch_pages=8, timestamp_s=1
    )
    blobs = []
    for threads in (1, 4):
        out = tmp_path / f"t{threads}.kdump"
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            write_kdump(plan, {"r": src}, fd, CODECS["zlib"], threads=threads)
        finally:
            os.close(fd)
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1]


def test_stop_interrupts_the_writer(tmp_path: Path, source: tuple[FileSource, bytes]) -> None:
    src, data = source
    plan = plan_kdump(
        NOTES, RangeSet.of(0, len(data)), [Run(0, len(data), "r", 0)], codec_flag=1, batch_pages=1
    )
    stop = threading.Event()
    seen: list[int] = []

    def progress(read: int, written: int) -> None:
        seen.append(read)
        assert written > 0
        if len(seen) == 3:
            stop.set()

    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(Stopped):
            write_kdump(plan, {"r": src}, fd, CODECS["zlib"], stop=stop, progress=progress)
    finally:
        os.close(fd)
    assert len(seen) == 3


@settings(deadline=None, max_examples=25)
@given(st.sets(st.integers(0, 63), max_size=64), st.sampled_from(list(ZeroPages)))
def test_any_population_reads_back(populated: set[int], zero_pages: ZeroPages) -> None:
    """Property: for any set of populated pages in 64 pages of RAM, the file gives back every
    populated page's bytes and zeros (or "excluded") elsewhere."""
    content = {pfn: bytes([pfn + 1]) * PAGE for pfn in populated}
    with tempfile.TemporaryDirectory() as tmp:
        region = Path(tmp) / "region"
        region.write_bytes(b"".join(content.get(p, bytes(PAGE)) for p in range(64)))
        fd_src = os.open(region, os.O_RDONLY)
        out = Path(tmp) / "dump"
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            runs = [Run(p * PAGE, PAGE, "r", p * PAGE) for p in sorted(populated)]
            plan = plan_kdump(
                NOTES, RangeSet.of(0, 64 * PAGE), runs, codec_flag=1, zero_pages=zero_pages
            )
            write_kdump(plan, {"r": FileSource(fd_src)}, fd, CODECS["zlib"], threads=2)
        finally:
            os.close(fd)
            os.close(fd_src)
        pages, excluded = read_back(out, _decompressors())
    assert set(pages) | excluded == set(range(64))
    for pfn in range(64):
        assert pages.get(pfn, bytes(PAGE)) == content.get(pfn, bytes(PAGE))
    if zero_pages is ZeroPages.SHARED:
        assert not excluded
    else:
        assert excluded == set(range(64)) - populated


def test_auto_codec_is_one_every_reader_opens() -> None:
    debian12 = {
        "makedumpfile": {"zlib", "lzo"},
        "crash": {"zlib", "lzo", "snappy", "zstd"},
        "drgn": set(CODECS),
    }
    assert auto_codec(debian12) == "lzo"
    assert auto_codec({"drgn": set(CODECS)}) == "zstd"
    assert auto_codec({}) == "zstd"
    assert codec_for_format("kdump", debian12).name == "lzo"
    assert codec_for_format("kdump-snappy").name == "snappy"
    from qmpdump.errors import UsageError  # noqa: PLC0415

    with pytest.raises(UsageError):
        codec_for_format("kdump-lz4")


def _uts_blob(offset: int, release: str) -> bytes:
    fields = ("Linux", "guest", release, "#1 SMP PREEMPT_DYNAMIC Debian", "x86_64", "(none)")
    return bytes(offset) + b"".join(f.encode().ljust(65, b"\0") for f in fields) + bytes(8)


def test_kernel_utsname_is_taken_only_when_it_checks_out() -> None:
    info = parse_vmcoreinfo(VMCOREINFO)
    # __START_KERNEL_map + phys_base, phys_base negative here (a kernel loaded low)
    assert init_uts_ns_gpa(info) == 0xFFFFFFFF82A13620 - 0xFFFFFFFF80000000 - 861929472
    release = "6.1.0-test-amd64"
    for offset in (0, 4):
        uts = utsname_from_memory(_uts_blob(offset, release), release)
        assert uts is not None
        assert (uts.nodename, uts.version) == ("guest", "#1 SMP PREEMPT_DYNAMIC Debian")
        assert (uts.domainname, uts.machine) == ("(none)", "x86_64")
    assert utsname_from_memory(_uts_blob(0, "5.10.0"), release) is None
    assert utsname_from_memory(bytes(UTS_READ_SIZE), release) is None
    assert utsname_from_memory(b"Linux", release) is None
    plan = plan_kdump(
        NOTES,
        RangeSet.of(0, PAGE),
        [],
        codec_flag=1,
        utsname=utsname_from_memory(_uts_blob(0, release), release),
    )
    fields = [v.rstrip(b"\0") for v in HEADER.unpack_from(plan.prefix)[2:8]]
    assert fields[3] == b"#1 SMP PREEMPT_DYNAMIC Debian"
