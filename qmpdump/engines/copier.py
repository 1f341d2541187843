"""Copy populated guest memory into the core, and hash the core as it grows (blocking threads).

fd-backed RAM (memfd, file) goes with ``sendfile(2)`` from the backing file at the populated
offsets only (shmem holes are never read, so nothing is allocated); anonymous RAM with
``process_vm_readv(2)`` into one reused buffer, then ``pwrite``. Copies run in bounded chunks so
that a stop request lands between two chunks.

The sha256 of the output is computed by a second thread that reads back, in file order, what the
copier has finished (from the page cache), so hashing overlaps the copy instead of following it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qmpdump.engines.copyplan import CopyOp
from qmpdump.host.procmem import read_process_memory

__all__ = ["CHUNK", "CopyState", "FileSource", "ProcessSource", "copy_ops_into", "hash_output"]

CHUNK = 8 << 20


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


def copy_ops_into(
    out_fd: int, ops: Sequence[CopyOp], sources: Mapping[str, Source], state: CopyState
) -> None:
    """Run the copy operations in order; raises :class:`Stopped` or the ``OSError`` hit."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for op in ops:
        src = sources[op.region]
        done = 0
        if isinstance(src, FileSource):
            os.lseek(out_fd, op.file_offset, os.SEEK_SET)
        while done < op.size:
            if state.stop.is_set():
                raise Stopped
            want = min(CHUNK, op.size - done)
            if isinstance(src, FileSource):
                moved = os.sendfile(out_fd, src.fd, src.file_offset + op.region_offset + done, want)
                if moved == 0:
                    raise OSError(0, f"the backing file of {op.region} ended early")
            else:
                read_process_memory(src.pid, src.hva + op.region_offset + done, view[:want])
                _pwrite_all(out_fd, view[:want], op.file_offset + done)
                moved = want
            done += moved
            state.advance(moved, op.file_offset + done)


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
