"""Benchmark: the sparse reader against QEMU's dump and a plain kernel copy, in one run.

Reference VM (``shared/FACTS.md``): q35, 2 GiB memfd main RAM (1 GiB below 4 GiB), virtio-mem
8 GiB max with 2 GiB plugged, the guest writes 512 MiB. The anonymous VM is the same guest with
the same sizes on anonymous memory (the common case: plain ``-m``, libvirt's default): main RAM
the default ``pc.ram``, virtio-mem on ``memory-backend-ram``. With the VM stopped (consistent
dumps), in this order on the same VM:

1. floor: exactly the populated bytes of every RAM region into one file, plus fsync (no ELF, no
   hashing): the least any dumper of that data must do. fd-backed regions: ``sendfile`` of the
   populated extents of the backing file. Anonymous regions: ``process_vm_readv`` of the
   populated pages from QEMU, written with ``O_DIRECT`` by a second thread, the fastest way
   ``bench/anon_paths.py`` found. On the anonymous VM also "floor + sha256": the same copy
   with a third thread hashing the buffers, the least a dumper that also hashes its output (as
   qmpdump does) must do;
2. backend: ``qmpdump dump --engine backend`` (in-process, same code path);
3. qemu kdump-zlib, 4. qemu elf: QEMU's ``dump-guest-memory`` through qmpdump's relay.

For each: wall time, this process's CPU time (every thread; on a shared machine the wall time
of CPU-bound work such as sha256 follows the load, I/O-bound work much less), output bytes
(apparent and allocated), how long the VM was paused by the dump itself, and host memory growth
(populated bytes of every region before/after: SEEK_DATA on backing files, PAGEMAP_SCAN in
QEMU's anonymous memory; and ``Shmem`` of /proc/meminfo). Ratios against QEMU's ELF and the
floor are printed with the targets: backend >= 10x faster than QEMU elf, <= 1.2x the floor,
output within 1 % of the populated bytes plus headers, zero host memory growth.

With ``--phases``, the backend's time is split into its phases (survey, QEMU's header probe,
plan, copy, hash, fsync), measured by wrapping the engine's functions, on one extra run.

Run from the repository root:
``.venv/bin/python bench/engines.py [--vm memfd|anon|both] [--pattern-mib N] [--phases]``
(a few minutes under TCG per VM, most of it booting and plugging).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anon_paths import direct_copy

from qmpdump.engines import backend as backend_module
from qmpdump.engines import run as run_module
from qmpdump.engines.run import run_dump
from qmpdump.engines.spec import DumpSpec
from qmpdump.host.extents import path_extents
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.output import DumpFile
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

#: The same guest and sizes on anonymous memory: default pc.ram, virtio-mem on memory-backend-ram.
ANONYMOUS = dataclasses.replace(
    REFERENCE,
    name="qmpdump-bench-anon",
    ram_backend=Backend.DEFAULT,
    virtio_mem=(
        VirtioMemSpec(id="vmem0", backend=Backend.RAM, max_size=8 * GiB, requested_size=2 * GiB),
    ),
)

VMS = {"memfd": REFERENCE, "anon": ANONYMOUS}


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
    #: CPU seconds this process spent (every thread; QEMU's own work is not in it)
    cpu_s: float = 0.0


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def shmem_bytes() -> int:
    """``Shmem`` of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def populated_bytes(result: Survey) -> int:
    """Populated bytes of every RAM region: SEEK_DATA on backing files, else PAGEMAP_SCAN."""
    total = 0
    for region, access in result.access.items():
        if access.path is not None:
            size = next(b.size for b in result.layout.backends if b.region == region)
            total += path_extents(access.path, Range(access.file_offset, size)).total
        else:
            total += result.population.regions[region].offsets.total
    return total


def anonymous_extents(result: Survey) -> RangeSet:
    """The populated pages of every anonymous region, as QEMU's host virtual addresses."""
    found = RangeSet()
    for region, access in result.access.items():
        if access.path is None and access.hva is not None:
            found = found | result.population.regions[region].offsets.shift(access.hva)
    return found


def floor_copy(result: Survey, target: Path, *, hashing: bool = False) -> int:
    """Exactly the populated bytes into one file, back to back, the fastest way; fsync.
    ``hashing``: also sha256 the anonymous bytes from the copy's buffers (a parallel thread)."""
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
        anonymous = anonymous_extents(result)
        if anonymous and result.facts.pid is not None:
            direct = os.open(target, os.O_WRONLY | os.O_DIRECT)
            try:
                aligned = -(-written // 4096) * 4096
                written += direct_copy(
                    result.facts.pid, anonymous, direct, aligned, hashing=hashing
                )
            finally:
                os.close(direct)
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


class Phases:
    """Where a backend dump's time goes: spans of the engine's functions, by wrapping them."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.spans: list[tuple[str, float, float]] = []
        self.undo: list[tuple[Any, str, Any]] = []

    def _record(self, label: str, start: float) -> None:
        self.spans.append((label, start - self.t0, time.perf_counter() - self.t0))

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of ``owner.name`` (sync or async) as ``label``."""
        original = getattr(owner, name)
        self.undo.append((owner, name, original))
        if asyncio.iscoroutinefunction(original):

            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    self._record(label, start)

            setattr(owner, name, timed_async)
        else:

            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self._record(label, start)

            setattr(owner, name, timed)

    def __enter__(self) -> Phases:
        self.wrap(run_module, "survey", "survey")
        self.wrap(backend_module, "survey", "survey (after stop)")
        self.wrap(backend_module, "_probe", "probe (QEMU's dump headers)")
        self.wrap(backend_module, "plan_core", "plan")
        self.wrap(backend_module, "copy_ops", "copy operations")
        self.wrap(backend_module, "copy_ops_into", "copy (read + write)")
        self.wrap(backend_module, "hash_output", "hash (sha256)")
        self.wrap(os, "fdatasync", "fdatasync")
        self.wrap(DumpFile, "commit", "commit (fsync, sidecar, rename)")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)

    def print(self, wall_s: float) -> None:
        """The spans in start order."""
        print(f"\nbackend phases (one run, {wall_s:.2f} s; spans overlap where threads do):")
        for label, start, end in sorted(self.spans, key=lambda s: s[1]):
            print(f"  {label:<34} {start:6.3f} -> {end:6.3f}  {end - start:6.3f} s")


async def measure_dump(
    vm: VM,
    name: str,
    target: Path,
    engine: str,
    fmt: str = "elf",
    *,
    zero_pages: bool = False,
    phases: Phases | None = None,
) -> Row:
    """One dump through qmpdump's own code path, with growth measured around it."""
    async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
        before = await survey(qmp)
        grown_from = populated_bytes(before)
        shmem_from = shmem_bytes()
        t0 = time.perf_counter()
        cpu0 = cpu_seconds()
        with phases or contextlib.nullcontext():
            spec = DumpSpec.checked(engine=engine, format=fmt, zero_pages=zero_pages)
            outcome = await run_dump(qmp, target, spec)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
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
        cpu,
    )


def floor_way(result: Survey) -> str:
    """How :func:`floor_copy` copies this VM's memory."""
    ways = []
    if any(access.path is not None for access in result.access.values()):
        ways.append("sendfile")
    if anonymous_extents(result):
        ways.append("process_vm_readv + O_DIRECT")
    return ", ".join(ways)


def measure_floor(
    first: Survey, target: Path, how: str | None = None, *, hashing: bool = False
) -> Row:
    """The floor, with growth measured around it."""
    how = how or floor_way(first)
    shmem_from = shmem_bytes()
    grown_from = populated_bytes(first)
    t = time.perf_counter()
    cpu0 = cpu_seconds()
    copied = floor_copy(first, target, hashing=hashing)
    wall = time.perf_counter() - t
    cpu = cpu_seconds() - cpu0
    st = os.stat(target)
    os.unlink(target)
    growth = populated_bytes(first) - grown_from
    return Row(
        f"floor ({how})",
        wall,
        copied,
        st.st_blocks * 512,
        None,
        growth,
        shmem_bytes() - shmem_from,
        cpu,
    )


def median_row(rows: list[Row]) -> Row:
    """The row of median wall time."""
    return sorted(rows, key=lambda r: r.wall_s)[len(rows) // 2]


def fmt_bytes(n: int) -> str:
    """MiB with one decimal."""
    return f"{n / MiB:9.1f}"


async def bench_vm(kind: str, pattern_mib: int, out_dir: Path, *, phases: bool) -> bool:
    """Boot one VM, measure, print; True when every target is met."""
    spec = dataclasses.replace(VMS[kind], pattern_mib=pattern_mib)
    print(f"booting the {kind} VM (pattern {pattern_mib} MiB) ...", flush=True)
    t0 = time.monotonic()
    async with launch(spec) as vm:
        print(f"  up and plugged in {time.monotonic() - t0:.1f} s", flush=True)
        assert vm.qmp is not None
        await vm.qmp.execute("stop")
        async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
            first = await survey(qmp)
        populated = first.population.populated.total
        how = "sendfile" if kind == "memfd" else "process_vm_readv + O_DIRECT"
        # Floor and backend alternate REPEAT times (the machine is noisy); the median counts.
        floors: list[Row] = []
        hashed: list[Row] = []
        ours: list[Row] = []
        # The hashed floor hashes the anonymous bytes only: shown where that is all of them.
        anonymous = all(access.path is None for access in first.access.values())
        for i in range(REPEAT):
            floors.append(measure_floor(first, out_dir / "floor.raw", how))
            if anonymous:
                hashed.append(
                    measure_floor(first, out_dir / "floor.raw", f"{how} + sha256", hashing=True)
                )
            ours.append(
                await measure_dump(vm, "backend (qmpdump)", out_dir / f"b{i}.elf", "backend")
            )
            for name in (f"b{i}.elf", f"b{i}.elf.json"):
                os.unlink(out_dir / name)
        rows: list[Row] = [median_row(floors), median_row(ours)]
        if hashed:
            rows.insert(1, median_row(hashed))
        if phases:
            recorder = Phases()
            timed = await measure_dump(
                vm, "backend (phases)", out_dir / "p.elf", "backend", phases=recorder
            )
            recorder.print(timed.wall_s)
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
        for name in ("z.elf", "q.kdump", "q.elf", "p.elf"):
            for path in (out_dir / name, out_dir / f"{name}.json"):
                path.unlink(missing_ok=True)

    print(
        f"\n{kind} VM: guest RAM {first.layout.ram.total / GiB:.2f} GiB; populated on the host "
        f"{populated / MiB:.1f} MiB; VM stopped during all dumps\n"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores, shared)")
    print(
        f"{'engine':<46} {'wall s':>7} {'output MiB':>10} {'on disk MiB':>11} "
        f"{'host growth MiB':>15} {'Shmem growth MiB':>16} {'our CPU s':>9}"
    )
    print(
        f"(floor and backend: median of {REPEAT} alternating runs; "
        f"floor {', '.join(f'{r.wall_s:.2f}' for r in floors)} s, "
        + (f"floor + sha256 {', '.join(f'{r.wall_s:.2f}' for r in hashed)} s, " if hashed else "")
        + f"backend {', '.join(f'{r.wall_s:.2f}' for r in ours)} s)"
    )
    for r in rows:
        print(
            f"{r.name:<46} {r.wall_s:7.2f} {fmt_bytes(r.size):>10} {fmt_bytes(r.allocated):>11} "
            f"{fmt_bytes(r.growth):>15} {fmt_bytes(r.shmem_growth):>16} {r.cpu_s:9.2f}"
        )
    floor, mine, elf = rows[0], rows[-4], rows[-1]
    speedup = elf.wall_s / mine.wall_s
    vs_floor = mine.wall_s / floor.wall_s
    overhead = (mine.allocated - populated) / populated
    checks = [
        (f"backend vs qemu elf: {speedup:.1f}x faster (target >= 10x)", speedup >= 10),
        (f"backend vs floor:    {vs_floor:.2f}x (target <= 1.2x)", vs_floor <= 1.2),
        *(
            [(f"backend vs floor + sha256: {mine.wall_s / rows[1].wall_s:.2f}x (no target)", True)]
            if hashed
            else []
        ),
        (
            f"backend output on disk vs populated: {overhead * 100:+.2f} % (target within 1 %)",
            abs(overhead) <= 0.01,
        ),
        (f"backend host memory growth: {mine.growth} bytes (target 0)", mine.growth == 0),
    ]
    print()
    for text, ok in checks:
        print(f"{text}  {'OK' if ok else 'MISS'}")
    print(flush=True)
    return all(ok for _, ok in checks)


async def main(kinds: list[str], pattern_mib: int, out_dir: Path, *, phases: bool) -> int:
    """Each VM in turn (one at a time: the machine is small)."""
    results = [await bench_vm(kind, pattern_mib, out_dir, phases=phases) for kind in kinds]
    return 0 if all(results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm", choices=["memfd", "anon", "both"], default="both")
    parser.add_argument("--pattern-mib", type=int, default=512)
    parser.add_argument("--phases", action="store_true", help="time the backend's phases")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where dumps go (default: a temp dir)"
    )
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="qmpdump-bench-", dir="/var/tmp"))
    chosen = ["memfd", "anon"] if args.vm == "both" else [args.vm]
    try:
        sys.exit(asyncio.run(main(chosen, args.pattern_mib, folder, phases=args.phases)))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
