"""Tests of qmpdump.memmap.ranges: properties against a reference model, plus worked examples.

The model of a set of bytes is a Python int used as a bitmask (bit b set iff byte b is in the
set): union, intersection and difference are then ``|``, ``&`` and ``& ~``, and the model's
maximal runs of set bits are exactly the normalised form a RangeSet must have. Addresses stay
below 2**20 and come from a few coarse grids, so drawn ranges overlap and touch often.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpdump.memmap.ranges import Range, RangeSet

# Grids the strategies draw on: single bytes, an odd stride (so granules in align_out do not
# divide it), and pages. 250 grid steps of a page stay below 2**20.
UNITS = (1, 3, 4096)
GRID_STEPS = 200
MAX_RUN_STEPS = 48


def mask_of(ranges: Iterable[Range]) -> int:
    """Return the model of the bytes the ranges cover."""
    mask = 0
    for rng in ranges:
        mask |= ((1 << rng.size) - 1) << rng.start
    return mask


def runs_of(mask: int) -> list[Range]:
    """Return the maximal runs of set bits in ``mask``, in address order."""
    runs = []
    offset = 0
    while mask:
        zeros = (mask & -mask).bit_length() - 1
        mask >>= zeros
        offset += zeros
        ones = (~mask & (mask + 1)).bit_length() - 1
        runs.append(Range(offset, ones))
        mask >>= ones
        offset += ones
    return runs


def holes_of(ranges: RangeSet) -> list[Range]:
    """Return the holes between neighbouring runs of a set."""
    return [Range.from_bounds(a.end, b.start) for a, b in pairwise(ranges)]


def assert_normalised(ranges: RangeSet) -> None:
    """Assert the runs are sorted, disjoint and not adjacent, and the container agrees."""
    runs = list(ranges)
    for before, after in pairwise(runs):
        assert before.end < after.start, f"{before} and {after} are out of order or touch"
    assert len(ranges) == len(runs)
    assert bool(ranges) == bool(runs)


@st.composite
def range_lists(draw: st.DrawFn, max_size: int = 12) -> list[Range]:
    """Draw a list of ranges on one grid, in any order, overlapping and touching freely."""
    unit = draw(st.sampled_from(UNITS))
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, GRID_STEPS), st.integers(1, MAX_RUN_STEPS)),
            max_size=max_size,
        )
    )
    # Sometimes push a start off the grid, so that not every end lines up with a start.
    jitter = draw(st.integers(0, unit - 1)) if draw(st.booleans()) else 0
    return [
        Range(start * unit + jitter * (index % 2), size * unit)
        for index, (start, size) in enumerate(pairs)
    ]


def range_sets() -> st.SearchStrategy[RangeSet]:
    """Draw a RangeSet built from a list of ranges."""
    return range_lists().map(RangeSet.from_ranges)


@st.composite
def windows(draw: st.DrawFn) -> Range:
    """Draw a range on one of the grids, possibly off-grid at its start."""
    unit = draw(st.sampled_from(UNITS))
    start = draw(st.integers(0, GRID_STEPS + MAX_RUN_STEPS)) * unit + draw(st.integers(0, unit - 1))
    return Range(start, draw(st.integers(1, 2 * MAX_RUN_STEPS)) * unit)


# -- properties ------------------------------------------------------------------------------


@given(range_lists())
def test_from_ranges_normalises_and_preserves_coverage(ranges: list[Range]) -> None:
    result = RangeSet.from_ranges(ranges)
    assert_normalised(result)
    assert mask_of(result) == mask_of(ranges)
    assert list(result) == runs_of(mask_of(ranges))
    # Order and spelling of the input do not matter.
    assert RangeSet.from_ranges(reversed(ranges)) == result
    assert RangeSet.from_ranges((rng.start, rng.size) for rng in ranges) == result


@given(range_sets(), range_sets())
def test_union_matches_model(left: RangeSet, right: RangeSet) -> None:
    result = left.union(right)
    assert_normalised(result)
    assert mask_of(result) == mask_of(left) | mask_of(right)
    assert left | right == result
    assert right | left == result


@given(range_sets(), range_sets())
def test_intersection_matches_model(left: RangeSet, right: RangeSet) -> None:
    result = left.intersection(right)
    assert_normalised(result)
    assert mask_of(result) == mask_of(left) & mask_of(right)
    assert left & right == result
    assert right & left == result


@given(range_sets(), range_sets())
def test_difference_matches_model(left: RangeSet, right: RangeSet) -> None:
    result = left.difference(right)
    assert_normalised(result)
    assert mask_of(result) == mask_of(left) & ~mask_of(right)
    assert left - right == result


@given(range_sets(), windows())
def test_clip_matches_model(ranges: RangeSet, window: Range) -> None:
    result = ranges.clip(window)
    assert_normalised(result)
    assert mask_of(result) == mask_of(ranges) & mask_of([window])
    assert result == ranges & RangeSet.of(window.start, window.size)


@given(range_sets(), st.integers(0, 1 << 20))
def test_shift_round_trips(ranges: RangeSet, delta: int) -> None:
    moved = ranges.shift(delta)
    assert_normalised(moved)
    assert mask_of(moved) == mask_of(ranges) << delta
    assert moved.shift(-delta) == ranges
    assert len(moved) == len(ranges)
    assert moved.total == ranges.total


@given(range_sets(), st.integers(1, 1 << 20))
def test_shift_below_zero_is_refused(ranges: RangeSet, delta: int) -> None:
    bounds = ranges.bounds
    if bounds is None:
        assert ranges.shift(-delta) == ranges
    elif delta > bounds.start:
        with pytest.raises(ValueError, match="below address 0"):
            ranges.shift(-delta)
    else:
        assert mask_of(ranges.shift(-delta)) == mask_of(ranges) >> delta


@given(range_sets(), st.integers(0, 64 * 4096))
def test_coalesce_fills_exactly_the_small_holes(ranges: RangeSet, max_gap: int) -> None:
    result = ranges.coalesce(max_gap)
    assert_normalised(result)
    before = mask_of(ranges)
    after = mask_of(result)
    assert after & before == before, "coalescing dropped bytes"
    # Every new byte lies in a hole of at most max_gap bytes, and every such hole is filled.
    assert after & ~before == mask_of(hole for hole in holes_of(ranges) if hole.size <= max_gap)
    assert all(hole.size > max_gap for hole in holes_of(result))
    assert len(result) <= len(ranges)


@given(range_sets(), st.integers(1, 3 * 4096 + 5))
def test_align_out_matches_model(ranges: RangeSet, granule: int) -> None:
    result = ranges.align_out(granule)
    assert_normalised(result)
    widened = [
        Range.from_bounds(rng.start // granule * granule, -(-rng.end // granule) * granule)
        for rng in ranges
    ]
    assert mask_of(result) == mask_of(widened)
    assert mask_of(result) & mask_of(ranges) == mask_of(ranges)
    for rng in result:
        assert rng.start % granule == 0
        assert rng.end % granule == 0
    assert len(result) <= len(ranges)


@given(range_sets(), windows())
def test_gaps_complement_the_set_within(ranges: RangeSet, window: Range) -> None:
    result = ranges.gaps(window)
    assert_normalised(result)
    inside = mask_of([window])
    held = mask_of(ranges)
    assert mask_of(result) | (held & inside) == inside
    assert mask_of(result) & held == 0
    assert result.total + ranges.clip(window).total == window.size


@given(range_sets(), st.data())
def test_lookups_match_model(ranges: RangeSet, data: st.DataObject) -> None:
    held = mask_of(ranges)
    runs = runs_of(held)
    limit = ranges.bounds.end + 2 if ranges.bounds else 16
    # Every edge of every run, plus a few drawn addresses.
    probes = {0, limit}
    for rng in runs:
        probes |= {max(rng.start - 1, 0), rng.start, rng.end - 1, rng.end}
    probes |= set(data.draw(st.lists(st.integers(0, limit), max_size=16)))
    for addr in sorted(probes):
        assert ranges.contains(addr) == bool(held >> addr & 1)
        assert ranges.find(addr) == next((rng for rng in runs if rng.contains(addr)), None)

    candidates = list(runs)
    for rng in runs:
        candidates.append(Range(rng.start, rng.size + 1))  # spills into the hole after it
        if rng.start:
            candidates.append(Range(rng.start - 1, rng.size))  # starts in the hole before it
        if rng.size > 1:
            candidates.append(Range(rng.start + 1, rng.size - 1))
    candidates += data.draw(
        st.lists(st.builds(Range, st.integers(0, limit), st.integers(1, limit)), max_size=8)
    )
    for candidate in candidates:
        assert ranges.covers(candidate) == (mask_of([candidate]) & ~held == 0), str(candidate)


@given(range_lists())
def test_size_queries_match_model(ranges: list[Range]) -> None:
    result = RangeSet.from_ranges(ranges)
    held = mask_of(ranges)
    runs = runs_of(held)
    assert result.total == held.bit_count()
    assert len(result) == len(runs)
    if runs:
        assert result.bounds == Range.from_bounds(runs[0].start, runs[-1].end)
    else:
        assert result.bounds is None
        assert result == RangeSet.empty()


@given(range_lists())
def test_equal_sets_compare_hash_and_pickle_equal(ranges: list[Range]) -> None:
    result = RangeSet.from_ranges(ranges)
    rebuilt = RangeSet.from_ranges(runs_of(mask_of(ranges)))
    assert result == rebuilt
    assert hash(result) == hash(rebuilt)
    assert pickle.loads(pickle.dumps(result)) == result  # noqa: S301 - our own bytes


# -- examples --------------------------------------------------------------------------------


def test_adjacent_ranges_merge_into_one() -> None:
    # Regression: [0, 10) and [10, 20) touch, so normalisation must join them.
    merged = RangeSet.from_ranges([Range(0, 10), Range(10, 10)])
    assert list(merged) == [Range(0, 20)]
    assert len(merged) == 1
    assert RangeSet.from_ranges([(10, 10), (0, 10)]) == merged
    assert RangeSet.of(0, 10) | RangeSet.of(10, 10) == RangeSet.of(0, 20)


def test_coalesce_boundary_is_inclusive() -> None:
    # Regression for a _coalesce_sections-style off-by-one: [0, 10) and [15, 20) have a hole
    # of exactly 5 bytes, which max_gap=5 fills and max_gap=4 leaves.
    ranges = RangeSet.from_ranges([(0, 10), (15, 5)])
    assert list(ranges.coalesce(5)) == [Range(0, 20)]
    assert list(ranges.coalesce(4)) == [Range(0, 10), Range(15, 5)]
    assert ranges.coalesce(0) == ranges


def test_range_basics() -> None:
    page = Range(0x1000, 0x1000)
    assert str(page) == "[0x1000, 0x2000)"
    assert page.end == 0x2000
    assert page.contains(0x1000)
    assert page.contains(0x1FFF)
    assert not page.contains(0x2000)
    assert not page.contains(0xFFF)
    assert not page.overlaps(Range(0x2000, 1)), "touching is not overlapping"
    assert page.overlaps(Range(0x1FFF, 2))
    assert page.intersection(Range(0x1800, 0x1000)) == Range(0x1800, 0x800)
    assert page.intersection(Range(0x2000, 0x1000)) is None
    assert page.shift(0xF000) == Range(0x10000, 0x1000)
    assert page.shift(-0x1000) == Range(0, 0x1000)
    assert Range.from_bounds(0x10, 0x30) == Range(0x10, 0x20)


def test_bad_values_are_refused_with_hex_messages() -> None:
    with pytest.raises(ValueError, match="-0x10"):
        Range(-0x10, 1)
    with pytest.raises(ValueError, match=r"0x1000.*size 0x0"):
        Range(0x1000, 0)
    with pytest.raises(ValueError, match="below address 0"):
        Range(0x1000, 1).shift(-0x1001)
    with pytest.raises(ValueError, match="0x2000"):
        RangeSet.from_ranges([(0, 1), (0x2000, -1)])
    with pytest.raises(ValueError, match="max_gap"):
        RangeSet.of(0, 1).coalesce(-1)
    with pytest.raises(ValueError, match="granule"):
        RangeSet.of(0, 1).align_out(0)
    with pytest.raises(ValueError, match="0x10000000000000000"):
        RangeSet.of((1 << 64) - 1, 2)
    with pytest.raises(ValueError, match="0x10000000000000000"):
        RangeSet.of((1 << 64) - 2, 1).shift(1)


def test_range_set_is_immutable() -> None:
    ranges = RangeSet.of(0, 1)
    with pytest.raises(AttributeError, match="immutable"):
        ranges._starts = ranges._ends
    assert list(ranges) == [Range(0, 1)]


def test_set_algebra_examples() -> None:
    left = RangeSet.from_ranges([(0x0, 0x3000), (0x5000, 0x1000)])
    right = RangeSet.from_ranges([(0x2000, 0x4000)])
    assert list(left | right) == [Range(0x0, 0x6000)]
    assert list(left & right) == [Range(0x2000, 0x1000), Range(0x5000, 0x1000)]
    assert list(left - right) == [Range(0x0, 0x2000)]
    assert list(right - left) == [Range(0x3000, 0x2000)]
    assert left - RangeSet.empty() == left
    assert (left & RangeSet.empty()) == RangeSet.empty()
    assert left.total == 0x4000
    assert left.bounds == Range(0x0, 0x6000)


def test_clip_gaps_and_lookups_examples() -> None:
    ranges = RangeSet.from_ranges([(0x0, 0x1000), (0x2000, 0x1000), (0x4000, 0x1000)])
    assert list(ranges.clip(Range(0x800, 0x3000))) == [Range(0x800, 0x800), Range(0x2000, 0x1000)]
    assert not ranges.clip(Range(0x1000, 0x1000))
    assert list(ranges.gaps(Range(0x0, 0x6000))) == [
        Range(0x1000, 0x1000),
        Range(0x3000, 0x1000),
        Range(0x5000, 0x1000),
    ]
    assert list(ranges.gaps(Range(0x2100, 0x100))) == []
    assert ranges.find(0x2FFF) == Range(0x2000, 0x1000)
    assert ranges.find(0x3000) is None
    assert ranges.covers(Range(0x2000, 0x1000))
    assert not ranges.covers(Range(0x2000, 0x1001))
    assert list(ranges.shift(0x1_0000_0000)) == [
        Range(0x1_0000_0000, 0x1000),
        Range(0x1_0000_2000, 0x1000),
        Range(0x1_0000_4000, 0x1000),
    ]


def test_align_out_examples() -> None:
    assert list(RangeSet.of(0x1001, 1).align_out(0x1000)) == [Range(0x1000, 0x1000)]
    assert list(RangeSet.of(4, 1).align_out(3)) == [Range(3, 3)]
    # Runs that only touch after rounding are merged.
    ranges = RangeSet.from_ranges([(0x0, 0x10), (0x1FF0, 0x20)])
    assert list(ranges.align_out(0x1000)) == [Range(0x0, 0x3000)]


def test_repr_stays_short_for_large_sets() -> None:
    ranges = RangeSet.from_ranges((index * 0x2000, 0x1000) for index in range(10_000))
    text = repr(ranges)
    assert text.startswith("RangeSet(n=10000: [0x0, 0x1000), [0x2000, 0x3000)")
    assert len(text) < 120
    assert repr(RangeSet.empty()) == "RangeSet(n=0)"
