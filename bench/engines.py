"""Benchmark: the sparse reader against QEMU's dump and a plain kernel copy, in one run.

Reference VM (``shared/FACTS.md``): q35, 2 GiB memfd main RAM (1 GiB below 4 GiB), virtio-mem
8 GiB max with 2 GiB plugged, the guest writes 512 MiB. With the VM stopped (consistent dumps),
in this order on the same VM:

1. floor: ``sendfile`` of exactly the populated extents of every backing file into one file,
   plus fsync (no ELF, no hashing): the least any dumper of that data must do;
2. backend: ``qmpdump dump --engine backend`` (in-process, same code path);
3. qemu kdump-zlib, 4. qemu elf: QEMU's ``dump-guest-memory`` through qmpdump's relay.

For each: wall time, output bytes (apparent and allocated), how long the VM was paused by the
dump itself, and host memory growth (populated bytes of the backing files before/after, and
``Shmem`` of /proc/meminfo). Ratios against QEMU's ELF and the floor are printed with the
targets: backend >= 10x faster than QEMU elf, <= 1.2x the floor, output within 1 % of the
populated bytes plus headers, zero host memory growth.

Run from the repository root: ``.venv/bin/python bench/engines.py [--pattern-mib N]``
(about a minute under TCG, most of it booting and plugging).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.engines.run import run_dump
from qmpdump.engines.spec import DumpSpec
from qmpdump.host.extents import path_extents
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey, refill_holes, survey
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

REPEAT = 3

REFERENCE = VMSpec(
    name="qmpdump-bench",
    machine="q35",
    ram_backend=Backend.MEMFD,
    ram_size=2 * GiB,
    below_4g=1 * GiB,
    virtio_mem=(
        VirtioMemSpec(id="vmem0", backend=Backend.MEMFD, max_size=8 * GiB, requested_size=2 * GiB),
    ),
    pattern_mib=512,
    boot_timeout_s=600.0,
)


@dataclass(frozen=True, slots=True)
class Row:
    """One measured way of dumping."""

    name: str
    wall_s: float
    size: int
    allocated: int
    paused_s: float | None
    growth: int
    shmem_growth: int


def shmem_bytes() -> int:
    """``Shmem`` of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def populated_bytes(result: Survey) -> int:
    """Populated bytes of every fd-backed region, from the kernel (SEEK_DATA)."""
    total = 0
    for region, access in result.access.items():
        if access.path is not None:
            size = next(b.size for b in result.layout.backends if b.region == region)
            total += path_extents(access.path, Range(access.file_offset, size)).total
    return total


def floor_copy(result: Survey, target: Path) -> int:
    """sendfile exactly the populated extents of each backing file, one after another."""
    written = 0
    fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for access in result.access.values():
            if access.path is None:
                continue
            src = os.open(access.path, os.O_RDONLY)
            try:
                for extent in path_extents(access.path):
                    offset, left = extent.start, extent.size
                    while left:
                        sent = os.sendfile(fd_out, src, offset, left)
                        offset += sent
                        left -= sent
                        written += sent
            finally:
                os.close(src)
        os.fsync(fd_out)
    finally:
        os.close(fd_out)
    return written


def restore_holes(before: Survey) -> None:
    """Punch out again what a QEMU dump allocated (holes before, zeros now): the next engine
    then starts from the same host state. The VM is stopped, so nothing races with this."""
    for region, access in before.access.items():
        if access.path is None:
            continue
        size = next(b.size for b in before.layout.backends if b.region == region)
        populated = before.population.regions[region].offsets
        refill_holes(access, RangeSet.of(0, size) - populated)


async def measure_dump(
    vm: VM,
    name: str,
    target: Path,
    engine: str,
    fmt: str = "elf",
    *,
    zero_pages: bool = False,
) -> Row:
    """One dump through qmpdump's own code path, with growth measured around it."""
    async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
        before = await survey(qmp)
        grown_from = populated_bytes(before)
        shmem_from = shmem_bytes()
        t0 = time.perf_counter()
        spec = DumpSpec.checked(engine=engine, format=fmt, zero_pages=zero_pages)
        outcome = await run_dump(qmp, target, spec)
        wall = time.perf_counter() - t0
        after = await survey(qmp)
        growth = populated_bytes(after) - grown_from
        shmem_growth = shmem_bytes() - shmem_from
        await asyncio.to_thread(restore_holes, before)
    st = os.stat(target)
    return Row(
        name,
        wall,
        st.st_size,
        st.st_blocks * 512,
        outcome.paused_s,
        growth,
        shmem_growth,
    )


def measure_floor(first: Survey, target: Path) -> Row:
    """The floor: sendfile of the populated extents, fsync; growth measured around it."""
    shmem_from = shmem_bytes()
    grown_from = populated_bytes(first)
    t = time.perf_counter()
    copied = floor_copy(first, target)
    wall = time.perf_counter() - t
    st = os.stat(target)
    os.unlink(target)
    growth = populated_bytes(first) - grown_from
    return Row(
        "floor (sendfile)",
        wall,
        copied,
        st.st_blocks * 512,
        None,
        growth,
        shmem_bytes() - shmem_from,
    )


def median_row(rows: list[Row]) -> Row:
    """The row of median wall time."""
    return sorted(rows, key=lambda r: r.wall_s)[len(rows) // 2]


def fmt_bytes(n: int) -> str:
    """MiB with one decimal."""
    return f"{n / MiB:9.1f}"


async def main(pattern_mib: int, out_dir: Path) -> int:
    """Boot, measure, print."""
    spec = dataclasses.replace(REFERENCE, pattern_mib=pattern_mib)
    print(f"booting the reference VM (pattern {pattern_mib} MiB) ...", flush=True)
    t0 = time.monotonic()
    async with launch(spec) as vm:
        print(f"  up and plugged in {time.monotonic() - t0:.1f} s", flush=True)
        assert vm.qmp is not None
        await vm.qmp.execute("stop")
        async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
            first = await survey(qmp)
        populated = first.population.populated.total
        # Floor and backend alternate REPEAT times (the machine is noisy); the median counts.
        floors: list[Row] = []
        ours: list[Row] = []
        for i in range(REPEAT):
            floors.append(measure_floor(first, out_dir / "floor.raw"))
            ours.append(
                await measure_dump(vm, "backend (qmpdump)", out_dir / f"b{i}.elf", "backend")
            )
            for name in (f"b{i}.elf", f"b{i}.elf.json"):
                os.unlink(out_dir / name)
        rows: list[Row] = [median_row(floors), median_row(ours)]
        rows.append(
            await measure_dump(
                vm,
                "backend --zero-pages",
                out_dir / "z.elf",
                "backend",
                zero_pages=True,
            )
        )
        rows.append(
            await measure_dump(vm, "qemu kdump-zlib", out_dir / "q.kdump", "qemu", "kdump-zlib")
        )
        rows.append(await measure_dump(vm, "qemu elf", out_dir / "q.elf", "qemu", "elf"))

    print(
        f"\nguest RAM {first.layout.ram.total / GiB:.2f} GiB; populated on the host "
        f"{populated / MiB:.1f} MiB; VM stopped during all dumps\n"
    )
    print(
        f"{'engine':<20} {'wall s':>7} {'output MiB':>10} {'on disk MiB':>11} "
        f"{'host growth MiB':>15} {'Shmem growth MiB':>16}"
    )
    print(
        f"(floor and backend: median of {REPEAT} alternating runs; "
        f"floor {', '.join(f'{r.wall_s:.2f}' for r in floors)} s, "
        f"backend {', '.join(f'{r.wall_s:.2f}' for r in ours)} s)"
    )
    for r in rows:
        print(
            f"{r.name:<20} {r.wall_s:7.2f} {fmt_bytes(r.size):>10} {fmt_bytes(r.allocated):>11} "
            f"{fmt_bytes(r.growth):>15} {fmt_bytes(r.shmem_growth):>16}"
        )
    floor, mine, _, _, elf = rows
    speedup = elf.wall_s / mine.wall_s
    vs_floor = mine.wall_s / floor.wall_s
    overhead = (mine.allocated - populated) / populated
    print()
    print(
        f"backend vs qemu elf: {speedup:.1f}x faster (target >= 10x)  "
        f"{'OK' if speedup >= 10 else 'MISS'}"
    )
    print(
        f"backend vs floor:    {vs_floor:.2f}x (target <= 1.2x)  "
        f"{'OK' if vs_floor <= 1.2 else 'MISS'}"
    )
    print(
        f"backend output on disk vs populated: {overhead * 100:+.2f} % (target within 1 %)  "
        f"{'OK' if abs(overhead) <= 0.01 else 'MISS'}"
    )
    print(
        f"backend host memory growth: {mine.growth} bytes (target 0)  "
        f"{'OK' if mine.growth == 0 else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern-mib", type=int, default=512)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where dumps go (default: a temp dir)"
    )
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="qmpdump-bench-", dir="/var/tmp"))
    try:
        sys.exit(asyncio.run(main(args.pattern_mib, folder)))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
