"""Benchmark: qmpdump's own kdump-compressed dumps per codec, against QEMU's kdump-zlib and our ELF.

Reference VM (``shared/FACTS.md``, the one of ``bench/engines.py``): q35, 2 GiB memfd main RAM,
virtio-mem 8 GiB max with 2 GiB plugged, the guest writes 512 MiB. The VM is stopped for all
dumps; in one run, on the same VM:

1. floor: ``sendfile`` of the populated extents plus fsync (the least any dumper of that data
   must do; the floor of the ELF path);
2. our ELF (backend engine);
3. our kdump for each codec (zero pages: the default, exclude-holes), and kdump-zlib with every
   zero page shared (``--kdump-zero-pages shared``) and excluded (``exclude``), to measure the
   descriptor cost of each choice;
4. QEMU's kdump-zlib (through qmpdump's relay; what it allocates is punched out again after).

Floor, ELF, each codec and QEMU's: median of ``--repeat`` runs, alternating. Printed: wall
time, output size (apparent and on disk), the VM's pause caused by the dump (None: it was
already stopped), host memory growth. Then the targets, as ratios within this run (the
machine is shared): our kdump-zlib no larger than QEMU's and at least 3x faster; the fastest
codec at most 2x the floor; zero host growth.

Run from the repository root: ``.venv/bin/python bench/kdump.py [--pattern-mib N] [--repeat N]``
(a few minutes under TCG, most of it booting and plugging).
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines import (
    REFERENCE,
    Row,
    fmt_bytes,
    measure_floor,
    median_row,
    populated_bytes,
    restore_holes,
    shmem_bytes,
)

from qmpdump.engines.run import run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName
from qmpdump.kdump.codecs import CODECS, auto_codec
from qmpdump.kdump.plan import ZeroPages
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import survey
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, launch


async def _measure(vm: VM, name: str, target: Path, spec: DumpSpec) -> Row:
    """One dump through qmpdump's own code path; growth over every RAM region (anonymous too,
    from the survey) and of the backing files, QEMU's allocations punched out again after."""
    async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
        before = await survey(qmp)
        files_from = populated_bytes(before)
        shmem_from = shmem_bytes()
        t0 = time.perf_counter()
        outcome = await run_dump(qmp, target, spec)
        wall = time.perf_counter() - t0
        after = await survey(qmp)
        growth = max(
            populated_bytes(after) - files_from,
            after.population.populated.total - before.population.populated.total,
        )
        shmem_growth = shmem_bytes() - shmem_from
        await asyncio.to_thread(restore_holes, before)
    st = os.stat(target)
    for path in (target, target.with_name(target.name + ".json")):
        path.unlink(missing_ok=True)
    return Row(name, wall, st.st_size, st.st_blocks * 512, outcome.paused_s, growth, shmem_growth)


async def _ours(vm: VM, name: str, target: Path, fmt: DumpFormat, **options: Any) -> Row:
    spec = DumpSpec(engine=EngineName.BACKEND, format=fmt, **options)
    return await _measure(vm, name, target, spec)


async def main(pattern_mib: int, repeat: int, out_dir: Path, *, anon: bool) -> int:
    """Boot, measure, print."""
    spec = dataclasses.replace(REFERENCE, pattern_mib=pattern_mib)
    if anon:
        vmem = tuple(dataclasses.replace(v, backend=Backend.RAM) for v in spec.virtio_mem)
        spec = dataclasses.replace(spec, ram_backend=Backend.RAM, virtio_mem=vmem)
    kind = "anonymous-RAM" if anon else "reference"
    print(f"booting the {kind} VM (pattern {pattern_mib} MiB) ...", flush=True)
    t0 = time.monotonic()
    runs: dict[str, list[Row]] = {}
    async with launch(spec) as vm:
        print(f"  up and plugged in {time.monotonic() - t0:.1f} s", flush=True)
        assert vm.qmp is not None
        await vm.qmp.execute("stop")
        async with QMPSession(str(vm.qmp_path), timeout_s=60) as qmp:
            first = await survey(qmp)
        populated = first.population.populated.total
        for i in range(repeat):
            if not anon:  # the floor copies backing files; anonymous RAM has none
                runs.setdefault("floor (sendfile)", []).append(
                    measure_floor(first, out_dir / "floor.raw")
                )
            runs.setdefault("our elf", []).append(
                await _ours(vm, "our elf", out_dir / f"e{i}.elf", DumpFormat.ELF)
            )
            for codec in CODECS:
                name = f"our kdump-{codec}"
                fmt = DumpFormat(f"kdump-{codec}")
                runs.setdefault(name, []).append(
                    await _ours(vm, name, out_dir / f"k{i}.kdump", fmt)
                )
            # QEMU's faults in the holes it reads; measure_dump punches them out again.
            runs.setdefault("qemu kdump-zlib", []).append(
                await _measure(
                    vm,
                    "qemu kdump-zlib",
                    out_dir / "q.kdump",
                    DumpSpec(engine=EngineName.QEMU, format=DumpFormat.KDUMP_ZLIB),
                )
            )
        rows = [median_row(r) for r in runs.values()]
        for mode in (ZeroPages.SHARED, ZeroPages.EXCLUDE):
            name = f"our kdump-zlib {mode}"
            target = out_dir / "m.kdump"
            rows.append(await _ours(vm, name, target, DumpFormat.KDUMP_ZLIB, kdump_zero_pages=mode))

    print(
        f"\nguest RAM {first.layout.ram.total / GiB:.2f} GiB; populated on the host "
        f"{populated / MiB:.1f} MiB; VM stopped during all dumps; median of {repeat} "
        f"alternating runs where listed; cpus {os.cpu_count()}; auto codec here: {auto_codec()}\n"
    )
    print(
        f"{'dump':<28} {'wall s':>7} {'output MiB':>10} {'on disk MiB':>11} "
        f"{'paused s':>8} {'host growth MiB':>15} {'Shmem growth MiB':>16}"
    )
    for r in rows:
        paused = "-" if r.paused_s is None else f"{r.paused_s:.2f}"
        print(
            f"{r.name:<28} {r.wall_s:7.2f} {fmt_bytes(r.size):>10} {fmt_bytes(r.allocated):>11} "
            f"{paused:>8} {fmt_bytes(r.growth):>15} {fmt_bytes(r.shmem_growth):>16}"
        )
    for name, got in runs.items():
        print(f"  {name}: {', '.join(f'{r.wall_s:.2f}' for r in got)} s")
    by = {r.name: r for r in rows}
    qemu, zlib = by["qemu kdump-zlib"], by["our kdump-zlib"]
    floor = by.get("floor (sendfile)", by["our elf"])
    fastest = min((by[f"our kdump-{c}"] for c in CODECS), key=lambda r: r.wall_s)
    speedup = qemu.wall_s / zlib.wall_s
    vs_floor = fastest.wall_s / floor.wall_s
    ours = [r for r in rows if r.name.startswith("our ")]
    print()
    print(
        f"our kdump-zlib vs qemu's: {zlib.size / qemu.size:.2f}x the size (target <= 1)  "
        f"{'OK' if zlib.size <= qemu.size else 'MISS'}; {speedup:.1f}x faster (target >= 3x)  "
        f"{'OK' if speedup >= 3 else 'MISS'}"
    )
    print(
        f"fastest codec ({fastest.name}) vs {floor.name}: {vs_floor:.2f}x (target <= 2x)  "
        f"{'OK' if vs_floor <= 2 else 'MISS'}"
    )
    # Growth = populated bytes of the VM's backing files (Shmem is machine-wide: others' VMs).
    grown = [r.name for r in ours if r.growth]
    print(
        f"host memory growth of our dumps: {max(r.growth for r in ours)} bytes (target 0)  "
        f"{'OK' if not grown else 'MISS: ' + ', '.join(grown)}; qemu's: "
        f"{qemu.growth / MiB:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--anon",
        action="store_true",
        help="anonymous RAM (memory-backend-ram) for main RAM and virtio-mem; no sendfile "
        "floor, our ELF is the reference instead",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where dumps go (default: temp)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="qmpdump-bench-kdump-", dir="/var/tmp"))
    try:
        sys.exit(asyncio.run(main(args.pattern_mib, args.repeat, folder, anon=args.anon)))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
