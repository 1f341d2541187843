"""The migration stream parser on streams written here in QEMU 10.0's byte layout.

Why synthetic streams: every branch (footers or none, CONTINUE, fill bytes, each malformed
record) needs a stream that shows exactly it; real QEMU writes only its one shape. The real
streams are parsed by the snapshot engine's tests (``tests/test_dump_snapshot.py``), which check
the result against QEMU's own dump. The layout written here is the one read from a real
QEMU 10.0 background snapshot (see :mod:`qmpdump.migstream`).
"""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpdump.errors import MigrationStreamError
from qmpdump.migstream import (
    PAGE_SIZE,
    EarlyVirtioMem,
    MigrationStream,
    Page,
    RamBlockInfo,
    RamBlocks,
    RamDone,
    Record,
)


def _str(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


class Writer:
    """Writes a background snapshot stream the way QEMU 10.0 does."""

    def __init__(self, *, footers: bool = True, config: bool = True) -> None:
        self.out = bytearray(struct.pack(">II", 0x5145564D, 3))
        self.footers = footers
        if config:
            self.out += b"\x07" + struct.pack(">I", 11) + b"pc-q35-10.0"
        self.last: str | None = None

    def footer(self, section_id: int) -> None:
        if self.footers:
            self.out += b"\x7e" + struct.pack(">I", section_id)

    def start_ram(self, blocks: list[tuple[str, int]]) -> None:
        self.out += b"\x01" + struct.pack(">I", 1) + _str("ram") + struct.pack(">II", 0, 4)
        total = sum(size for _, size in blocks)
        self.out += struct.pack(">Q", total | 0x04)
        for name, size in blocks:
            self.out += _str(name) + struct.pack(">Q", size)
        self.out += struct.pack(">Q", 0x10)
        self.footer(1)

    def early_vmem(self, bitmap_bits: list[int], *, block: int = 2 << 20, nbits: int = 64) -> None:
        name = "0000:00:01.0/virtio-mem-device-early"
        self.out += b"\x04" + struct.pack(">I", 41) + _str(name) + struct.pack(">II", 0, 1)
        self.out += struct.pack(">QQQIQ", 1 << 32, nbits * block, block, 0, 0)
        words = [0] * -(-nbits // 64)
        for bit in bitmap_bits:
            words[bit // 64] |= 1 << (bit % 64)
        self.out += b"".join(struct.pack(">Q", w) for w in words)
        self.footer(41)

    def part(self, pages: list[tuple[str, int, bytes | None]]) -> None:
        self.out += b"\x02" + struct.pack(">I", 1)
        for name, offset, data in pages:
            flags = 0x08 if data is not None else 0x02
            same = name == self.last
            self.out += struct.pack(">Q", offset | flags | (0x20 if same else 0))
            if not same:
                self.out += _str(name)
            self.last = name
            self.out += data if data is not None else b"\x00"
        self.out += struct.pack(">Q", 0x10)
        self.footer(1)

    def device_state(self) -> None:
        self.out += b"\x04" + struct.pack(">I", 2) + _str("timer") + struct.pack(">II", 0, 2)
        self.out += bytes(24)  # VMState of no known length: the parser must not read it
        self.footer(2)
        self.out += b"\x00"


def parse(data: bytes) -> list[Record]:
    return list(MigrationStream(io.BytesIO(data)).records())


def _page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def test_a_background_snapshot_stream_parses_to_blocks_pages_and_done() -> None:
    w = Writer()
    w.start_ram([("ram0", 4 * PAGE_SIZE), ("pc.bios", PAGE_SIZE)])
    w.early_vmem([0, 1, 5])
    w.part([("ram0", 2 * PAGE_SIZE, _page(7)), ("ram0", 0, None), ("pc.bios", 0, _page(1))])
    w.part([("ram0", PAGE_SIZE, None), ("ram0", 3 * PAGE_SIZE, _page(9))])
    w.device_state()
    records = parse(bytes(w.out))
    assert records[0] == RamBlocks(
        (RamBlockInfo("ram0", 4 * PAGE_SIZE), RamBlockInfo("pc.bios", PAGE_SIZE))
    )
    early = records[1]
    assert isinstance(early, EarlyVirtioMem)
    assert early.addr == 1 << 32
    assert early.plugged == ((0, 4 << 20), (10 << 20, 2 << 20))
    assert records[2:] == [
        Page("ram0", 2 * PAGE_SIZE, _page(7)),
        Page("ram0", 0, None),
        Page("pc.bios", 0, _page(1)),
        Page("ram0", PAGE_SIZE, None),
        Page("ram0", 3 * PAGE_SIZE, _page(9)),
        RamDone(),
    ]


def test_streams_without_footers_or_configuration_parse_the_same() -> None:
    w = Writer(footers=False, config=False)
    w.start_ram([("pc.ram", 2 * PAGE_SIZE)])
    w.part([("pc.ram", PAGE_SIZE, _page(3))])
    w.device_state()
    assert parse(bytes(w.out))[1:] == [Page("pc.ram", PAGE_SIZE, _page(3)), RamDone()]


def test_the_parser_stops_before_the_device_state() -> None:
    w = Writer()
    w.start_ram([("ram0", PAGE_SIZE)])
    w.part([("ram0", 0, _page(1))])
    before = len(w.out)
    w.device_state()
    src = io.BytesIO(bytes(w.out))
    stream = MigrationStream(src)
    assert list(stream.records())[-1] == RamDone()
    # Only the FULL section's type byte was read: the rest is the caller's to drain.
    assert stream.position == before + 1


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 15), st.integers(0, 255)),
        min_size=1,
        max_size=40,
        unique_by=lambda t: (t[0], t[1]),
    ),
    st.integers(1, 5),
)
def test_pages_come_out_as_they_went_in(pages: list[tuple[int, int, int]], parts: int) -> None:
    names = ["0000:00:01.0/mem-vmem0", "ram0"]
    w = Writer()
    w.start_ram([(n, 16 * PAGE_SIZE) for n in names])
    sent = [(names[b], i * PAGE_SIZE, None if f == 0 else _page(f)) for b, i, f in pages]
    step = -(-len(sent) // parts)
    for k in range(0, len(sent), step):
        w.part(sent[k : k + step])
    w.device_state()
    got = parse(bytes(w.out))
    assert got[1:-1] == [Page(*p) for p in sent]
    assert got[-1] == RamDone()


def _bad(mutate: str) -> bytes:
    w = Writer()
    w.start_ram([("ram0", 2 * PAGE_SIZE)])
    if mutate == "unknown-block":
        w.part([("ram1", 0, _page(1))])
    elif mutate == "past-end":
        w.part([("ram0", 2 * PAGE_SIZE, _page(1))])
    elif mutate == "xbzrle":
        w.out += b"\x02" + struct.pack(">I", 1) + struct.pack(">Q", 0x40) + _str("ram0")
    elif mutate == "cut":
        w.part([("ram0", 0, _page(1))])
        return bytes(w.out[:-100])
    elif mutate == "eof":
        w.part([("ram0", 0, _page(1))])
        w.out += b"\x00"
        return bytes(w.out)
    elif mutate == "device-first":
        w.device_state()
        return bytes(w.out)
    elif mutate == "other-iterable":
        w.out += b"\x01" + struct.pack(">I", 3) + _str("block") + struct.pack(">II", 0, 1)
        return bytes(w.out)
    w.device_state()
    return bytes(w.out)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("unknown-block", "not in the block list"),
        ("past-end", "past the end"),
        ("xbzrle", "XBZRLE"),
        ("cut", "ended at byte"),
        ("eof", "EOF section"),
        ("device-first", "cannot skip it"),
        ("other-iterable", "'block' is not supported"),
    ],
)
def test_malformed_streams_raise_a_clear_error(mutate: str, message: str) -> None:
    with pytest.raises(MigrationStreamError, match=message):
        parse(_bad(mutate))


def test_not_a_migration_stream() -> None:
    with pytest.raises(MigrationStreamError, match="not a QEMU migration stream"):
        parse(b"\x7fELF" + bytes(60))


class _Collect:
    def __init__(self) -> None:
        self.pages: list[Page] = []

    def page(self, block: str, offset: int, data: bytes | None, /) -> None:
        self.pages.append(Page(block, offset, data))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 15), st.integers(0, 3)),
        min_size=1,
        max_size=30,
        unique_by=lambda t: (t[0], t[1]),
    )
)
def test_feed_delivers_what_records_yields(pages: list[tuple[int, int, int]]) -> None:
    names = ["0000:00:01.0/mem-vmem0", "ram0"]
    w = Writer()
    w.start_ram([(n, 16 * PAGE_SIZE) for n in names])
    w.part([(names[b], i * PAGE_SIZE, None if f == 0 else _page(f)) for b, i, f in pages])
    w.device_state()
    sink = _Collect()
    others = list(MigrationStream(io.BytesIO(bytes(w.out))).feed(sink))
    every = parse(bytes(w.out))
    assert sink.pages == [r for r in every if isinstance(r, Page)]
    assert others == [r for r in every if not isinstance(r, Page)]


def test_feed_rejects_what_records_rejects() -> None:
    data = _bad("past-end")
    with pytest.raises(MigrationStreamError, match="past the end"):
        list(MigrationStream(io.BytesIO(data)).feed(_Collect()))


class _CollectRuns(_Collect):
    """Takes runs of zero pages as the snapshot engine's reader does; expands them to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []

    def zero_run(self, block: str, offset: int, count: int, /) -> None:
        self.runs.append(count)
        self.pages += [Page(block, offset + i * PAGE_SIZE, None) for i in range(count)]

    def data_run(self, block: str, offset: int, count: int, data: bytes, /) -> None:
        assert len(data) == count * PAGE_SIZE
        self.runs.append(count)
        self.pages += [
            Page(block, offset + i * PAGE_SIZE, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            for i in range(count)
        ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 511), st.integers(0, 2)),
        min_size=1,
        max_size=40,
        unique_by=lambda t: (t[0], t[1]),
    ),
    st.integers(0, 500),
    st.integers(0, 3),
)
def test_runs_of_pages_arrive_as_runs_and_as_they_were_sent(
    pages: list[tuple[int, int, int]], run: int, fill: int
) -> None:
    """Zero (or data) pages in order come out as one run; anything else (another kind of page,
    a gap, a page out of order, another block, a non-zero fill) ends it, and every page is
    still delivered once, with its bytes."""
    names = ["0000:00:01.0/mem-vmem0", "ram0"]
    w = Writer()
    w.start_ram([(n, 1024 * PAGE_SIZE) for n in names])
    taken = {(b, i) for b, i, _ in pages}
    ordered = [(1, 512 + i, fill) for i in range(run) if (1, 512 + i) not in taken]
    records = [(names[b], i * PAGE_SIZE, None if f == 0 else _page(f)) for b, i, f in pages]
    records += [(names[b], i * PAGE_SIZE, None if f == 0 else _page(f)) for b, i, f in ordered]
    w.part(records)
    w.device_state()
    sink = _CollectRuns()
    list(MigrationStream(io.BytesIO(bytes(w.out))).feed(sink))
    assert sink.pages == [r for r in parse(bytes(w.out)) if isinstance(r, Page)]
    if len(ordered) > 2:
        # The ordered tail comes as runs, each after one page delivered alone; a run ends
        # where the parser's buffer does (1 MiB: 255 data pages).
        size = 9 if fill == 0 else 8 + PAGE_SIZE
        assert len(sink.runs) <= len(pages) + 2 + len(ordered) * size // (1 << 20)
        assert sum(sink.runs) + len(sink.runs) >= len(ordered)
