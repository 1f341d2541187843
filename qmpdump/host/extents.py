"""Populated extents of a backing file, found with ``lseek(SEEK_DATA/SEEK_HOLE)`` alone.

QEMU's shared memory backends (``memory-backend-memfd``, ``memory-backend-file`` on ``/dev/shm``)
are sparse files: a page the guest never touched, or one virtio-mem unplugged (QEMU punches a
hole, ``ram_block_discard_range``), is a hole. ``SEEK_DATA``/``SEEK_HOLE`` (``lseek(2)``, Linux
3.1+; shmem since 4.5) name the data runs without reading them, so nothing is faulted in or
allocated (unlike QEMU's own ``dump-guest-memory``, which allocates every hole it reads; see
``shared/FACTS.md``). On shmem the answer is page-granular; on a disk filesystem it is
block-granular, and a filesystem without support reports the whole file as data (``lseek(2)``:
the file is then "one data run ending at EOF"), which is a superset, never a loss.

Offsets are file offsets; the caller maps them to guest-physical addresses.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from qmpdump.host import host_access_error
from qmpdump.memmap.ranges import Range, RangeSet

__all__ = [
    "HUGETLBFS_MAGIC",
    "TMPFS_MAGIC",
    "data_extents",
    "filesystem_magic",
    "holes_are_exact",
    "open_for_extents",
    "path_extents",
    "punch_hole",
]


def open_for_extents(path: str | os.PathLike[str]) -> int:
    """Open ``path`` read-only for :func:`data_extents`; the caller closes the descriptor.

    ``path`` may be a ``/proc/PID/fd/N`` link (a memfd of QEMU) or a ``/dev/shm`` file.
    Raises :class:`~qmpdump.errors.HostAccessError` naming the path if it cannot be opened.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise host_access_error(
            f"cannot open {os.fspath(path)} to read its extents: {err.strerror}", err
        ) from err


def data_extents(fd: int, window: Range | None = None, *, name: str | None = None) -> RangeSet:
    """Return the populated extents of the open file ``fd``, as file offsets, inside ``window``.

    ``window`` defaults to the whole file (``[0, st_size)``); extents are clipped to it and to
    the file's size, so a window past the end yields an empty set. Only ``lseek`` is called: no
    byte is read and no hole is allocated. The file position of ``fd`` is left wherever the last
    seek put it. ``name`` (a path) only improves error messages.

    Raises :class:`~qmpdump.errors.HostAccessError` naming ``name`` or the fd if ``fd`` cannot
    be inspected (closed, or not a regular file: a device or pipe has no meaningful size).
    """
    label = name if name is not None else f"fd {fd}"
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise host_access_error(f"cannot stat {label}: {err.strerror}", err) from err
    if not stat.S_ISREG(st.st_mode):
        # A device (a DAX or block device behind memory-backend-file) has st_size 0: an empty
        # answer would silently lose all of its memory.
        raise host_access_error(
            f"{label} is not a regular file (mode {st.st_mode:#o}); its data extents are unknown"
        )
    size = st.st_size
    lo, hi = (0, size) if window is None else (window.start, min(window.end, size))
    starts: list[int] = []
    sizes: list[int] = []
    pos = lo
    try:
        while pos < hi:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data at or after pos
                    break
                raise
            if start >= hi:
                break
            # There is always a hole at EOF (lseek(2)), so SEEK_HOLE from data never fails
            # unless the file shrank under us; then ENXIO again means "nothing more".
            try:
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            starts.append(start)
            sizes.append(min(stop, hi) - start)
            pos = stop
    except OSError as err:
        raise host_access_error(
            f"cannot seek for data and holes in {label} at offset {pos:#x}: {err.strerror}", err
        ) from err
    return RangeSet.from_ranges(zip(starts, sizes, strict=True))


def path_extents(path: str | os.PathLike[str], window: Range | None = None) -> RangeSet:
    """Open ``path``, return :func:`data_extents` of it inside ``window``, and close it."""
    fd = open_for_extents(path)
    try:
        return data_extents(fd, window, name=os.fspath(path))
    finally:
        os.close(fd)


# fallocate(2) modes from linux/falloc.h; Python's os module has posix_fallocate only.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, window: Range, *, name: str | None = None) -> None:
    """Deallocate ``window`` of a file (it reads as zeros afterwards, as a hole)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, mode, ctypes.c_int64(window.start), ctypes.c_int64(window.size)) != 0:
        code = ctypes.get_errno()
        label = name or f"fd {fd}"
        raise host_access_error(
            f"cannot punch a hole in {label} at {window}: {os.strerror(code)}", OSError(code, "")
        )


# statfs(2) f_type values (include/uapi/linux/magic.h).
TMPFS_MAGIC = 0x01021994  # tmpfs, /dev/shm and memfd (shmem)
HUGETLBFS_MAGIC = 0x958458F6  # hugetlbfs, and memfd with MFD_HUGETLB
_EXT4_SUPER_MAGIC = 0xEF53  # ext2, ext3 and ext4
_XFS_SUPER_MAGIC = 0x58465342
_BTRFS_SUPER_MAGIC = 0x9123683E
#: Filesystems whose SEEK_DATA/SEEK_HOLE name real holes. hugetlbfs uses ``default_llseek``
#: (measured on Linux 6.18: a 8 MiB hugetlb memfd with one page written is one data run).
_EXACT_HOLES = frozenset({TMPFS_MAGIC, _EXT4_SUPER_MAGIC, _XFS_SUPER_MAGIC, _BTRFS_SUPER_MAGIC})
#: ``struct statfs`` is 120 bytes on 64-bit Linux; ``f_type`` (a long) comes first.
_STATFS_BYTES = 256


def filesystem_magic(fd: int, *, name: str | None = None) -> int:
    """The ``f_type`` of the filesystem holding the open file ``fd`` (``fstatfs(2)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if libc.fstatfs(fd, buf) != 0:
        code = ctypes.get_errno()
        label = name or f"fd {fd}"
        raise host_access_error(
            f"cannot read the filesystem of {label}: {os.strerror(code)}", OSError(code, "")
        )
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def holes_are_exact(fd: int, *, name: str | None = None) -> bool:
    """Whether SEEK_DATA/SEEK_HOLE on ``fd`` name the file's real holes (not "all data")."""
    return filesystem_magic(fd, name=name) in _EXACT_HOLES
