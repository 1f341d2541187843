"""Copy populated guest memory into the core, and hash the core as it grows (blocking threads).

fd-backed RAM (memfd, file) goes with ``splice(2)`` through a pipe from the backing file at the
populated offsets only (shmem holes are never read, so nothing is allocated). Memory read from
QEMU's address space (anonymous RAM) goes through a pipeline of a few reused, page-aligned
buffers (``bench/anon_paths.py`` measured the ways):

* a reader thread gathers up to :data:`PIPELINE_CHUNK` bytes of copy operations that lie back
  to back in the core into one buffer with one ``process_vm_readv(2)`` (up to ``IOV_MAX``
  ranges: populated anonymous memory has many small runs between its 2 MiB huge pages);
* the copier thread writes each buffer with one ``pwrite`` on an ``O_DIRECT`` descriptor of the
  core (no second copy into the page cache, no write-back left for the final fsync, and no growth
  of the host's page cache); unaligned pieces, and filesystems without ``O_DIRECT``, are written
  through the page cache;
* the hasher hashes the same buffer in memory, so no byte is read back.

A buffer is refilled only once it is both written and hashed. Copies run in bounded chunks so
that a stop request lands between two chunks.

The sha256 of the output is computed by a second thread, in file order: from the copier's buffers
where it has them, else reading back (from the page cache) what the copier has finished (the
headers, spliced data, holes), so hashing overlaps the copy instead of following it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from qmpdump.engines.copyplan import CopyOp, RegionRun
from qmpdump.host.procmem import IOV_MAX, read_process_memory, read_process_vectors
from qmpdump.memmap.ranges import RangeSet

__all__ = [
    "CHUNK",
    "PIPELINE_CHUNK",
    "CopyState",
    "FileSource",
    "ProcessSource",
    "copy_ops_into",
    "find_zero_pages",
    "hash_output",
]

CHUNK = 8 << 20
PIPE_SIZE = 1 << 20
#: The pipeline's buffer size. Small enough that the hasher finds the bytes the reader just
#: gathered still in the CPU cache (2 MiB of L2 per core here): with 2 MiB buffers the copy and
#: hash of 1 GiB took 1.0 CPU s, with 8 MiB 1.2 to 1.3 (``/proc/self`` memory, this machine).
PIPELINE_CHUNK = 2 << 20
#: Buffers in flight between reader, writer and hasher.
BUFFERS = 4
#: ``O_DIRECT`` needs file offsets and sizes in units of the logical block size (512 or 4096).
DIRECT_ALIGN = 4096


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


@dataclass(frozen=True, slots=True)
class Piece:
    """Output bytes at ``file_offset`` the copier holds in memory (for the hasher)."""

    file_offset: int
    data: memoryview


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
    #: output bytes in the copier's buffers, in file order, not hashed yet
    pieces: deque[Piece] = field(default_factory=deque)
    #: every byte of the output below this offset is hashed
    hashed_upto: int = 0

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

    def publish(self, piece: Piece) -> None:
        """Hand bytes that will be written at ``piece.file_offset`` to the hasher."""
        with self.changed:
            self.pieces.append(piece)
            self.changed.notify_all()

    def wait_until(self, ready: Callable[[], bool]) -> None:
        """Block until ``ready()`` (checked under the lock) or a stop; raises :class:`Stopped`."""
        with self.changed:
            while not ready():
                if self.stop.is_set():
                    raise Stopped
                self.changed.wait(0.1)


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


@dataclass(frozen=True, slots=True)
class _Batch:
    """Copy operations that lie back to back in the core: one read, one write."""

    file_offset: int
    size: int
    pid: int
    #: (hva, size) of each piece, in file order
    remote: tuple[tuple[int, int], ...]


def _batches(ops: Sequence[CopyOp], sources: Mapping[str, Source]) -> Iterator[_Batch]:
    """Group process-memory operations into batches of at most PIPELINE_CHUNK bytes and
    IOV_MAX ranges."""
    remote: list[tuple[int, int]] = []
    start = end = pid = 0
    for op in ops:
        src = sources[op.region]
        assert isinstance(src, ProcessSource)
        done = 0
        while done < op.size:
            offset = op.file_offset + done
            if remote and (offset != end or src.pid != pid or len(remote) == IOV_MAX):
                yield _Batch(start, end - start, pid, tuple(remote))
                remote = []
            if not remote:
                start = end = offset
                pid = src.pid
            take = min(op.size - done, PIPELINE_CHUNK - (end - start))
            remote.append((src.hva + op.region_offset + done, take))
            end += take
            done += take
            if end - start == PIPELINE_CHUNK:
                yield _Batch(start, end - start, pid, tuple(remote))
                remote = []
    if remote:
        yield _Batch(start, end - start, pid, tuple(remote))


class _Direct:
    """An ``O_DIRECT`` descriptor of the output, where the filesystem has one."""

    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        try:
            self.fd = os.open(f"/proc/self/fd/{out_fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, data: memoryview, offset: int) -> None:
        if self.fd >= 0 and offset % DIRECT_ALIGN == 0 and data.nbytes % DIRECT_ALIGN == 0:
            try:
                _pwrite_all(self.fd, data, offset)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.close()  # this filesystem takes no direct I/O after all: page cache
            else:
                return
        _pwrite_all(self.out_fd, data, offset)


def _copy_from_processes(
    out_fd: int, ops: Sequence[CopyOp], sources: Mapping[str, Source], state: CopyState
) -> None:
    """The reader/writer/hasher pipeline for operations that read QEMU's memory."""
    # Anonymous mappings: page-aligned, as O_DIRECT wants; kept alive by the hasher's views.
    buffers = [memoryview(mmap.mmap(-1, PIPELINE_CHUNK)) for _ in range(BUFFERS)]
    #: per buffer: written out, and the end offset of its last batch (free once hashed past it)
    written = [True] * BUFFERS
    ends = [0] * BUFFERS
    abort = threading.Event()
    filled: queue.Queue[tuple[int, _Batch] | BaseException | None] = queue.Queue()

    def free(slot: int) -> bool:
        return abort.is_set() or (written[slot] and state.hashed_upto >= ends[slot])

    def read_all() -> None:
        try:
            for index, batch in enumerate(_batches(ops, sources)):
                slot = index % BUFFERS
                state.wait_until(lambda: free(slot))  # noqa: B023 - called before slot changes
                if abort.is_set():
                    return
                if state.stop.is_set():
                    raise Stopped
                view = buffers[slot][: batch.size]
                read_process_vectors(batch.pid, batch.remote, view)
                written[slot] = False
                ends[slot] = batch.file_offset + batch.size
                state.publish(Piece(batch.file_offset, view))
                filled.put((slot, batch))
            filled.put(None)
        except BaseException as err:
            filled.put(err)

    reader = threading.Thread(target=read_all, name="qmpdump-read", daemon=True)
    direct = _Direct(out_fd)
    reader.start()
    try:
        while (item := _next_filled(filled, state)) is not None:
            if isinstance(item, BaseException):
                raise item
            slot, batch = item
            if state.stop.is_set():
                raise Stopped
            direct.write(buffers[slot][: batch.size], batch.file_offset)
            with state.changed:
                written[slot] = True
            state.advance(batch.size, batch.file_offset + batch.size)
    finally:
        abort.set()
        with state.changed:
            state.changed.notify_all()
        reader.join()
        direct.close()


def _next_filled(
    filled: queue.Queue[tuple[int, _Batch] | BaseException | None], state: CopyState
) -> tuple[int, _Batch] | BaseException | None:
    while True:
        try:
            return filled.get(timeout=0.1)
        except queue.Empty:
            if state.stop.is_set():
                raise Stopped from None


def copy_ops_into(
    out_fd: int, ops: Sequence[CopyOp], sources: Mapping[str, Source], state: CopyState
) -> None:
    """Run the copy operations in order; raises :class:`Stopped` or the ``OSError`` hit."""
    splicer = _Splicer()
    try:
        index = 0
        while index < len(ops):
            # Consecutive operations of one kind: file regions splice, process memory pipelines.
            from_file = isinstance(sources[ops[index].region], FileSource)
            end = index
            while end < len(ops) and isinstance(sources[ops[end].region], FileSource) == from_file:
                end += 1
            if from_file:
                for op in ops[index:end]:
                    _splice_op(out_fd, op, sources, state, splicer)
            else:
                _copy_from_processes(out_fd, ops[index:end], sources, state)
            index = end
    finally:
        splicer.close()


def _splice_op(
    out_fd: int,
    op: CopyOp,
    sources: Mapping[str, Source],
    state: CopyState,
    splicer: _Splicer,
) -> None:
    src = sources[op.region]
    assert isinstance(src, FileSource)
    done = 0
    while done < op.size:
        if state.stop.is_set():
            raise Stopped
        want = min(CHUNK, op.size - done)
        moved = splicer.copy(
            src.fd, src.file_offset + op.region_offset + done, out_fd, op.file_offset + done, want
        )
        if moved == 0:
            raise OSError(0, f"the backing file of {op.region} ended early")
        done += moved
        state.advance(moved, op.file_offset + done)


def hash_output(out_fd: int, state: CopyState) -> str:
    """sha256 of the output in file order: the copier's buffers where it publishes them, else
    read back behind the copier; until it has finished."""
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    hashed = 0
    while True:
        with state.changed:
            while True:
                if state.stop.is_set():
                    raise Stopped
                piece = state.pieces[0] if state.pieces else None
                upto = state.final_upto
                finished = state.finished
                if piece is not None and piece.file_offset <= hashed:
                    break
                if hashed < upto or (finished and piece is None):
                    break
                state.changed.wait(0.1)
        if piece is not None and piece.file_offset <= hashed:
            if piece.file_offset < hashed:
                raise OSError(0, f"output bytes at {piece.file_offset:#x} handed over twice")
            hasher.update(piece.data)
            hashed += piece.data.nbytes
            with state.changed:
                state.pieces.popleft()
                state.hashed_upto = hashed
                state.changed.notify_all()
            continue
        # Everything in [hashed, upto) below the next piece is on file: read it back.
        limit = upto if piece is None else min(upto, piece.file_offset)
        while hashed < limit:
            got = os.preadv(out_fd, [view[: min(CHUNK, limit - hashed)]], hashed)
            if got == 0:
                raise OSError(0, f"the output ended at {hashed:#x} while hashing")
            hasher.update(view[:got])
            hashed += got
        with state.changed:
            state.hashed_upto = hashed
            state.changed.notify_all()
        if finished and piece is None and hashed >= upto:
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
