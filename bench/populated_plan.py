"""Benchmark: planning the populated set of a synthetic 1 TiB virtio-mem region.

Builds a synthetic 1 TiB virtio-mem region whose sparse backing file holds 512 Ki data extents
(page-aligned, sorted and disjoint, as a SEEK_DATA/SEEK_HOLE walk yields them; fixed seed) next
to 3 GiB of main RAM, then runs qmpdump's own planning code on it: extents -> RangeSet, the
layout's region -> guest-physical translation and per-device summary
(:func:`qmpdump.memmap.populated.compute_population`, with 4096 exact plugged runs), set
difference and union with small sets, totals, and coalescing to cap the number of ELF program
headers.

Prints wall time per step (time.perf_counter, three runs) and peak memory (tracemalloc over one
more run, and the process's ru_maxrss) with OK/MISS against the targets (< 1 s, < 200 MiB).
Exits non-zero only if something fails or a result is inconsistent, never for a missed target.

Run from the repository root: ``.venv/bin/python bench/populated_plan.py``
"""

from __future__ import annotations

import random
import resource
import sys
import time
import tracemalloc
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.memmap.layout import Backend, BackendType, Piece, VirtioMem, build_layout
from qmpdump.memmap.populated import RegionPopulation, Source, compute_population
from qmpdump.memmap.ranges import Range, RangeSet

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

SEED = 0x51D0_2024
PAGE_SIZE = 4 * KiB
BLOCK_SIZE = 2 * MiB  # virtio-mem block size and the coalescing gap
REGION_SIZE = 1 * TiB
REGION_GPA = 0x1_0000_0000  # where the device's memory region sits in guest-physical space
EXTENT_COUNT = 512 * 1024
PLUGGED_RUNS = 4096
RUNS = 3

TARGET_TIME_S = 1.0
TARGET_MEMORY_BYTES = 200 * MiB


@dataclass(frozen=True, slots=True)
class Inputs:
    """What planning starts from: backing-file extents, plugged blocks and two small sets."""

    extent_offsets: array[int]  # file offsets of the data extents
    extent_sizes: array[int]  # their sizes in bytes
    plugged: list[Range]  # plugged runs of whole blocks, gpa
    excluded: list[Range]  # a few gpa ranges to leave out
    boot: list[Range]  # populated boot memory below the device, gpa


@dataclass(frozen=True, slots=True)
class Plan:
    """What planning produces."""

    populated: RangeSet
    headers: RangeSet
    file_total: int
    plugged_total: int
    populated_total: int


def make_inputs(rng: random.Random) -> Inputs:
    """Generate the synthetic region deterministically from ``rng``."""
    # One extent per 2 MiB slot of the file, at a random page offset with a random page count,
    # always ending at least a page before the slot does: sorted, disjoint, never touching.
    slot_pages = REGION_SIZE // EXTENT_COUNT // PAGE_SIZE
    offsets = array("Q")
    sizes = array("Q")
    for slot in range(EXTENT_COUNT):
        first_page = rng.randrange(slot_pages // 2)
        page_count = rng.randrange(1, slot_pages - first_page)
        offsets.append((slot * slot_pages + first_page) * PAGE_SIZE)
        sizes.append(page_count * PAGE_SIZE)

    # One run of 32..96 blocks per 256 MiB slot of the region: about half of it plugged.
    slot_blocks = REGION_SIZE // PLUGGED_RUNS // BLOCK_SIZE
    plugged = []
    for slot in range(PLUGGED_RUNS):
        block_count = rng.randint(slot_blocks // 4, slot_blocks * 3 // 4)
        first_block = rng.randint(0, slot_blocks - block_count)
        gpa = REGION_GPA + (slot * slot_blocks + first_block) * BLOCK_SIZE
        plugged.append(Range(gpa, block_count * BLOCK_SIZE))

    excluded = [
        Range(REGION_GPA + rng.randrange(REGION_SIZE // GiB) * GiB, rng.randint(1, 64) * MiB)
        for _ in range(16)
    ]
    boot = [Range(index * 64 * MiB, rng.randint(1, 32) * MiB) for index in range(48)]
    return Inputs(offsets, sizes, plugged, excluded, boot)


MAIN_RAM_SIZE = 3 * GiB
MAIN = Backend(region="ram0", type=BackendType.MEMFD, size=MAIN_RAM_SIZE, id="ram0")
DEVICE_RAM = Backend(region="mem-vmem0", type=BackendType.FILE, size=REGION_SIZE, id="mem-vmem0")
DEVICE = VirtioMem(
    id="vmem0",
    memaddr=REGION_GPA,
    max_size=REGION_SIZE,
    block_size=BLOCK_SIZE,
    size=PLUGGED_RUNS * BLOCK_SIZE,
    requested_size=PLUGGED_RUNS * BLOCK_SIZE,
    memdev="mem-vmem0",
)
LAYOUT = build_layout(
    [
        Piece(Range(0, MAIN_RAM_SIZE), "ram0", 0, MAIN),
        Piece(Range(REGION_GPA, REGION_SIZE), "mem-vmem0", 0, DEVICE_RAM),
    ],
    [DEVICE],
)


def plan(inputs: Inputs, lap: Callable[[str], None]) -> Plan:
    """Run the planning steps, calling ``lap(step)`` after each one."""
    in_file = RangeSet.from_ranges(zip(inputs.extent_offsets, inputs.extent_sizes, strict=True))
    lap("extents -> RangeSet (512 Ki)")
    plugged = RangeSet.from_ranges(inputs.plugged)
    boot = RangeSet.from_ranges(inputs.boot)
    lap("plugged runs, boot -> RangeSet")
    population = compute_population(
        LAYOUT,
        {
            "ram0": RegionPopulation("ram0", boot, Source.SEEK_DATA),
            "mem-vmem0": RegionPopulation("mem-vmem0", in_file, Source.SEEK_DATA),
        },
        {"vmem0": plugged},
    )
    lap("compute_population")
    populated = population.populated - RangeSet.from_ranges(inputs.excluded)
    lap("difference (small set)")
    file_total = in_file.total
    plugged_total = population.devices[0].plugged.total
    populated_total = populated.total
    lap("totals")
    headers = populated.coalesce(BLOCK_SIZE)
    lap("coalesce(2 MiB)")
    return Plan(populated, headers, file_total, plugged_total, populated_total)


def check(inputs: Inputs, result: Plan) -> None:
    """Raise ``RuntimeError`` if the plan is inconsistent with its inputs."""
    boot_total = sum(rng.size for rng in inputs.boot)
    problems = []
    if result.file_total != sum(inputs.extent_sizes):
        problems.append("the extent set lost or gained bytes")
    if not 0 < result.populated_total <= result.file_total + boot_total:
        problems.append("the populated set holds more than the extents plus boot memory")
    if result.populated - result.headers:
        problems.append("coalescing dropped populated bytes")
    if not 0 < len(result.headers) <= len(result.populated):
        problems.append("coalescing produced more ranges than it started with")
    if problems:
        raise RuntimeError("; ".join(problems))


def timed_run(inputs: Inputs) -> tuple[Plan, dict[str, float], float]:
    """Run the plan once; return it, seconds per step and seconds in all."""
    steps: dict[str, float] = {}
    began = last = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[step] = now - last
        last = now

    result = plan(inputs, lap)
    return result, steps, time.perf_counter() - began


def max_rss_bytes() -> int:
    """Return the process's peak resident set size in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * KiB  # Linux reports KiB


def verdict(value: float, target: float) -> str:
    """Return OK or MISS for a value that should stay below its target."""
    return "OK" if value < target else "MISS"


def main() -> int:
    """Generate the inputs, run and measure the plan, print the table."""
    began = time.perf_counter()
    inputs = make_inputs(random.Random(SEED))  # noqa: S311 - synthetic data, not secrets
    generated_s = time.perf_counter() - began

    runs = [timed_run(inputs) for _ in range(RUNS)]
    for result, _, _ in runs:
        check(inputs, result)
    if len({(result.populated, result.headers) for result, _, _ in runs}) != 1:
        raise RuntimeError("repeated runs disagree")
    rss_bytes = max_rss_bytes()  # before tracemalloc adds its own bookkeeping

    tracemalloc.start()
    timed_run(inputs)
    _, traced_peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = runs[0][0]
    best_s = min(total for _, _, total in runs)
    worst_s = max(total for _, _, total in runs)
    print(
        f"inputs: {EXTENT_COUNT} extents in a {REGION_SIZE // GiB} GiB region, "
        f"{len(inputs.plugged)} plugged runs"
    )
    print(f"        generated in {generated_s:.2f} s (not timed below)")
    print(
        f"result: {len(result.populated)} populated ranges, "
        f"{result.populated_total / GiB:.1f} GiB of {result.plugged_total / GiB:.1f} GiB plugged;"
    )
    print(f"        {len(result.headers)} ranges after coalesce(2 MiB)")
    print()
    print(f"{'step':<32} {'best ms':>9} {'worst ms':>9}")
    for step in runs[0][1]:
        laps = [steps[step] for _, steps, _ in runs]
        print(f"{step:<32} {min(laps) * 1e3:9.1f} {max(laps) * 1e3:9.1f}")
    print()
    print(f"{'measure':<32} {'value':>12} {'target':>10}  verdict")
    print(
        f"{'wall time, worst of ' + str(RUNS):<32} {worst_s * 1e3:9.1f} ms "
        f"{TARGET_TIME_S * 1e3:7.0f} ms  {verdict(worst_s, TARGET_TIME_S)}"
    )
    print(f"{'wall time, best of ' + str(RUNS):<32} {best_s * 1e3:9.1f} ms")
    for label, value in (
        ("tracemalloc peak (planning)", traced_peak_bytes),
        ("ru_maxrss (whole process)", rss_bytes),
    ):
        print(
            f"{label:<32} {value / MiB:8.1f} MiB {TARGET_MEMORY_BYTES / MiB:6.0f} MiB  "
            f"{verdict(value, TARGET_MEMORY_BYTES)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
