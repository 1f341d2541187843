"""QEMU's address space as ``/proc/PID/maps`` shows it, and the file behind a host address.

Follows ``proc(5)`` (``/proc/pid/maps``, ``/proc/pid/fd``, ``/proc/pid/map_files``) and the
kernel's ``show_map_vma()`` (``fs/proc/task_mmu.c``), which prints each VMA as::

    start-end perms offset major:minor inode    path
    7f919bfff000-7f91abfff000 rw-s 00000000 00:01 1061   /memfd:memory-backend-memfd (deleted)

with addresses, offset and device numbers in hex and the inode in decimal. ``offset`` is the file
offset of ``start``; anonymous memory (QEMU's ``pc.ram``, ``memory-backend-ram``) has inode 0.

The file behind a shared mapping is found by identity, never by name: every memfd backend reads
``/memfd:memory-backend-memfd (deleted)``, and a ``/dev/shm`` path may have been replaced since
QEMU opened it. A candidate path counts only if ``os.stat`` gives the mapping's device and inode.
Candidates, in order: QEMU's open descriptors (``/proc/PID/fd/N``: QEMU keeps a backend's fd
open for the RAM block's life), then ``/proc/PID/map_files/START-END`` (needs ``CAP_SYS_ADMIN``),
then the printed path itself when it still exists.

Whether a file holds the guest's bytes depends on how QEMU maps it (:func:`region_mapping`): a
``MAP_SHARED`` mapping (``s`` in the permissions; QEMU's ``share=on``) writes through to the file;
a ``MAP_PRIVATE`` one (``p``; ``share=off``) keeps every page the guest wrote in an anonymous
copy-on-write page of QEMU's, and the file keeps its old content (``mmap(2)``).
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from qmpdump.host import host_access_error, proc_error
from qmpdump.memmap.ranges import Range

__all__ = [
    "BackingFile",
    "MappingKind",
    "MapsEntry",
    "RegionMapping",
    "find_mapping",
    "find_mapping_file",
    "mapped_file",
    "mapping_at",
    "parse_maps",
    "parse_maps_line",
    "read_maps",
    "region_mapping",
]

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One VMA of a process: ``[start, end)`` in host virtual addresses (hva), as maps prints it."""

    start: int
    end: int
    #: four characters, e.g. ``rw-s`` (``s`` shared, ``p`` private copy-on-write)
    perms: str
    #: file offset of ``start`` (0 for anonymous memory)
    offset: int
    dev_major: int
    dev_minor: int
    #: 0 for anonymous memory
    inode: int
    #: as printed: a file path (possibly ending ``" (deleted)"``), ``[heap]``, or ``""``
    path: str

    @property
    def size(self) -> int:
        """Bytes mapped."""
        return self.end - self.start

    @property
    def hva_range(self) -> Range:
        """The mapped host virtual addresses."""
        return Range.from_bounds(self.start, self.end)

    @property
    def is_anonymous(self) -> bool:
        """Whether no file backs the mapping (inode 0: anonymous, heap, stack, vdso...)."""
        return self.inode == 0

    @property
    def is_shared(self) -> bool:
        """Whether writes reach the file (``MAP_SHARED``), as QEMU's ``share=on`` backends do."""
        return self.perms[3:4] == "s"

    @property
    def is_deleted(self) -> bool:
        """Whether the file was unlinked (every memfd is)."""
        return self.path.endswith(_DELETED)

    def contains(self, hva: int) -> bool:
        """Whether ``hva`` lies inside the mapping."""
        return self.start <= hva < self.end

    def file_offset(self, hva: int) -> int:
        """The file offset mapped at ``hva``; ``hva`` must lie inside the mapping."""
        if not self.contains(hva):
            raise ValueError(f"{hva:#x} is outside the mapping [{self.start:#x}, {self.end:#x})")
        return self.offset + (hva - self.start)


@dataclass(frozen=True, slots=True)
class BackingFile:
    """The file behind a host virtual address of a process, and a path that opens that file."""

    pid: int
    #: the VMA holding the address
    mapping: MapsEntry
    #: opens the very file mapped (device and inode checked): ``/proc/PID/fd/N`` usually
    path: str
    #: how :attr:`path` was found
    source: Literal["fd", "map_files", "path"]
    #: the descriptor number in the process when :attr:`source` is ``"fd"``
    fd: int | None
    #: the file offset of the address asked about
    file_offset: int
    #: the file's size when it was found (``st_size``)
    file_size: int

    @property
    def mapped_file_range(self) -> Range:
        """The file offsets this one VMA maps (a RAM block may span several VMAs)."""
        return Range(self.mapping.offset, self.mapping.size)


class MappingKind(StrEnum):
    """How a RAM block is mapped in QEMU, and so which source holds the guest's bytes."""

    #: private anonymous memory (``pc.ram``, ``memory-backend-ram``): only QEMU's address space
    ANONYMOUS = "anonymous"
    #: ``MAP_SHARED`` of one file (``share=on``): the file holds every byte the guest wrote
    SHARED_FILE = "shared-file"
    #: ``MAP_PRIVATE`` of one file (``share=off``): the guest's writes are QEMU's private pages
    PRIVATE_FILE = "private-file"


@dataclass(frozen=True, slots=True)
class RegionMapping:
    """The VMAs that map one RAM block of QEMU, all of one :class:`MappingKind`."""

    hva: Range
    kind: MappingKind
    #: the VMAs covering :attr:`hva`, in address order, without gaps
    entries: tuple[MapsEntry, ...]

    @property
    def first(self) -> MapsEntry:
        """The VMA holding the block's first byte."""
        return self.entries[0]

    @property
    def file_offset(self) -> int:
        """The file offset mapped at the block's first byte (0 for anonymous memory)."""
        return 0 if self.kind is MappingKind.ANONYMOUS else self.first.file_offset(self.hva.start)

    def describe(self) -> str:
        """A short phrase for reasons and proofs, e.g. ``a shared mapping of 00:01 inode 1061``."""
        e = self.first
        if self.kind is MappingKind.ANONYMOUS:
            return f"anonymous private memory at {self.hva}"
        how = "shared" if self.kind is MappingKind.SHARED_FILE else "private"
        name = e.path or "a file"
        return (
            f"a {how} mapping of {name} (device {e.dev_major:02x}:{e.dev_minor:02x}, "
            f"inode {e.inode}) at {self.hva}"
        )


def region_mapping(entries: Sequence[MapsEntry], hva: Range) -> RegionMapping:
    """Classify how ``hva`` (one RAM block) is mapped, from address-sorted ``entries``.

    Pure. The block counts as one kind only if VMAs cover it without a gap and all agree: all
    anonymous and private, or all the same file (device and inode) at consecutive offsets and
    all shared or all private. Raises ``ValueError`` saying what did not fit otherwise (a gap,
    a mix, anonymous shared memory); the caller then cannot prove which source holds the bytes.
    """
    index = max(0, bisect_right([e.start for e in entries], hva.start) - 1)
    covering: list[MapsEntry] = []
    position = hva.start
    for entry in entries[index:]:
        if position >= hva.end:
            break
        if entry.end <= position:
            continue
        if entry.start > position:
            break
        covering.append(entry)
        position = entry.end
    if position < hva.end:
        raise ValueError(f"no mapping of QEMU holds host address {position:#x} of {hva}")
    first = covering[0]
    for entry in covering:
        same = (
            entry.inode == first.inode
            and (entry.dev_major, entry.dev_minor) == (first.dev_major, first.dev_minor)
            and entry.is_shared == first.is_shared
        )
        if not same:
            raise ValueError(f"{hva} is mapped by VMAs of different kinds (maps: {entry.path!r})")
        if not first.is_anonymous and entry.offset != first.offset + (entry.start - first.start):
            raise ValueError(f"{hva} maps non-consecutive offsets of {first.path or 'a file'}")
    if first.is_anonymous:
        if first.is_shared:
            raise ValueError(f"{hva} is shared anonymous memory without a file to read")
        kind = MappingKind.ANONYMOUS
    else:
        kind = MappingKind.SHARED_FILE if first.is_shared else MappingKind.PRIVATE_FILE
    return RegionMapping(hva, kind, tuple(covering))


def parse_maps_line(line: str) -> MapsEntry:
    """Parse one line of ``/proc/PID/maps``; raises ``ValueError`` naming a malformed line."""
    # The path is everything after the fifth space-separated field, and may itself hold spaces;
    # the kernel pads before it, so strip only the leading padding.
    fields = line.rstrip("\n").split(None, 5)
    try:
        bounds, perms, offset, dev, inode = fields[:5]
        start_text, end_text = bounds.split("-")
        major_text, minor_text = dev.split(":")
        entry = MapsEntry(
            start=int(start_text, 16),
            end=int(end_text, 16),
            perms=perms,
            offset=int(offset, 16),
            dev_major=int(major_text, 16),
            dev_minor=int(minor_text, 16),
            inode=int(inode, 10),
            path=fields[5] if len(fields) > 5 else "",
        )
    except ValueError as err:
        raise ValueError(f"malformed /proc/PID/maps line: {line!r}") from err
    if len(perms) != 4 or entry.end <= entry.start:
        raise ValueError(f"malformed /proc/PID/maps line: {line!r}")
    return entry


def parse_maps(text: str | Iterable[str]) -> list[MapsEntry]:
    """Parse the text of ``/proc/PID/maps`` (or its lines) into entries, in address order."""
    lines = text.splitlines() if isinstance(text, str) else text
    return [parse_maps_line(line) for line in lines if line.strip()]


def read_maps(pid: int) -> list[MapsEntry]:
    """Read and parse ``/proc/PID/maps``.

    Raises :class:`~qmpdump.errors.HostAccessError` if the process is gone or this user may not
    read its maps (that needs ptrace read access: the same user without a stricter
    ``kernel.yama.ptrace_scope``, or ``CAP_SYS_PTRACE``).
    """
    proc_path = f"/proc/{pid}/maps"
    try:
        with open(proc_path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as err:
        raise proc_error(pid, proc_path, "read", err) from err
    return parse_maps(text)


def mapping_at(entries: Sequence[MapsEntry], hva: int) -> MapsEntry | None:
    """Return the entry holding ``hva`` in address-sorted ``entries``, or ``None``."""
    index = bisect_right([e.start for e in entries], hva) - 1
    if index >= 0 and entries[index].contains(hva):
        return entries[index]
    return None


def find_mapping(pid: int, hva: int) -> MapsEntry:
    """Return the VMA of process ``pid`` that holds ``hva``.

    Raises :class:`~qmpdump.errors.HostAccessError` if ``/proc/PID/maps`` cannot be read, or if no
    mapping holds ``hva`` (a stale address, or the wrong process).
    """
    entry = mapping_at(read_maps(pid), hva)
    if entry is None:
        raise host_access_error(
            f"no mapping of process {pid} holds host address {hva:#x} (see /proc/{pid}/maps)"
        )
    return entry


def find_mapping_file(pid: int, hva: int) -> BackingFile | None:
    """Return the file behind ``hva`` in process ``pid``, or ``None`` if the memory is anonymous.

    For a file-backed mapping (a memfd or ``/dev/shm`` backend of QEMU) the result holds the
    mapping, a path that opens that very file (device and inode match the mapping; see the module
    docstring for the order tried) and the file offset of ``hva``.

    Raises :class:`~qmpdump.errors.HostAccessError` naming the ``/proc`` entry that could not be
    read, if no mapping holds ``hva``, or if no path to the mapped file can be found.
    """
    entry = find_mapping(pid, hva)
    if entry.is_anonymous:
        return None
    return mapped_file(pid, entry, hva)


def mapped_file(pid: int, entry: MapsEntry, hva: int) -> BackingFile:
    """The file ``entry`` (a file-backed VMA of process ``pid``) maps, with the offset of ``hva``.

    Raises :class:`~qmpdump.errors.HostAccessError` as :func:`find_mapping_file` does.
    """
    file_offset = entry.file_offset(hva)
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as err:
        raise proc_error(pid, fd_dir, "list", err) from err
    for fd in sorted(int(name) for name in names if name.isdigit()):
        candidate = f"{fd_dir}/{fd}"
        size = _same_file_size(candidate, entry)
        if size is not None:
            return BackingFile(pid, entry, candidate, "fd", fd, file_offset, size)
    others: list[tuple[str, Literal["map_files", "path"]]] = [
        (f"/proc/{pid}/map_files/{entry.start:x}-{entry.end:x}", "map_files")
    ]
    if entry.path.startswith("/") and not entry.is_deleted:
        others.append((entry.path, "path"))
    for candidate, source in others:
        size = _same_file_size(candidate, entry)
        if size is not None:
            return BackingFile(pid, entry, candidate, source, None, file_offset, size)
    raise host_access_error(
        f"process {pid} maps {entry.path or 'a file'} (device "
        f"{entry.dev_major:02x}:{entry.dev_minor:02x}, inode {entry.inode}) at {hva:#x}, but "
        f"no descriptor in {fd_dir}, no /proc/{pid}/map_files link and no path opens that file"
    )


def _same_file_size(path: str, entry: MapsEntry) -> int | None:
    """``st_size`` of ``path`` if it is the file ``entry`` maps, else ``None``."""
    try:
        st = os.stat(path)
    except OSError as err:
        # A descriptor closed meanwhile, a socket of another namespace, map_files without
        # CAP_SYS_ADMIN: not this file, try the next candidate.
        if err.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ESTALE):
            return None
        raise host_access_error(f"cannot stat {path}: {err.strerror}", err) from err
    same = (
        st.st_ino == entry.inode
        and os.major(st.st_dev) == entry.dev_major
        and os.minor(st.st_dev) == entry.dev_minor
    )
    return st.st_size if same else None
