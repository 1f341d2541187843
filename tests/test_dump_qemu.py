"""Engine 1 (QEMU's ``dump-guest-memory``) against real QEMU: formats, readers, faults, run state.

Guest tier: the shared guest (1 GiB main RAM on a file, 256 MiB of virtio-mem plugged, 64 MiB of
pattern written by the guest, VMCOREINFO published) is dumped through the CLI, and each format is
opened with the tool that consumes it: pyelftools for ELF, ``makedumpfile`` (filtering an ELF,
``-R`` for the flattened kdump layout) and ``crash --osrelease`` for kdump. A dump pauses the
guest and QEMU resumes it; a test that stops it continues it again, so it is left as found.

Bare tier: VMs stopped at reset need no kernel and dump fine (their ELF has no VMCOREINFO), so
the fault tests run there: progress, cancel (in-process and SIGINT to the CLI), QEMU killed
mid-dump, a full filesystem, a dump already running, file and folder modes. ``cont`` makes a
bare VM ``running`` (SeaBIOS finds nothing to boot and waits) where the run state matters.

Everything is real: no fake QMP peer is needed here. Each test removes its dump files itself
(multi-GiB files are not left to pytest's tmp_path retention) and unmounts what it mounted.
One change to the shared guest is QEMU's and cannot be avoided with this engine: its full dumps
allocate every hole of the shmem-backed RAM they read (``FACTS.md``), so after this module the
shared guest's backing files are fully populated on the host. Its run state is as found.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from qmpdump.engines.base import EngineJob, EngineResult, Progress
from qmpdump.engines.qemu import ENGINE as QEMU_ENGINE
from qmpdump.engines.run import DumpOutcome, DumpTask, run_dump
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.errors import DumpBusy, DumpCancelled, QEMUGone
from qmpdump.host.extents import path_extents
from qmpdump.memmap.layout import Layout
from qmpdump.memmap.ranges import RangeSet
from qmpdump.output import DumpFile
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey, survey
from qmpdump.testbed.guest import PATTERN_UNIT, build_guest
from qmpdump.testbed.vm import VM, GiB, MiB, VMSpec

from .clirun import QMPDUMP
from .clirun import run_cli as cli
from .conftest import SHARED_GUEST, VMFactory

PAGE = 4096
PATTERN_PAGE = PATTERN_UNIT * (PAGE // len(PATTERN_UNIT))
#: makedumpfile's signatures (makedumpfile.h, diskdump_mod.h): flattened stream, kdump file
FLAT_SIGNATURE = b"makedumpfile"
KDUMP_SIGNATURE = b"KDUMP   "


def qemu_spec(**options: Any) -> DumpSpec:
    """A dump with QEMU's engine."""
    return DumpSpec(engine=EngineName.QEMU, **options)


async def run_qemu_dump(
    session: QMPSession, target: Path, spec: DumpSpec, **kwargs: Any
) -> DumpOutcome:
    """Survey, QEMU's engine, commit: the whole path."""
    return await run_dump(session, target, spec, **kwargs)


async def dump_with_qemu(session: QMPSession, output: DumpFile, spec: DumpSpec) -> EngineResult:
    """QEMU's engine alone, into an output the caller owns."""
    return await QEMU_ENGINE.run(EngineJob(session, output, spec, await survey(session)))


# ---------------------------------------------------------------- helpers


def dump_args(vm: VM, target: Path, *extra: str) -> list[str]:
    """``qmpdump dump`` with engine 1 into ``target``."""
    return ["dump", "--engine", "qemu", "--qmp", str(vm.qmp_path), "-o", str(target), *extra]


async def run_state(vm: VM) -> str:
    """The VM's run state, asked over the testbed's own QMP session."""
    assert vm.qmp is not None
    return str((await vm.qmp.execute("query-status"))["status"])


async def settled_state(vm: VM, timeout_s: float = 10.0) -> str:
    """The run state once QEMU has left ``save-vm`` (it resumes just after DUMP_COMPLETED)."""
    for _ in range(int(timeout_s / 0.02)):
        if (state := await run_state(vm)) != "save-vm":
            return state
        await asyncio.sleep(0.02)
    return await run_state(vm)


async def dump_status(vm: VM) -> str:
    """``query-dump``'s status: none, active, completed or failed."""
    assert vm.qmp is not None
    return str((await vm.qmp.execute("query-dump"))["status"])


def files_in(folder: Path) -> list[str]:
    """Every file name below ``folder`` (partials and sidecars included), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sidecar(dump: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(dump.with_name(dump.name + ".json").read_text())
    return doc


def run_tool(*argv: str, stdin: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Debian tool (makedumpfile, crash) with a timeout, capturing its output."""
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(stdin.open("rb")) if stdin is not None else None
        return subprocess.run(
            argv, stdin=source, capture_output=True, text=True, timeout=120, check=False
        )


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private folder under /tmp, removed with its (possibly GiB-sized) dumps afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"qmpdump-test-{prefix}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``where`` (made if missing), always unmounted after."""
    where.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        done = subprocess.run(["umount", str(where)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    assert not os.path.ismount(where)


async def running_bare(vm_factory: VMFactory, name: str, ram_size: int) -> VM:
    """A bare VM on QEMU's default anonymous RAM, made ``running`` (SeaBIOS waits)."""
    vm = await vm_factory(VMSpec(name=name, guest=False, ram_size=ram_size))
    assert vm.qmp is not None
    await vm.qmp.execute("cont")
    assert await run_state(vm) == "running"
    return vm


@dataclass(frozen=True)
class ElfCore:
    """What the tests need of an ELF core, read by pyelftools."""

    header: dict[str, Any]
    #: (p_paddr, p_offset, p_filesz, p_memsz, p_vaddr) of every PT_LOAD, in file order
    loads: list[tuple[int, int, int, int, int]]
    #: (name, type, desc) of every note
    notes: list[tuple[str, Any, bytes]]


def read_core(path: Path) -> ElfCore:
    with path.open("rb") as f:
        elf = ELFFile(f)
        header = {k: elf.header[k] for k in elf.header}
        loads: list[tuple[int, int, int, int, int]] = []
        notes: list[tuple[str, Any, bytes]] = []
        for seg in elf.iter_segments():
            h = seg.header
            if h.p_type == "PT_LOAD":
                loads.append((h.p_paddr, h.p_offset, h.p_filesz, h.p_memsz, h.p_vaddr))
            elif isinstance(seg, NoteSegment):
                for note in seg.iter_notes():
                    desc = note["n_desc"]
                    raw = desc if isinstance(desc, bytes) else str(desc).encode("latin-1")
                    notes.append((note["n_name"], note["n_type"], raw))
    return ElfCore(header, loads, notes)


def pattern_offsets(path: Path) -> RangeSet:
    """File offsets of the whole pattern pages in a backing file (reading only its data)."""
    found: list[tuple[int, int]] = []
    with path.open("rb") as f:
        for extent in path_extents(path):
            offset = extent.start
            while offset < extent.end:
                size = min(extent.end - offset, 8 * MiB)
                chunk = os.pread(f.fileno(), size, offset)
                found.extend(
                    (offset + i, PAGE)
                    for i in range(0, len(chunk) - PAGE + 1, PAGE)
                    if chunk[i : i + PAGE] == PATTERN_PAGE
                )
                offset += size
    return RangeSet.from_ranges(found)


def pattern_gpas(vm: VM, layout: Layout) -> RangeSet:
    """Guest-physical pages holding the pattern, per the backing files and the layout."""
    gpas = RangeSet.empty()
    for path in sorted(vm.backing_dir.iterdir()):
        assert layout.pieces_of(path.name), f"no RAM region {path.name} in the layout"
        gpas = gpas | layout.region_to_gpa(path.name, pattern_offsets(path))
    return gpas


# ---------------------------------------------------------------- guest tier: ELF


@dataclass(frozen=True)
class GuestElf:
    """One ELF dump of the shared guest through the CLI, and what was seen around it."""

    path: Path
    code: int
    stdout: str
    stderr: str
    state_before: str
    state_after: str
    #: surveyed before the dump (QEMU's dump allocates the shmem it reads: see FACTS.md)
    survey_before: Survey
    #: surveyed after the dump, with the exact plugged ranges
    survey: Survey
    #: pattern pages seen in the backing files both before and after the dump
    pattern: RangeSet


@pytest.fixture(scope="module")
async def guest_elf(shared_guest: VM) -> AsyncIterator[GuestElf]:
    """Dump the shared guest as ELF once for the ELF tests (the dump takes seconds)."""
    with scratch_dir("elf") as folder:
        path = folder / "guest.elf"
        found_before = await _survey(shared_guest)
        before = await asyncio.to_thread(pattern_gpas, shared_guest, found_before.layout)
        state_before = await run_state(shared_guest)
        code, out, err = await cli(*dump_args(shared_guest, path, "--json"))
        state_after = await run_state(shared_guest)
        found = await _survey(shared_guest, exact_plug=True)
        after = await asyncio.to_thread(pattern_gpas, shared_guest, found.layout)
        yield GuestElf(
            path=path,
            code=code,
            stdout=out,
            stderr=err,
            state_before=state_before,
            state_after=state_after,
            survey_before=found_before,
            survey=found,
            pattern=before & after,
        )


async def _survey(vm: VM, *, exact_plug: bool = False) -> Survey:
    async with QMPSession(str(vm.qmp_path)) as qmp:
        return await survey(qmp, exact_plug=exact_plug)


@pytest.mark.guest
async def test_elf_dump_of_a_running_guest(guest_elf: GuestElf) -> None:
    assert guest_elf.code == 0, guest_elf.stderr
    summary = json.loads(guest_elf.stdout)
    path = guest_elf.path
    assert summary["path"] == str(path)
    assert (summary["engine"], summary["format"]) == ("qemu", "elf")
    # A running VM is paused for the dump and runs again afterwards.
    assert (guest_elf.state_before, guest_elf.state_after) == ("running", "running")
    doc = sidecar(path)
    assert isinstance(doc["paused_s"], float)
    assert 0 < doc["paused_s"] <= doc["duration_s"] + 0.5
    assert doc["engine"] == "qemu"
    assert doc["request"]["elf_header_fixed"] is True
    # The hash made on the way equals the file's; the sidecar knows the size.
    assert doc["bytes"] == summary["bytes"] == path.stat().st_size
    assert doc["sha256"] == summary["sha256"] == await asyncio.to_thread(sha256_of, path)
    # Modes: a guest memory dump holds the guest's secrets.
    assert mode_of(path) == 0o600
    assert mode_of(path.with_name(path.name + ".json")) == 0o600
    assert files_in(path.parent) == ["guest.elf", "guest.elf.json"]


@pytest.mark.guest
async def test_elf_dump_reads_in_pyelftools_as_the_vm_is(guest_elf: GuestElf) -> None:
    assert guest_elf.code == 0, guest_elf.stderr
    core = await asyncio.to_thread(read_core, guest_elf.path)
    h = core.header
    assert (h["e_type"], h["e_machine"]) == ("ET_CORE", "EM_X86_64")
    # The fix-up: program headers right after the ELF header, the section headers behind them,
    # and the real ELF header size (QEMU 7.2 writes 8).
    assert h["e_ehsize"] == 64
    assert h["e_phoff"] == 64
    assert h["e_shoff"] == h["e_phoff"] + h["e_phnum"] * h["e_phentsize"]

    # PT_LOADs: all RAM except unplugged virtio-mem, fully backed, physical = virtual.
    layout = guest_elf.survey.layout
    assert all(
        filesz == memsz > 0 and vaddr == paddr for paddr, _, filesz, memsz, vaddr in core.loads
    )
    loads = RangeSet.from_ranges((paddr, memsz) for paddr, _, _, memsz, _ in core.loads)
    (device,) = guest_elf.survey.population.devices
    region = device.device.region
    assert device.plugged_exact
    assert loads == layout.ram - (RangeSet.of(region.start, region.size) - device.plugged)
    # ... and, independently of QEMU's own headers: as much as query-memory-devices says is
    # plugged, in whole blocks, covering every block the guest wrote to.
    in_device = loads.clip(region)
    assert in_device.total == device.device.size == SHARED_GUEST.virtio_mem[0].requested_size
    assert in_device.align_out(device.device.block_size) == in_device
    (device_before,) = guest_elf.survey_before.population.devices
    assert device_before.blocks_with_data
    assert device_before.blocks_with_data - in_device == RangeSet.empty()
    assert (
        sum(memsz for _, _, _, memsz, _ in core.loads)
        == sidecar(guest_elf.path)["request"]["qemu_total"]
    )

    # Notes: one NT_PRSTATUS and one QEMU CPU state per vCPU, and the guest's VMCOREINFO.
    names = [name for name, _, _ in core.notes]
    prstatus = [n for n in core.notes if n[0] == "CORE" and n[1] == "NT_PRSTATUS"]
    assert len(prstatus) == SHARED_GUEST.cpus
    assert names.count("QEMU") == SHARED_GUEST.cpus
    (vmcoreinfo,) = [desc for name, _, desc in core.notes if name == "VMCOREINFO"]
    assert f"OSRELEASE={build_guest().release}\n".encode() in vmcoreinfo


@pytest.mark.guest
async def test_guest_pattern_is_in_the_elf_dump_at_its_gpa(guest_elf: GuestElf) -> None:
    assert guest_elf.code == 0, guest_elf.stderr
    core = await asyncio.to_thread(read_core, guest_elf.path)
    pattern = guest_elf.pattern
    # The guest's tmpfs file holds pattern_mib MiB of whole pattern pages (page cache may add).
    assert pattern.total >= SHARED_GUEST.pattern_mib * MiB

    def check() -> tuple[int, int]:
        loads = sorted((paddr, offset, filesz) for paddr, offset, filesz, _, _ in core.loads)
        starts = [paddr for paddr, _, _ in loads]
        pages = missing = 0
        with guest_elf.path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            for run in pattern:
                for gpa in range(run.start, run.end, PAGE):
                    paddr, offset, filesz = loads[bisect_right(starts, gpa) - 1]
                    assert paddr <= gpa < paddr + filesz, f"{gpa:#x} is in no PT_LOAD"
                    at = offset + gpa - paddr
                    pages += 1
                    missing += mm[at : at + PAGE] != PATTERN_PAGE
        return pages, missing

    pages, missing = await asyncio.to_thread(check)
    assert pages == pattern.total // PAGE
    assert missing == 0


@pytest.mark.guest
async def test_makedumpfile_reads_the_fixed_elf_and_not_qemus(
    guest_elf: GuestElf, shared_guest: VM
) -> None:
    assert guest_elf.code == 0, guest_elf.stderr
    with scratch_dir("makedumpfile") as folder:
        fixed = await asyncio.to_thread(
            run_tool,
            "makedumpfile",
            "-c",
            "-d",
            "31",
            str(guest_elf.path),
            str(folder / "fixed.kd"),
        )
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert (folder / "fixed.kd").read_bytes()[:8] == KDUMP_SIGNATURE

        # The same dump with QEMU 7.2's header layout as it is: makedumpfile 1.7.2 gives up.
        # This failure is why the fix-up exists (and is on by default).
        raw = folder / "raw.elf"
        code, _out, err = await cli(*dump_args(shared_guest, raw, "--no-elf-fix"))
        assert code == 0, err
        assert sidecar(raw)["request"]["elf_header_fixed"] is False
        core = await asyncio.to_thread(read_core, raw)
        assert (core.header["e_shoff"], core.header["e_ehsize"]) == (64, 8)
        assert core.header["e_phoff"] == 64 + core.header["e_shnum"] * core.header["e_shentsize"]
        assert raw.stat().st_size == guest_elf.path.stat().st_size
        refused = await asyncio.to_thread(
            run_tool, "makedumpfile", "-c", "-d", "31", str(raw), str(folder / "raw.kd")
        )
        assert refused.returncode != 0
        assert "Can't get the number of PT_LOAD" in refused.stdout + refused.stderr
        assert not (folder / "raw.kd").exists()


# ---------------------------------------------------------------- guest tier: other formats


@pytest.mark.guest
async def test_kdump_flattened_and_standard_of_a_paused_guest(shared_guest: VM) -> None:
    assert shared_guest.qmp is not None
    release = build_guest().release
    await shared_guest.qmp.execute("stop")
    try:
        with scratch_dir("kdump") as folder:
            flat, standard = folder / "flat.kdump", folder / "standard.kdump"
            code, _out, err = await cli(*dump_args(shared_guest, flat, "--format", "kdump-zlib"))
            assert code == 0, err
            # A VM paused by someone else stays paused, and nothing was paused by the dump.
            assert await run_state(shared_guest) == "paused"
            doc = sidecar(flat)
            assert doc["paused_s"] is None
            assert doc["request"]["kdump_layout"] == "flattened"
            assert doc["sha256"] == sha256_of(flat)
            assert flat.read_bytes()[:16] == FLAT_SIGNATURE + bytes(4)

            rebuilt = folder / "rebuilt.kdump"
            done = await asyncio.to_thread(run_tool, "makedumpfile", "-R", str(rebuilt), stdin=flat)
            assert done.returncode == 0, done.stdout + done.stderr
            assert rebuilt.read_bytes()[:8] == KDUMP_SIGNATURE

            code, _out, err = await cli(
                *dump_args(shared_guest, standard, "--format", "kdump-zlib", "--seekable")
            )
            assert code == 0, err
            assert await run_state(shared_guest) == "paused"
            doc = sidecar(standard)
            assert doc["request"]["kdump_layout"] == "standard"
            assert doc["sha256"] == sha256_of(standard)
            assert doc["bytes"] == standard.stat().st_size
            assert mode_of(standard) == 0o600
            # The standard layout directly, and byte for byte what makedumpfile -R rebuilds
            # (the guest is paused, so both dumps hold the same memory).
            assert standard.read_bytes()[:8] == KDUMP_SIGNATURE
            assert sha256_of(standard) == sha256_of(rebuilt)

            for dump in (flat, standard):
                seen = await asyncio.to_thread(run_tool, "crash", "--osrelease", str(dump))
                assert seen.returncode == 0, seen.stdout + seen.stderr
                assert seen.stdout.strip() == release
    finally:
        await shared_guest.qmp.execute("cont")
    assert await run_state(shared_guest) == "running"


@pytest.mark.guest
async def test_win_dmp_of_a_linux_guest_fails_cleanly(shared_guest: VM) -> None:
    with scratch_dir("windmp") as folder:
        code, out, err = await cli(
            *dump_args(shared_guest, folder / "guest.dmp", "--format", "win-dmp")
        )
        assert (code, out) == (44, "")
        assert err.startswith("qmpdump: error: QEMU reports the dump failed: win-dump")
        assert "Traceback" not in err
        assert files_in(folder) == []
    assert await run_state(shared_guest) == "running"


# ---------------------------------------------------------------- bare tier: progress, cancel


@pytest.mark.bare
async def test_progress_increases_and_ends_at_total(vm_factory: VMFactory) -> None:
    # 1.5 GiB of RAM: QEMU's ELF dump takes seconds under TCG; progress is polled every 0.25 s.
    vm = await running_bare(vm_factory, "bare-progress", 3 * GiB // 2)
    seen: list[Progress] = []
    with scratch_dir("progress") as folder:
        async with QMPSession(str(vm.qmp_path)) as qmp:
            outcome = await run_qemu_dump(qmp, folder / "vm.elf", qemu_spec(), progress=seen.append)
        size = (folder / "vm.elf").stat().st_size
    assert outcome.size == size
    assert len(seen) >= 3, seen
    total = outcome.record.request.model_dump()["qemu_total"]
    assert total >= 1 * GiB
    assert all(p.total == total for p in seen)
    for earlier, later in itertools.pairwise(seen):
        assert earlier.written <= later.written
        assert earlier.completed <= later.completed
    assert seen[0].completed < total
    assert seen[-1] == Progress(written=size, completed=total, total=total)
    assert isinstance(outcome.paused_s, float)
    assert await run_state(vm) == "running"


@pytest.mark.bare
async def test_cancel_in_process_leaves_nothing_and_qemu_usable(vm_factory: VMFactory) -> None:
    vm = await running_bare(vm_factory, "bare-cancel", 1 * GiB)
    seen: list[Progress] = []
    tasks: list[DumpTask] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.written > 0:
            tasks[0].cancel()

    with scratch_dir("cancel") as folder:
        async with QMPSession(str(vm.qmp_path)) as qmp:
            dump = run_qemu_dump(qmp, folder / "vm.elf", qemu_spec(), progress=progress)
            tasks.append(DumpTask(dump))
            with pytest.raises(DumpCancelled):
                await tasks[0].result()
            assert 0 < seen[-1].written < seen[-1].total
            assert files_in(folder) == []
            assert await run_state(vm) == "running"
            assert await dump_status(vm) == "failed"
            # QEMU is not stuck: the next dump runs to the end.
            again = await run_qemu_dump(
                qmp, folder / "again.elf", qemu_spec(begin=0, length=1 * MiB)
            )
        assert again.size > 1 * MiB
        assert files_in(folder) == ["again.elf", "again.elf.json"]
    assert await dump_status(vm) == "completed"
    assert await run_state(vm) == "running"


async def _wait_for_bytes(path: Path, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.returncode is None, "the dump ended before it wrote anything"
        assert time.monotonic() < deadline, f"{path} got no bytes within {timeout_s:g} s"
        await asyncio.sleep(0.01)


@pytest.mark.bare
async def test_sigint_cancels_the_cli(vm_factory: VMFactory) -> None:
    vm = await running_bare(vm_factory, "bare-sigint", 1 * GiB)
    with scratch_dir("sigint") as folder:
        target = folder / "vm.elf"
        proc = await asyncio.create_subprocess_exec(
            QMPDUMP,
            *dump_args(vm, target),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await _wait_for_bytes(target.with_name("vm.elf.partial"), proc, 30)
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert (proc.returncode, out) == (41, b"")
        assert err.decode() == "qmpdump: error: the dump was cancelled\n"
        assert files_in(folder) == []
    assert await run_state(vm) == "running"
    assert await dump_status(vm) == "failed"


# ---------------------------------------------------------------- bare tier: faults


@pytest.mark.bare
async def test_qemu_killed_mid_dump(vm_factory: VMFactory) -> None:
    vm = await running_bare(vm_factory, "bare-killed", 1 * GiB)

    def progress(p: Progress) -> None:
        if p.written > 0 and vm.proc.returncode is None:
            os.kill(vm.pid, signal.SIGKILL)

    with scratch_dir("killed") as folder:
        async with QMPSession(str(vm.qmp_path)) as qmp:
            with pytest.raises(QEMUGone) as caught:
                await run_qemu_dump(qmp, folder / "vm.elf", qemu_spec(), progress=progress)
        assert caught.value.exit_code == 42
        assert files_in(folder) == []
    # The testbed cleans up after a QEMU that died under it.
    run_dir, backing_dir = vm.run_dir, vm.backing_dir
    await vm.stop()
    assert vm.proc.returncode == -signal.SIGKILL
    assert not run_dir.exists()
    assert not backing_dir.exists()


@pytest.mark.bare
async def test_full_filesystem(vm_factory: VMFactory) -> None:
    # 256 MiB of RAM: the ELF is bigger than the 64 MiB tmpfs it is written to.
    vm = await running_bare(vm_factory, "bare-enospc", 256 * MiB)
    with scratch_dir("enospc") as folder, small_tmpfs(folder / "small", "64m") as small:
        code, out, err = await cli(*dump_args(vm, small / "vm.elf"))
        assert (code, out) == (43, "")
        assert err == f"qmpdump: error: no space left on the filesystem of {small}\n"
        assert files_in(small) == []
        assert shutil.disk_usage(small).used == 0
    assert await run_state(vm) == "running"
    assert await dump_status(vm) == "failed"


@pytest.mark.bare
async def test_busy_while_another_dump_runs(vm_factory: VMFactory) -> None:
    vm = await running_bare(vm_factory, "bare-busy", 1 * GiB)
    assert vm.qmp is not None
    with scratch_dir("busy") as folder:
        # Someone else's dump (as libvirt would start it), held in progress for as long as this
        # test needs: QEMU writes into a pipe that nobody reads until our CLI has run. A dump
        # into a file can end before the CLI starts on a loaded machine (seen: 1 GiB of holes).
        read_fd, write_fd = os.pipe()
        try:
            with vm.qmp.listen("DUMP_COMPLETED") as completed:
                fdname = await vm.qmp.pass_fd(write_fd)
                os.close(write_fd)
                write_fd = -1
                await vm.qmp.execute(
                    "dump-guest-memory",
                    {"paging": False, "protocol": f"fd:{fdname}", "detach": True},
                )
                code, out, err = await cli(*dump_args(vm, folder / "ours.elf"))
                assert (code, out) == (40, "")
                assert err == "qmpdump: error: QEMU is already running a dump of this VM\n"
                assert files_in(folder) == []
                # Let the other dump finish: drain the pipe to its end.
                drained = await asyncio.to_thread(_drain, read_fd)
                event = await asyncio.wait_for(completed.get(), 60)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        assert event.data["result"]["status"] == "completed"
        assert drained >= 1 * GiB
    assert await settled_state(vm) == "running"


def _drain(fd: int) -> int:
    """Read a pipe to its end; the number of bytes read."""
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
    return total


@pytest.mark.bare
async def test_two_dumps_at_once_one_is_busy(vm_factory: VMFactory) -> None:
    # Two sessions start a dump together: both see no dump running (query-dump), so the loser
    # learns it from QEMU's refusal of dump-guest-memory ("There is a dump in process, please
    # wait."; the path taken in 5 of 5 trial runs). Either way it must be DumpBusy, at once.
    vm = await running_bare(vm_factory, "bare-race", 256 * MiB)
    assert vm.qmp is not None
    with scratch_dir("race") as folder:
        async with QMPSession(str(vm.qmp_path)) as qmp:
            with DumpFile.create(folder / "a.elf") as a, DumpFile.create(folder / "b.elf") as b:
                t0 = time.monotonic()
                results = await asyncio.gather(
                    dump_with_qemu(qmp, a, qemu_spec()),
                    dump_with_qemu(vm.qmp, b, qemu_spec()),
                    return_exceptions=True,
                )
                elapsed = time.monotonic() - t0
        busy = [r for r in results if isinstance(r, BaseException)]
        assert len(busy) == 1, results
        assert isinstance(busy[0], DumpBusy), repr(busy[0])
        assert files_in(folder) == []
    # The loser did not wait for the winner's pause to end before it reported.
    assert elapsed < 10
    assert await run_state(vm) == "running"


# ---------------------------------------------------------------- bare tier: usage, modes


@pytest.mark.bare
async def test_usage_errors_start_nothing(vm_factory: VMFactory) -> None:
    vm = await vm_factory(VMSpec(name="bare-usage", guest=False, ram_size=128 * MiB))
    assert vm.qmp is not None
    offered = (await vm.qmp.execute("query-dump-guest-memory-capability"))["formats"]
    missing = next(f for f in ("kdump-lzo", "kdump-snappy", "no-such-format") if f not in offered)
    with scratch_dir("usage") as folder:
        target = folder / "new" / "vm.dump"
        code, out, err = await cli(*dump_args(vm, target, "--format", missing))
        assert (code, out) == (2, "")
        assert f"{missing!r} is not one" in err
        for fmt in offered:
            assert fmt in err
        # The seekable (standard) layout is a kdump thing.
        code, _out, err = await cli(*dump_args(vm, target, "--seekable"))
        assert code == 2
        assert "kdump formats only" in err
        # Nothing was created, not even the folder, and QEMU never started a dump.
        assert list(folder.iterdir()) == []
    assert await dump_status(vm) == "none"
    assert await run_state(vm) == "prelaunch"


@pytest.mark.bare
async def test_modes_and_no_overwrite(vm_factory: VMFactory) -> None:
    vm = await vm_factory(VMSpec(name="bare-modes", guest=False, ram_size=128 * MiB))
    small = ("--begin", "0", "--length", "1M")
    with scratch_dir("modes") as folder:
        folder.chmod(0o755)
        target = folder / "new" / "deeper" / "vm.elf"
        # umask 0: the modes come from qmpdump, not from the caller's umask.
        code, _out, err = await cli(*dump_args(vm, target, *small), umask=0)
        assert code == 0, err
        assert mode_of(folder / "new") == 0o700
        assert mode_of(folder / "new" / "deeper") == 0o700
        assert mode_of(target) == 0o600
        assert mode_of(target.with_name("vm.elf.json")) == 0o600

        before = (sha256_of(target), target.stat().st_mtime_ns, target.stat().st_ino)
        side_before = target.with_name("vm.elf.json").read_bytes()
        code, out, err = await cli(*dump_args(vm, target, *small))
        assert (code, out) == (2, "")
        assert "exists already" in err
        assert (sha256_of(target), target.stat().st_mtime_ns, target.stat().st_ino) == before
        assert target.with_name("vm.elf.json").read_bytes() == side_before
        assert files_in(target.parent) == ["vm.elf", "vm.elf.json"]

        code, _out, err = await cli(*dump_args(vm, target, *small, "--overwrite"))
        assert code == 0, err
        assert target.stat().st_ino != before[2]
        assert mode_of(target) == 0o600
        assert files_in(target.parent) == ["vm.elf", "vm.elf.json"]
    assert await run_state(vm) == "prelaunch"
