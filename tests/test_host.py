"""Tests of qmpdump.host: extents, /proc lookups and PAGEMAP_SCAN, with real QEMU where it counts.

The real-QEMU tests (``bare``) write known bytes into a stopped VM's RAM from the host and check
that each function reports exactly the pages written, and that QEMU sees the bytes at the
expected guest-physical address. Where the kernel populates more than the bytes written
(transparent huge pages), the expectation is derived from sysfs and ``/proc/PID/smaps``, which
are independent of the code under test, and checked against smaps' own counters.

The unit tests need no QEMU: the maps parser on literal text, the ioctl layout against the
kernel header's numbers, and the kernel interfaces on a memfd or this process's own memory,
where layouts can be made that QEMU would not produce (4 KiB pages only, thousands of runs).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qmpdump.errors import HostAccessError
from qmpdump.host import pagemap
from qmpdump.host.extents import data_extents, open_for_extents, path_extents
from qmpdump.host.pagemap import (
    PAGE_SIZE,
    PAGEMAP_SCAN,
    PageCategory,
    PageRegion,
    PmScanArg,
    read_pagemap_present,
    scan_populated,
)
from qmpdump.host.procfs import (
    MapsEntry,
    find_mapping,
    find_mapping_file,
    mapping_at,
    parse_maps,
    parse_maps_line,
    read_maps,
)
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.testbed.vm import VM, Backend, MiB, VirtioMemSpec, VMSpec

from .conftest import VMFactory

THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage")
MEMFD_TARGET = "/memfd:memory-backend-memfd (deleted)"


# ---------------------------------------------------------------- helpers


def pages_of(writes: Iterable[tuple[int, bytes]]) -> RangeSet:
    """The pages that writes of ``data`` at ``offset`` touch, as one set."""
    return RangeSet.from_ranges(Range(offset, len(data)) for offset, data in writes).align_out(
        PAGE_SIZE
    )


def hva_of(hmp_text: str) -> int:
    """The host address in HMP's ``Host virtual address for 0x... (ram0) is 0x7f...``."""
    match = re.search(r"Host virtual address for 0x[0-9a-f]+ \(.*\) is (0x[0-9a-f]+)", hmp_text)
    assert match, hmp_text
    return int(match.group(1), 16)


async def gpa2hva(vm: VM, gpa: int) -> int:
    assert vm.qmp is not None
    return hva_of(await vm.qmp.hmp(f"gpa2hva {gpa:#x}"))


async def guest_bytes(vm: VM, gpa: int, count: int = 8) -> bytes:
    """``count`` bytes at ``gpa`` as QEMU itself reads guest memory (HMP ``xp``)."""
    assert vm.qmp is not None
    text = await vm.qmp.hmp(f"xp /{count}xb {gpa:#x}")
    # One line per 8 bytes: "0000000000100000: 0x51 0x4d ...".
    lines = [line.partition(":")[2] for line in text.splitlines() if ":" in line]
    return bytes(int(token, 16) for line in lines for token in line.split())


class _IOVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.process_vm_writev.restype = ctypes.c_ssize_t
_LIBC.process_vm_readv.restype = ctypes.c_ssize_t


def _process_vm(pid: int, hva: int, buf: ctypes.Array[ctypes.c_char], write: bool) -> None:
    local = _IOVec(ctypes.addressof(buf), len(buf))
    remote = _IOVec(hva, len(buf))
    call = _LIBC.process_vm_writev if write else _LIBC.process_vm_readv
    done = call(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done != len(buf):
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_{'writev' if write else 'readv'}: {os.strerror(err)}")


def poke(pid: int, hva: int, data: bytes) -> None:
    """Write ``data`` into process ``pid`` at ``hva`` (``process_vm_writev``; root here)."""
    _process_vm(pid, hva, ctypes.create_string_buffer(data, len(data)), write=True)


def peek(pid: int, hva: int, count: int) -> bytes:
    """Read ``count`` bytes of process ``pid`` at ``hva`` (``process_vm_readv``)."""
    buf = ctypes.create_string_buffer(count)
    _process_vm(pid, hva, buf, write=False)
    return buf.raw


def sysfs_choice(path: Path) -> str:
    """The selected word of a sysfs choice file such as ``always [madvise] never``."""
    match = re.search(r"\[(\w+)\]", path.read_text())
    assert match, path
    return match.group(1)


def smaps_fields(pid: int, hva: int) -> dict[str, str]:
    """The ``/proc/PID/smaps`` fields of the VMA holding ``hva`` (values as text)."""
    fields: dict[str, str] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
                if inside:
                    break
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= hva < end
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    assert fields, f"no VMA of {pid} holds {hva:#x}"
    return fields


def kib(value: str) -> int:
    """Bytes in an smaps value like ``4096 kB``."""
    number, unit = value.split()
    assert unit == "kB"
    return int(number) * 1024


def anon_fault_granules(pid: int, hva: int) -> tuple[int, int]:
    """How much a first write and a first read at ``hva`` map in QEMU's anonymous RAM.

    Returns ``(write_granule, read_granule)``, derived from sysfs and smaps rather than from the
    code under test: if the VMA is THP-eligible (smaps ``THPeligible: 1``: QEMU madvises guest
    RAM ``MADV_HUGEPAGE``, and ``enabled`` is ``always`` or ``madvise``), a write fault allocates
    a whole PMD-size huge page and a read fault maps the huge zero page when ``use_zero_page``
    is 1; otherwise both map one base page. Multi-size THP (folios between 4 KiB and 2 MiB)
    would make the write granule depend on more than this, so the test refuses to guess.
    """
    pmd_size = int((THP_SYSFS / "hpage_pmd_size").read_text())
    eligible = smaps_fields(pid, hva).get("THPeligible") == "1"
    if not eligible:
        return PAGE_SIZE, PAGE_SIZE
    for size_dir in THP_SYSFS.glob("hugepages-*kB"):
        size = int(size_dir.name.removeprefix("hugepages-").removesuffix("kB")) * 1024
        enabled = size_dir / "enabled"  # absent for shmem-only sizes
        if size != pmd_size and enabled.exists() and sysfs_choice(enabled) != "never":
            pytest.skip(f"multi-size THP {size_dir.name} is enabled; expectations assume PMD only")
    use_zero = (THP_SYSFS / "use_zero_page").read_text().strip() == "1"
    return pmd_size, pmd_size if use_zero else PAGE_SIZE


def whole_blocks(vma: Range, granule: int) -> RangeSet:
    """The naturally aligned ``granule`` blocks that lie wholly inside ``vma``."""
    lo = -(-vma.start // granule) * granule
    hi = vma.end // granule * granule
    return RangeSet.of(lo, hi - lo) if lo < hi else RangeSet()


def fault_extent(pages: RangeSet, granule: int, vma: Range) -> RangeSet:
    """What faulting ``pages`` in ``vma`` maps: whole ``granule`` blocks where one fits the VMA.

    A huge page needs its naturally aligned block inside the VMA; at a VMA's unaligned edges the
    kernel falls back to base pages.
    """
    blocks = whole_blocks(vma, granule)
    return (pages.align_out(granule) & blocks) | (pages - blocks)


def shmem_page_granule() -> int:
    """The granule shmem (memfd, /dev/shm) allocates in: base pages unless shmem THP is on."""
    setting = sysfs_choice(THP_SYSFS / "shmem_enabled")
    if setting not in ("never", "deny"):
        pytest.skip(f"shmem_enabled={setting}: expectations assume base-page shmem")
    return PAGE_SIZE


def address_of(area: mmap.mmap) -> int:
    """The address of an mmap in this process (the temporary buffer export ends at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


@contextmanager
def opened(path: str | Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def memfd(size: int) -> Iterator[int]:
    fd = os.memfd_create("qmpdump-test-host", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        yield fd
    finally:
        os.close(fd)


# Writes at known offsets: two adjacent pages, bytes straddling a page boundary, a page written
# with zeros (allocation, not content, makes data), one in the middle and the last byte.
def file_writes(size: int) -> list[tuple[int, bytes]]:
    return [
        (0x0, b"QMPDUMP0"),
        (0x1000 + 0x40, b"QMPDUMP1"),
        (0x10FFC, b"STRADDLE"),
        (0x200000, bytes(16)),
        (0x800000 + 5, b"MIDDLE!!"),
        (size - 1, b"Z"),
    ]


# ---------------------------------------------------------------- unit: /proc/PID/maps parser

MAPS_TEXT = """\
55d4c7a00000-55d4c7e5a000 r--p 00000000 fe:00 1315129  /usr/bin/qemu-system-x86_64
55d4c9b4f000-55d4ca1a8000 rw-p 00000000 00:00 0  [heap]
7f4bf7e00000-7f4c07e00000 rw-p 00000000 00:00 0 
7f919bfff000-7f91abfff000 rw-s 00000000 00:01 1061  /memfd:memory-backend-memfd (deleted)
7f91abfff000-7f91bbfff000 rw-s 10000000 00:1a 77  /dev/shm/qmpdump vm/ram0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""  # noqa: W291 - the kernel ends an anonymous line with a space


def test_parse_maps_reads_every_field_of_literal_lines() -> None:
    entries = parse_maps(MAPS_TEXT)
    assert [e.path for e in entries] == [
        "/usr/bin/qemu-system-x86_64",
        "[heap]",
        "",
        MEMFD_TARGET,
        "/dev/shm/qmpdump vm/ram0",  # a space in a path survives
        "[vsyscall]",
    ]
    memfd_entry = entries[3]
    assert memfd_entry == MapsEntry(
        start=0x7F919BFFF000,
        end=0x7F91ABFFF000,
        perms="rw-s",
        offset=0,
        dev_major=0,
        dev_minor=1,
        inode=1061,
        path=MEMFD_TARGET,
    )
    assert (memfd_entry.is_shared, memfd_entry.is_deleted, memfd_entry.is_anonymous) == (
        True,
        True,
        False,
    )
    assert memfd_entry.size == 256 * MiB
    assert memfd_entry.hva_range == Range(0x7F919BFFF000, 256 * MiB)
    anon = entries[2]
    assert (anon.is_anonymous, anon.is_shared, anon.inode) == (True, False, 0)
    shm = entries[4]
    assert (shm.dev_major, shm.dev_minor, shm.inode, shm.offset) == (0, 0x1A, 77, 0x10000000)
    assert shm.file_offset(0x7F91ABFFF000 + 0x1234) == 0x10001234
    with pytest.raises(ValueError, match="outside the mapping"):
        shm.file_offset(shm.end)
    assert (entries[0].dev_major, entries[0].inode) == (0xFE, 1315129)
    assert entries[-1].end == 0xFFFFFFFFFF601000
    assert mapping_at(entries, 0x7F4BF7E00000) is anon
    assert mapping_at(entries, 0x7F4C07E00000 - 1) is anon
    assert mapping_at(entries, 0x7F4C07E00000) is None  # the gap before the memfd
    assert mapping_at(entries, 0x1000) is None


@pytest.mark.parametrize(
    "line",
    [
        "not a maps line",
        "7f00-7e00 rw-p 00000000 00:00 0",  # end before start
        "7f00-7f01 rw 00000000 00:00 0",  # perms are four characters
        "7f00-7f01 rw-p 0000zz00 00:00 0",
        "7f00-7f01 rw-p 00000000 0000 0",
    ],
)
def test_parse_maps_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="malformed /proc/PID/maps line"):
        parse_maps_line(line)


def test_read_maps_of_this_process_finds_a_memfd_by_identity() -> None:
    with memfd(4 * PAGE_SIZE) as fd, mmap.mmap(fd, 4 * PAGE_SIZE) as view:
        address = address_of(view)
        found = find_mapping_file(os.getpid(), address + PAGE_SIZE + 5)
        assert found is not None
        assert found.source == "fd"
        assert found.path == f"/proc/{os.getpid()}/fd/{fd}"
        assert found.fd == fd
        assert found.file_offset == PAGE_SIZE + 5
        assert found.file_size == 4 * PAGE_SIZE
        assert found.mapping.start == address
        assert any(e.start == address for e in read_maps(os.getpid()))


def test_proc_errors_name_the_entry() -> None:
    gone = _unused_pid()
    with pytest.raises(HostAccessError, match=rf"/proc/{gone}/maps: process {gone} is gone"):
        read_maps(gone)
    with pytest.raises(HostAccessError, match=rf"/proc/{gone}/pagemap: process {gone} is gone"):
        scan_populated(gone, Range(0x10000, PAGE_SIZE))
    with pytest.raises(HostAccessError, match="no mapping of process") as caught:
        find_mapping(os.getpid(), 0x1000)  # the zero page is never mapped
    assert caught.value.exit_code == 31


def _unused_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not Path(f"/proc/{pid}").exists():
            return pid
    raise AssertionError("no free pid")


def test_permission_problems_name_the_proc_entry() -> None:
    """An unprivileged user may not look into pid 1: each function says which entry failed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    calls = (
        lambda: find_mapping_file(1, 0x400000),
        lambda: scan_populated(1, Range(0x400000, PAGE_SIZE)),
    )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody, reports each error on the pipe, and exits
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            lines = []
            for call in calls:
                try:
                    call()
                    lines.append("no error")
                except HostAccessError as err:
                    lines.append(f"{err.errno} {err}")
            os.write(write_end, "\n".join(lines).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as report:
        lines = report.read().splitlines()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert lines == [
        f"{errno.EACCES} cannot read /proc/1/maps: permission denied "
        "(ptrace read access to the process is needed)",
        f"{errno.EACCES} cannot open /proc/1/pagemap: permission denied "
        "(ptrace read access to the process is needed)",
    ]


# ---------------------------------------------------------------- unit: the PAGEMAP_SCAN ABI


def test_pagemap_scan_struct_layout_and_ioctl_number() -> None:
    # include/uapi/linux/fs.h: struct pm_scan_arg is twelve __u64, struct page_region three.
    assert ctypes.sizeof(PmScanArg) == 96
    assert ctypes.sizeof(PageRegion) == 24
    offsets = {name: getattr(PmScanArg, name).offset for name, _ in PmScanArg._fields_}
    assert offsets == {
        "size": 0,
        "flags": 8,
        "start": 16,
        "end": 24,
        "walk_end": 32,
        "vec": 40,
        "vec_len": 48,
        "max_pages": 56,
        "category_inverted": 64,
        "category_mask": 72,
        "category_anyof_mask": 80,
        "return_mask": 88,
    }
    # _IOWR('f', 16, struct pm_scan_arg): dir READ|WRITE (3) << 30 | size 96 << 16 |
    # type 'f' (0x66) << 8 | nr 16.
    assert PAGEMAP_SCAN == (3 << 30) | (96 << 16) | (ord("f") << 8) | 16 == 0xC0606610
    assert pagemap.ioc(1, 0x94, 9, 4) == 0x40049409  # FICLONE = _IOW(0x94, 9, int)
    assert pagemap.iowr(ord("X"), 119, 4) == 0xC0045877  # FIFREEZE = _IOWR('X', 119, int)
    categories = (
        PageCategory.PRESENT,
        PageCategory.SWAPPED,
        PageCategory.PFNZERO,
        PageCategory.HUGE,
    )
    assert categories == (1 << 3, 1 << 4, 1 << 5, 1 << 6)
    with pytest.raises(ValueError, match="does not fit 14 bits"):
        pagemap.iowr(ord("f"), 16, 1 << 14)


# ---------------------------------------------------------------- unit: kernel interfaces


def test_data_extents_on_a_memfd_is_exact_and_clips() -> None:
    size = 16 * MiB
    writes = file_writes(size)
    with memfd(size) as fd:
        assert data_extents(fd) == RangeSet()
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        expected = pages_of(writes)
        assert data_extents(fd) == expected
        assert len(expected) == 5  # pages 0-1 merged; the straddle holds two pages
        for window in (
            Range(0x800, 0x10800),  # starts and ends inside pages
            Range(0x11000, PAGE_SIZE),
            Range(0x3000, PAGE_SIZE),  # a hole
            Range(size - PAGE_SIZE, 10 * PAGE_SIZE),  # past EOF
            Range(size + PAGE_SIZE, PAGE_SIZE),  # wholly past EOF
        ):
            assert data_extents(fd, window) == expected.clip(window), window
        # A hole punched back (what virtio-mem unplug does) disappears from the extents.
        fallocate = _LIBC.fallocate
        fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
        mode = falloc_fl_keep_size | falloc_fl_punch_hole
        assert fallocate(fd, mode, 0x800000, PAGE_SIZE) == 0
        assert data_extents(fd) == expected - RangeSet.of(0x800000, PAGE_SIZE)
        assert path_extents(f"/proc/self/fd/{fd}") == expected - RangeSet.of(0x800000, PAGE_SIZE)


def test_data_extents_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(HostAccessError, match=f"cannot open {missing}") as caught:
        open_for_extents(missing)
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        with pytest.raises(HostAccessError, match="a-pipe is not a regular file"):
            data_extents(read_end, Range(0, 1), name="a-pipe")
    finally:
        os.close(read_end)
    with pytest.raises(HostAccessError, match=f"cannot stat fd {read_end}"):
        data_extents(read_end)  # closed now


def test_scan_populated_on_base_pages_excludes_the_zero_page_and_loops() -> None:
    """This process's own memory, with THP off, gives page-exact runs and many of them."""
    pages = 1024
    with mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as area:
        area.madvise(mmap.MADV_NOHUGEPAGE)
        base = address_of(area)
        window = Range(base, pages * PAGE_SIZE)
        assert scan_populated(os.getpid(), window).populated == RangeSet()
        written = [p for p in range(pages) if p % 3 == 0 or p % 7 == 0]
        read_only = [p for p in range(pages) if p % 5 == 1 and p not in written]
        for page in written:
            area[page * PAGE_SIZE] = 1
        for page in read_only:
            assert area[page * PAGE_SIZE] == 0  # maps the zero page
        expected = RangeSet.from_ranges((base + p * PAGE_SIZE, PAGE_SIZE) for p in written)
        zero_mapped = RangeSet.from_ranges((base + p * PAGE_SIZE, PAGE_SIZE) for p in read_only)
        full = scan_populated(os.getpid(), window)
        assert (full.exact, full.method) == (True, "PAGEMAP_SCAN")
        assert full.populated == expected
        assert not full.huge_seen
        assert full.page_size == PAGE_SIZE
        assert len(expected) > 100
        # A tiny output vector forces the walk_end loop: the same answer.
        for vec_len in (1, 2, 7):
            assert scan_populated(os.getpid(), window, vec_len=vec_len).populated == expected
        raw = read_pagemap_present(os.getpid(), window)
        assert (raw.exact, raw.method) == (False, "pagemap")
        assert raw.populated == expected | zero_mapped


def test_scan_populated_falls_back_to_raw_pagemap(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ioctl(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(fcntl, "ioctl", no_ioctl)
    window = _own_stack_window()
    scan = scan_populated(os.getpid(), window)
    assert (scan.exact, scan.method, scan.huge) == (False, "pagemap", RangeSet())
    assert scan.populated == read_pagemap_present(os.getpid(), window).populated
    assert scan.populated  # the stack's top page is in use
    with pytest.raises(HostAccessError, match="PAGEMAP_SCAN ioctl"):
        scan_populated(os.getpid(), window, fallback=False)
    with pytest.raises(ValueError, match="not aligned"):
        scan_populated(os.getpid(), Range(window.start + 1, PAGE_SIZE))


def _own_stack_window() -> Range:
    stack = next(e for e in read_maps(os.getpid()) if e.path == "[stack]")
    return stack.hva_range


# ---------------------------------------------------------------- bare QEMU: file backend


@pytest.mark.bare
async def test_file_backend_extents_are_exactly_the_written_pages(vm_factory: VMFactory) -> None:
    ram_size = 256 * MiB
    vm = await vm_factory(
        VMSpec(name="host-file", guest=False, ram_backend=Backend.FILE, ram_size=ram_size)
    )
    granule = shmem_page_granule()
    path = vm.backing_file("ram0")
    writes = file_writes(ram_size)
    with opened(path) as fd:
        # QEMU stopped at reset has not touched guest RAM: the file is all hole.
        assert data_extents(fd) == RangeSet()
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        expected = pages_of(writes).align_out(granule)
        blocks_before = os.fstat(fd).st_blocks
        assert data_extents(fd, name=str(path)) == expected
        assert blocks_before * 512 == expected.total  # allocation matches, independently
        window = Range(0x800, 0x10800)
        assert data_extents(fd, window) == expected.clip(window)
        assert data_extents(fd, Range(ram_size, PAGE_SIZE)) == RangeSet()
        # Asking allocated nothing: same blocks, same extents.
        assert os.fstat(fd).st_blocks == blocks_before
        assert path_extents(path) == expected
    # Main RAM is ram0 from offset 0 at gpa 0 (256 MiB, no split): QEMU sees the bytes there.
    for offset, data in writes:
        assert await guest_bytes(vm, offset, len(data)) == data


# ---------------------------------------------------------------- bare QEMU: memfd backend


@pytest.mark.bare
async def test_memfd_backend_is_found_by_identity_and_extents_land_at_the_gpa(
    vm_factory: VMFactory,
) -> None:
    ram_size = 256 * MiB
    vmem = VirtioMemSpec(id="vmem0", backend=Backend.MEMFD, max_size=512 * MiB, requested_size=0)
    vm = await vm_factory(
        VMSpec(
            name="host-memfd",
            guest=False,
            ram_backend=Backend.MEMFD,
            ram_size=ram_size,
            virtio_mem=(vmem,),
        )
    )
    assert vm.qmp is not None
    granule = shmem_page_granule()
    gpa = 0x100000
    main = find_mapping_file(vm.pid, await gpa2hva(vm, gpa))
    devices: list[dict[str, Any]] = await vm.qmp.execute("query-memory-devices")
    vmem_gpa = next(d["data"]["memaddr"] for d in devices if d["data"]["id"] == "vmem0")
    device = find_mapping_file(vm.pid, await gpa2hva(vm, vmem_gpa))
    assert main is not None
    assert device is not None

    # Two memfds with the very same link text: told apart by device and inode only.
    assert os.readlink(main.path) == os.readlink(device.path) == MEMFD_TARGET
    assert main.mapping.path == device.mapping.path == MEMFD_TARGET
    assert main.source == device.source == "fd"
    assert main.path == f"/proc/{vm.pid}/fd/{main.fd}"
    assert main.fd != device.fd
    assert (main.file_size, device.file_size) == (ram_size, vmem.max_size)
    for found in (main, device):
        st = os.stat(found.path)
        assert st.st_ino == found.mapping.inode
        assert (os.major(st.st_dev), os.minor(st.st_dev)) == (
            found.mapping.dev_major,
            found.mapping.dev_minor,
        )
    # ram0 is mapped from file offset 0 and holds gpa 0 at offset 0; virtio-mem likewise.
    assert main.file_offset == gpa
    assert device.file_offset == 0

    writes = [(main.file_offset + offset, data) for offset, data in file_writes(16 * MiB)]
    with opened(main.path) as fd:
        assert data_extents(fd) == RangeSet()
        for offset, data in writes:
            os.pwrite(fd, data, offset)
        expected = pages_of(writes).align_out(granule)
        assert data_extents(fd) == expected
        assert os.fstat(fd).st_blocks * 512 == expected.total
    assert path_extents(device.path) == RangeSet()  # the other memfd was not touched
    for offset, data in writes:
        assert await guest_bytes(vm, gpa + (offset - main.file_offset), len(data)) == data


# ---------------------------------------------------------------- bare QEMU: anonymous RAM


@pytest.mark.bare
@pytest.mark.parametrize("backend", [Backend.DEFAULT, Backend.RAM])
async def test_anonymous_ram_scan_is_exactly_the_written_pages(
    vm_factory: VMFactory, backend: Backend
) -> None:
    ram_size = 256 * MiB
    vm = await vm_factory(
        VMSpec(name=f"host-anon-{backend}", guest=False, ram_backend=backend, ram_size=ram_size)
    )
    base = await gpa2hva(vm, 0)
    ram = Range(base, ram_size)
    entry = find_mapping(vm.pid, base)
    assert entry.is_anonymous
    assert entry.hva_range.intersection(ram) == ram
    assert find_mapping_file(vm.pid, base) is None
    assert base + 0x100000 == await gpa2hva(vm, 0x100000)  # one contiguous block

    before = scan_populated(vm.pid, ram)
    assert before.exact
    assert before.populated == RangeSet()  # QEMU at reset wrote no RAM
    write_granule, read_granule = anon_fault_granules(vm.pid, base)

    writes = [
        (0x5000, b"QMPDUMP0"),
        (0x7000 + 0x10, b"QMPDUMP1"),  # the same 2 MiB block as the first
        (0x5FFFFC, b"STRADDLE"),  # across a 2 MiB boundary: two blocks
        (0x8000000 + 0x123, b"MIDDLE!!"),
        (ram_size - 8, b"LASTBYTE"),
    ]
    for offset, data in writes:
        poke(vm.pid, base + offset, data)
    written = pages_of((base + offset, data) for offset, data in writes)
    expected = fault_extent(written, write_granule, entry.hva_range)

    scan = scan_populated(vm.pid, ram)
    assert (scan.exact, scan.method) == (True, "PAGEMAP_SCAN")
    assert scan.populated == expected
    assert scan.page_size == PAGE_SIZE
    # Independent witnesses: smaps counts the VMA's anonymous and huge-page bytes.
    smaps = smaps_fields(vm.pid, base)
    assert kib(smaps["Anonymous"]) == expected.total, smaps
    if write_granule > PAGE_SIZE:
        huge = written.align_out(write_granule) & whole_blocks(entry.hva_range, write_granule)
        assert kib(smaps["AnonHugePages"]) == huge.total, "THP allocation fell back"
        assert scan.huge == huge
        if base % write_granule == 0:  # QEMU aligns its RAM blocks (QEMU_VMALLOC_ALIGN)
            assert (len(written), len(expected)) == (5, 4)  # page runs, huge-page runs
    else:
        assert scan.huge == RangeSet()
    for vec_len in (1, 3):  # runs cut by a full output vector join up again
        assert scan_populated(vm.pid, ram, vec_len=vec_len).populated == expected
    for offset, data in writes:
        assert peek(vm.pid, base + offset, len(data)) == data
        assert await guest_bytes(vm, offset, len(data)) == data

    # Reading never-written RAM maps the (huge) zero page: plain pagemap calls that present,
    # PAGEMAP_SCAN does not.
    untouched = 0x6000000 + 0x3000
    assert not expected.contains(base + untouched)
    assert peek(vm.pid, base + untouched, PAGE_SIZE) == bytes(PAGE_SIZE)
    zero_mapped = fault_extent(
        RangeSet.of(base + untouched, PAGE_SIZE), read_granule, entry.hva_range
    )
    after_read = scan_populated(vm.pid, ram)
    assert after_read.populated == expected
    raw = read_pagemap_present(vm.pid, ram)
    assert not raw.exact
    assert raw.populated == expected | zero_mapped
    assert kib(smaps_fields(vm.pid, base)["Anonymous"]) == expected.total
