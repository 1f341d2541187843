"""The fidelity matrix: every memory configuration a fleet runs, dumped as QEMU itself would.

For each configuration one guest boots, writes its pattern, and is stopped; then ``--engine auto``
dumps it, and QEMU's own ``dump-guest-memory`` (ELF) dumps the same stopped VM. Page by page,
every page QEMU dumps equals ours (same coverage; every data byte of ours equals QEMU's at its
gpa; what we leave out is zero in QEMU's), with ``compare_cores`` of ``test_dump_backend``.
Where the backend engine cannot prove that what it would read holds the guest's bytes
(``qmpdump.survey``), ``auto`` must choose QEMU's engine and say why, and ``--engine backend``
must refuse with exit 49 and no traceback. Our dump must not change the host's populated memory
(a read through a private mapping of a shmem hole would allocate a page).

Where QEMU offers it (8.1 and later), the snapshot engine dumps the same stopped VM too, before
QEMU's engine (whose reads allocate the holes of shmem RAM): its notes, coverage and bytes equal
QEMU's dump, and the host memory QEMU's pre-touch took is within 5 % of the engine's prediction
(the summary's last column). Where the prediction cannot be made (private hugetlb: the holes are
unknown) it refuses and says why.

==================  ====================================================  ===============
case                memory                                                 auto chooses
==================  ====================================================  ===============
memfd-shared        main memfd share=on; virtio-mem file share=on, 384M   backend
 vmem-unplug         ... then unplugged to 192M (same VM)                  backend
memfd-private       main memfd share=off; virtio-mem memfd share=off      backend
file-shared         main file share=on                                     backend
file-private        main file share=off, prealloc=on                      backend
default-pcram       default pc.ram; virtio-mem memory-backend-ram          backend
backend-ram         main memory-backend-ram                               backend
hugetlb-shared      main memfd hugetlb=on share=on (2 MiB pages)          backend
hugetlb-private     main memfd hugetlb=on share=off                       qemu (refusal)
hugetlbfs-file      main file on a hugetlbfs mount the test makes         backend
numa                node0 memfd shared, node1 file private; virtio-mem    backend
                    (memfd) on node 1
 pc-dimm             ... then a pc-dimm hot-plugged (object-add,           backend
                    device_add; same VM)
==================  ====================================================  ===============

Main RAM is 256 MiB (NUMA: 128 MiB a node), virtio-mem 512 MiB at most, the guest's pattern 8 MiB.
The hugetlb cases add to ``vm.nr_hugepages`` for themselves and take them back after, pass or
fail. Each row of the matrix (pages compared, mismatches, engine chosen, QEMU version) goes into
the run's terminal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines.run import DumpOutcome, run_dump
from qmpdump.engines.snapshot import snapshot_supported
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.errors import SnapshotRefused
from qmpdump.host.procmem import read_process_memory
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import RegionAccess, survey
from qmpdump.testbed.vm import (
    VM,
    Backend,
    BackendOptions,
    DimmSpec,
    GiB,
    MiB,
    NumaNodeSpec,
    VirtioMemSpec,
    VMSpec,
)

from .clirun import run_cli
from .conftest import SUMMARY, VMFactory
from .test_dump_backend import CHUNK, PAGE, Core, compare_cores, dumps, read_core

__all__ = ["dumps"]  # the fixture, re-used

PATTERN_MIB = 8
RAM = 256 * MiB
VMEM_MAX = 512 * MiB
PRIVATE = BackendOptions(share=False)
HUGE = BackendOptions(hugetlb=True)
HUGE_PAGE = 2 * MiB
#: the exit code of SourceUnproven (qmpdump.errors)
REFUSED = 49


@dataclass(frozen=True)
class Row:
    case: str
    version: str
    pages: int
    mismatches: int
    engine: str
    reason: str
    #: per fd-backed region: populated pages whose file content differs from QEMU's memory
    file_differs: str = "-"
    #: the snapshot engine on the same stopped VM: equal to QEMU's dump, or refused (and why)
    snapshot: str = "-"


ROWS: list[Row] = []


def _summary_line(row: Row) -> str:
    return (
        f"fidelity: {row.case:<16} QEMU {row.version:<7} pages compared {row.pages:>7}  "
        f"mismatches {row.mismatches}  engine {row.engine:<7} file!=memory {row.file_differs} "
        f"({row.reason}) snapshot: {row.snapshot}"
    )


@dataclass(frozen=True)
class Case:
    spec: VMSpec
    expect: str = "backend"
    #: huge pages this case needs reserved
    huge_pages: int = 0
    #: main RAM on a file in a hugetlbfs mount the test makes
    hugetlbfs_mount: bool = False
    #: stages after the first comparison, each compared again
    stages: tuple[str, ...] = ()
    #: the snapshot engine, where offered: "same" as QEMU's dump, or "refused" (and says why)
    snapshot: str = "same"

    @property
    def id(self) -> str:
        return self.spec.name


def _spec(name: str, **kwargs: object) -> VMSpec:
    base: dict[str, object] = {
        "name": name,
        "machine": "q35",
        "ram_size": RAM,
        "pattern_mib": PATTERN_MIB,
    }
    base.update(kwargs)
    return VMSpec(**base)  # type: ignore[arg-type]


CASES = [
    Case(
        _spec(
            "memfd-shared",
            ram_backend=Backend.MEMFD,
            virtio_mem=(
                VirtioMemSpec(backend=Backend.FILE, max_size=VMEM_MAX, requested_size=384 * MiB),
            ),
        ),
        stages=("vmem-unplug",),
    ),
    Case(
        _spec(
            "memfd-private",
            ram_backend=Backend.MEMFD,
            ram_options=PRIVATE,
            virtio_mem=(
                VirtioMemSpec(
                    backend=Backend.MEMFD,
                    max_size=VMEM_MAX,
                    requested_size=256 * MiB,
                    options=PRIVATE,
                ),
            ),
        )
    ),
    Case(_spec("file-shared", ram_backend=Backend.FILE)),
    Case(
        _spec(
            "file-private",
            ram_backend=Backend.FILE,
            ram_options=BackendOptions(share=False, prealloc=True),
        )
    ),
    Case(
        _spec(
            "default-pcram",
            virtio_mem=(
                VirtioMemSpec(backend=Backend.RAM, max_size=VMEM_MAX, requested_size=256 * MiB),
            ),
        )
    ),
    Case(_spec("backend-ram", ram_backend=Backend.RAM)),
    Case(
        _spec("hugetlb-shared", ram_backend=Backend.MEMFD, ram_options=HUGE),
        huge_pages=RAM // HUGE_PAGE,
    ),
    Case(
        _spec(
            "hugetlb-private",
            ram_backend=Backend.MEMFD,
            ram_options=BackendOptions(share=False, hugetlb=True),
        ),
        expect="qemu",
        huge_pages=RAM // HUGE_PAGE,
        # A read fault on a hole of a private hugetlb mapping takes a huge page from the pool;
        # the holes are not known, so neither is what QEMU's pre-touch would take.
        snapshot="refused",
    ),
    Case(
        _spec("hugetlbfs-file", ram_backend=Backend.FILE),
        huge_pages=RAM // HUGE_PAGE,
        hugetlbfs_mount=True,
    ),
    Case(
        _spec(
            "numa",
            numa=(
                NumaNodeSpec(RAM // 2, Backend.MEMFD),
                NumaNodeSpec(RAM // 2, Backend.FILE, PRIVATE),
            ),
            virtio_mem=(
                VirtioMemSpec(
                    backend=Backend.MEMFD, max_size=VMEM_MAX, requested_size=256 * MiB, node=1
                ),
            ),
            dimm_slots=2,
            dimm_space=256 * MiB,
        ),
        stages=("pc-dimm",),
    ),
]


# ================================================================ huge pages


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def huge_pages_reserved(count: int) -> Iterator[None]:
    """Add ``count`` 2 MiB pages to the pool (``vm.nr_hugepages``); restore it after, always."""
    # Relative, not absolute: another reservation made meanwhile is left alone.
    NR_HUGEPAGES.write_text(str(int(NR_HUGEPAGES.read_text()) + count))
    try:
        free = _meminfo("HugePages_Free")
        if free < count:
            pytest.skip(f"the kernel gave only {free} of {count} huge pages (memory fragmented)")
        yield
    finally:
        NR_HUGEPAGES.write_text(str(max(0, int(NR_HUGEPAGES.read_text()) - count)))


@contextlib.contextmanager
def hugetlbfs_mount() -> Iterator[Path]:
    """A private hugetlbfs mount (2 MiB pages), unmounted and removed after."""
    folder = Path(tempfile.mkdtemp(prefix="qmpdump-hugetlbfs-"))
    try:
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M,mode=0700", "none", str(folder)],
            check=True,
            capture_output=True,
        )
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True, capture_output=True)
    finally:
        folder.rmdir()


@contextlib.asynccontextmanager
async def host_setup(case: Case) -> AsyncIterator[VMSpec]:
    """Reserve what the case needs on the host; the spec to launch with."""
    with contextlib.ExitStack() as stack:
        spec = case.spec
        if case.huge_pages:
            stack.enter_context(huge_pages_reserved(case.huge_pages))
        if case.hugetlbfs_mount:
            mount = stack.enter_context(hugetlbfs_mount())
            options = BackendOptions(mem_dir=mount)
            spec = replace(spec, ram_options=options)
        yield spec


# ================================================================ one comparison


async def _populated(vm: VM) -> dict[str, int]:
    async with QMPSession(str(vm.qmp_path)) as session:
        result = await survey(session)
    return {r: p.offsets.total for r, p in result.population.regions.items()}


def _differing_pages(pid: int, access: RegionAccess, offsets: RangeSet) -> int:
    """Populated pages of a region whose backing file holds other bytes than QEMU's memory."""
    assert access.path is not None
    assert access.hva is not None
    differ = 0
    buf = bytearray(CHUNK)
    fd = os.open(access.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for run in offsets:
            for offset in range(run.start, run.end, CHUNK):
                size = min(CHUNK, run.end - offset)
                view = memoryview(buf)[:size]
                # pread of a hole (shmem, hugetlbfs) reads zeros without allocating; QEMU's
                # memory is read only where populated, as the backend engine does.
                in_file = os.pread(fd, size, access.file_offset + offset)
                read_process_memory(pid, access.hva + offset, view)
                if in_file != view:
                    differ += sum(
                        in_file[i : i + PAGE] != view[i : i + PAGE] for i in range(0, size, PAGE)
                    )
    finally:
        os.close(fd)
    return differ


async def file_versus_memory(vm: VM) -> str:
    """For each fd-backed region: how many populated pages the file holds differently from
    QEMU's address space (the finding behind the sources chosen: 0 for shared mappings)."""
    async with QMPSession(str(vm.qmp_path)) as session:
        result = await survey(session)
    parts = []
    for region, access in sorted(result.access.items()):
        population = result.population.regions[region]
        if access.path is None or access.hva is None or not population.known:
            continue
        differ = await asyncio.to_thread(_differing_pages, vm.pid, access, population.offsets)
        parts.append(f"{region} {differ}/{population.offsets.total // PAGE}")
    return ", ".join(parts) or "-"


async def snapshot_dump(vm: VM, dumps: Path, label: str, version: str) -> DumpOutcome | str:
    """The snapshot engine on the stopped VM, before QEMU's engine reads (and so allocates) the
    holes of shmem RAM; or why not: a refusal that says why, with nothing left behind."""
    if not snapshot_supported(version)[0]:
        return "- (not offered on this QEMU)"
    out = dumps / "snapshot"
    spec = DumpSpec(engine=EngineName.SNAPSHOT, max_host_growth=64 * GiB)
    async with QMPSession(str(vm.qmp_path)) as session:
        try:
            snap = await run_dump(session, out / f"{label}.snap.elf", spec)
        except SnapshotRefused as err:
            assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
            return f"refused ({err})"
    assert vm.qmp is not None
    assert (await vm.qmp.execute("query-status"))["status"] == "paused"  # left as found
    return snap


async def snapshot_versus_qemu(snap: DumpOutcome | str, label: str, qemu_core: Core) -> str:
    """The snapshot's core has the same notes, coverage and bytes as QEMU's dump of the same
    stopped VM, and the host memory it took is within 5 % of its prediction."""
    if isinstance(snap, str):
        return snap
    core = await asyncio.to_thread(read_core, snap.path)
    assert core.notes == qemu_core.notes, f"{label}: snapshot notes differ from QEMU's"
    assert core.coverage == qemu_core.coverage, f"{label}: snapshot coverage differs"
    found = await asyncio.to_thread(compare_cores, core, qemu_core)
    assert found.pattern_pages >= PATTERN_MIB * MiB // PAGE
    record: dict[str, Any] = json.loads(snap.sidecar.read_text())
    growth = record["request"]["host_growth"]
    predicted, measured = growth["predicted_bytes"], growth["measured_bytes"]
    assert abs(measured - predicted) <= predicted // 20, growth
    snap.path.unlink()
    snap.sidecar.unlink()
    return f"same as QEMU's, host growth {measured / MiB:.0f} MiB (predicted {predicted / MiB:.0f})"


async def compare_stage(
    vm: VM, dumps: Path, label: str, expect: str, snap_expect: str = "same"
) -> Row:
    """Stop the VM, dump it with auto, the snapshot engine and QEMU's engine, compare page by
    page, resume."""
    assert vm.qmp is not None
    await vm.qmp.execute("stop")
    try:
        before = await _populated(vm)
        async with QMPSession(str(vm.qmp_path)) as session:
            ours = await run_dump(session, dumps / f"{label}.ours.elf", DumpSpec())
        after = await _populated(vm)
        # The sidecar as written (JSON), whatever model the engine keeps it in.
        record: dict[str, Any] = json.loads(ours.sidecar.read_text())
        reason = str(record["engine_reason"])
        assert ours.engine == expect, f"{label}: auto chose {ours.engine}: {reason}"
        if ours.engine == "backend":
            assert after == before, f"{label}: our dump changed populated memory"
            sources = record["request"]["sources"]
            assert all(s["read_from"] and s["proof"] for s in sources.values()), sources
            reason = ", ".join(f"{r}: {s['read_from']}" for r, s in sources.items())
        else:
            code, out, err = await run_cli(
                "dump",
                "--qmp",
                str(vm.qmp_path),
                "-o",
                str(dumps / "refused" / "x.elf"),
                "--engine",
                "backend",
            )
            assert code == REFUSED, (code, out, err)
            assert "Traceback" not in err
            assert "cannot dump this VM" in err, err
            assert "--engine qemu" in err, err
            assert not (dumps / "refused").exists() or not list((dumps / "refused").iterdir())
        version = str(record["vm"]["qemu_version"])
        snap = await snapshot_dump(vm, dumps, label, version)
        if isinstance(snap, str) and snapshot_supported(version)[0]:
            assert snap_expect == "refused", f"{label}: snapshot {snap}"
            assert "cannot be predicted" in snap, snap
        elif not isinstance(snap, str):
            assert snap_expect == "same", f"{label}: the snapshot engine ran"
        async with QMPSession(str(vm.qmp_path)) as session:
            qemu = await run_dump(
                session, dumps / f"{label}.qemu.elf", DumpSpec(engine=EngineName.QEMU)
            )
        ours_core = await asyncio.to_thread(read_core, ours.path)
        qemu_core = await asyncio.to_thread(read_core, qemu.path)
        assert ours_core.notes == qemu_core.notes
        assert ours_core.coverage == qemu_core.coverage
        found = await asyncio.to_thread(compare_cores, ours_core, qemu_core)
        assert found.pattern_pages >= PATTERN_MIB * MiB // PAGE
        pages = (found.data_bytes + found.zero_bytes) // PAGE
        assert pages == qemu_core.coverage.total // PAGE
        differ = await file_versus_memory(vm)
        ours.path.unlink()
        snapshot = await snapshot_versus_qemu(snap, label, qemu_core)
        row = Row(label, version, pages, 0, ours.engine.value, reason, differ, snapshot)
        qemu.path.unlink()
    finally:
        await vm.qmp.execute("cont")
    ROWS.append(row)
    SUMMARY.append(_summary_line(row))
    print(_summary_line(row))
    return row


async def run_stage(vm: VM, stage: str) -> None:
    """Change the running VM as the stage says, and wait until the guest has done its part."""
    assert vm.qmp is not None
    if stage == "vmem-unplug":
        await vm.resize("vmem0", 192 * MiB)
        (dev,) = await vm.wait_plugged()
        assert dev.size == 192 * MiB
    elif stage == "pc-dimm":
        await vm.hotplug_dimm(DimmSpec(id="dimm0", size=128 * MiB), node=1)
        devices = await vm.qmp.execute("query-memory-devices")
        assert [d["data"]["id"] for d in devices if d["type"] == "dimm"] == ["dimm0"]
        await asyncio.sleep(2.0)  # the guest's ACPI handler onlines the new memory
    else:
        raise AssertionError(f"unknown stage {stage}")


@pytest.mark.guest
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_fidelity(vm_factory: VMFactory, dumps: Path, case: Case) -> None:
    t0 = time.monotonic()
    async with host_setup(case) as spec:
        vm = await vm_factory(spec)
        try:
            await compare_stage(vm, dumps, case.id, case.expect, case.snapshot)
            for stage in case.stages:
                await run_stage(vm, stage)
                await compare_stage(vm, dumps, stage, case.expect, case.snapshot)
        finally:
            await vm.stop()  # before the huge pages or the mount go
    SUMMARY.append(f"fidelity: {case.id} took {time.monotonic() - t0:.0f} s")
