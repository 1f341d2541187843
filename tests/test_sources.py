"""Which source holds the guest's bytes, and the refusal where that cannot be proven.

* :func:`region_mapping` (pure) on literal ``/proc/PID/maps`` lines: the kinds, and every shape
  it must refuse (a gap, a mix of VMAs, non-consecutive offsets, shared anonymous memory).
* :func:`region_population` on real mappings of this very process, standing in for QEMU (the
  kernel does the same for any process): a ``MAP_PRIVATE`` memfd's written pages are private
  copy-on-write pages the file never sees, and the survey must read them from the process, over
  the union of file data and those pages, without allocating a hole of the file; a shared one is
  read from the file; a private hugetlb mapping is refused (its holes cannot be told apart).
* Real QEMU (bare tier) over TCP: QEMU's pid is unknown, nothing can be proven. Through a proxy
  (SO_PEERCRED names the proxy, as with libvirt's ``virt-qemu-qmp-proxy``): the peer's pid is
  not QEMU's (QEMU's vCPU threads are not its threads), so ``auto`` chooses QEMU's engine and
  says why, and ``--engine backend`` exits 49 without a traceback and without a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qmpdump.engines.backend import readable
from qmpdump.engines.run import choose_engine
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.errors import SourceUnproven
from qmpdump.host.extents import (
    HUGETLBFS_MAGIC,
    TMPFS_MAGIC,
    data_extents,
    filesystem_magic,
    holes_are_exact,
)
from qmpdump.host.pagemap import PAGE_SIZE
from qmpdump.host.procfs import MappingKind, parse_maps, region_mapping
from qmpdump.host.procmem import read_process_memory
from qmpdump.memmap.layout import Backend, BackendType
from qmpdump.memmap.populated import Source
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.qmp.session import QMPSession, parse_address
from qmpdump.survey import ReadFrom, region_population, survey
from qmpdump.testbed.vm import Backend as VMBackend
from qmpdump.testbed.vm import MiB, VMSpec

from .clirun import run_cli
from .conftest import VMFactory

MAPS = """\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
7f0000200000-7f0000300000 rw-s 00000000 00:01 1061  /memfd:memory-backend-memfd (deleted)
7f0000300000-7f0000400000 rw-s 00100000 00:01 1061  /memfd:memory-backend-memfd (deleted)
7f0000400000-7f0000500000 rw-p 00000000 00:1a 77  /dev/shm/ram0
7f0000500000-7f0000600000 rw-s 00100000 00:1a 77  /dev/shm/ram0
7f0000600000-7f0000700000 rw-s 00300000 00:01 1061  /memfd:memory-backend-memfd (deleted)
7f0000800000-7f0000900000 rw-s 00000000 00:00 0 
"""  # noqa: W291 - the kernel ends an anonymous line with a space
BASE = 0x7F0000000000
M = 0x100000


def _at(offset: int, size: int) -> Range:
    return Range(BASE + offset, size)


def test_region_mapping_kinds() -> None:
    entries = parse_maps(MAPS)
    anon = region_mapping(entries, _at(0, 2 * M))  # two anonymous VMAs, no gap
    assert anon.kind is MappingKind.ANONYMOUS
    assert len(anon.entries) == 2
    assert anon.file_offset == 0
    shared = region_mapping(entries, _at(2 * M + 0x1000, 2 * M - 0x1000))  # consecutive offsets
    assert shared.kind is MappingKind.SHARED_FILE
    assert shared.file_offset == 0x1000
    assert "shared mapping" in shared.describe()
    assert "inode 1061" in shared.describe()
    private = region_mapping(entries, _at(4 * M, M))
    assert private.kind is MappingKind.PRIVATE_FILE
    assert "private mapping of /dev/shm/ram0" in private.describe()


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        (_at(6 * M, 2 * M), "no mapping of QEMU holds host address 0x7f0000700000"),
        (_at(1 * M, 2 * M), "VMAs of different kinds"),  # anonymous, then a file
        (_at(4 * M, 2 * M), "VMAs of different kinds"),  # same file, private then shared
        (_at(3 * M, 4 * M), "VMAs of different kinds"),  # the memfd, then /dev/shm
        (_at(8 * M, M), "shared anonymous memory"),
        (_at(0x10 * M, M), "no mapping of QEMU holds"),
    ],
)
def test_region_mapping_refuses_what_it_cannot_classify(window: Range, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        region_mapping(parse_maps(MAPS), window)


def test_region_mapping_refuses_non_consecutive_offsets() -> None:
    text = MAPS.replace(
        "7f0000300000-7f0000400000 rw-s 00100000", "7f0000300000-7f0000400000 rw-s 00200000"
    )
    with pytest.raises(ValueError, match="non-consecutive offsets"):
        region_mapping(parse_maps(text), _at(2 * M, 2 * M))


# ================================================================ real mappings of this process

SIZE = 64 * PAGE_SIZE


def _address(view: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@contextlib.contextmanager
def _mapped(flags: int, size: int = SIZE, memfd_flags: int = 0) -> Iterator[tuple[int, mmap.mmap]]:
    fd = os.memfd_create("qmpdump-test", memfd_flags)
    try:
        os.ftruncate(fd, size)
        view = mmap.mmap(fd, size, flags)
        try:
            yield fd, view
        finally:
            view.close()
    finally:
        os.close(fd)


def _backend(size: int = SIZE) -> Backend:
    return Backend(region="ram0", type=BackendType.MEMFD, size=size, id="ram0", share=None)


def test_private_mapping_is_read_from_the_process_over_file_data_and_cow_pages() -> None:
    with _mapped(mmap.MAP_PRIVATE) as (fd, view):
        os.pwrite(fd, b"F" * PAGE_SIZE, 3 * PAGE_SIZE)  # the file's own content
        os.pwrite(fd, b"f" * PAGE_SIZE, 7 * PAGE_SIZE)  # file content the guest overwrites
        view[7 * PAGE_SIZE : 8 * PAGE_SIZE] = b"G" * PAGE_SIZE  # copy-on-write: file untouched
        view[9 * PAGE_SIZE : 10 * PAGE_SIZE] = b"g" * PAGE_SIZE  # a private page over a hole
        # The write fault over the hole read the file page first (do_cow_fault): a zero page
        # was allocated in the file, as QEMU's own reads through such a mapping do.
        before = data_extents(fd)
        assert before == RangeSet.from_ranges(
            [(3 * PAGE_SIZE, PAGE_SIZE), (7 * PAGE_SIZE, PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE)]
        )
        assert os.pread(fd, PAGE_SIZE, 9 * PAGE_SIZE) == bytes(PAGE_SIZE)
        population, access = region_population(os.getpid(), _backend(), _address(view))
        assert access is not None
        assert access.read_from is ReadFrom.PROCESS
        assert "private mapping" in access.proof
        assert population.source is Source.SEEK_DATA_AND_PAGEMAP_SCAN
        assert population.exact
        assert population.offsets == before
        # The file never saw the guest's writes: reading it would have been wrong.
        assert os.pread(fd, PAGE_SIZE, 7 * PAGE_SIZE) == b"f" * PAGE_SIZE
        buf = bytearray(PAGE_SIZE)
        expected = {3: b"F", 7: b"G", 9: b"g"}
        for run in population.offsets:
            for offset in range(run.start, run.end, PAGE_SIZE):
                read_process_memory(os.getpid(), _address(view) + offset, memoryview(buf))
                assert bytes(buf) == expected[offset // PAGE_SIZE] * PAGE_SIZE
        assert data_extents(fd) == before  # reading only populated pages allocated nothing


def test_shared_mapping_is_read_from_the_file() -> None:
    with _mapped(mmap.MAP_SHARED) as (fd, view):
        view[2 * PAGE_SIZE : 3 * PAGE_SIZE] = b"S" * PAGE_SIZE
        population, access = region_population(os.getpid(), _backend(), _address(view))
        assert access is not None
        assert access.read_from is ReadFrom.FILE
        assert access.path == f"/proc/{os.getpid()}/fd/{fd}"
        assert "shared mapping" in access.proof
        assert population.source is Source.SEEK_DATA
        assert population.offsets == RangeSet.of(2 * PAGE_SIZE, PAGE_SIZE)


def test_anonymous_memory_is_read_from_the_process() -> None:
    view = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE)
    try:
        view[PAGE_SIZE : 2 * PAGE_SIZE] = b"A" * PAGE_SIZE
        population, access = region_population(os.getpid(), _backend(), _address(view))
        assert access is not None
        assert access.read_from is ReadFrom.PROCESS
        assert "anonymous" in access.proof
        assert population.offsets == RangeSet.of(PAGE_SIZE, PAGE_SIZE)
    finally:
        view.close()


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
HUGE = 2 * MiB


@contextlib.contextmanager
def _huge_pages(count: int) -> Iterator[None]:
    # Relative, not absolute: another reservation made meanwhile is left alone.
    NR_HUGEPAGES.write_text(str(int(NR_HUGEPAGES.read_text()) + count))
    try:
        yield
    finally:
        NR_HUGEPAGES.write_text(str(max(0, int(NR_HUGEPAGES.read_text()) - count)))


def test_private_hugetlb_mapping_is_refused_with_the_reason() -> None:
    with _huge_pages(4), _mapped(mmap.MAP_PRIVATE, 2 * HUGE, os.MFD_HUGETLB) as (_, view):
        view[0:1] = b"h"
        population, access = region_population(os.getpid(), _backend(2 * HUGE), _address(view))
        assert access is not None
        assert access.read_from is None
        assert not population.known
        assert "hugetlbfs" in access.proof
        assert "would allocate" in population.note


# ================================================================ QEMU's pid: unknown or not QEMU's


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.bare
async def test_over_tcp_nothing_is_proven_and_auto_picks_qemu(vm_factory: VMFactory) -> None:
    port = _free_port()
    spec = VMSpec(
        name="sources-tcp",
        guest=False,
        ram_backend=VMBackend.FILE,
        ram_size=64 * MiB,
        qmp_tcp_port=port,
    )
    await vm_factory(spec)
    async with QMPSession(parse_address(f"tcp:127.0.0.1:{port}")) as session:
        result = await survey(session)
    assert result.facts.pid is None
    ok, why = readable(result)
    assert not ok
    assert "QEMU's pid is unknown" in why
    assert all(a.read_from is None for a in result.access.values())


@contextlib.asynccontextmanager
async def qmp_proxy(target: Path, listen: Path) -> AsyncIterator[None]:
    """A byte-for-byte UNIX socket proxy in this process, as libvirt's virt-qemu-qmp-proxy is
    one in its own: qmpdump's SO_PEERCRED then names the proxy, not QEMU. (The real proxy
    needs a libvirt domain; what matters here is only that the peer is another process.)"""
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(target))
        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            tasks.add(asyncio.create_task(task))

    server = await asyncio.start_unix_server(serve, path=str(listen))
    try:
        yield
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.bare
async def test_a_proxy_peer_is_not_taken_for_qemu(vm_factory: VMFactory, tmp_path: Path) -> None:
    vm = await vm_factory(
        VMSpec(name="sources-proxy", guest=False, ram_backend=VMBackend.RAM, ram_size=64 * MiB)
    )
    listen = tmp_path / "proxy.sock"
    async with qmp_proxy(vm.qmp_path, listen):
        async with QMPSession(str(listen)) as session:
            assert session.pid == os.getpid()  # the proxy: this very process
            result = await survey(session)
            engine, reason = choose_engine(DumpSpec(), result, session)
            with pytest.raises(SourceUnproven) as caught:
                choose_engine(DumpSpec(engine=EngineName.BACKEND), result, session)
        assert engine.traits.name is EngineName.QEMU
        assert "is not proven to be QEMU's process" in reason
        assert f"pid {os.getpid()}" in reason
        assert caught.value.exit_code == 49
        assert all(a.read_from is None for a in result.access.values())

        folder = tmp_path / "out"
        code, out, err = await run_cli(
            "dump", "--qmp", str(listen), "-o", str(folder / "x.elf"), "--engine", "backend"
        )
    assert code == 49, err
    assert out == ""
    assert "is not proven to be QEMU's process" in err
    assert "Traceback" not in err
    assert not folder.exists() or not list(folder.iterdir())
    # Straight to QEMU, the same VM's pid is QEMU's and every region is proven.
    async with QMPSession(str(vm.qmp_path)) as session:
        direct = await survey(session)
    assert readable(direct) == (True, "every RAM region can be read from the host")
    assert {a.read_from for a in direct.access.values()} == {ReadFrom.PROCESS}


def test_holes_are_exact_on_shmem_not_on_hugetlbfs() -> None:
    fd = os.memfd_create("qmpdump-test")
    try:
        assert holes_are_exact(fd)
        assert filesystem_magic(fd) == TMPFS_MAGIC
    finally:
        os.close(fd)
    with _huge_pages(1):
        fd = os.memfd_create("qmpdump-test", os.MFD_HUGETLB)
        try:
            assert filesystem_magic(fd) == HUGETLBFS_MAGIC
            assert not holes_are_exact(fd)
        finally:
            os.close(fd)
