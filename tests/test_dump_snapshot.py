"""Engine 3, the background snapshot, on real QEMU (10.0; refused on 7.2).

The reference is QEMU's own dump, as for the sparse reader (``test_dump_backend.py``):

* a VM stopped before the dump stays stopped, so QEMU's dump of it afterwards shows the same
  instant: every data byte, every zero-fill range and the notes (CPU state, VMCOREINFO) must be
  identical, and the consumers (drgn, makedumpfile, volatility3, pyelftools) must read it;
* on a running guest, idle after writing its pattern, the pattern pages must equal QEMU's later
  dump; the VM was paused only briefly, the notes were read inside that pause (STOP, then the
  probe's DUMP_COMPLETED, then RESUME), the migration capabilities are as before, and the
  sidecar records the host memory growth, predicted and measured;
* faults (cancel, disk full, a migration already running, qmpdump killed in QEMU's pause or
  mid-stream) end with the guest running, no partial file, and the capabilities restored (after
  a kill: by the next CLI run, from its journal).

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
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qmpdump.cli.settings_journal import SettingsJournal
from qmpdump.engines import snapshot as snapshot_engine
from qmpdump.engines.base import Progress
from qmpdump.engines.run import DumpTask, run_dump
from qmpdump.engines.snapshot import SnapshotDumpRequest, dump_with_snapshot
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.errors import (
    DiskFull,
    DumpBusy,
    DumpCancelled,
    DumpError,
    DumpFailed,
    SnapshotRefused,
)
from qmpdump.output import DumpFile
from qmpdump.qmp.migsettings import MigrationSettings
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


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ("running", None),
        ("paused", None),
        ("prelaunch", "does not allow from 'prelaunch'"),
        ("shutdown", "does not allow from 'shutdown'"),
        ("guest-panicked", "does not allow from 'guest-panicked'"),
        ("suspended", "wake the suspended guest up"),
    ],
)
def test_run_states_a_snapshot_may_start_from(state: str, why: str | None) -> None:
    refusal = snapshot_engine.run_state_refusal(state)
    if why is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert why in str(refusal)
        assert refusal.exit_code == SnapshotRefused.exit_code


@pytest.mark.bare
@needs_snapshot
async def test_a_vm_that_never_ran_is_refused_and_its_qemu_lives(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
) -> None:
    # QEMU held at reset (-S) is in run state 'prelaunch'. A background snapshot from there
    # makes QEMU 10.0 abort ("invalid runstate transition: 'prelaunch' -> 'paused'"), found by
    # trying it. The engine refuses before it changes anything; QEMU's engine dumps the VM.
    vm = await vm_factory(VMSpec(name="snap-prelaunch", guest=False, ram_size=256 * MiB))
    async with QMPSession(str(vm.qmp_path)) as session:
        caps = await capabilities(session)
    target = dumps / "never.elf"
    code, _, err = await run_cli(
        "dump", "--qmp", str(vm.qmp_path), "--engine", "snapshot", "-o", str(target)
    )
    assert code == SnapshotRefused.exit_code, (code, err)
    assert "run state 'prelaunch'" in err, err
    assert "Traceback" not in err
    assert not list(dumps.iterdir())
    assert vm.proc.returncode is None
    assert await status(vm) == "prelaunch"
    async with QMPSession(str(vm.qmp_path)) as session:
        assert await capabilities(session) == caps
        assert await migration_status(session) is None  # no migration was ever started
    code, _, err = await run_cli(
        "dump", "--qmp", str(vm.qmp_path), "--engine", "qemu", "-o", str(target)
    )
    assert code == 0, err
    assert await status(vm) == "prelaunch"


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
    assert details["timings_s"]["instant"] == 1.0  # the notes were decoded from the stream
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


@pytest.mark.guest
@needs_snapshot
async def test_a_resume_by_another_client_inside_qmpdumps_pause_leaves_no_dump(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where qmpdump makes the instant, the notes are read inside its pause and the memory is
    taken at QEMU's snapshot point a moment later: another QMP client that resumes (or resets)
    the VM in between would tear the two apart, so the dump fails and nothing is kept. QEMU is
    real; the probe is held until the other client's ``cont`` has landed, to hit the window."""
    assert snap_vm.qmp is not None
    resumed = asyncio.Event()
    real_probe = snapshot_engine.probe_prefix_without_growth  # type: ignore[attr-defined]

    async def held_probe(*args: Any, **kwargs: Any) -> bytes:
        await asyncio.wait_for(resumed.wait(), 60)
        return await real_probe(*args, **kwargs)

    monkeypatch.setattr(snapshot_engine, "probe_prefix_without_growth", held_probe)
    async with QMPSession(str(snap_vm.qmp_path)) as session:
        caps = await capabilities(session)
        with DumpFile.create(dumps / "torn.elf") as output:
            dump = asyncio.create_task(
                dump_with_snapshot(session, output, SnapshotDumpRequest(instant="stop"))
            )
            while await status(snap_vm) != "paused":
                assert not dump.done()
                await asyncio.sleep(0.005)
            await snap_vm.qmp.execute("cont")  # another client
            resumed.set()
            with pytest.raises(
                DumpFailed, match=r"between its notes and the snapshot point \(RESUME;"
            ):
                await dump
        await assert_runs(snap_vm)
        assert await capabilities(session) == caps
        assert await migration_status(session) in (None, "cancelled", "completed")
    assert not list(dumps.iterdir())


@pytest.mark.guest
@needs_snapshot
async def test_a_stream_without_its_device_description_makes_qemu_pause_for_the_notes(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
) -> None:
    """``-machine suppress-vmdesc=on``: QEMU's stream would not describe the device state the
    notes come from, so the engine takes the stopping instant (and says so), never a guess."""
    spec = _spec("snap-novmdesc", Backend.RAM)
    vm = await vm_factory(replace(spec, machine_options=("suppress-vmdesc=on",)))
    async with QMPSession(str(vm.qmp_path)) as session:
        ours = await run_dump(session, dumps / "ours.elf", DumpSpec(engine=EngineName.SNAPSHOT))
        await assert_runs(vm)
        qemu = await run_dump(session, dumps / "qemu.elf", DumpSpec(engine=EngineName.QEMU))
    assert check_files(ours.path)["request"]["timings_s"]["instant"] == 0.0
    mine, theirs = read_core(ours.path), read_core(qemu.path)
    assert mine.coverage == theirs.coverage
    assert len(mine.notes) == len(theirs.notes)


# ================================================================ faults


@pytest.mark.guest
@needs_snapshot
async def test_a_stuck_output_is_given_up_and_the_guest_released(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that never returns (a hung disk) stops the reader; while nothing is read QEMU
    cannot send, and the guest's writes to pages not sent yet wait. The stream's stall timer
    gives up, the socket is shut, QEMU's snapshot fails and the guest runs on, while the
    reader thread is still blocked. A real disk cannot be made to hang on demand here, so the
    reader's write is replaced by one that blocks until the test releases it."""
    release = threading.Event()
    real_flush = snapshot_engine._Pending.flush
    blocked: list[int] = []

    def stuck_flush(self: Any) -> None:
        if not blocked:
            blocked.append(1)
            release.wait(120)
        real_flush(self)

    monkeypatch.setattr(snapshot_engine._Pending, "flush", stuck_flush)
    assert snap_vm.qmp is not None
    try:
        async with QMPSession(str(snap_vm.qmp_path)) as session:
            caps = await capabilities(session)
            with (
                DumpFile.create(dumps / "stuck.elf") as output,
                pytest.raises(DumpFailed, match="stood still"),
            ):
                await dump_with_snapshot(session, output, SnapshotDumpRequest(stall_s=2.0))
            assert blocked  # the fault happened
            assert not release.is_set()  # and is still there: the guest was freed without it
            await assert_runs(snap_vm)
            assert await capabilities(session) == caps
            assert await migration_status(session) in ("failed", "cancelled")
    finally:
        release.set()
    assert not (dumps / "stuck.elf").exists()
    assert leftovers(dumps) == []


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


async def _cli_dump(
    vm: VM, engine: str, out: Path, runtime: Path, *extra: str
) -> tuple[int, str, str]:
    """``qmpdump dump`` of ``vm`` with its settings journal in ``runtime``."""
    return await run_cli(
        "dump",
        "--qmp",
        str(vm.qmp_path),
        "--engine",
        engine,
        *extra,
        "-o",
        str(out),
        env={"QMPDUMP_RUNTIME_DIR": str(runtime)},
        timeout_s=300.0,
    )


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


async def _migration_settings(vm: VM) -> tuple[dict[str, bool], int]:
    """The VM's migration capabilities and ``max-bandwidth``."""
    assert vm.qmp is not None
    caps = {
        c["capability"]: bool(c["state"])
        for c in await vm.qmp.execute("query-migrate-capabilities")
    }
    params = await vm.qmp.execute("query-migrate-parameters")
    return caps, int(params["max-bandwidth"])


async def _kill_cli_during_snapshot(vm: VM, target: Path, runtime: Path, point: str) -> None:
    """Start ``qmpdump dump --engine snapshot`` and SIGKILL it at ``point``: ``setup`` (QEMU
    reports the migration in setup, or active with nothing sent yet: inside or right before
    QEMU's own pause, qmpdump does not stop the VM itself) or ``streaming`` (pages flow and the
    guest runs again). Returns once the CLI is dead."""
    assert vm.qmp is not None
    env = {
        **os.environ,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "QMPDUMP_RUNTIME_DIR": str(runtime),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qmpdump.cli.main",
        "dump",
        "--qmp",
        str(vm.qmp_path),
        "--engine",
        "snapshot",
        "-o",
        str(target),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(20000):
            reply = await vm.qmp.execute("query-migrate")
            state = reply.get("status")
            sent = reply.get("ram", {}).get("transferred")
            if point == "setup":
                if state == "setup" or (state == "active" and not sent):
                    break
                # missed the window: the test would prove nothing about it
                assert not (state == "active" and sent), "the kill came after the setup"
                await asyncio.sleep(0)
            else:
                if state == "active" and sent and await status(vm) == "running":
                    break
                await asyncio.sleep(0.002)
        else:
            raise AssertionError(f"the snapshot never reached {point}")
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _journal_of(vm: VM, runtime: Path) -> Path:
    return SettingsJournal(runtime, os.path.abspath(vm.qmp_path)).path


@pytest.mark.guest
@needs_snapshot
async def test_the_next_cli_run_restores_what_a_killed_one_changed(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGKILL of the CLI mid-stream leaves ``background-snapshot`` on and its journal entry;
    the next ``qmpdump dump`` of the VM, with another engine, ends the orphaned snapshot, puts
    the capability and ``max-bandwidth`` back, says so, and removes the entry."""
    runtime = tmp_path_factory.mktemp("run")
    before = await _migration_settings(snap_vm)
    assert before[0]["background-snapshot"] is False
    killed = dumps / "killed"  # its .partial stays (the CLI cannot clean up after SIGKILL)
    killed.mkdir()
    await _kill_cli_during_snapshot(snap_vm, killed / "x.elf", runtime, "streaming")
    # The fault happened: the killed run could not put its settings back.
    caps, bandwidth = await _migration_settings(snap_vm)
    assert caps["background-snapshot"] is True
    assert bandwidth != before[1]
    journal = _journal_of(snap_vm, runtime)
    assert journal.exists()
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600

    code, _out, err = await _cli_dump(snap_vm, "backend", dumps / "next.elf", runtime)
    assert code == 0, err
    assert "warning: restored the migration settings a killed qmpdump dump had changed" in err
    assert "background-snapshot=off" in err
    assert await _migration_settings(snap_vm) == before
    assert not journal.exists()
    assert snap_vm.qmp is not None
    assert await migration_status(snap_vm.qmp) in ("failed", "cancelled")
    check_files(dumps / "next.elf")
    assert not (killed / "x.elf").exists()
    await assert_runs(snap_vm)


@pytest.mark.guest
@needs_snapshot
async def test_the_next_cli_run_cancels_an_orphaned_snapshot(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A background snapshot whose reader lives on (here a thread of this test reading slowly,
    about 6 MB/s; for a killed CLI, a process that inherited its end of the stream) still runs
    when the next CLI starts: that run cancels it, waits for its end, restores the journalled
    settings and says both.

    (A reader that reads nothing at all is worse: QEMU 10.0 then stops answering QMP, new
    connections and ``migrate_cancel`` included, as its setup blocks on the full socket.)"""
    assert snap_vm.qmp is not None
    runtime = tmp_path_factory.mktemp("run")
    before = await _migration_settings(snap_vm)
    journal = SettingsJournal(runtime, os.path.abspath(snap_vm.qmp_path))
    # what the snapshot engine journals before its change, for this QEMU process
    assert journal.record(
        snap_vm.pid,
        MigrationSettings({"background-snapshot": False}, {"max-bandwidth": before[1]}),
    )
    # ... by a CLI that was killed since: its writer process is gone (this test's is not)
    entry = journal.read()
    assert entry is not None
    killed = subprocess.Popen(["true"])  # noqa: ASYNC220 - exits at once
    killed.wait()
    journal.write(entry.model_copy(update={"writer_pid": killed.pid, "writer_start": 1}))
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def read_slowly() -> None:
        while not stop.is_set():
            try:
                if not ours.recv(64 * 1024):
                    return
            except OSError:
                return
            time.sleep(0.01)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    try:
        await snap_vm.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": True}]},
        )
        await snap_vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        fdname = await snap_vm.qmp.pass_fd(theirs.fileno())
        await snap_vm.qmp.execute("migrate", {"uri": f"fd:{fdname}"})
        await _wait_migrating(snap_vm.qmp)
        code, _out, err = await _cli_dump(snap_vm, "backend", dumps / "next.elf", runtime)
        assert code == 0, err
        assert "after cancelling its orphaned background snapshot" in err
        assert await migration_status(snap_vm.qmp) == "cancelled"
        assert await _migration_settings(snap_vm) == before
        assert not journal.path.exists()
        check_files(dumps / "next.elf")
    finally:
        stop.set()
        ours.shutdown(socket.SHUT_RDWR)
        reader.join()
        ours.close()
        theirs.close()
        if await migration_status(snap_vm.qmp) in ("setup", "active"):
            await snap_vm.qmp.execute("migrate_cancel")
        await snap_vm.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": False}]},
        )
        await snap_vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": before[1]})
    await assert_runs(snap_vm)


@pytest.mark.guest
@needs_snapshot
@pytest.mark.parametrize("point", ["setup", "streaming"])
async def test_qmpdump_killed_mid_stream_leaves_the_guest_running(
    snap_vm: VM,
    dumps: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    point: str,
) -> None:
    """SIGKILL of the CLI in QEMU's setup of the snapshot (its pause) or while it streams: the
    socket closes, QEMU's snapshot fails (QEMU 8.1+ write-unprotects guest RAM on that path)
    and QEMU resumes the guest; the next CLI run puts the migration settings back from its
    journal and makes a snapshot that completes (the guest is not blocked on a write-protected
    page). Nothing is presented as a dump."""
    runtime = tmp_path_factory.mktemp("run")
    before = await _migration_settings(snap_vm)
    killed = dumps / "killed"  # its .partial stays (the CLI cannot clean up after SIGKILL)
    killed.mkdir()
    await _kill_cli_during_snapshot(snap_vm, killed / "x.elf", runtime, point)
    assert _journal_of(snap_vm, runtime).exists()
    assert snap_vm.qmp is not None
    for _ in range(400):
        if await status(snap_vm) == "running":
            break
        await asyncio.sleep(0.05)
    await assert_runs(snap_vm)
    code, out, err = await _cli_dump(snap_vm, "snapshot", dumps / "again.elf", runtime, "--json")
    assert code == 0, err
    assert "warning: restored the migration settings" in err
    assert json.loads(out)["engine"] == "snapshot"
    check_files(dumps / "again.elf")
    assert await _migration_settings(snap_vm) == before
    assert not _journal_of(snap_vm, runtime).exists()
    # Nothing is presented as a dump; the killed run's .partial is the daemon's to remove at
    # its next start (the CLI cannot clean up after SIGKILL).
    assert not (killed / "x.elf").exists()
    await assert_runs(snap_vm)
