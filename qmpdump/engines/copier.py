"""Copy populated guest memory into the core, and hash the core as it grows (blocking threads).

fd-backed RAM (memfd, file) goes with ``splice(2)`` through a pipe from the backing file at the
populated offsets only (shmem holes are never read, so nothing is allocated); anonymous RAM with
``process_vm_readv(2)`` into one reused buffer, then ``pwrite``. Copies run in bounded chunks so
that a stop request lands between two chunks.

The sha256 of the output is computed by a second thread that reads back, in file order, what the
copier has finished (from the page cache), so hashing overlaps the copy instead of following it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qmpdump.engines.copyplan import CopyOp, RegionRun
from qmpdump.host.procmem import read_process_memory
from qmpdump.memmap.ranges import RangeSet

__all__ = [
    "CHUNK",
    "CopyState",
    "FileSource",
    "ProcessSource",
    "copy_ops_into",
    "find_zero_pages",
    "hash_output",
]

CHUNK = 8 << 20
PIPE_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class FileSource:
    """A RAM region in a file: ``fd`` at ``file_offset`` holds region offset 0."""

    fd: int
    file_offset: int = 0


@dataclass(frozen=True, slots=True)
class ProcessSource:
    """A RAM region in QEMU's address space: ``hva`` holds region offset 0."""

    pid: int
    hva: int


Source = FileSource | ProcessSource


@dataclass
class CopyState:
    """Shared between the copier, the hasher and their owner."""

    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    #: guest bytes copied so far
    copied: int = 0
    #: every byte of the output below this offset is final
    final_upto: int = 0
    #: set when nothing more will be written (the output has its full size)
    finished: bool = False

    def advance(self, copied: int, final_upto: int) -> None:
        """Record progress and wake the hasher."""
        with self.changed:
            self.copied += copied
            self.final_upto = max(self.final_upto, final_upto)
            self.changed.notify_all()

    def finish(self, size: int) -> None:
        """Mark the output complete at ``size`` bytes."""
        with self.changed:
            self.final_upto = size
            self.finished = True
            self.changed.notify_all()


class Stopped(Exception):
    """Raised inside the copy threads when a stop was requested."""


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data = data[done:]
        offset += done


class _Splicer:
    """file -> pipe -> file with ``splice(2)``: measured fastest here (``bench/copy_paths.py``:
    splice 1.9 GB/s, pread/pwrite and sendfile 1.7 to 1.8, copy_file_range EXDEV across
    filesystems). Falls back to ``sendfile`` where a filesystem cannot splice, and to ``pread``
    where it cannot do that either (hugetlbfs: EINVAL for both, ``shared/FACTS.md``)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.splice_ok = True
        self.sendfile_ok = True

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)

    def copy(self, src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> int:
        """Copy up to ``size`` bytes; returns how many (0: the source ended)."""
        if self.splice_ok:
            try:
                into = os.splice(src, self.write_end, min(size, PIPE_SIZE), offset_src=src_offset)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self.splice_ok = False
            else:
                moved = 0
                while moved < into:
                    moved += os.splice(
                        self.read_end, dst, into - moved, offset_dst=dst_offset + moved
                    )
                return into
        if self.sendfile_ok:
            os.lseek(dst, dst_offset, os.SEEK_SET)
            try:
                return os.sendfile(dst, src, src_offset, size)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self.sendfile_ok = False
        data = os.pread(src, min(size, PIPE_SIZE), src_offset)
        _pwrite_all(dst, memoryview(data), dst_offset)
        return len(data)


def copy_ops_into(
    out_fd: int, ops: Sequence[CopyOp], sources: Mapping[str, Source], state: CopyState
) -> None:
    """Run the copy operations in order; raises :class:`Stopped` or the ``OSError`` hit."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    splicer = _Splicer()
    try:
        for op in ops:
            src = sources[op.region]
            done = 0
            while done < op.size:
                if state.stop.is_set():
                    raise Stopped
                want = min(CHUNK, op.size - done)
                if isinstance(src, FileSource):
                    moved = splicer.copy(
                        src.fd,
                        src.file_offset + op.region_offset + done,
                        out_fd,
                        op.file_offset + done,
                        want,
                    )
                    if moved == 0:
                        raise OSError(0, f"the backing file of {op.region} ended early")
                else:
                    read_process_memory(src.pid, src.hva + op.region_offset + done, view[:want])
                    _pwrite_all(out_fd, view[:want], op.file_offset + done)
                    moved = want
                done += moved
                state.advance(moved, op.file_offset + done)
    finally:
        splicer.close()


def hash_output(out_fd: int, state: CopyState) -> str:
    """sha256 of the output, read back behind the copier until it has finished."""
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    hashed = 0
    while True:
        with state.changed:
            while hashed >= state.final_upto and not state.finished and not state.stop.is_set():
                state.changed.wait(0.1)
            if state.stop.is_set():
                raise Stopped
            upto = state.final_upto
            finished = state.finished
        while hashed < upto:
            got = os.preadv(out_fd, [view[: min(CHUNK, upto - hashed)]], hashed)
            if got == 0:
                raise OSError(0, f"the output ended at {hashed:#x} while hashing")
            hasher.update(view[:got])
            hashed += got
        if finished and hashed >= upto:
            return hasher.hexdigest()


PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


def _read_into(src: Source, region_offset: int, view: memoryview) -> None:
    if isinstance(src, FileSource):
        got = os.preadv(src.fd, [view], src.file_offset + region_offset)
        if got != view.nbytes:
            raise OSError(0, f"short read at region offset {region_offset:#x}")
    else:
        read_process_memory(src.pid, src.hva + region_offset, view)


def find_zero_pages(
    runs: Sequence[RegionRun], sources: Mapping[str, Source], stop: threading.Event
) -> RangeSet:
    """Guest-physical pages of ``runs`` whose bytes are all zero (reads them once; blocking).

    Runs are page-aligned (populated extents are); a partial page at a run's end is kept.
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    found: list[tuple[int, int]] = []
    for run in runs:
        src = sources[run.region]
        done = 0
        while done < run.size:
            if stop.is_set():
                raise Stopped
            want = min(CHUNK, run.size - done)
            _read_into(src, run.region_offset + done, view[:want])
            if buf.count(0, 0, want) == want:  # a whole chunk of zeros: one C-level pass
                found.append((run.gpa + done, want - want % PAGE))
            else:
                for page in range(0, want - PAGE + 1, PAGE):
                    if view[page : page + PAGE] == _ZERO_PAGE:
                        found.append((run.gpa + done + page, PAGE))
            done += want
    return RangeSet.from_ranges((gpa, size) for gpa, size in found if size)
