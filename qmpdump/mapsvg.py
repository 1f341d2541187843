"""The memory map as a picture: :func:`render_svg` draws a :class:`~qmpdump.report.MapReport`.

``qmpdump map --svg FILE`` writes this. Top to bottom the picture holds a header (the VM, its
QEMU, the run state, the totals), a legend, then one horizontal *lane* per guest-physical RAM
piece in address order, with a break line naming each hole of non-RAM address space between
lanes.

Why lanes: guest-physical RAM is sparse (RAM below the PCI hole, RAM from 4 GiB, a virtio-mem
region somewhere up to a TiB), so one linear scale would shrink everything but the largest piece
to a sliver. Each lane has its own linear scale instead, printed in its title. Small neighbours
(pieces under 1 MiB less than 1 MiB apart: the PAM and ROM pieces below 1 MiB) share one lane in
which every piece gets at least :data:`MIN_PIECE_COLUMNS` columns and a label of its own.

Why columns: the populated set and a virtio-mem device's plugged set can each hold about a million
ranges, far more than there are pixels. Each lane is rasterised into :data:`COLUMNS` one-pixel
columns; for each column the fraction of its bytes that hold data (are plugged, are of unknown
population) is computed from prefix sums in O(log n), quantised, and runs of equal columns become
one ``<rect>``. The output is thus bounded by the number of lanes, not of ranges.

What a lane shows: a light tint of the backend type's colour (memfd, file, ram, anonymous) for
RAM, a bar of the dark shade rising from the bottom whose height is the share of the column's
bytes that hold data on the host, amber hatching (from the top) for bytes whose population is
unknown, and on virtio-mem lanes grey hatching for unplugged blocks with the tint showing only
where blocks are plugged. Every piece and every run carries a ``<title>`` tooltip with exact
numbers. Elements carry a ``class`` (``lane``, ``piece``, ``hole``, ``populated``, ``unknown``,
``plugged``, ``unplugged``) so tools and tests can find them.

Pure: builds the text from the report with the standard library only, no I/O. The SVG uses what
librsvg and browsers share (rect, line, path, text, pattern, title; no CSS, no scripts).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, groupby
from operator import add, attrgetter, le
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

from qmpdump.memmap.layout import BackendType
from qmpdump.memmap.ranges import RangeSet
from qmpdump.report import GpaRange, MapReport, RangeEntry, RegionEntry, VirtioMemEntry

__all__ = ["COLUMNS", "MIN_PIECE_COLUMNS", "render_svg"]

#: Pixel columns (one pixel each) that every lane is rasterised into.
COLUMNS = 1000
#: The fewest columns a RAM piece gets in a lane it shares with other pieces.
MIN_PIECE_COLUMNS = 8
# A hole between the pieces of a shared lane gets at least this many columns.
_MIN_HOLE_COLUMNS = 4
# Pieces smaller than this, and less than this apart, share a lane.
_SMALL = 1 << 20
# At most this many pieces share a lane: with the holes between them that is at most 47
# segments, so even then each gets COLUMNS // (2 * 47) >= MIN_PIECE_COLUMNS columns.
_MAX_SHARED = 24

# Geometry, in pixels.
_MARGIN = 24
_BAR_X = _MARGIN
_BAR_H = 30
_GUTTER = 128
_WIDTH = _MARGIN + COLUMNS + _GUTTER + _MARGIN
_TITLE_SIZE = 13
_TITLE_LINE = 18
_TICK_SIZE = 10.5
_TICK_LEN = 5
_TICK_ROW = 13
_LABEL_SIZE = 11
_LABEL_ROW = 15
_LANE_SPACE = 14
_BREAK_H = 26
_LABEL_PAD = 8

_SANS = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
_MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
# Advance widths in em, rounded up from DejaVu Sans (Verdana is within a few per cent): narrow
# and wide characters by class, 0.64 for the rest (digits are 0.636). Bold is about 10% wider.
# DejaVu Sans Mono is 0.602 em throughout.
_SANS_WIDTHS = {
    **dict.fromkeys(" .,:;'|!ijl\N{MIDDLE DOT}", 0.33),
    **dict.fromkeys("ftrI()[]-/", 0.42),
    **dict.fromkeys("cksvxyz_", 0.6),
    **dict.fromkeys("ABCDEFGHJKLNOPQRSTUVXYZ", 0.78),
    **dict.fromkeys("mwMW%", 1.0),
}
_SANS_EM = 0.64
_BOLD = 1.1
_MONO_EM = 0.61

_INK = "#222222"
_DIM = "#6b6b6b"
_RULE = "#c8c8c8"
_OUTLINE = "#4a4a4a"
_HOLE_FILL = "#f1f1f1"
_UNKNOWN_INK = "#c98a00"
_UNPLUGGED_INK = "#a6a6a6"
_SEP = " \N{MIDDLE DOT} "

# Quantisation: data bars take whole pixels of height; plugged tint takes this many opacity steps.
_DATA_H = _BAR_H - 2
_PLUG_LEVELS = 8


@dataclass(frozen=True, slots=True)
class _Colours:
    """The light (RAM) and dark (holds data) shade of one backend type."""

    tint: str
    ink: str


_COLOURS: dict[BackendType, _Colours] = {
    BackendType.MEMFD: _Colours("#cfe2f3", "#1f5f9e"),
    BackendType.FILE: _Colours("#d3ecd1", "#2e7d32"),
    BackendType.RAM: _Colours("#fde0c2", "#c2571a"),
    BackendType.ANONYMOUS: _Colours("#e3daf0", "#5e3c99"),
}


# -- numbers as text ---------------------------------------------------------------------------

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _human(size: float) -> str:
    """A byte count in binary units with three significant digits: ``780 KiB``, ``1.5 GiB``."""
    unit = 0
    value = float(size)
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if value == int(value):
        return f"{int(value)} {_UNITS[unit]}"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return f"{text} {_UNITS[unit]}"


def _pct(part: int, whole: int) -> str:
    """``part`` as a share of ``whole``; a non-zero share never shows as 0, a partial as 100."""
    if whole <= 0:
        return "n/a"
    share = 100 * part / whole
    if part <= 0:
        return "0%"
    if part >= whole:
        return "100%"
    if share < 0.1:
        return "<0.1%"
    if share > 99.9:
        return ">99.9%"
    return f"{share:.1f}".removesuffix(".0") + "%"


def _num(value: float) -> str:
    """A coordinate as short text."""
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def _text_width(text: str, size: float, em: float | None = None, *, bold: bool = False) -> float:
    """The estimated width of ``text``: monospaced at ``em`` per character, else DejaVu Sans."""
    if em is not None:
        return len(text) * size * em
    ems = sum(_SANS_WIDTHS.get(char, _SANS_EM) for char in text)
    return ems * size * (_BOLD if bold else 1.0)


# -- the sets, as prefix sums ------------------------------------------------------------------

_GPA = attrgetter("gpa")
_SIZE = attrgetter("size")


class _Cover:
    """A set of guest-physical ranges that answers "how many of its bytes lie below x" by bisection.

    Built once per set in C-level passes (``map``, ``accumulate``); each query is O(log n), so
    rasterising a lane costs O(COLUMNS log n) however many ranges the set holds.
    """

    __slots__ = ("_cum", "_ends", "_starts")

    def __init__(self, ranges: Sequence[GpaRange]) -> None:
        starts: list[int] = list(map(_GPA, ranges))
        sizes: list[int] = list(map(_SIZE, ranges))
        ends: list[int] = list(map(add, starts, sizes))
        # The report promises sorted, disjoint ranges; normalise anything else rather than
        # draw nonsense.
        if not all(map(le, ends, starts[1:])) or (sizes and min(sizes) <= 0):
            normal = RangeSet.from_ranges(zip(starts, sizes, strict=True))
            starts = [rng.start for rng in normal]
            sizes = [rng.size for rng in normal]
            ends = list(map(add, starts, sizes))
        self._starts = starts
        self._ends = ends
        self._cum: list[int] = list(accumulate(sizes, initial=0))

    def below(self, gpa: int) -> int:
        """The number of bytes of the set below ``gpa``."""
        index = bisect_right(self._starts, gpa) - 1
        if index < 0:
            return 0
        return self._cum[index] + min(gpa, self._ends[index]) - self._starts[index]

    def contains(self, gpa: int) -> bool:
        """Whether byte ``gpa`` is in the set."""
        index = bisect_right(self._starts, gpa) - 1
        return index >= 0 and gpa < self._ends[index]


@dataclass(frozen=True, slots=True)
class _Profile:
    """One set seen through a lane's columns: bytes per column, and each column's fraction."""

    below: list[int]  # bytes of the set below each column boundary
    fractions: list[float]

    @classmethod
    def of(cls, cover: _Cover, bounds: Sequence[int]) -> _Profile:
        below = [cover.below(gpa) for gpa in bounds]
        fractions = []
        for col in range(len(bounds) - 1):
            width = bounds[col + 1] - bounds[col]
            if width > 0:
                fractions.append((below[col + 1] - below[col]) / width)
            else:  # a piece narrower than its columns: each column shows one byte
                fractions.append(1.0 if cover.contains(bounds[col]) else 0.0)
        return cls(below, fractions)

    def bytes_in(self, first: int, stop: int) -> int:
        """Bytes of the set in columns ``[first, stop)``."""
        return self.below[stop] - self.below[first]


def _levels(fractions: Sequence[float], steps: int) -> list[int]:
    """Quantise fractions to ``0..steps``: only 0 maps to 0 and only 1 maps to ``steps``."""
    out = []
    for fraction in fractions:
        if fraction <= 0:
            out.append(0)
        elif fraction >= 1:
            out.append(steps)
        else:
            out.append(min(max(round(fraction * steps), 1), steps - 1))
    return out


def _runs(levels: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """``(first column, column count, level)`` for each run of equal non-zero levels."""
    col = 0
    for level, group in groupby(levels):
        count = sum(1 for _ in group)
        if level:
            yield col, count, level
        col += count


# -- lanes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Segment:
    """A stretch of a lane: one RAM piece, or a hole (``piece is None``) between two."""

    start: int
    end: int
    piece: RangeEntry | None
    first_col: int
    columns: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class _Lane:
    """One bar: its segments in address order, and the virtio-mem device it shows, if any."""

    segments: tuple[_Segment, ...]
    device: VirtioMemEntry | None

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def end(self) -> int:
        return self.segments[-1].end

    @property
    def pieces(self) -> list[RangeEntry]:
        return [seg.piece for seg in self.segments if seg.piece is not None]

    @property
    def shared(self) -> bool:
        return len(self.segments) > 1

    def bounds(self) -> list[int]:
        """The gpa of every column boundary (``COLUMNS + 1`` values)."""
        out = [self.start]
        for seg in self.segments:
            out.extend(
                seg.start + seg.size * col // seg.columns for col in range(1, seg.columns + 1)
            )
        return out

    def x_of(self, gpa: int) -> float:
        """The x coordinate of an address inside the lane."""
        for seg in self.segments:
            if gpa <= seg.end:
                return _BAR_X + seg.first_col + seg.columns * (gpa - seg.start) / seg.size
        return float(_BAR_X + COLUMNS)


def _allocate(sizes: Sequence[int], minimums: Sequence[int], total: int) -> list[int]:
    """Share ``total`` columns in proportion to ``sizes``, giving each at least its minimum."""
    fixed: set[int] = set()
    while True:
        free = total - sum(minimums[i] for i in fixed)
        rest = sum(size for i, size in enumerate(sizes) if i not in fixed)
        short = {
            i for i, size in enumerate(sizes) if i not in fixed and size * free < minimums[i] * rest
        }
        if not short:
            break
        fixed |= short
    shares = [
        float(minimums[i]) if i in fixed else sizes[i] * free / rest for i in range(len(sizes))
    ]
    columns = [int(share) for share in shares]
    # Largest remainders take the columns the flooring left over.
    order = sorted(range(len(sizes)), key=lambda i: columns[i] - shares[i])
    for i in order[: total - sum(columns)]:
        columns[i] += 1
    return columns


def _make_lane(pieces: Sequence[RangeEntry], device: VirtioMemEntry | None) -> _Lane:
    spans: list[tuple[int, int, RangeEntry | None]] = []
    for piece in pieces:
        if spans and piece.gpa > spans[-1][1]:
            spans.append((spans[-1][1], piece.gpa, None))
        spans.append((piece.gpa, piece.gpa + piece.size, piece))
    # Keep minimums affordable even for a lane of many pieces.
    floor = max(COLUMNS // (2 * len(spans)), 1)
    minimums = [
        min(MIN_PIECE_COLUMNS if piece is not None else _MIN_HOLE_COLUMNS, floor)
        for _, _, piece in spans
    ]
    columns = _allocate([end - start for start, end, _ in spans], minimums, COLUMNS)
    firsts = [0, *accumulate(columns)]
    segments = tuple(
        _Segment(start, end, piece, first, count)
        for (start, end, piece), first, count in zip(spans, firsts, columns, strict=False)
    )
    return _Lane(segments, device)


def _device_of(piece: RangeEntry, devices: Sequence[VirtioMemEntry]) -> VirtioMemEntry | None:
    for dev in devices:
        if dev.memaddr == piece.gpa and (dev.max_size == piece.size or dev.memdev == piece.region):
            return dev
    return None


def _lanes(report: MapReport) -> list[_Lane]:
    """Group the pieces into lanes: small close neighbours together, everything else alone."""
    lanes: list[_Lane] = []
    shared: list[RangeEntry] = []
    for piece in sorted(report.ranges, key=_GPA):
        if piece.size <= 0:
            continue  # holds no byte, so there is nothing to draw
        device = _device_of(piece, report.virtio_mem)
        small = device is None and piece.size < _SMALL
        if (
            small
            and shared
            and piece.gpa - (shared[-1].gpa + shared[-1].size) < _SMALL
            and len(shared) < _MAX_SHARED
        ):
            shared.append(piece)
            continue
        if shared:
            lanes.append(_make_lane(shared, None))
            shared = []
        if small:
            shared = [piece]
        else:
            lanes.append(_make_lane([piece], device))
    if shared:
        lanes.append(_make_lane(shared, None))
    return lanes


# -- the SVG writer ----------------------------------------------------------------------------

_Attr = str | int | float


def _attrs(attrs: dict[str, _Attr]) -> str:
    out = []
    for key, value in attrs.items():
        name = key.rstrip("_").replace("_", "-")
        text = _num(value) if isinstance(value, float | int) else value
        out.append(f" {name}={quoteattr(text)}")
    return "".join(out)


class _Svg:
    """Accumulates SVG elements as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def el(self, tag: str, *, title: str | None = None, **attrs: _Attr) -> None:
        """An element without text content, with an optional tooltip."""
        if title is None:
            self.parts.append(f"<{tag}{_attrs(attrs)}/>")
        else:
            self.parts.append(f"<{tag}{_attrs(attrs)}><title>{escape(title)}</title></{tag}>")

    def text(self, x: float, y: float, content: str, **attrs: _Attr) -> None:
        self.parts.append(f"<text{_attrs({'x': x, 'y': y, **attrs})}>{escape(content)}</text>")

    def rich(self, x: float, y: float, spans: Sequence[_Span], **attrs: _Attr) -> None:
        """A line of text whose spans have their own weight and colour."""
        inner = "".join(_tspan(span) for span in spans)
        self.parts.append(f"<text{_attrs({'x': x, 'y': y, **attrs})}>{inner}</text>")

    def open(self, tag: str, **attrs: _Attr) -> None:
        self.parts.append(f"<{tag}{_attrs(attrs)}>")

    def close(self, tag: str) -> None:
        self.parts.append(f"</{tag}>")


@dataclass(frozen=True, slots=True)
class _Span:
    """A run of text in one style."""

    text: str
    style: Literal["plain", "bold", "dim"] = "plain"

    def attrs(self) -> dict[str, _Attr]:
        if self.style == "bold":
            return {"font_weight": "bold"}
        if self.style == "dim":
            return {"fill": _DIM}
        return {}


def _tspan(span: _Span) -> str:
    """A span as markup; spaces at its ends stay outside the tspan, where renderers keep them."""
    attrs = span.attrs()
    if not attrs:
        return escape(span.text)
    core = span.text.strip(" ")
    if not core:
        return escape(span.text)
    lead = span.text[: len(span.text) - len(span.text.lstrip(" "))]
    trail = span.text[len(span.text.rstrip(" ")) :]
    return f"{escape(lead)}<tspan{_attrs(attrs)}>{escape(core)}</tspan>{escape(trail)}"


def _wrap(
    items: Sequence[Sequence[_Span]], width: float, size: float, sep: str = _SEP
) -> list[list[_Span]]:
    """Lay out items (each a few spans) on lines no wider than ``width``, ``sep`` between."""
    lines: list[list[_Span]] = [[]]
    used = 0.0
    sep_w = _text_width(sep, size)
    for item in items:
        item_w = sum(_text_width(span.text, size, bold=span.style == "bold") for span in item)
        if lines[-1] and used + sep_w + item_w > width:
            lines.append([])
            used = 0.0
        if lines[-1]:
            lines[-1].append(_Span(sep, "dim"))
            used += sep_w
        lines[-1].extend(item)
        used += item_w
    return lines


# -- label placement ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Label:
    """Text to place near ``x``; ``anchor`` says which of its points sits at ``x``."""

    text: str
    x: float
    width: float
    anchor: Literal["start", "middle", "end"] = "middle"

    @property
    def left(self) -> float:
        if self.anchor == "start":
            return self.x
        if self.anchor == "end":
            return self.x - self.width
        return self.x - self.width / 2


def _centred(text: str, x: float, size: float, lo: float, hi: float) -> _Label:
    """A label centred at ``x`` but kept inside ``[lo, hi]``."""
    width = _text_width(text, size, _MONO_EM)
    left = min(max(x - width / 2, lo), hi - width)
    return _Label(text, left, width, "start")


def _place(
    labels: Sequence[_Label], max_rows: int, leaders: Sequence[float] | None = None
) -> list[int | None]:
    """Give each label (in priority order) the lowest row where it overlaps nothing, or None.

    With ``leaders``, label ``i`` also hangs on a vertical line at ``leaders[i]`` that runs
    from its row down to row 0: no label may cover a line passing through its row.
    """
    rows: list[list[tuple[float, float]]] = []
    lines: list[tuple[float, int]] = []  # (x, row the line starts from)
    placed: list[int | None] = []
    for index, label in enumerate(labels):
        left, right = label.left - _LABEL_PAD / 2, label.left + label.width + _LABEL_PAD / 2
        line_x = leaders[index] if leaders is not None else None
        chosen = None
        for row in range(max_rows):
            if row < len(rows) and any(a < right and left < b for a, b in rows[row]):
                continue
            if any(x_ > left and x_ < right and row < top for x_, top in lines):
                continue
            if line_x is not None and any(a < line_x < b for below in rows[:row] for a, b in below):
                continue
            chosen = row
            break
        placed.append(chosen)
        if chosen is None:
            continue
        while len(rows) <= chosen:
            rows.append([])
        rows[chosen].append((left, right))
        if line_x is not None:
            lines.append((line_x, chosen))
    return placed


# -- drawing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    """What every lane draws from."""

    populated: _Cover
    unknown: _Cover
    regions: dict[str, RegionEntry]


def _backend_text(piece: RangeEntry) -> str:
    kind = str(piece.backend_type)
    if piece.backend is None:
        return f"{kind}, no backend object"
    return f"backend {piece.backend} ({kind})"


def _range_text(start: int, end: int) -> str:
    return f"[{start:#x}, {end:#x})"


def _population_text(piece: RangeEntry, region: RegionEntry | None) -> str:
    if piece.populated_size is None:
        note = f": {region.note}" if region is not None and region.note else ""
        return f"population unknown{note}"
    how = ""
    if region is not None:
        how = f" via {region.population_source}" + ("" if region.exact else " (a superset)")
    return (
        f"holds data {_human(piece.populated_size)} ({_pct(piece.populated_size, piece.size)}){how}"
    )


def _piece_tooltip(piece: RangeEntry, region: RegionEntry | None) -> str:
    end = piece.gpa + piece.size
    lines = [
        f"{piece.region}{' (read-only)' if piece.readonly else ''}: {_backend_text(piece)}",
        f"gpa {piece.gpa:#x}..{end - 1:#x} = {_range_text(piece.gpa, end)}",
        f"size {piece.size:#x} = {piece.size:,} bytes ({_human(piece.size)})",
        f"region offset {piece.region_offset:#x}"
        + (f", file offset {piece.file_offset:#x}" if piece.file_offset is not None else ""),
    ]
    if piece.populated_size is not None:
        lines.append(
            f"holds data: {piece.populated_size:,} bytes ({_pct(piece.populated_size, piece.size)})"
        )
    if region is not None:
        exact = "exact" if region.exact else "not exact"
        lines.append(f"population source: {region.population_source} ({exact})")
        if region.mem_path:
            lines.append(f"mem-path: {region.mem_path}")
        if region.note:
            lines.append(f"note: {region.note}")
    return "\n".join(lines)


def _device_tooltip(dev: VirtioMemEntry) -> str:
    return "\n".join(
        [
            f"virtio-mem {dev.id} (memdev {dev.memdev}, node {dev.node})",
            f"region {_range_text(dev.memaddr, dev.memaddr + dev.max_size)}, "
            f"max size {dev.max_size:#x} ({_human(dev.max_size)})",
            f"block size {dev.block_size:#x} ({_human(dev.block_size)})",
            f"plugged {dev.size:,} bytes ({_human(dev.size)}), "
            f"requested {dev.requested_size:,} bytes ({_human(dev.requested_size)})",
            f"plugged ranges: {len(dev.plugged):,}"
            + ("" if dev.plugged_exact else " (inferred from the blocks that hold data)"),
            f"holds data: {dev.populated_size:,} bytes in {len(dev.blocks_with_data):,} ranges "
            "of whole blocks",
        ]
    )


def _lane_titles(lane: _Lane, facts: _Facts) -> list[list[_Span]]:
    """The lines above a lane's bar."""
    scale = _Span(f"1 px = {_human(max((lane.end - lane.start) // COLUMNS, 1))}", "dim")
    if lane.shared:
        pieces = lane.pieces
        names = list(dict.fromkeys(piece.region for piece in pieces))
        ram = sum(piece.size for piece in pieces)
        known = [piece.populated_size for piece in pieces if piece.populated_size is not None]
        where = "below 1 MiB" if lane.end <= _SMALL else "small pieces"
        items: list[list[_Span]] = [
            [_Span(where, "bold")],
            [_Span(f"{len(pieces)} pieces of {', '.join(names)}")],
            [_Span(_range_text(lane.start, lane.end))],
            [_Span(f"RAM {_human(ram)}")],
        ]
        if known:
            held = sum(known)
            items.append([_Span(f"holds data {_human(held)} ({_pct(held, ram)})")])
        if len(known) < len(pieces):
            items.append([_Span("population partly unknown")])
        items.append([scale])
        return _wrap(items, COLUMNS + _GUTTER, _TITLE_SIZE)
    piece = lane.pieces[0]
    region = facts.regions.get(piece.region)
    items = [
        [_Span(piece.region, "bold")],
        [_Span(_backend_text(piece))],
        *([[_Span("read-only")]] if piece.readonly else []),
        [_Span(_range_text(piece.gpa, piece.gpa + piece.size))],
        [_Span(_human(piece.size), "bold")],
        *([[_Span(f"region offset {piece.region_offset:#x}")]] if piece.region_offset else []),
        [_Span(_population_text(piece, region))],
        [scale],
    ]
    lines = _wrap(items, COLUMNS + _GUTTER, _TITLE_SIZE)
    dev = lane.device
    if dev is not None:
        dev_items = [
            [_Span(f"virtio-mem {dev.id}", "bold")],
            [_Span(f"block {_human(dev.block_size)}")],
            [_Span(f"plugged {_human(dev.size)} of {_human(dev.max_size)}")],
            [_Span(f"{_pct(dev.size, dev.max_size)} plugged")],
            [_Span(f"requested {_human(dev.requested_size)}")],
            [_Span(f"node {dev.node}")],
            [_Span(f"{len(dev.blocks_with_data):,} block ranges hold data")],
        ]
        if not dev.plugged_exact:
            dev_items.append([_Span("plugged blocks inferred from data", "dim")])
        lines.extend(_wrap(dev_items, COLUMNS + _GUTTER, _TITLE_SIZE))
    return lines


def _segment_labels(lane: _Lane) -> tuple[list[_Label], list[float], list[bool]]:
    """Labels of the pieces of a shared lane, in placement order, with leader x and priority."""
    lo, hi = float(_BAR_X), float(_BAR_X + COLUMNS)
    labels: list[tuple[bool, _Label, float]] = []
    seen: set[str] = set()
    for seg in lane.segments:
        piece = seg.piece
        if piece is None:
            continue
        name = piece.region + (" ROM" if piece.readonly else "")
        if piece.backend is not None and piece.backend != piece.region:
            name += f" [{piece.backend}]"
        text = f"{name} {_human(piece.size)}"
        centre = _BAR_X + seg.first_col + seg.columns / 2
        must = piece.region not in seen
        seen.add(piece.region)
        labels.append((must, _centred(text, centre, _LABEL_SIZE, lo, hi), centre))
    labels.sort(key=lambda item: not item[0])  # stable: the first of each region name first
    return [lab for _, lab, _ in labels], [x for _, _, x in labels], [m for m, _, _ in labels]


def _tick_labels(lane: _Lane) -> list[tuple[float, _Label]]:
    """Tick marks (x) with their hex labels, most important first."""
    lo, hi = float(_BAR_X), float(_BAR_X + COLUMNS)
    first = f"{lane.start:#x}"
    last = f"{lane.end:#x}"
    ticks = [
        (lo, _Label(first, lo, _text_width(first, _TICK_SIZE, _MONO_EM), "start")),
        (hi, _Label(last, hi, _text_width(last, _TICK_SIZE, _MONO_EM), "end")),
    ]
    if lane.shared:
        inner = [seg.start for seg in lane.segments[1:]]
    else:
        size = lane.end - lane.start
        label_w = _text_width(last, _TICK_SIZE, _MONO_EM) + 3 * _LABEL_PAD
        step = 1
        while step * 8 < size or step * COLUMNS < label_w * size:
            step *= 2
        inner = list(range((lane.start // step + 1) * step, lane.end, step))
    for gpa in inner:
        x = lane.x_of(gpa)
        ticks.append((x, _centred(f"{gpa:#x}", x, _TICK_SIZE, lo, hi)))
    return ticks


def _draw_segment_labels(svg: _Svg, lane: _Lane, y: float) -> float:
    """Draw a shared lane's piece labels in rows above ``y`` + their height; return bar y."""
    labels, leaders, must = _segment_labels(lane)
    rows = _place(labels, max_rows=len(labels), leaders=leaders)
    # Optional labels may not push the lane taller than three rows.
    rows = [
        row if m or (row is not None and row < 3) else None
        for row, m in zip(rows, must, strict=True)
    ]
    count = max((row for row in rows if row is not None), default=-1) + 1
    bar_y = y + count * _LABEL_ROW + 4
    for label, leader, row in zip(labels, leaders, rows, strict=True):
        if row is None:
            continue
        base = bar_y - 4 - row * _LABEL_ROW - 4
        svg.text(label.left, base, label.text, font_family=_MONO, font_size=_LABEL_SIZE)
        if row:
            svg.el(
                "line", x1=leader, y1=base + 3, x2=leader, y2=bar_y, stroke=_DIM, stroke_width=0.6
            )
    return bar_y


def _draw_ticks(svg: _Svg, lane: _Lane, y: float) -> float:
    """Draw the axis under a lane's bar starting at ``y``; return the y below it."""
    ticks = _tick_labels(lane)
    rows = _place([label for _, label in ticks], max_rows=3 if lane.shared else 1)
    for x, _ in ticks:
        svg.el("line", x1=x, y1=y, x2=x, y2=y + _TICK_LEN, stroke=_OUTLINE, stroke_width=0.8)
    for (_, label), row in zip(ticks, rows, strict=True):
        if row is not None:
            svg.text(
                label.left,
                y + _TICK_LEN + (row + 1) * _TICK_ROW - 3,
                label.text,
                font_family=_MONO,
                font_size=_TICK_SIZE,
                fill=_DIM,
            )
    used = max((row for row in rows if row is not None), default=0) + 1
    return y + _TICK_LEN + used * _TICK_ROW


def _draw_plugged(
    svg: _Svg, lane: _Lane, dev: VirtioMemEntry, region: RegionEntry | None, y: float
) -> None:
    """A virtio-mem lane's base: unplugged hatching, then the tint where blocks are plugged."""
    piece = lane.pieces[0]
    colours = _COLOURS[piece.backend_type]
    svg.el(
        "rect",
        class_="unplugged",
        x=_BAR_X,
        y=y,
        width=COLUMNS,
        height=_BAR_H,
        fill="url(#unplugged)",
        title=_piece_tooltip(piece, region) + "\n" + _device_tooltip(dev),
    )
    bounds = lane.bounds()
    plugged = _Profile.of(_Cover(dev.plugged), bounds)
    for col, count, level in _runs(_levels(plugged.fractions, _PLUG_LEVELS)):
        held = plugged.bytes_in(col, col + count)
        span = bounds[col + count] - bounds[col]
        svg.el(
            "rect",
            class_="plugged",
            x=_BAR_X + col,
            y=y,
            width=count,
            height=_BAR_H,
            fill=colours.tint,
            fill_opacity=level / _PLUG_LEVELS,
            title=f"{_range_text(bounds[col], bounds[col + count])}: plugged "
            f"{_human(held)} ({_pct(held, span)})",
        )


def _draw_bar(svg: _Svg, lane: _Lane, facts: _Facts, y: float) -> None:
    """The bar: tint per piece (or plugged blocks), data bars, unknown hatching, outlines."""
    bounds = lane.bounds()
    dev = lane.device
    if dev is not None:
        _draw_plugged(svg, lane, dev, facts.regions.get(lane.pieces[0].region), y)
    for seg in lane.segments:
        x = _BAR_X + seg.first_col
        if seg.piece is None:
            svg.el(
                "rect",
                class_="hole",
                x=x,
                y=y,
                width=seg.columns,
                height=_BAR_H,
                fill=_HOLE_FILL,
                title=f"not RAM: {_range_text(seg.start, seg.end)}, {_human(seg.size)}",
            )
        elif dev is None:
            svg.el(
                "rect",
                class_="piece",
                data_region=seg.piece.region,
                x=x,
                y=y,
                width=seg.columns,
                height=_BAR_H,
                fill=_COLOURS[seg.piece.backend_type].tint,
                title=_piece_tooltip(seg.piece, facts.regions.get(seg.piece.region)),
            )
    # Data and unknown runs take the colour of the piece they start in.
    owners = [seg for seg in lane.segments for _ in range(seg.columns)]
    data = _Profile.of(facts.populated, bounds)
    for col, count, level in _runs(_levels(data.fractions, _DATA_H)):
        owner = owners[col].piece
        ink = _COLOURS[owner.backend_type].ink if owner is not None else _INK
        held = data.bytes_in(col, col + count)
        span = bounds[col + count] - bounds[col]
        svg.el(
            "rect",
            class_="populated",
            x=_BAR_X + col,
            y=y + _BAR_H - 1 - level,
            width=count,
            height=level,
            fill=ink,
            title=f"{_range_text(bounds[col], bounds[col + count])}: holds data "
            f"{_human(held)} of {_human(span)} ({_pct(held, span)})",
        )
    unknown = _Profile.of(facts.unknown, bounds)
    for col, count, level in _runs(_levels(unknown.fractions, _DATA_H)):
        svg.el(
            "rect",
            class_="unknown",
            x=_BAR_X + col,
            y=y + 1,
            width=count,
            height=level,
            fill="url(#unknown)",
            title=f"{_range_text(bounds[col], bounds[col + count])}: population unknown",
        )
    for seg in lane.segments:
        if seg.piece is not None:
            svg.el(
                "rect",
                x=_BAR_X + seg.first_col,
                y=y,
                width=seg.columns,
                height=_BAR_H,
                fill="none",
                stroke=_OUTLINE,
                stroke_width=0.8,
            )
        elif seg.columns > 60:
            svg.text(
                _BAR_X + seg.first_col + seg.columns / 2,
                y + _BAR_H / 2 + 4,
                "not RAM",
                text_anchor="middle",
                font_size=10,
                fill=_DIM,
                font_style="italic",
            )


def _draw_gutter(svg: _Svg, lane: _Lane, y: float) -> None:
    """The lane's share of bytes that hold data, in large type right of the bar."""
    pieces = lane.pieces
    x = _BAR_X + COLUMNS + 14
    known = [p for p in pieces if p.populated_size is not None]
    first = pieces[0]
    if known:
        held = sum(p.populated_size or 0 for p in known)
        ram = sum(p.size for p in known)
        big, ink = _pct(held, ram), _COLOURS[first.backend_type].ink
    else:
        big, ink = "?", _UNKNOWN_INK
    svg.text(x, y + 15, big, font_size=17, font_weight="bold", fill=ink)
    svg.text(x, y + 28, "holds data" if known else "unknown", font_size=10, fill=_DIM)
    if lane.device is not None:
        dev = lane.device
        svg.text(
            x,
            y + 43,
            f"{_pct(dev.size, dev.max_size)} plugged",
            font_size=10,
            fill=_DIM,
        )


def _draw_lane(svg: _Svg, lane: _Lane, facts: _Facts, y: float) -> float:
    """Draw one lane whose top is at ``y``; return the y below it."""
    svg.open(
        "g",
        class_="lane",
        data_start=f"{lane.start:#x}",
        data_end=f"{lane.end:#x}",
    )
    for line in _lane_titles(lane, facts):
        y += _TITLE_LINE
        svg.rich(_BAR_X, y - 4, line, font_size=_TITLE_SIZE, fill=_INK)
    y += 4
    if lane.shared:
        y = _draw_segment_labels(svg, lane, y)
    _draw_bar(svg, lane, facts, y)
    _draw_gutter(svg, lane, y)
    y = _draw_ticks(svg, lane, y + _BAR_H)
    svg.close("g")
    return y + _LANE_SPACE


def _draw_break(svg: _Svg, start: int, end: int, y: float) -> float:
    """The line between two lanes that names the address space between them."""
    mid = y + _BREAK_H / 2
    text = f"not RAM{_SEP}{_range_text(start, end)}{_SEP}{_human(end - start)}"
    width = _text_width(text, 11)
    centre = _BAR_X + COLUMNS / 2
    for x1, x2 in ((_BAR_X, centre - width / 2 - 16), (centre + width / 2 + 16, _BAR_X + COLUMNS)):
        svg.el("line", x1=x1, y1=mid, x2=x2, y2=mid, stroke=_RULE, stroke_dasharray="4 4")
    # A break mark (two slanted strokes) where the scale jumps.
    for dx in (-6, 0):
        bx = centre - width / 2 - 8 + dx
        svg.el("line", x1=bx, y1=mid + 6, x2=bx + 6, y2=mid - 6, stroke=_DIM, stroke_width=1.2)
    svg.text(
        centre, mid + 4, text, text_anchor="middle", font_size=11, fill=_DIM, font_style="italic"
    )
    return y + _BREAK_H


# -- header and legend -------------------------------------------------------------------------


def _header_lines(report: MapReport) -> list[list[_Span]]:
    vm = report.vm
    totals = report.totals
    lines = _wrap(
        [
            [_Span(vm.address)],
            *([[_Span(f"pid {vm.pid}")]] if vm.pid is not None else []),
            [
                _Span(
                    f"QEMU {vm.qemu_version}" + (f" ({vm.qemu_package})" if vm.qemu_package else "")
                )
            ],
            [_Span("run state "), _Span(vm.run_state, "bold")],
        ],
        _WIDTH - 2 * _MARGIN,
        _TITLE_SIZE,
    )
    ram = totals.ram_size
    items: list[list[_Span]] = [
        [_Span("RAM "), _Span(_human(ram), "bold")],
        [
            _Span("holds data "),
            _Span(_human(totals.populated_size), "bold"),
            _Span(f" ({_pct(totals.populated_size, ram)} of RAM)"),
        ],
        [
            _Span(f"{totals.populated_extents:,}", "bold"),
            _Span(" populated extents"),
        ],
    ]
    if totals.unknown_size:
        items.append(
            [
                _Span("population unknown "),
                _Span(_human(totals.unknown_size), "bold"),
                _Span(f" ({_pct(totals.unknown_size, ram)})"),
            ]
        )
    if totals.virtio_mem_max_size:
        items.append(
            [
                _Span("virtio-mem plugged "),
                _Span(_human(totals.virtio_mem_plugged_size), "bold"),
                _Span(
                    f" of {_human(totals.virtio_mem_max_size)} "
                    f"({_pct(totals.virtio_mem_plugged_size, totals.virtio_mem_max_size)}), "
                    f"{_human(totals.virtio_mem_populated_size)} hold data"
                ),
            ]
        )
    lines.extend(_wrap(items, _WIDTH - 2 * _MARGIN, _TITLE_SIZE))
    return lines


def _defs(svg: _Svg) -> None:
    svg.parts.append(
        "<defs>"
        '<pattern id="unknown" width="7" height="7" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)">'
        f'<rect width="7" height="7" fill="#fff4d6" fill-opacity="0.55"/>'
        f'<line x1="0" y1="0" x2="0" y2="7" stroke="{_UNKNOWN_INK}" stroke-width="3"/>'
        "</pattern>"
        '<pattern id="unplugged" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(-45)">'
        '<rect width="6" height="6" fill="#ffffff"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{_UNPLUGGED_INK}" stroke-width="1.5"/>'
        "</pattern>"
        "</defs>"
    )


def _draw_legend(svg: _Svg, report: MapReport, lanes: Sequence[_Lane], y: float) -> float:
    """Swatches for what the colours mean; returns the y below the legend."""
    present = list(dict.fromkeys(piece.backend_type for piece in report.ranges))
    x = float(_MARGIN)
    sw, sh = 28, 13
    for kind in present or list(BackendType):
        colours = _COLOURS[kind]
        svg.el(
            "rect",
            x=x,
            y=y,
            width=sw,
            height=sh,
            fill=colours.tint,
            stroke=_OUTLINE,
            stroke_width=0.6,
        )
        svg.el("rect", x=x + sw / 2, y=y + 0.5, width=sw / 2 - 0.5, height=sh - 1, fill=colours.ink)
        svg.text(x + sw + 6, y + sh - 2, str(kind), font_size=12, fill=_INK)
        x += sw + 12 + _text_width(str(kind), 12) + 14
    others = []
    if report.unknown:
        others.append(("url(#unknown)", "population unknown"))
    if report.virtio_mem:
        others.append(("url(#unplugged)", "virtio-mem: not plugged"))
    if any(seg.piece is None for lane in lanes for seg in lane.segments):
        others.append((_HOLE_FILL, "not RAM"))
    for fill, text in others:
        svg.el("rect", x=x, y=y, width=sw, height=sh, fill=fill, stroke=_OUTLINE, stroke_width=0.6)
        svg.text(x + sw + 6, y + sh - 2, text, font_size=12, fill=_INK)
        x += sw + 12 + _text_width(text, 12) + 14
    note = (
        "Each lane is one RAM piece (small neighbours share one) on its own linear scale. "
        "Light: RAM (on a virtio-mem lane: plugged blocks). Dark: holds data on the host; its "
        "height is the share of the pixel column's bytes that do. Hover for exact numbers."
    )
    lines = _wrap([[_Span(word)] for word in note.split()], _WIDTH - 2 * _MARGIN, 11.5, " ")
    y += sh + 4
    for line in lines:
        y += 15
        svg.text(_MARGIN, y, "".join(span.text for span in line), font_size=11.5, fill=_DIM)
    return y + 10


# -- entry point -------------------------------------------------------------------------------


def render_svg(report: MapReport) -> str:
    """Return the memory map of ``report`` as a standalone SVG document (pure; no I/O).

    The picture is :data:`COLUMNS` pixels of bar wide plus margins, and as tall as its lanes
    need. Its size depends on the number of RAM pieces, not on the number of populated or
    plugged ranges.
    """
    facts = _Facts(
        populated=_Cover(report.populated),
        unknown=_Cover(report.unknown),
        regions={region.region: region for region in report.regions},
    )
    body = _Svg()
    _defs(body)
    name = report.vm.name or "unnamed VM"
    body.text(
        _MARGIN, 34, f"Guest-physical memory of {name}", font_size=20, font_weight="bold", fill=_INK
    )
    y = 38.0
    for line in _header_lines(report):
        y += _TITLE_LINE + 1
        body.rich(_MARGIN, y, line, font_size=_TITLE_SIZE, fill=_INK)
    lanes = _lanes(report)
    y = _draw_legend(body, report, lanes, y + 14)
    body.el("line", x1=_MARGIN, y1=y, x2=_WIDTH - _MARGIN, y2=y, stroke=_RULE)
    y += 6
    if not lanes:
        y += 30
        body.text(_MARGIN, y, "The report lists no RAM.", font_size=_TITLE_SIZE, fill=_DIM)
    previous: _Lane | None = None
    for lane in lanes:
        if previous is not None and lane.start > previous.end:
            y = _draw_break(body, previous.end, lane.start, y)
        y = _draw_lane(body, lane, facts, y)
        previous = lane
    height = int(y + _MARGIN)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family={quoteattr(_SANS)}>'
        f'<rect width="100%" height="100%" fill="#ffffff"/>'
    )
    return "\n".join([head, *body.parts, "</svg>\n"])
