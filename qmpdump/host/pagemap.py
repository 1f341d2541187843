"""Populated pages of anonymous memory in QEMU's address space, from ``/proc/PID/pagemap``.

QEMU's ``pc.ram`` and ``memory-backend-ram`` are anonymous: there is no file to ask with
``SEEK_DATA``. The page tables know which pages exist, but plain ``/proc/PID/pagemap``
(``Documentation/admin-guide/mm/pagemap.rst``; bit 63 present, bit 62 swapped) also calls a page
"present" when it maps the shared zero page, which any read of never-written memory installs
(``process_vm_readv``, ``/proc/PID/mem``, QEMU's own ``dump-guest-memory``): after one full read
every page looks populated (``shared/FACTS.md``).

The ``PAGEMAP_SCAN`` ioctl (Linux 6.7+, ``fs/proc/task_mmu.c``, ``include/uapi/linux/fs.h``)
reports page *categories* per run, among them ``PAGE_IS_PFNZERO``, and filters in the kernel:
we ask for pages that are ``PRESENT`` or ``SWAPPED`` (``category_anyof_mask``) and not
``PFNZERO`` (``category_mask`` with the bit in ``category_inverted``). Caveat: kernels without
the June 2025 fix "fs/proc/task_mmu: fix PAGE_IS_PFNZERO detection for the huge zero folio"
tested ``is_zero_pfn()`` on PMDs too, so a 2 MiB range only ever read, and thus mapped to the
*huge* zero page, is counted there: a superset, never a loss. Linux 6.18 has the fix (the tests
check it on the host they run on).

Where the ioctl is missing (``ENOTTY``: no ``unlocked_ioctl`` on pagemap before 6.7; ``EINVAL``:
an unknown command or struct size), :func:`scan_populated` decodes raw pagemap entries instead and
says so with ``exact=False``.

The ioctl number is computed here from the ``_IOWR`` macro of ``include/uapi/asm-generic/ioctl.h``
(the layout x86, arm64, riscv, s390 and loongarch use; alpha, mips, powerpc and sparc define other
direction and size bits and are not supported).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
from array import array
from dataclasses import dataclass
from enum import IntFlag
from itertools import compress
from operator import sub
from typing import Literal

from qmpdump.host import proc_error
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = [
    "PAGEMAP_SCAN",
    "PAGE_SIZE",
    "PageCategory",
    "PageRegion",
    "PagemapScan",
    "PmScanArg",
    "ioc",
    "iowr",
    "read_pagemap_present",
    "scan_populated",
]

#: The kernel's base page size; pagemap entries and PAGEMAP_SCAN work in these units.
PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")

# -- ioctl number encoding: include/uapi/asm-generic/ioctl.h ---------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS  # 8
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS  # 16
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS  # 30
_IOC_WRITE = 1  # userland writes, the kernel reads
_IOC_READ = 2  # the kernel writes, userland reads


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``: pack an ioctl request number."""
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"an ioctl argument of {size} bytes does not fit {_IOC_SIZEBITS} bits")
    if not (0 <= type_ < 1 << _IOC_TYPEBITS and 0 <= nr < 1 << _IOC_NRBITS):
        raise ValueError(f"ioctl type {type_:#x} or number {nr:#x} does not fit 8 bits")
    if not 0 <= direction < 1 << _IOC_DIRBITS:
        raise ValueError(f"ioctl direction {direction} does not fit {_IOC_DIRBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def iowr(type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOWR(type, nr, size)``: a request whose argument goes in and comes back."""
    return ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


# -- include/uapi/linux/fs.h -----------------------------------------------------------------------


class PageCategory(IntFlag):
    """``PAGE_IS_*``: categories PAGEMAP_SCAN filters on and reports per run of pages."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7


class PageRegion(ctypes.Structure):
    """``struct page_region``: one run ``[start, end)`` of pages sharing ``categories``."""

    _fields_ = (
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    )


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg``: the PAGEMAP_SCAN argument; the kernel writes back ``walk_end``."""

    _fields_ = (
        ("size", ctypes.c_uint64),  # sizeof(struct pm_scan_arg), checked by the kernel
        ("flags", ctypes.c_uint64),  # PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC: none here
        ("start", ctypes.c_uint64),  # first address, page aligned
        ("end", ctypes.c_uint64),  # exclusive end
        ("walk_end", ctypes.c_uint64),  # out: where the walk stopped (== end when complete)
        ("vec", ctypes.c_uint64),  # address of a struct page_region array
        ("vec_len", ctypes.c_uint64),  # its length in elements
        ("max_pages", ctypes.c_uint64),  # 0: no limit
        ("category_inverted", ctypes.c_uint64),  # categories that match when 0
        ("category_mask", ctypes.c_uint64),  # all of these must match
        ("category_anyof_mask", ctypes.c_uint64),  # at least one of these must match
        ("return_mask", ctypes.c_uint64),  # categories reported in page_region.categories
    )


#: ``#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)`` == 0xc0606610 (96-byte argument).
PAGEMAP_SCAN: int = iowr(ord("f"), 16, ctypes.sizeof(PmScanArg))

_REGION_WORDS = ctypes.sizeof(PageRegion) // 8  # three u64 per page_region

#: Populated: present or swapped out, and not the (huge) zero page.
_ANYOF = PageCategory.PRESENT | PageCategory.SWAPPED
_NOT = PageCategory.PFNZERO
_RETURN = PageCategory.PRESENT | PageCategory.SWAPPED | PageCategory.HUGE
_HUGE_BIT = int(PageCategory.HUGE)

# -- raw /proc/PID/pagemap entries (Documentation/admin-guide/mm/pagemap.rst) ----------------------

_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_ENTRY_BYTES = 8
#: Pages decoded per read of raw pagemap: 256 KiB of entries cover 128 MiB of address space.
_RAW_CHUNK_PAGES = 1 << 15
_RUNS = re.compile(rb"\x01+")


@dataclass(frozen=True, slots=True)
class PagemapScan:
    """What a scan found in ``hva``: populated pages as host virtual addresses."""

    #: the host virtual addresses scanned
    hva: Range
    #: pages present or swapped, not mapped to the zero page (when :attr:`exact`)
    populated: RangeSet
    #: the part of :attr:`populated` mapped by huge pages (THP or hugetlb); empty if unknown
    huge: RangeSet
    #: granularity of :attr:`populated` (the base page size)
    page_size: int
    #: False when raw pagemap was decoded: zero-page mappings count as populated, huge unknown
    exact: bool
    method: Literal["PAGEMAP_SCAN", "pagemap"]

    @property
    def huge_seen(self) -> bool:
        """Whether any populated page is part of a huge page (only known when :attr:`exact`)."""
        return bool(self.huge)


def scan_populated(
    pid: int, hva: Range, *, vec_len: int = 4096, fallback: bool = True
) -> PagemapScan:
    """Return the populated pages of process ``pid`` in the host virtual range ``hva``.

    ``hva`` must start and end on page boundaries (QEMU's RAM blocks do). Unmapped parts of the
    range are simply not populated. ``vec_len`` is how many runs one ioctl may return; the scan
    repeats from the kernel's ``walk_end`` until the range is covered, whatever its value.
    With ``fallback`` (default), a kernel without PAGEMAP_SCAN gets :func:`read_pagemap_present`.

    Raises :class:`~qmpdump.errors.HostAccessError` if the process is gone, if this user lacks
    ptrace read access to it, or if the kernel rejects the scan.
    """
    _check_aligned(hva)
    if vec_len < 1:
        raise ValueError(f"vec_len must be at least 1, not {vec_len}")
    path = f"/proc/{pid}/pagemap"
    fd = _open_pagemap(pid, path)
    try:
        try:
            populated, huge = _scan_ioctl(fd, hva, vec_len)
        except OSError as err:
            if fallback and err.errno in (errno.ENOTTY, errno.EINVAL):
                return _read_raw(fd, pid, hva, path)
            raise proc_error(pid, path, "scan (PAGEMAP_SCAN ioctl)", err) from err
    finally:
        os.close(fd)
    return PagemapScan(hva, populated, huge, PAGE_SIZE, exact=True, method="PAGEMAP_SCAN")


def read_pagemap_present(pid: int, hva: Range) -> PagemapScan:
    """Return the pages of ``hva`` that raw ``/proc/PID/pagemap`` calls present or swapped.

    This counts pages mapped to the (huge) zero page as populated, hence ``exact=False``; it is
    the fallback for kernels without PAGEMAP_SCAN, and shows what that ioctl saves a dump.
    Raises :class:`~qmpdump.errors.HostAccessError` as :func:`scan_populated` does.
    """
    _check_aligned(hva)
    path = f"/proc/{pid}/pagemap"
    fd = _open_pagemap(pid, path)
    try:
        return _read_raw(fd, pid, hva, path)
    finally:
        os.close(fd)


def _check_aligned(hva: Range) -> None:
    if hva.start % PAGE_SIZE or hva.size % PAGE_SIZE:
        raise ValueError(f"{hva} is not aligned to the {PAGE_SIZE:#x}-byte page size")


def _open_pagemap(pid: int, path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise proc_error(pid, path, "open", err) from err


def _scan_ioctl(fd: int, hva: Range, vec_len: int) -> tuple[RangeSet, RangeSet]:
    """Run PAGEMAP_SCAN over ``hva`` until ``walk_end`` reaches its end; raises ``OSError``."""
    # The output vector as a flat u64 column: page_region is three u64 with no padding (checked
    # by the ctypes struct size), and slicing an array('Q') with a step runs in C.
    vec = array("Q", bytes(vec_len * ctypes.sizeof(PageRegion)))
    vec_address, _ = vec.buffer_info()
    arg = PmScanArg(
        size=ctypes.sizeof(PmScanArg),
        flags=0,
        end=hva.end,
        vec=vec_address,
        max_pages=0,
        category_inverted=_NOT,
        category_mask=_NOT,
        category_anyof_mask=_ANYOF,
        return_mask=_RETURN,
    )
    starts: list[int] = []
    ends: list[int] = []
    huge_starts: list[int] = []
    huge_ends: list[int] = []
    position = hva.start
    while position < hva.end:
        arg.start = position
        arg.walk_end = 0
        arg.vec_len = vec_len
        # fcntl copies the 96-byte struct into a kernel-visible buffer and back, so walk_end
        # arrives in arg; the kernel writes the regions straight into vec through its address.
        count = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
        words = count * _REGION_WORDS
        region_starts = vec[0:words:_REGION_WORDS]
        region_ends = vec[1:words:_REGION_WORDS]
        is_huge = list(map(_HUGE_BIT.__and__, vec[2:words:_REGION_WORDS]))
        starts += region_starts
        ends += region_ends
        huge_starts += compress(region_starts, is_huge)
        huge_ends += compress(region_ends, is_huge)
        walk_end = arg.walk_end
        if walk_end <= position:  # the kernel made no progress: never loop forever
            message = f"PAGEMAP_SCAN stopped at {walk_end:#x}, not past {position:#x}"
            raise OSError(errno.EIO, message)
        position = walk_end
    # A run cut by a full vector continues in the next call: from_ranges merges the two halves,
    # and runs with different categories (huge or not) that touch.
    return _columns_to_set(starts, ends), _columns_to_set(huge_starts, huge_ends)


def _columns_to_set(starts: list[int], ends: list[int]) -> RangeSet:
    return RangeSet.from_ranges(zip(starts, map(sub, ends, starts), strict=True))


def _read_raw(fd: int, pid: int, hva: Range, path: str) -> PagemapScan:
    """Decode raw pagemap entries of ``hva`` (bit 63 present, bit 62 swapped)."""
    mask = (_PM_PRESENT | _PM_SWAPPED).__and__
    starts: list[int] = []
    sizes: list[int] = []
    first_page = hva.start // PAGE_SIZE
    stop_page = hva.end // PAGE_SIZE
    page = first_page
    try:
        while page < stop_page:
            count = min(_RAW_CHUNK_PAGES, stop_page - page)
            data = _pread_full(fd, count * _PM_ENTRY_BYTES, page * _PM_ENTRY_BYTES)
            entries = array("Q")
            entries.frombytes(data[: len(data) - len(data) % _PM_ENTRY_BYTES])
            if not entries:
                break  # past the end of the process's address space
            # One byte per page, 1 where populated; a regex finds the runs in C.
            flags = bytes(map(bool, map(mask, entries)))
            for run in _RUNS.finditer(flags):
                starts.append((page + run.start()) * PAGE_SIZE)
                sizes.append((run.end() - run.start()) * PAGE_SIZE)
            page += len(entries)
    except OSError as err:
        raise proc_error(pid, path, "read", err) from err
    populated = RangeSet.from_ranges(zip(starts, sizes, strict=True))
    return PagemapScan(hva, populated, RangeSet(), PAGE_SIZE, exact=False, method="pagemap")


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)
