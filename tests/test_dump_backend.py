"""Engine 2, the sparse reader, on real QEMU: fidelity to QEMU's own dump, consumers, modes, auto.

QEMU's ``dump-guest-memory`` (engine 1) is the reference. For one VM, stopped so that nothing
changes between the two, our ELF core and QEMU's must describe the same guest-physical addresses
with the same bytes: every byte of every data PT_LOAD of ours equals QEMU's at that gpa, and every
gpa we describe as zero-fill (``p_filesz = 0``) is zero in QEMU's file. The notes are copied from
QEMU's own dump headers, so they must be byte-identical. The covering set of VMs (one guest each)
takes every machine, every main-RAM backend, and every virtio-mem state with every device backend
at least once ("split": ``max-ram-below-4g=256M``, main RAM on both sides of 4 GiB):

=================  =======  ==========  ==================  ======================
case               machine  main RAM    virtio-mem          state
=================  =======  ==========  ==================  ======================
q35-memfd-split    q35      memfd       file, 512 MiB max   partly plugged (192M)
pc-file            pc       file        memfd, 512 MiB max  fully plugged
q35-ram            q35      ram         none                absent
pc-default-split   pc       pc.ram      ram, 512 MiB max    partly plugged (192M)
q35-default        q35      pc.ram      file, 512 MiB max   fully plugged
pc-memfd           pc       memfd       none                absent
q35-file-split     q35      file        memfd, 512 MiB max  partly plugged (192M)
pc-ram             pc       ram         ram, 512 MiB max    fully plugged
=================  =======  ==========  ==================  ======================

"Partly plugged" boots with 512 MiB plugged and then asks the guest to unplug down to 192 MiB
(unplugged blocks are holes in QEMU's coverage, and punched holes in a shared backing file).
Every case also hands our dump to drgn, makedumpfile, volatility3 and pyelftools, and checks
that our dump leaves the host's populated memory alone while QEMU's grows it (``FACTS.md``).
makedumpfile is run with its default mmap reader and checked against its read() reader
(``MAKEDUMPFILE_READ``): that found zero-fill ``p_offset`` values inside the data, now fixed.

The mode, cancel, disk-full and engine-choice tests share one running guest, which each of them
leaves running as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import stat
import subprocess
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qmpdump.elf.format import (
    EHDR_SIZE,
    PT_LOAD,
    ElfHeader,
    ProgramHeader,
    parse_header,
    parse_program_headers,
    prefix_needed,
)
from qmpdump.elf.plan import notes_payload
from qmpdump.engines import backend as backend_engine
from qmpdump.engines import copier, kdump_writer
from qmpdump.engines.base import PauseHooks, Progress
from qmpdump.engines.copier import CopyState, Source
from qmpdump.engines.copyplan import CopyOp
from qmpdump.engines.run import DumpTask, run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName
from qmpdump.errors import DiskFull, DumpCancelled
from qmpdump.host.extents import path_extents
from qmpdump.host.procfs import find_mapping_file
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.plugged import probe_dump_loads
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.guest import PATTERN_UNIT
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec, start

from .clirun import run_cli
from .conftest import VMFactory
from .test_host import gpa2hva

PAGE = 4096
#: Bytes compared per read: large enough for speed, small enough for memory.
CHUNK = 4 * MiB
#: One page of the guest's pattern file (``qmpdump.testbed.guest``).
PATTERN_PAGE = PATTERN_UNIT * (PAGE // len(PATTERN_UNIT))
PATTERN_MIB = 8
VMEM_MAX = 512 * MiB
PARTLY = 192 * MiB
NT_PRSTATUS = "NT_PRSTATUS"
FOUR_GIB = 4 * GiB


# ================================================================ reading ELF cores


@dataclass(frozen=True)
class Core:
    """An ELF core's headers and notes, read the way a consumer does (program headers)."""

    path: Path
    header: ElfHeader
    loads: tuple[ProgramHeader, ...]  # PT_LOADs, in gpa order
    notes: bytes
    size: int

    @property
    def coverage(self) -> RangeSet:
        """Every guest-physical address some PT_LOAD describes."""
        return RangeSet.from_ranges((ph.paddr, ph.memsz) for ph in self.loads if ph.memsz)

    @property
    def data(self) -> RangeSet:
        """The gpas whose bytes are stored in the file."""
        return RangeSet.from_ranges((ph.paddr, ph.filesz) for ph in self.loads if ph.filesz)

    @property
    def zero_fill(self) -> RangeSet:
        """The gpas described with no bytes in the file (read as zeros)."""
        return self.coverage - self.data


def read_core(path: Path) -> Core:
    """Parse the headers and notes of the ELF core at ``path``."""
    with path.open("rb") as f:
        prefix = b""
        while (need := prefix_needed(prefix)) > len(prefix):
            f.seek(0)
            prefix = f.read(need)
            assert len(prefix) == need, f"{path} ends at {len(prefix):#x}, inside its headers"
        size = os.fstat(f.fileno()).st_size
    loads = sorted(
        (ph for ph in parse_program_headers(prefix) if ph.type == PT_LOAD), key=lambda p: p.paddr
    )
    return Core(path, parse_header(prefix), tuple(loads), notes_payload(prefix), size)


class GpaReader:
    """Guest-physical reads through a core's PT_LOADs (bytes past ``p_filesz`` are zeros)."""

    def __init__(self, core: Core, fd: int) -> None:
        self.core = core
        self.fd = fd
        self.starts = [ph.paddr for ph in core.loads]

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray(size)
        end = gpa + size
        index = max(0, bisect_right(self.starts, gpa) - 1)
        for ph in self.core.loads[index:]:
            if ph.paddr >= end:
                break
            lo, hi = max(gpa, ph.paddr), min(end, ph.paddr + ph.filesz)
            if lo < hi:
                data = os.pread(self.fd, hi - lo, ph.offset + lo - ph.paddr)
                assert len(data) == hi - lo, f"{self.core.path} is cut short at gpa {lo:#x}"
                out[lo - gpa : hi - gpa] = data
        return bytes(out)


@dataclass
class Comparison:
    """What comparing our core with QEMU's found."""

    data_bytes: int = 0
    zero_bytes: int = 0
    pattern_pages: int = 0
    #: a few gpas of pattern pages, and of other data, for spot checks by consumers
    pattern_gpas: list[int] = field(default_factory=list)
    data_gpas: list[int] = field(default_factory=list)


def first_difference(a: bytes, b: bytes) -> int:
    """The index of the first byte where ``a`` and ``b`` differ (they do)."""
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, len(a)) if a[i] != b[i])


def compare_cores(ours: Core, qemu: Core) -> Comparison:
    """Every data byte of ours equals QEMU's at its gpa; our zero-fill gpas are zero in QEMU's."""
    found = Comparison()
    with ours.path.open("rb") as mine, qemu.path.open("rb") as theirs:
        ref = GpaReader(qemu, theirs.fileno())
        for ph in ours.loads:
            for offset in range(0, ph.memsz, CHUNK):
                gpa = ph.paddr + offset
                size = min(CHUNK, ph.memsz - offset)
                expected = ref.read(gpa, size)
                if not ph.filesz:
                    zeros = expected.count(0)
                    assert zeros == size, (
                        f"QEMU's dump holds {size - zeros} non-zero bytes in our zero-fill "
                        f"segment at {gpa:#x}+{size:#x}"
                    )
                    found.zero_bytes += size
                    continue
                got = os.pread(mine.fileno(), size, ph.offset + offset)
                if got != expected:
                    at = gpa + first_difference(got, expected)
                    raise AssertionError(f"our dump differs from QEMU's at gpa {at:#x}")
                found.data_bytes += size
                found.pattern_pages += got.count(PATTERN_PAGE)
                if offset == 0 and len(found.data_gpas) < 6:
                    found.data_gpas.append(gpa)
                if len(found.pattern_gpas) < 3 and (at := got.find(PATTERN_PAGE)) >= 0:
                    found.pattern_gpas.append(gpa + at)
    return found


def check_our_layout(core: Core) -> None:
    """The shape consumers need: headers at 64, exact data segments packed in gpa order."""
    assert core.header.phoff == EHDR_SIZE
    end: int | None = None
    for ph in core.loads:
        assert ph.vaddr == ph.paddr
        assert ph.memsz > 0
        assert ph.filesz in (0, ph.memsz), f"PT_LOAD at {ph.paddr:#x} has a zero tail"
        if ph.filesz:
            assert ph.offset == end if end is not None else ph.offset % PAGE == 0
            end = ph.offset + ph.filesz
    assert end == core.size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(dump: Path) -> dict[str, Any]:
    """Dump and sidecar are 0600, the sidecar's size and sha256 are the file's; the sidecar."""
    side = dump.with_name(dump.name + ".json")
    for path in (dump, side):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    record: dict[str, Any] = json.loads(side.read_text())
    assert record["bytes"] == dump.stat().st_size
    assert record["sha256"] == sha256_of(dump)
    assert not list(dump.parent.glob("*.partial"))
    return record


# ================================================================ consumers


def drgn_reads(path: Path, gpas: Sequence[int], size: int) -> tuple[bool, list[bytes]]:
    """drgn: whether it sees a Linux kernel, and physical reads at ``gpas``."""
    import drgn  # noqa: PLC0415 - optional test dependency, heavy import

    prog = drgn.Program()
    prog.set_core_dump(str(path))
    linux = bool(prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL)
    return linux, [bytes(prog.read(gpa, size, True)) for gpa in gpas]


def volatility_reads(path: Path, gpas: Sequence[int], size: int) -> list[bytes]:
    """volatility3's ELF layer over a file layer: reads at ``gpas``."""
    from volatility3.framework import contexts  # noqa: PLC0415
    from volatility3.framework.layers import elf, physical  # noqa: PLC0415

    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["memory.base_layer"] = "base"
    layer = elf.Elf64Layer(ctx, "memory", "memory")
    ctx.add_layer(layer)
    return [bytes(layer.read(gpa, size)) for gpa in gpas]


@dataclass(frozen=True)
class ElfNotes:
    """What pyelftools sees of a core."""

    load_count: int
    note_names: list[tuple[str, str]]
    vmcoreinfo: bytes


def pyelftools_view(path: Path) -> ElfNotes:
    from elftools.elf.elffile import ELFFile  # noqa: PLC0415
    from elftools.elf.segments import NoteSegment  # noqa: PLC0415

    names: list[tuple[str, str]] = []
    vmcoreinfo = b""
    loads = 0
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE"
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                loads += 1
            elif isinstance(seg, NoteSegment):
                for note in seg.iter_notes():
                    names.append((note["n_name"], str(note["n_type"])))
                    if note["n_name"] == "VMCOREINFO":
                        desc = note["n_desc"]
                        vmcoreinfo = desc.encode("latin-1") if isinstance(desc, str) else desc
    return ElfNotes(loads, names, vmcoreinfo)


#: makedumpfile 1.7.2 (its master branch too) reads an ELF core through mmap() windows whose
#: extent it takes from ``p_offset + p_memsz`` (``elf_info.c``: ``offset_to_pt_load_end``,
#: ``max_file_offset``), and caches a window as one run of physical addresses (``readmem``). Our
#: zero-fill PT_LOADs (``p_filesz = 0``) have ``p_offset`` at the running data offset, so their
#: ``[p_offset, p_offset + p_memsz)`` covers later data segments: a window then spans segments
#: that are not adjacent in guest-physical memory, and makedumpfile reads pages of the wrong
#: segment, or past the end of the file (SIGBUS, exit -7). Reads with ``read()`` are exact.
#: qmpdump.elf.plan now puts the zero-fill ``p_offset`` at the end of the data;
#: test_makedumpfile_reads_our_dump_through_mmap keeps it so. The read() reader, for comparison:
MAKEDUMPFILE_READ = ("--non-mmap",)


def makedumpfile(dump: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["makedumpfile", *options, str(dump), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def check_makedumpfile_pages(dump: Path, out: Path) -> int:
    """Every byte makedumpfile kept in its ELF output (``-E``) is our dump's byte at that gpa."""
    ours, theirs = read_core(dump), read_core(out)
    assert theirs.data - ours.coverage == RangeSet.empty()
    compared = 0
    with dump.open("rb") as mine, out.open("rb") as kept:
        reader = GpaReader(ours, mine.fileno())
        for ph in theirs.loads:
            for offset in range(0, ph.filesz, CHUNK):
                size = min(CHUNK, ph.filesz - offset)
                got = os.pread(kept.fileno(), size, ph.offset + offset)
                expected = reader.read(ph.paddr + offset, size)
                if got != expected:
                    at = ph.paddr + offset + first_difference(got, expected)
                    raise AssertionError(f"makedumpfile's output differs from our dump at {at:#x}")
                compared += size
    return compared


def mmap_agrees_with_read(dump: Path, work: Path) -> None:
    """makedumpfile keeps the same pages, with our bytes, whether it reads with mmap or read."""
    kept: dict[str, Core] = {}
    for name, options in (("mmap", ()), ("read", MAKEDUMPFILE_READ)):
        out = work / f"makedumpfile.{name}"
        done = makedumpfile(dump, out, "-E", "-d", "31", *options)
        assert done.returncode == 0, f"{name}: exit {done.returncode}: {done.stdout}{done.stderr}"
        kept[name] = read_core(out)
    lost = kept["read"].data - kept["mmap"].data
    assert not lost, f"with mmap, makedumpfile dropped {lost.total:#x} bytes of data, from {lost}"
    assert check_makedumpfile_pages(dump, kept["mmap"].path) > 0


def run_makedumpfile(dump: Path, work: Path, *read_options: str) -> None:
    """``makedumpfile -c -d 31`` exits 0; with ``-E``, what it kept is what our dump holds."""
    for options, name in ((("-c", "-d", "31"), "kdump"), (("-E", "-d", "31"), "elf")):
        out = work / f"makedumpfile.{name}"
        done = makedumpfile(dump, out, *options, *read_options)
        assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}{done.stderr}"
        assert out.stat().st_size > 0
        if name == "elf":
            assert check_makedumpfile_pages(dump, out) > 0
        out.unlink()


def check_consumers(dump: Path, found: Comparison, cpus: int, work: Path) -> None:
    """drgn, volatility3, pyelftools and makedumpfile all read our dump, and agree with it."""
    core = read_core(dump)
    gpas = [*found.pattern_gpas, *found.data_gpas]
    with dump.open("rb") as f:
        ours = GpaReader(core, f.fileno())
        expected = [ours.read(gpa, PAGE) for gpa in gpas]
    assert found.pattern_gpas
    assert all(expected[i] == PATTERN_PAGE for i in range(len(found.pattern_gpas)))

    linux, via_drgn = drgn_reads(dump, gpas, PAGE)
    assert linux, "drgn did not recognise a Linux kernel (VMCOREINFO)"
    assert via_drgn == expected
    zero_gpa = next(iter(core.zero_fill), None)
    if zero_gpa is not None:  # a zero-fill segment reads as zeros (p_filesz = 0)
        assert drgn_reads(dump, [zero_gpa.start], PAGE)[1] == [bytes(PAGE)]

    assert volatility_reads(dump, gpas, PAGE) == expected

    view = pyelftools_view(dump)
    assert view.load_count == len(core.loads)
    assert [n for n in view.note_names if n[1] == NT_PRSTATUS] == [("CORE", NT_PRSTATUS)] * cpus
    assert b"OSRELEASE=" in view.vmcoreinfo

    run_makedumpfile(dump, work)  # the default reader: mmap


# ================================================================ host memory, run state


async def shmem_files(vm: VM) -> dict[str, str]:
    """memdev -> a path that opens its backing file, for every file and memfd backend."""
    assert vm.qmp is not None
    devices = await vm.qmp.execute("query-memory-devices")
    memaddr = {d["data"]["id"]: d["data"]["memaddr"] for d in devices if d["type"] == "virtio-mem"}
    regions: list[tuple[str, Backend, int]] = []
    if vm.spec.main_memdev is not None:
        regions.append((vm.spec.main_memdev, vm.spec.ram_backend, 0))
    regions += [(d.memdev, d.backend, memaddr[d.id]) for d in vm.spec.virtio_mem]
    out: dict[str, str] = {}
    for memdev, kind, gpa in regions:
        if kind is Backend.FILE:
            out[memdev] = str(vm.backing_file(memdev))
        elif kind is Backend.MEMFD:
            found = find_mapping_file(vm.pid, await gpa2hva(vm, gpa))
            assert found is not None, f"{memdev} at {gpa:#x} is not file-backed"
            assert found.file_offset == 0
            out[memdev] = found.path
    return out


def populated(files: dict[str, str]) -> dict[str, RangeSet]:
    return {memdev: path_extents(path) for memdev, path in files.items()}


def growth(before: dict[str, RangeSet], after: dict[str, RangeSet]) -> dict[str, int]:
    return {m: after[m].total - before[m].total for m in before}


async def status(vm: VM) -> str:
    assert vm.qmp is not None
    return str((await vm.qmp.execute("query-status"))["status"])


@dataclass
class Watch:
    """Run states polled while a dump ran, and the STOP/RESUME events QEMU sent meanwhile."""

    #: distinct consecutive states, from before the dump to after it settled
    states: list[str] = field(default_factory=list)
    #: (event name, QEMU's timestamp in seconds)
    heard: list[tuple[str, float]] = field(default_factory=list)

    @property
    def events(self) -> list[str]:
        return [name for name, _ in self.heard]

    @property
    def paused_s(self) -> float:
        """Seconds between each STOP and the next RESUME, summed."""
        total, stopped = 0.0, None
        for name, at in self.heard:
            if name == "STOP":
                stopped = at
            elif stopped is not None:
                total += at - stopped
                stopped = None
        return total


@contextlib.asynccontextmanager
async def watched(vm: VM) -> AsyncIterator[Watch]:
    """Poll the run state (about every 2 ms) and hear STOP/RESUME while the block runs.

    On exit, waits until the VM's state has settled (no ``save-vm``) and the events of that
    last transition have arrived.
    """
    assert vm.qmp is not None
    watch = Watch()
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            now = await status(vm)
            if not watch.states or watch.states[-1] != now:
                watch.states.append(now)
            await asyncio.sleep(0.002)

    with vm.qmp.listen("STOP", "RESUME") as listener:
        poller = asyncio.create_task(poll())
        try:
            yield watch
        finally:
            done.set()
            await poller
            for _ in range(500):  # QEMU leaves save-vm within milliseconds of a dump's end
                if (now := await status(vm)) != "save-vm":
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the last RESUME of QEMU's own dump thread, if any
            if watch.states[-1] != now:
                watch.states.append(now)
            for event in listener.drain():
                watch.heard.append((event.event, event.at))


@pytest.fixture
def dumps(tmp_path: Path) -> Iterator[Path]:
    """A folder for a test's dumps, emptied afterwards: pytest keeps tmp_path, dumps are big."""
    try:
        yield tmp_path
    finally:
        for path in sorted(tmp_path.rglob("*"), reverse=True):
            if path.is_file() and not path.is_symlink():
                path.unlink()


# ================================================================ fidelity on real QEMU


@dataclass(frozen=True)
class Case:
    spec: VMSpec
    #: ask the guest to unplug down to this size after boot
    unplug_to: int | None = None

    @property
    def id(self) -> str:
        return self.spec.name


def _case(
    name: str,
    machine: str,
    main: Backend,
    device: Backend | None,
    *,
    below_4g: int | None = None,
    unplug_to: int | None = None,
) -> Case:
    vmem = (
        ()
        if device is None
        else (VirtioMemSpec(backend=device, max_size=VMEM_MAX, requested_size=VMEM_MAX),)
    )
    spec = VMSpec(
        name=name,
        machine=machine,
        ram_backend=main,
        ram_size=512 * MiB,
        below_4g=below_4g,
        virtio_mem=vmem,
        pattern_mib=PATTERN_MIB,
    )
    return Case(spec, unplug_to)


CASES = [
    _case(
        "q35-memfd-split", "q35", Backend.MEMFD, Backend.FILE, below_4g=256 * MiB, unplug_to=PARTLY
    ),
    _case("pc-file", "pc", Backend.FILE, Backend.MEMFD),
    _case("q35-ram", "q35", Backend.RAM, None),
    _case(
        "pc-default-split", "pc", Backend.DEFAULT, Backend.RAM, below_4g=256 * MiB, unplug_to=PARTLY
    ),
    _case("q35-default", "q35", Backend.DEFAULT, Backend.FILE),
    _case("pc-memfd", "pc", Backend.MEMFD, None),
    _case(
        "q35-file-split", "q35", Backend.FILE, Backend.MEMFD, below_4g=256 * MiB, unplug_to=PARTLY
    ),
    _case("pc-ram", "pc", Backend.RAM, Backend.RAM),
]


@pytest.mark.guest
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_backend_dump_equals_qemu_dump(
    vm_factory: VMFactory,
    dumps: Path,
    case: Case,
    record_property: Callable[[str, object], None],
) -> None:
    vm = await vm_factory(case.spec)
    assert vm.qmp is not None
    if case.unplug_to is not None:
        await vm.resize("vmem0", case.unplug_to)
        (dev,) = await vm.wait_plugged()
        assert dev.size == case.unplug_to
    plugged = sum(d.size for d in await vm.memory_devices())

    await vm.qmp.execute("stop")
    files = await shmem_files(vm)
    before = await asyncio.to_thread(populated, files)
    async with QMPSession(str(vm.qmp_path)) as session:
        ours = await run_dump(session, dumps / "ours.elf", DumpSpec(engine=EngineName.BACKEND))
        after_ours = await asyncio.to_thread(populated, files)
        assert await status(vm) == "paused"  # consistent mode on a paused VM: left paused
        qemu = await run_dump(session, dumps / "qemu.elf", DumpSpec(engine=EngineName.QEMU))
        after_qemu = await asyncio.to_thread(populated, files)
    assert await status(vm) == "paused"

    # Host memory: ours allocates nothing; QEMU's allocates the holes of what it reads.
    assert after_ours == before
    ours_grew = growth(before, after_ours)
    qemu_grew = growth(after_ours, after_qemu)
    line = (
        f"{case.id}: populated before {sum(r.total for r in before.values()) // MiB} MiB; "
        f"growth by our dump {sum(ours_grew.values())} B, by QEMU's "
        f"{sum(qemu_grew.values()) / MiB:.1f} MiB ({ {m: g // MiB for m, g in qemu_grew.items()} })"
    )
    print(line)
    record_property("host_memory", line)
    if files:
        assert sum(qemu_grew.values()) > 0, "QEMU's dump should have allocated holes"

    # Sidecar, file modes, hash.
    assert (ours.engine, ours.paused_s) == ("backend", None)
    record = await asyncio.to_thread(check_files, ours.path)
    assert record["engine"] == "backend"
    assert record["request"]["mode"] == "consistent"
    assert record["paused_s"] is None

    ours_core = await asyncio.to_thread(read_core, ours.path)
    qemu_core = await asyncio.to_thread(read_core, qemu.path)
    check_our_layout(ours_core)
    assert ours_core.header.machine == qemu_core.header.machine
    assert ours_core.notes == qemu_core.notes
    assert ours_core.coverage == qemu_core.coverage
    # QEMU's coverage, from the spec: main RAM (split at max-ram-below-4g), pc.bios below 4 GiB,
    # and the plugged part of virtio-mem (device memory starts at the next 1 GiB boundary).
    below = min(case.spec.below_4g or case.spec.ram_size, case.spec.ram_size)
    above = case.spec.ram_size - below
    bios = 256 * 1024
    device_base = -(-(FOUR_GIB + above) // GiB) * GiB
    main = RangeSet.from_ranges([(0, below), (FOUR_GIB - bios, bios + above)])
    assert qemu_core.coverage.clip(Range(0, device_base)) == main
    assert qemu_core.coverage.total == main.total + plugged
    found = await asyncio.to_thread(compare_cores, ours_core, qemu_core)
    assert found.data_bytes == ours_core.data.total
    assert found.zero_bytes == ours_core.zero_fill.total
    assert found.pattern_pages >= PATTERN_MIB * MiB // PAGE
    assert record["request"]["data_bytes"] == ours_core.data.total
    print(
        f"{case.id}: ours {ours.size / MiB:.0f} MiB ({len(ours_core.loads)} PT_LOADs, "
        f"{ours_core.zero_fill.total / MiB:.0f} MiB zero-fill) in {ours.duration_s:.2f} s; "
        f"QEMU's {qemu.size / MiB:.0f} MiB in {qemu.duration_s:.2f} s"
    )
    qemu.path.unlink()
    await asyncio.to_thread(check_consumers, ours.path, found, case.spec.cpus, dumps)


# ================================================================ modes, cancel, errors, auto

MODES_SPEC = VMSpec(
    name="dump-modes",
    machine="q35",
    ram_backend=Backend.MEMFD,
    ram_size=512 * MiB,
    virtio_mem=(VirtioMemSpec(backend=Backend.FILE, max_size=VMEM_MAX, requested_size=256 * MiB),),
    pattern_mib=PATTERN_MIB,
)


@pytest.fixture(scope="module")
async def running_vm() -> AsyncIterator[VM]:
    """One running guest for the tests below; each leaves it running, as it found it."""
    vm = await start(MODES_SPEC)
    try:
        yield vm
    finally:
        await vm.stop()


async def assert_running(vm: VM) -> None:
    assert await status(vm) == "running"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@contextlib.contextmanager
def no_lost_task_errors() -> Iterator[list[str]]:
    """Collect what asyncio's exception handler reports (e.g. a task exception never retrieved).

    A finished task whose exception nobody retrieved is reported when it is garbage collected:
    the block is followed by a full collection so that the report happens here, not later.
    """
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(str(context)))
    try:
        yield reports
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


@contextlib.contextmanager
def tiny_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mountpoint``, unmounted on exit."""
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)


@pytest.mark.guest
async def test_makedumpfile_reads_our_dump_through_mmap(running_vm: VM, dumps: Path) -> None:
    """makedumpfile's default reader (mmap) gets what its read() reader gets: our bytes.

    Its assumption is checked directly first (deterministic): no zero-fill PT_LOAD's
    ``[p_offset, p_offset + p_memsz)`` may hold data bytes. Then the real thing: whether the
    wrong pages are read depends on which guest pages makedumpfile keeps (about one dump in
    four on these VMs: a segment's pages read as zeros, and dropped as zero pages; or SIGBUS).
    """
    vm = running_vm
    assert vm.qmp is not None
    await vm.qmp.execute("stop")
    try:
        async with QMPSession(str(vm.qmp_path)) as session:
            outcome = await run_dump(
                session, dumps / "mmap.elf", DumpSpec(engine=EngineName.BACKEND)
            )
    finally:
        await vm.qmp.execute("cont")
    core = await asyncio.to_thread(read_core, outcome.path)
    data_end = max(ph.offset + ph.filesz for ph in core.loads if ph.filesz)
    inside = [ph for ph in core.loads if not ph.filesz and ph.offset < data_end]
    assert not inside, (
        f"{len(inside)} zero-fill PT_LOADs have p_offset inside the data (the first: gpa "
        f"{inside[0].paddr:#x}, p_offset {inside[0].offset:#x}, data ends at {data_end:#x})"
    )
    await asyncio.to_thread(mmap_agrees_with_read, outcome.path, dumps)


@pytest.mark.guest
async def test_consistent_dump_of_a_running_vm_pauses_it_briefly(
    running_vm: VM, dumps: Path
) -> None:
    vm = running_vm
    await assert_running(vm)
    target = dumps / "consistent.elf"
    async with watched(vm) as watch:
        code, out, err = await run_cli(
            "dump", "--qmp", str(vm.qmp_path), "-o", str(target), "--engine", "backend", "--json"
        )
    assert code == 0, err
    # Our stop and cont, nothing else: QEMU's header probe runs while the VM is paused.
    assert watch.events == ["STOP", "RESUME"]
    assert watch.states[0] == watch.states[-1] == "running"
    assert "save-vm" not in watch.states
    record = await asyncio.to_thread(check_files, target)
    assert json.loads(out)["sha256"] == record["sha256"]
    assert record["request"]["mode"] == "consistent"
    assert isinstance(record["paused_s"], float)
    assert 0 < record["paused_s"] < 5
    assert record["paused_s"] == pytest.approx(watch.paused_s, abs=0.05)
    core = await asyncio.to_thread(read_core, target)
    check_our_layout(core)
    async with QMPSession(str(vm.qmp_path)) as session:
        assert core.coverage == await probe_dump_loads(session)


@pytest.mark.guest
async def test_consistent_dump_of_a_paused_vm_leaves_it_paused(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    assert vm.qmp is not None
    await vm.qmp.execute("stop")
    try:
        async with watched(vm) as watch, QMPSession(str(vm.qmp_path)) as session:
            outcome = await run_dump(
                session, dumps / "paused.elf", DumpSpec(engine=EngineName.BACKEND)
            )
        assert watch.events == []
        assert watch.states == ["paused"]
        assert outcome.paused_s is None
        record = await asyncio.to_thread(check_files, outcome.path)
        assert record["paused_s"] is None
        assert record["request"]["mode"] == "consistent"
        assert record["vm"]["run_state"] == "paused"
    finally:
        await vm.qmp.execute("cont")


@pytest.mark.guest
async def test_live_dump_keeps_the_vm_running(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    await assert_running(vm)
    target = dumps / "live.elf"
    async with watched(vm) as watch:
        code, _out, err = await run_cli(
            "dump", "--qmp", str(vm.qmp_path), "-o", str(target), "--engine", "backend", "--live"
        )
    assert code == 0, err
    # Only QEMU's header probe stops the VM, for milliseconds: save-vm, and "paused" when the
    # probe must check the pages QEMU's dump reads first (qmpdump.survey); one STOP, one RESUME.
    assert set(watch.states) <= {"running", "save-vm", "paused"}
    assert watch.states[0] == watch.states[-1] == "running"
    assert watch.events == ["STOP", "RESUME"]
    record = await asyncio.to_thread(check_files, target)
    assert record["request"]["mode"] == "live"
    # The sidecar reports that pause, as QEMU's events time it.
    assert isinstance(record["paused_s"], float)
    assert 0 < record["paused_s"] < 0.5
    assert record["paused_s"] == pytest.approx(watch.paused_s, abs=1e-5)
    core = await asyncio.to_thread(read_core, target)
    check_our_layout(core)
    assert b"VMCOREINFO" in core.notes
    async with QMPSession(str(vm.qmp_path)) as session:
        assert core.coverage == await probe_dump_loads(session)
    view = await asyncio.to_thread(pyelftools_view, target)
    assert view.load_count == len(core.loads)


@pytest.mark.guest
async def test_cancel_right_away(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    await assert_running(vm)
    folder = dumps / "out"
    tasks: list[DumpTask] = []

    async def cancel_at_pause() -> None:
        tasks[0].cancel()  # lands on the stop command: the guard resumes to be sure

    with no_lost_task_errors() as reports:
        async with watched(vm) as watch, QMPSession(str(vm.qmp_path)) as session:
            spec = DumpSpec(engine=EngineName.BACKEND)
            hooks = PauseHooks(before_pause=cancel_at_pause)
            tasks.append(DumpTask(run_dump(session, folder / "cancelled.elf", spec, hooks=hooks)))
            with pytest.raises(DumpCancelled):
                await tasks[0].result()
    assert reports == []
    assert leftovers(folder) == []
    assert watch.events in ([], ["STOP", "RESUME"])
    assert watch.states[-1] == "running"


@pytest.mark.guest
async def test_cancel_mid_copy(
    running_vm: VM, dumps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk (the copier sleeps between operations) so that the cancel lands mid-copy."""
    vm = running_vm
    await assert_running(vm)
    real = copier.copy_ops_into
    calls: list[int] = []

    def slow_copy(
        out_fd: int, ops: Sequence[CopyOp], sources: dict[str, Source], state: CopyState
    ) -> None:
        for op in ops:
            calls.append(op.size)
            real(out_fd, [op], sources, state)
            time.sleep(0.02)

    monkeypatch.setattr(backend_engine, "copy_ops_into", slow_copy)
    tasks: list[DumpTask] = []
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        if p.completed > 0 and not seen:
            seen.append(p)
            tasks[0].cancel()

    folder = dumps / "out"
    with no_lost_task_errors() as reports:
        async with watched(vm) as watch, QMPSession(str(vm.qmp_path)) as session:
            spec = DumpSpec(engine=EngineName.BACKEND)
            target = folder / "cancelled.elf"
            tasks.append(DumpTask(run_dump(session, target, spec, progress=progress)))
            with pytest.raises(DumpCancelled):
                await tasks[0].result()
    assert reports == []
    (when,) = seen
    assert 0 < when.completed < when.total
    assert sum(calls) < when.total  # the copier stopped before the end
    assert leftovers(folder) == []
    assert watch.events == ["STOP", "RESUME"]
    assert watch.states[-1] == "running"


@pytest.mark.guest
async def test_cancel_mid_kdump(
    running_vm: VM, dumps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kdump: the cancel lands while threads compress (reads slowed down); no file is left,
    the VM runs again, no thread's error is lost."""
    vm = running_vm
    await assert_running(vm)
    real = kdump_writer.read_source
    reads: list[int] = []

    def slow_read(src: Source, region_offset: int, size: int) -> bytes:
        reads.append(size)
        time.sleep(0.01)
        return real(src, region_offset, size)

    monkeypatch.setattr(kdump_writer, "read_source", slow_read)
    tasks: list[DumpTask] = []
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        if p.completed > 0 and not seen:
            seen.append(p)
            tasks[0].cancel()

    folder = dumps / "out"
    with no_lost_task_errors() as reports:
        async with watched(vm) as watch, QMPSession(str(vm.qmp_path)) as session:
            spec = DumpSpec(engine=EngineName.BACKEND, format=DumpFormat.KDUMP_LZO)
            target = folder / "cancelled.kdump"
            tasks.append(DumpTask(run_dump(session, target, spec, progress=progress)))
            with pytest.raises(DumpCancelled):
                await tasks[0].result()
    assert reports == []
    (when,) = seen
    assert 0 < when.completed < when.total
    assert sum(reads) < when.total  # the writer stopped before the end
    assert leftovers(folder) == []
    assert watch.events == ["STOP", "RESUME"]
    assert watch.states[-1] == "running"


@pytest.mark.guest
async def test_disk_full_removes_the_partial_and_resumes_the_vm(
    running_vm: VM, dumps: Path
) -> None:
    vm = running_vm
    await assert_running(vm)
    with tiny_tmpfs(dumps / "small", "16m") as folder, no_lost_task_errors() as reports:
        async with watched(vm) as watch, QMPSession(str(vm.qmp_path)) as session:
            with pytest.raises(DiskFull) as raised:
                await run_dump(session, folder / "big.elf", DumpSpec(engine=EngineName.BACKEND))
        assert raised.value.exit_code == 43
        assert leftovers(folder) == []
        # The same through the CLI: its exit code, one line, nothing left behind.
        code, _out, err = await run_cli(
            "dump", "--qmp", str(vm.qmp_path), "-o", str(folder / "cli.elf"), "--engine", "backend"
        )
        assert code == 43, err
        assert "no space left" in err
        assert "Traceback" not in err
        assert leftovers(folder) == []
    assert reports == []
    assert watch.events == ["STOP", "RESUME"]
    assert watch.states[-1] == "running"


@pytest.mark.guest
async def test_auto_picks_the_backend_and_says_why(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    target = dumps / "auto.elf"
    code, out, err = await run_cli(
        "dump", "--qmp", str(vm.qmp_path), "-o", str(target), "--engine", "auto", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    record = await asyncio.to_thread(check_files, target)
    assert summary["engine"] == record["engine"] == "backend"
    assert record["engine_reason"] == summary["engine_reason"]
    assert record["engine_reason"] == "every RAM region can be read from the host"
    assert record["request"]["mode"] == "consistent"
    await assert_running(vm)


@pytest.mark.guest
async def test_auto_picks_the_backend_for_kdump_and_says_why(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    target = dumps / "auto.kdump"
    code, out, err = await run_cli(
        "dump",
        "--qmp",
        str(vm.qmp_path),
        "-o",
        str(target),
        "--engine",
        "auto",
        "--format",
        "kdump-zlib",
        "--json",
    )
    assert code == 0, err
    record = await asyncio.to_thread(check_files, target)
    assert json.loads(out)["engine"] == record["engine"] == "backend"
    assert "every RAM region can be read" in record["engine_reason"]
    assert record["format"] == "kdump-zlib"
    assert record["request"]["codec"] == "zlib"
    with target.open("rb") as f:
        assert f.read(8) == b"KDUMP   "  # the standard layout, never flattened
    await assert_running(vm)


@pytest.mark.guest
async def test_backend_refuses_win_dmp(running_vm: VM, dumps: Path) -> None:
    vm = running_vm
    folder = dumps / "out"
    code, out, err = await run_cli(
        "dump",
        "--qmp",
        str(vm.qmp_path),
        "-o",
        str(folder / "x.dmp"),
        "--engine",
        "backend",
        "--format",
        "win-dmp",
    )
    assert code == 2, err
    assert out == ""
    assert "does not write 'win-dmp'" in err
    assert "Traceback" not in err
    assert leftovers(folder) == []
    await assert_running(vm)


@pytest.mark.guest
async def test_zero_pages_are_left_out_and_read_as_zeros(running_vm: VM, dumps: Path) -> None:
    """``--zero-pages``: all-zero pages inside populated memory become zero-fill, the guest
    reads the same bytes everywhere, and the file holds less."""
    vm = running_vm
    assert vm.qmp is not None
    await vm.qmp.execute("stop")
    try:
        async with QMPSession(str(vm.qmp_path)) as session:
            full = await run_dump(session, dumps / "full.elf", DumpSpec(engine=EngineName.BACKEND))
            lean = await run_dump(
                session,
                dumps / "lean.elf",
                DumpSpec(engine=EngineName.BACKEND, zero_pages=True),
            )
    finally:
        await vm.qmp.execute("cont")
    core_full = await asyncio.to_thread(read_core, full.path)
    core_lean = await asyncio.to_thread(read_core, lean.path)
    assert core_lean.coverage == core_full.coverage
    assert core_lean.notes == core_full.notes
    left_out = core_full.data - core_lean.data
    assert left_out, "a booted guest has zero pages in its populated memory"
    assert core_lean.data - core_full.data == RangeSet.empty()
    assert lean.size < full.size
    assert lean.record.request.model_dump()["zero_pages_left_out"] is True
    with full.path.open("rb") as f_full, lean.path.open("rb") as f_lean:
        reader_full = GpaReader(core_full, f_full.fileno())
        reader_lean = GpaReader(core_lean, f_lean.fileno())
        for rng in core_full.data:
            for gpa in range(rng.start, rng.end, CHUNK):
                size = min(CHUNK, rng.end - gpa)
                assert reader_lean.read(gpa, size) == reader_full.read(gpa, size), hex(gpa)
        for rng in left_out:
            assert reader_full.read(rng.start, rng.size).count(0) == rng.size
