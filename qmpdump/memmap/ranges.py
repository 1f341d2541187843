"""Byte ranges and normalised sets of byte ranges: the algebra under every address space here.

A :class:`Range` is one half-open span ``[start, start + size)`` of bytes, the way QEMU describes
memory regions and RAM blocks (an address plus a size, see ``include/exec/memory.h``), rather than
the inclusive ``[lob, upb]`` of QEMU's ``include/qemu/range.h``. A :class:`RangeSet` is an
immutable set of bytes kept as sorted, disjoint, non-adjacent ranges.

The same two types serve guest-physical addresses (gpa) and backing-file offsets; callers say which
space a value lives in through their own names. Everything here is pure: no I/O, no clocks, no
imports from the rest of qmpdump.

A populated set can hold about a million ranges (a large virtio-mem device whose backing file is
sparse), so :class:`RangeSet` keeps two parallel ``array('Q')`` columns (starts and ends) instead
of a list of :class:`Range` objects, and builds every result from C-level primitives (``sorted``,
``map``, ``itertools.compress``, ``bisect``) so that no operation runs a Python-level loop per range
on the hot paths. Binary operations are linear merges; lookups and :meth:`RangeSet.clip` bisect.
Values must fit in 64 bits, which every guest-physical address and file offset does.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, islice
from operator import add, lt, neg, sub
from typing import Any, NoReturn

__all__ = ["Range", "RangeSet"]

# Unsigned 64-bit columns: 8 bytes a value instead of the ~40 a list slot plus an int object
# costs, which is what keeps a million-range set in a few MiB.
_TYPECODE = "Q"

# How many ranges repr() shows before it summarises; a populated set can hold a million.
_REPR_RANGES = 3


@dataclass(frozen=True, slots=True)
class Range:
    """One half-open span of bytes, ``[start, start + size)``, in some address space.

    ``start`` is the first byte (``>= 0``) and ``size`` the number of bytes (``> 0``): an empty
    range is never a value, so code that could produce one returns ``None`` or an empty
    :class:`RangeSet` instead.
    """

    start: int
    size: int

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"a range must start at or above 0, not at {self.start:#x}")
        if self.size <= 0:
            raise ValueError(
                f"a range must hold at least one byte; the one at {self.start:#x} "
                f"has size {self.size:#x}"
            )

    @classmethod
    def from_bounds(cls, start: int, end: int) -> Range:
        """Return the range ``[start, end)``; ``end`` is exclusive and must exceed ``start``."""
        return cls(start, end - start)

    @property
    def end(self) -> int:
        """The first byte after the range (exclusive end)."""
        return self.start + self.size

    def contains(self, addr: int) -> bool:
        """Return whether byte ``addr`` lies inside the range."""
        return self.start <= addr < self.start + self.size

    def overlaps(self, other: Range) -> bool:
        """Return whether the two ranges share at least one byte (touching is not overlapping)."""
        return self.start < other.start + other.size and other.start < self.start + self.size

    def intersection(self, other: Range) -> Range | None:
        """Return the bytes both ranges hold, or ``None`` if they share none."""
        start = max(self.start, other.start)
        end = min(self.start + self.size, other.start + other.size)
        return Range(start, end - start) if start < end else None

    def shift(self, delta: int) -> Range:
        """Return the range moved by ``delta`` bytes (e.g. from file offsets to gpa).

        Raises ``ValueError`` if the result would start below 0.
        """
        if self.start + delta < 0:
            raise ValueError(f"shifting {self} by {delta:#x} would move it below address 0")
        return Range(self.start + delta, self.size)

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.start + self.size:#x})"


def _pack(values: Iterable[int]) -> array[int]:
    """Store ``values`` in a 64-bit column, turning an overflow into a ``ValueError``."""
    try:
        return array(_TYPECODE, values)
    except OverflowError as err:
        raise ValueError("a range set can only hold addresses below 0x10000000000000000") from err


def _merge(
    starts: Sequence[int], ends: Sequence[int], max_gap: int = 0
) -> tuple[list[int], list[int]]:
    """Merge ranges given as separately sorted starts and ends; join gaps of ``<= max_gap`` bytes.

    The ranges may overlap, touch or nest, and their starts and ends need not be paired: sort
    each column on its own. Returns the columns of the normalised union.
    """
    if not starts:
        return [], []
    # Why sorting the columns independently is enough: at any byte x the number of ranges
    # covering it is #(starts <= x) - #(ends <= x). With both columns sorted, that count drops
    # to zero right after the i-th smallest end exactly when ends[i] < starts[i + 1] (the
    # (i+1)-th start is still ahead while i+1 ends are behind); otherwise the ranges chain on.
    # So the union breaks after index i iff ends[i] + max_gap < starts[i + 1]. Equality (a
    # touching neighbour, or a gap of exactly max_gap) merges. Computing the break flags with
    # map() and selecting with compress() keeps the whole pass in C.
    limits: Iterable[int] = map(max_gap.__add__, ends) if max_gap else ends
    breaks = list(map(lt, limits, islice(starts, 1, None)))
    merged_starts = [starts[0], *compress(islice(starts, 1, None), breaks)]
    merged_ends = [*compress(ends, breaks), ends[-1]]
    return merged_starts, merged_ends


def _complement(
    starts: Sequence[int], ends: Sequence[int], lo: int, hi: int
) -> tuple[list[int], list[int]]:
    """Return the columns of ``[lo, hi)`` minus the given normalised ranges.

    Every given range must overlap ``[lo, hi)``; the first may begin before ``lo`` and the last
    may end after ``hi``. With no ranges the result is ``[lo, hi)`` itself.
    """
    # The holes between normalised ranges are never empty (neighbours are not adjacent), so
    # only the hole before the first range and the one after the last can be empty.
    hole_starts = [lo, *ends]
    hole_ends = [*starts, hi]
    if hole_ends[0] <= lo:
        del hole_starts[0], hole_ends[0]
    if hole_starts and hole_starts[-1] >= hi:
        del hole_starts[-1], hole_ends[-1]
    return hole_starts, hole_ends


class RangeSet:
    """An immutable set of bytes, kept as sorted, disjoint, non-adjacent :class:`Range` runs.

    Build one with :meth:`from_ranges`, :meth:`of` or :meth:`empty`. Iterating yields the runs in
    address order; ``len()`` counts runs, :attr:`total` counts bytes. Set operations
    (``|``, ``&``, ``-``) take time linear in both operands; :meth:`clip`, :meth:`find`,
    :meth:`contains` and :meth:`covers` bisect. Results share nothing mutable with their inputs.
    """

    __slots__ = ("_ends", "_starts")

    # Invariant: equal lengths; for every i, _starts[i] < _ends[i] < _starts[i + 1].
    _starts: array[int]
    _ends: array[int]

    def __init__(self) -> None:
        """Create an empty set; use :meth:`from_ranges` or :meth:`of` for anything else."""
        object.__setattr__(self, "_starts", array(_TYPECODE))
        object.__setattr__(self, "_ends", array(_TYPECODE))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def _wrap(cls, starts: array[int], ends: array[int]) -> RangeSet:
        """Adopt two columns that already satisfy the invariant (no checks, no copies)."""
        self = cls.__new__(cls)
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_ends", ends)
        return self

    @classmethod
    def _from_columns(cls, starts: Iterable[int], ends: Iterable[int]) -> RangeSet:
        """Pack two columns that already satisfy the invariant."""
        return cls._wrap(_pack(starts), _pack(ends))

    @classmethod
    def from_ranges(cls, ranges: Iterable[Range | tuple[int, int]]) -> RangeSet:
        """Return the set of bytes covered by ``ranges``.

        ``ranges`` holds :class:`Range` values or ``(start, size)`` pairs, in any order; they may
        overlap, nest or touch. Raises ``ValueError`` for a pair with a negative start or a size
        below 1, or for an end beyond 64 bits.
        """
        starts: list[int] = []
        sizes: list[int] = []
        # One pass collects the columns; validation and the arithmetic then run in C.
        add_start = starts.append
        add_size = sizes.append
        for item in ranges:
            if isinstance(item, Range):
                add_start(item.start)
                add_size(item.size)
            else:
                start, size = item
                add_start(start)
                add_size(size)
        if not starts:
            return cls()
        if min(starts) < 0 or min(sizes) <= 0:
            for start, size in zip(starts, sizes, strict=True):
                Range(start, size)  # raises ValueError naming the first bad pair in hex
        ends = list(map(add, starts, sizes))
        del sizes
        # Input from SEEK_DATA/SEEK_HOLE or from another set is already sorted, and Timsort
        # takes linear time on a sorted list.
        starts.sort()
        ends.sort()
        return cls._from_columns(*_merge(starts, ends))

    @classmethod
    def empty(cls) -> RangeSet:
        """Return the set holding no bytes."""
        return cls()

    @classmethod
    def of(cls, start: int, size: int) -> RangeSet:
        """Return the set holding exactly ``[start, start + size)``."""
        rng = Range(start, size)
        return cls._from_columns((rng.start,), (rng.end,))

    # -- container protocol -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Range]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield Range(start, end - start)

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        # Normalisation makes the representation canonical, so equal sets have equal columns.
        return self._starts == other._starts and self._ends == other._ends

    def __hash__(self) -> int:
        return hash((self._starts.tobytes(), self._ends.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(str(rng) for rng in islice(self, _REPR_RANGES))
        more = ", ..." if len(self) > _REPR_RANGES else ""
        return f"RangeSet(n={len(self)}{': ' if shown else ''}{shown}{more})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"RangeSet is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"RangeSet is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default slot-state pickling would go through the blocked __setattr__.
        return (RangeSet._wrap, (self._starts, self._ends))

    @property
    def total(self) -> int:
        """The number of bytes in the set."""
        return sum(self._ends) - sum(self._starts)

    @property
    def bounds(self) -> Range | None:
        """The smallest range holding every byte of the set, or ``None`` if the set is empty."""
        if not self._starts:
            return None
        return Range.from_bounds(self._starts[0], self._ends[-1])

    # -- set algebra --------------------------------------------------------------------------

    def union(self, other: RangeSet) -> RangeSet:
        """Return the bytes in either set."""
        if not other:
            return self
        if not self:
            return other
        # Each concatenation is two sorted runs, which Timsort merges in linear time.
        starts = sorted(self._starts + other._starts)
        ends = sorted(self._ends + other._ends)
        return RangeSet._from_columns(*_merge(starts, ends))

    def intersection(self, other: RangeSet) -> RangeSet:
        """Return the bytes in both sets."""
        if not self or not other:
            return RangeSet()
        starts = sorted(self._starts + other._starts)
        ends = sorted(self._ends + other._ends)
        # Both operands are normalised, so at most two ranges cover any byte. Counting as in
        # _merge, the count is 2 exactly on [starts[k], ends[k - 1]) whenever that is non-empty:
        # the (k+1)-th start is behind and only k-1 ends are. Those spans are the intersection,
        # already sorted, disjoint and (since each operand is normalised) never adjacent.
        hits = list(map(lt, islice(starts, 1, None), ends))
        return RangeSet._from_columns(compress(islice(starts, 1, None), hits), compress(ends, hits))

    def difference(self, other: RangeSet) -> RangeSet:
        """Return the bytes in this set but not in ``other``."""
        if not self or not other:
            return self
        lo = self._starts[0]
        hi = self._ends[-1]
        first, stop = other._overlapping(lo, hi)
        if first >= stop:
            return self
        # Only the part of other inside our bounds matters; its complement there is finite.
        holes = _complement(other._starts[first:stop], other._ends[first:stop], lo, hi)
        return self.intersection(RangeSet._from_columns(*holes))

    def __or__(self, other: RangeSet) -> RangeSet:
        return self.union(other)

    def __and__(self, other: RangeSet) -> RangeSet:
        return self.intersection(other)

    def __sub__(self, other: RangeSet) -> RangeSet:
        return self.difference(other)

    # -- windows and transforms ---------------------------------------------------------------

    def _overlapping(self, lo: int, hi: int) -> tuple[int, int]:
        """Return ``(first, stop)``: the indices of the runs that overlap ``[lo, hi)``."""
        # A run overlaps iff its end is above lo and its start below hi; both columns are
        # sorted, so each condition is a bisection.
        return bisect_right(self._ends, lo), bisect_left(self._starts, hi)

    def clip(self, window: Range) -> RangeSet:
        """Return the part of the set inside ``window``, in O(log n + k) for k runs kept."""
        first, stop = self._overlapping(window.start, window.end)
        if first >= stop:
            return RangeSet()
        starts = self._starts[first:stop]
        ends = self._ends[first:stop]
        # Only the outermost runs can stick out of the window.
        starts[0] = max(starts[0], window.start)
        ends[-1] = min(ends[-1], window.end)
        return RangeSet._wrap(starts, ends)

    def shift(self, delta: int) -> RangeSet:
        """Return the set moved by ``delta`` bytes (e.g. from file offsets to gpa).

        Raises ``ValueError`` if the result would start below 0 or end beyond 64 bits.
        """
        if not self or delta == 0:
            return self
        if self._starts[0] + delta < 0:
            raise ValueError(
                f"shifting by {delta:#x} would move the range at {self._starts[0]:#x} "
                "below address 0"
            )
        # Translation keeps order, gaps and therefore normalisation.
        move = delta.__add__
        return RangeSet._from_columns(map(move, self._starts), map(move, self._ends))

    def coalesce(self, max_gap: int) -> RangeSet:
        """Return the set with every hole of at most ``max_gap`` bytes filled.

        Used to cap the number of ELF program headers: a few gap bytes dumped as data are
        cheaper than one header per run. ``max_gap`` must be ``>= 0``; a hole of exactly
        ``max_gap`` bytes is filled, one of ``max_gap + 1`` is not.
        """
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, not {max_gap:#x}")
        if max_gap == 0 or len(self) < 2:
            return self  # holes in a normalised set are at least one byte wide
        return RangeSet._from_columns(*_merge(self._starts, self._ends, max_gap))

    def align_out(self, granule: int) -> RangeSet:
        """Return the set with each run widened to multiples of ``granule`` bytes, then merged.

        Each start is rounded down and each end up. ``granule`` must be ``> 0``; it need not
        be a power of two (virtio-mem block sizes are, but nothing here relies on it).
        """
        if granule <= 0:
            raise ValueError(f"granule must be > 0, not {granule:#x}")
        if granule == 1 or not self:
            return self
        remainder = granule.__rmod__  # remainder(x) == x % granule, always in [0, granule)
        # Rounding is monotonic, so both columns stay sorted and _merge can join what now
        # overlaps or touches. Round up via the remainder of -end: end + (-end % granule).
        starts = list(map(sub, self._starts, map(remainder, self._starts)))
        ends = list(map(add, self._ends, map(remainder, map(neg, self._ends))))
        return RangeSet._from_columns(*_merge(starts, ends))

    def gaps(self, within: Range) -> RangeSet:
        """Return the bytes of ``within`` that are not in the set (its complement there)."""
        first, stop = self._overlapping(within.start, within.end)
        holes = _complement(
            self._starts[first:stop], self._ends[first:stop], within.start, within.end
        )
        return RangeSet._from_columns(*holes)

    # -- lookups ------------------------------------------------------------------------------

    def _index(self, addr: int) -> int:
        """Return the index of the run holding ``addr``, or -1."""
        index = bisect_right(self._starts, addr) - 1
        if index >= 0 and addr < self._ends[index]:
            return index
        return -1

    def contains(self, addr: int) -> bool:
        """Return whether byte ``addr`` is in the set."""
        return self._index(addr) >= 0

    def find(self, addr: int) -> Range | None:
        """Return the run holding byte ``addr``, or ``None``."""
        index = self._index(addr)
        if index < 0:
            return None
        return Range.from_bounds(self._starts[index], self._ends[index])

    def covers(self, rng: Range) -> bool:
        """Return whether every byte of ``rng`` is in the set."""
        # Runs are never adjacent, so a covered range lies inside a single run.
        index = self._index(rng.start)
        return index >= 0 and rng.end <= self._ends[index]
