"""Engine 3, the background snapshot, on real QEMU (10.0; refused on 7.2).

The reference is QEMU's own dump, as for the sparse reader (``test_dump_backend.py``):

* a VM stopped before the dump stays stopped, so QEMU's dump of it afterwards shows the same
  instant: every data byte, every zero-fill range and the notes (CPU state, VMCOREINFO) must be
  identical, and the consumers (drgn, makedumpfile, volatility3, pyelftools) must read it;
* on a running guest, idle after writing its pattern, the pattern pages must equal QEMU's later
  dump; the VM was paused only briefly, the notes were read inside that pause (STOP, then the
  probe's DUMP_COMPLETED, then RESUME), the migration capabilities are as before, and the
  sidecar records the host memory growth, predicted and measured;
* faults (cancel, disk full, a migration already running, qmpdump killed mid-stream) end with
  the guest running, no partial file, and the capabilities restored.

Which QEMU: the testbed's (``QMPDUMP_QEMU_BUILD``, or a binary in ``QMPDUMP_QEMU``). On QEMU
older than 8.1 only the refusal is tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines.base import Progress
from qmpdump.engines.run import DumpTask, run_dump
from qmpdump.engines.snapshot import SnapshotDumpRequest, dump_with_snapshot
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.errors import DiskFull, DumpBusy, DumpCancelled, DumpError
from qmpdump.output import DumpFile
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.qemus import default_build, resolve
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec

from .clirun import run_cli
from .conftest import VMFactory
from .test_dump_backend import (
    PATTERN_PAGE,
    check_consumers,
    check_files,
    compare_cores,
    dumps,  # noqa: F401 - fixture
    leftovers,
    read_core,
    status,
    tiny_tmpfs,
)

PAGE = 4096


def _qemu_version() -> tuple[int, int]:
    binary = resolve(default_build()).binary
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (0, 0)


QEMU = _qemu_version()
SUPPORTED = QEMU >= (8, 1)
needs_snapshot = pytest.mark.skipif(not SUPPORTED, reason=f"QEMU {QEMU} has no safe snapshot")


def _spec(name: str, backend: Backend, *, pattern_mib: int = 16) -> VMSpec:
    return VMSpec(
        name=name,
        ram_backend=backend,
        ram_size=512 * MiB,
        below_4g=256 * MiB,
        virtio_mem=(VirtioMemSpec(backend=backend, max_size=1 * GiB, requested_size=256 * MiB),),
        pattern_mib=pattern_mib,
    )


async def capabilities(session: QMPSession) -> dict[str, bool]:
    caps = await session.execute("query-migrate-capabilities")
    return {c["capability"]: bool(c["state"]) for c in caps}


async def migration_status(session: QMPSession) -> str | None:
    reply: dict[str, Any] = await session.execute("query-migrate")
    return reply.get("status")


@pytest.fixture(scope="module")
async def snap_vm() -> AsyncIterator[VM]:
    """One running guest on anonymous RAM that the tests leave running."""
    from qmpdump.testbed.vm import start  # noqa: PLC0415 - keep the import next to its use

    vm = await start(_spec("qmpdump-snap", Backend.RAM))
    try:
        yield vm
    finally:
        await vm.stop()


async def assert_runs(vm: VM) -> None:
    """The guest runs (QEMU says so, and its clock advances between two reads)."""
    assert vm.qmp is not None
    assert await status(vm) == "running"


# ================================================================ refusal where unsafe


@pytest.mark.guest
@pytest.mark.skipif(SUPPORTED, reason="only QEMU before 8.1 refuses")
async def test_refused_before_qemu_8_1(snap_vm: VM, dumps: Path) -> None:  # noqa: F811
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        with pytest.raises(DumpError, match=r"blocked on its next write"):
            await run_dump(session, dumps / "x.elf", DumpSpec(engine=EngineName.SNAPSHOT))
        assert await capabilities(session) == caps
    assert not list(dumps.iterdir())
    await assert_runs(snap_vm)


@pytest.mark.guest
async def test_the_cli_dumps_with_the_snapshot_engine_or_says_why_not(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
) -> None:
    target = dumps / "cli.elf"
    code, out, err = await run_cli(
        "dump",
        "--qmp",
        str(snap_vm.qmp_path),
        "--engine",
        "snapshot",
        "--json",
        "-o",
        str(target),
        timeout_s=300.0,
    )
    if not SUPPORTED:
        assert code == DumpError.exit_code, (code, err)  # choose_engine: "cannot dump this VM"
        assert "blocked on its next write" in err
        assert not target.exists()
    else:
        assert code == 0, err
        summary = json.loads(out)
        assert summary["engine"] == "snapshot"
        record = check_files(target)
        assert record["request"]["mode"] == "snapshot"
    await assert_runs(snap_vm)


# ================================================================ fidelity


@pytest.mark.guest
@needs_snapshot
@pytest.mark.parametrize("backend", [Backend.RAM, Backend.MEMFD])
async def test_snapshot_of_a_stopped_vm_equals_qemus_dump(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
    backend: Backend,
) -> None:
    vm = await vm_factory(_spec(f"snap-stopped-{backend}", backend))
    assert vm.qmp is not None
    await vm.qmp.execute("stop")
    async with QMPSession(str(vm.qmp_path)) as session:
        ours = await run_dump(
            session,
            dumps / "ours.elf",
            DumpSpec(engine=EngineName.SNAPSHOT, max_host_growth=2 * GiB),
        )
        assert await status(vm) == "paused"  # left as found
        qemu = await run_dump(session, dumps / "qemu.elf", DumpSpec(engine=EngineName.QEMU))
    assert await status(vm) == "paused"
    mine, theirs = read_core(ours.path), read_core(qemu.path)
    assert mine.coverage == theirs.coverage
    assert mine.notes == theirs.notes  # CPU state and VMCOREINFO of the same instant
    found = compare_cores(mine, theirs)
    assert found.data_bytes > 0
    assert found.pattern_pages >= 16 * MiB // PAGE
    record = check_files(ours.path)
    assert record["engine"] == "snapshot"
    details = record["request"]
    assert details["mode"] == "snapshot"
    assert details["data_pages"] + details["zero_pages"] == mine.coverage.total // PAGE
    growth_record = details["host_growth"]
    if backend is Backend.RAM:
        assert growth_record["predicted_bytes"] == 0
        assert growth_record["measured_bytes"] == 0
    else:
        assert growth_record["predicted_bytes"] > 0
        # Within 5 % of the prediction (the target); measured exactly equal here.
        assert abs(growth_record["measured_bytes"] - growth_record["predicted_bytes"]) <= (
            growth_record["predicted_bytes"] // 20
        )
    check_consumers(ours.path, found, vm.spec.cpus, dumps)
    await vm.qmp.execute("cont")


@pytest.mark.guest
@needs_snapshot
async def test_snapshot_of_a_running_vm_pauses_it_briefly(snap_vm: VM, dumps: Path) -> None:  # noqa: F811
    assert snap_vm.qmp is not None
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        with session.listen("STOP", "RESUME", "DUMP_COMPLETED") as listener:
            ours = await run_dump(session, dumps / "ours.elf", DumpSpec(engine=EngineName.SNAPSHOT))
            heard = listener.drain()
        await assert_runs(snap_vm)
        assert await capabilities(session) == caps
        assert await migration_status(session) == "completed"
        # qmpdump never stops the VM: two pauses of QEMU's own. First its probe dump (the
        # coverage, notes of the right size), then the snapshot point itself, inside which
        # QEMU stashed the vCPUs' state that the notes are built from.
        names = [e.event for e in heard]
        assert names == ["STOP", "DUMP_COMPLETED", "RESUME", "STOP", "RESUME"], names
        assert ours.paused_s is not None
        assert ours.paused_s < 1.0
        timings = check_files(ours.path)["request"]["timings_s"]
        assert timings["instant"] == 1.0
        total = timings["instant_paused_s"] + timings["probe_paused_s"]
        assert total == pytest.approx(ours.paused_s, abs=1e-5)  # the sidecar rounds to 1 us
        qemu = await run_dump(session, dumps / "qemu.elf", DumpSpec(engine=EngineName.QEMU))
    mine, theirs = read_core(ours.path), read_core(qemu.path)
    assert mine.coverage == theirs.coverage
    # The guest is idle after its pattern: those pages are the same at both instants.
    pattern = 0
    with ours.path.open("rb") as a, qemu.path.open("rb") as b:
        from .test_dump_backend import GpaReader  # noqa: PLC0415

        ra, rb = GpaReader(mine, a.fileno()), GpaReader(theirs, b.fileno())
        for rng in theirs.data:
            for gpa in range(rng.start, rng.end, 4 * MiB):
                size = min(4 * MiB, rng.end - gpa)
                want = rb.read(gpa, size)
                if PATTERN_PAGE in want:
                    got = ra.read(gpa, size)
                    for page in range(0, size, PAGE):
                        if want[page : page + PAGE] == PATTERN_PAGE:
                            assert got[page : page + PAGE] == PATTERN_PAGE, hex(gpa + page)
                            pattern += 1
    assert pattern >= 16 * MiB // PAGE
    check_files(ours.path)


@pytest.mark.guest
@needs_snapshot
async def test_where_qmpdump_makes_the_instant_the_notes_are_read_inside_its_pause(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
) -> None:
    """The fallback for cores whose notes qmpdump does not build (another architecture, x86
    outside long mode): qmpdump stops the VM, reads QEMU's notes of the stopped VM, starts the
    snapshot and resumes at its first page. Forced here on the x86-64 guest."""
    assert snap_vm.qmp is not None
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        with session.listen("STOP", "RESUME", "DUMP_COMPLETED") as listener:
            with DumpFile.create(dumps / "stop.elf") as output:
                result = await dump_with_snapshot(
                    session, output, SnapshotDumpRequest(instant="stop")
                )
                path = output.commit()
            heard = [e.event for e in listener.drain()]
        await assert_runs(snap_vm)
        assert await capabilities(session) == caps
        qemu = await run_dump(session, dumps / "qemu.elf", DumpSpec(engine=EngineName.QEMU))
    # One pause, ours: QEMU's notes were read inside it (its probe dump completed in it).
    assert heard == ["STOP", "DUMP_COMPLETED", "RESUME"], heard
    assert result.timings["instant"] == 0.0
    assert result.paused_s is not None
    mine, theirs = read_core(path), read_core(qemu.path)
    assert mine.coverage == theirs.coverage
    assert result.size == path.stat().st_size


# ================================================================ faults


@pytest.mark.guest
@needs_snapshot
async def test_a_running_migration_makes_the_vm_busy(snap_vm: VM, dumps: Path) -> None:  # noqa: F811
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        # Someone else's migration that cannot finish: a socket nobody reads.
        ours, theirs = socket.socketpair()
        try:
            fdname = await session.pass_fd(theirs.fileno())
            await session.execute("migrate", {"uri": f"fd:{fdname}"})
            with pytest.raises(DumpBusy, match="migration is already running"):
                await run_dump(session, dumps / "x.elf", DumpSpec(engine=EngineName.SNAPSHOT))
            assert await capabilities(session) == caps
        finally:
            await session.execute("migrate_cancel")
            ours.close()
            theirs.close()
            for _ in range(200):
                if await migration_status(session) in ("cancelled", "failed", "completed"):
                    break
                await asyncio.sleep(0.05)
        if await status(snap_vm) != "running":  # a classic migration may have stopped it
            await session.execute("cont")
    assert not list(dumps.iterdir())
    await assert_runs(snap_vm)


async def _wait_migrating(session: QMPSession) -> None:
    for _ in range(2000):
        if await migration_status(session) == "active":
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the snapshot never became active")


@pytest.mark.guest
@needs_snapshot
async def test_cancel_mid_stream(snap_vm: VM, dumps: Path) -> None:  # noqa: F811
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        tasks: list[DumpTask] = []

        def progress(p: Progress) -> None:
            if p.completed > 0 and tasks:
                tasks[0].cancel()

        spec = DumpSpec(engine=EngineName.SNAPSHOT)
        tasks.append(DumpTask(run_dump(session, dumps / "x.elf", spec, progress=progress)))
        with pytest.raises(DumpCancelled):
            await tasks[0].result()
        assert await capabilities(session) == caps
        assert await migration_status(session) in ("cancelled", "failed")
    assert leftovers(dumps) == []
    await assert_runs(snap_vm)


@pytest.mark.guest
@needs_snapshot
async def test_disk_full_ends_cleanly(snap_vm: VM, tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small", "24m") as small:
        async with QMPSession(str(snap_vm.qmp_path)) as session:
            caps = await capabilities(session)
            with pytest.raises(DiskFull):
                await run_dump(session, small / "x.elf", DumpSpec(engine=EngineName.SNAPSHOT))
            assert await capabilities(session) == caps
            assert await migration_status(session) in ("cancelled", "failed")
        assert leftovers(small) == []
    await assert_runs(snap_vm)


@pytest.mark.guest
@needs_snapshot
async def test_qmpdump_killed_mid_stream_leaves_the_guest_running(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
) -> None:
    """SIGKILL of the CLI while QEMU streams: the socket closes, QEMU's snapshot fails, and
    QEMU 8.1+ write-unprotects guest RAM on that path; the guest runs on."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qmpdump.cli.main",
        "dump",
        "--qmp",
        str(snap_vm.qmp_path),
        "--engine",
        "snapshot",
        "-o",
        str(dumps / "x.elf"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert snap_vm.qmp is not None
        for _ in range(4000):
            reply = await snap_vm.qmp.execute("query-migrate")
            streaming = reply.get("status") == "active" and reply.get("ram", {}).get("transferred")
            # Past the pause (a kill inside it leaves the VM paused, as with the backend
            # engine: the daemon's journal resumes it at its next start).
            if streaming and await status(snap_vm) == "running":
                break
            await asyncio.sleep(0.002)
        else:
            raise AssertionError("the snapshot never streamed")
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
    assert snap_vm.qmp is not None
    for _ in range(400):
        if (await snap_vm.qmp.execute("query-migrate")).get("status") in ("failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
    assert (await snap_vm.qmp.execute("query-migrate")).get("status") in ("failed", "cancelled")
    await assert_runs(snap_vm)
    # The guest is not blocked on a write-protected page: a later snapshot completes.
    caps = {
        c["capability"]: c["state"] for c in await snap_vm.qmp.execute("query-migrate-capabilities")
    }
    if caps.get("background-snapshot"):  # the killed run could not restore them
        await snap_vm.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": False}]},
        )
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        again = await run_dump(session, dumps / "again.elf", DumpSpec(engine=EngineName.SNAPSHOT))
    assert again.size > 0
    # Nothing is presented as a dump; the killed run's .partial is the daemon's to remove at
    # its next start (the CLI cannot clean up after SIGKILL).
    assert not (dumps / "x.elf").exists()
    await assert_runs(snap_vm)
