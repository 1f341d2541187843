"""Benchmark: which way moves populated anonymous memory of another process into a file fastest.

A child process maps 2 GiB of anonymous memory with ``MADV_HUGEPAGE`` (as QEMU does for guest
RAM) and writes random bytes into a random half of its 2 MiB blocks, plus scattered 4 KiB pages
(fixed seed). Its populated pages (``PAGEMAP_SCAN``, as the survey finds them) are copied into a
file on the dump filesystem (``/var/tmp`` by default), back to back, then fsynced, with each
candidate:

* ``process_vm_readv`` into one reused buffer, then ``pwrite`` (several buffer sizes; one
  syscall gathers up to 1024 remote extents);
* the same with reading and writing in two threads (double buffering);
* ``process_vm_readv`` straight into an ``mmap`` of the output file (one copy instead of two);
* ``process_vm_readv`` into a buffer, ``vmsplice`` into a pipe, ``splice`` into the file;
* ``O_DIRECT`` writes from an aligned buffer (no page cache; one or two threads).

Rows marked ``+sha256`` also hash every byte written from the buffer in a second thread (what
the backend engine must do on top). Median of 3 per way; GB/s over the populated bytes.
The engine (:mod:`qmpdump.engines.copier`) and the floor of ``bench/engines.py`` use the winner.

Run from the repository root (needs ptrace access to the child: root):
``.venv/bin/python bench/anon_paths.py [--dir DIR]``
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.host.pagemap import scan_populated
from qmpdump.host.procmem import IOV_MAX, read_process_vectors
from qmpdump.memmap.ranges import Range, RangeSet

MiB = 1 << 20
SIZE = 2048 * MiB
RUNS = 3

CHILD = r"""
import ctypes, mmap, os, random, sys
size = int(sys.argv[1])
m = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
skip = -base % (2 << 20)
m.madvise(mmap.MADV_HUGEPAGE)
rng = random.Random(7)
block = os.urandom(2 << 20)
for i in range(size // (2 << 20)):
    at = skip + i * (2 << 20)
    if rng.random() < 0.5:
        m[at : at + (2 << 20)] = block
    elif rng.random() < 0.1:
        m.madvise(mmap.MADV_NOHUGEPAGE, at, 2 << 20)
        for _ in range(8):
            page = rng.randrange(512) * 4096
            m[at + page : at + page + 4096] = block[:4096]
print(base + skip, flush=True)
sys.stdin.read()
"""

Copier = Callable[[int, RangeSet, int, bool], str | None]


def pieces(extents: RangeSet, chunk: int) -> Iterator[list[tuple[int, int]]]:
    """Batches of (hva, size), at most ``chunk`` bytes and IOV_MAX pieces each."""
    batch: list[tuple[int, int]] = []
    filled = 0
    for ext in extents:
        start, left = ext.start, ext.size
        while left:
            take = min(left, chunk - filled)
            batch.append((start, take))
            filled += take
            start += take
            left -= take
            if filled == chunk or len(batch) == IOV_MAX:
                yield batch
                batch, filled = [], 0
    if batch:
        yield batch


class Hasher:
    """sha256 of buffers handed over in order, in a thread (GIL released for big updates)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.jobs: queue.Queue[tuple[memoryview, threading.Event] | None] = queue.Queue()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.sha.update(job[0])
            job[1].set()

    def submit(self, view: memoryview) -> threading.Event:
        done = threading.Event()
        self.jobs.put((view, done))
        return done

    def close(self) -> str:
        self.jobs.put(None)
        self.thread.join()
        return self.sha.hexdigest()


def aligned_buffer(size: int) -> tuple[mmap.mmap, memoryview]:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return buf, memoryview(buf)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def by_pwrite(chunk: int) -> Copier:
    def copy(pid: int, extents: RangeSet, out: int, hashing: bool) -> str | None:
        nbuf = 2 if hashing else 1
        bufs = [aligned_buffer(chunk) for _ in range(nbuf)]
        busy: list[threading.Event | None] = [None] * nbuf
        hasher = Hasher() if hashing else None
        offset = 0
        for i, batch in enumerate(pieces(extents, chunk)):
            k = i % nbuf
            if (ev := busy[k]) is not None:
                ev.wait()
            view = bufs[k][1]
            got = read_process_vectors(pid, batch, view)
            write_all(out, view[:got], offset)
            if hasher is not None:
                busy[k] = hasher.submit(view[:got])
            offset += got
        return hasher.close() if hasher is not None else None

    return copy


def threaded_copy(
    pid: int, extents: RangeSet, out: int, offset: int, *, chunk: int, direct: bool, hashing: bool
) -> tuple[int, str | None]:
    """A reader thread fills buffers with ``process_vm_readv``, this one writes them from
    ``offset`` on (a third hashes them). ``direct``: ``out`` is O_DIRECT; the last block is
    padded, then the file cut to size. Returns the bytes copied and the sha256 if asked for."""
    nbuf = 4
    bufs = [aligned_buffer(chunk) for _ in range(nbuf)]
    free: queue.Queue[int] = queue.Queue()
    for k in range(nbuf):
        free.put(k)
    full: queue.Queue[tuple[int, int] | None] = queue.Queue()

    def reader() -> None:
        for batch in pieces(extents, chunk):
            k = free.get()
            full.put((k, read_process_vectors(pid, batch, bufs[k][1])))
        full.put(None)

    thread = threading.Thread(target=reader)
    thread.start()
    hasher = Hasher() if hashing else None
    pending: list[tuple[int, threading.Event]] = []
    start = offset
    while (item := full.get()) is not None:
        k, got = item
        view = bufs[k][1]
        write_all(out, view[: -(-got // 4096) * 4096] if direct else view[:got], offset)
        offset += got
        if hasher is not None:
            pending.append((k, hasher.submit(view[:got])))
            while pending and pending[0][1].is_set():
                free.put(pending.pop(0)[0])
            if len(pending) == nbuf:
                pk, ev = pending.pop(0)
                ev.wait()
                free.put(pk)
        else:
            free.put(k)
    thread.join()
    if direct:
        os.ftruncate(out, offset)
    return offset - start, hasher.close() if hasher is not None else None


def direct_copy(
    pid: int, extents: RangeSet, out: int, offset: int, *, hashing: bool = False
) -> int:
    """The floor's way for anonymous memory: ``process_vm_readv`` in one thread, ``O_DIRECT``
    writes of 2 MiB in another (``out`` opened with O_DIRECT, ``offset`` 4096-aligned); with
    ``hashing``, sha256 of the buffers in a third."""
    return threaded_copy(pid, extents, out, offset, chunk=2 * MiB, direct=True, hashing=hashing)[0]


def by_two_threads(chunk: int, *, direct: bool = False) -> Copier:
    def copy(pid: int, extents: RangeSet, out: int, hashing: bool) -> str | None:
        return threaded_copy(pid, extents, out, 0, chunk=chunk, direct=direct, hashing=hashing)[1]

    return copy


def by_mmap(chunk: int) -> Copier:
    def copy(pid: int, extents: RangeSet, out: int, hashing: bool) -> str | None:
        total = extents.total
        os.ftruncate(out, total)
        with mmap.mmap(out, total, flags=mmap.MAP_SHARED) as mapped:
            view = memoryview(mapped)
            hasher = Hasher() if hashing else None
            offset = 0
            for batch in pieces(extents, chunk):
                got = read_process_vectors(pid, batch, view[offset : offset + chunk])
                if hasher is not None:
                    hasher.submit(view[offset : offset + got])
                offset += got
            digest = hasher.close() if hasher is not None else None
            view.release()
        return digest

    return copy


_LIBC = ctypes.CDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


def by_vmsplice(copy_chunk: int) -> Copier:
    def copy(pid: int, extents: RangeSet, out: int, hashing: bool) -> str | None:
        del hashing
        import fcntl  # noqa: PLC0415

        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, copy_chunk)
        buf, view = aligned_buffer(copy_chunk)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        offset = 0
        try:
            for batch in pieces(extents, copy_chunk):
                got = read_process_vectors(pid, batch, view)
                sent = 0
                while sent < got:
                    iov = _IOVec(base + sent, got - sent)
                    into = _LIBC.vmsplice(w, ctypes.byref(iov), 1, 0)
                    if into < 0:
                        raise OSError(ctypes.get_errno(), "vmsplice")
                    moved = 0
                    while moved < into:
                        moved += os.splice(r, out, into - moved, offset_dst=offset + sent + moved)
                    sent += into
                offset += got
        finally:
            os.close(r)
            os.close(w)
            view.release()
            buf.close()
        return None

    return copy


def main() -> int:  # noqa: PLR0915 - one table, one loop
    """Measure every way, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--only", default="", help="run the ways whose name contains this")
    args = parser.parse_args()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(SIZE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        base = int(child.stdout.readline())
        scan = scan_populated(child.pid, Range(base, SIZE))
        extents = scan.populated
        total = extents.total
        print(
            f"source: 2 GiB anonymous, {total / MiB:.0f} MiB populated in {len(extents)} "
            f"extents ({scan.huge.total / MiB:.0f} MiB in huge pages); target folder {args.dir}"
        )
        ways: dict[str, tuple[Copier, int]] = {}
        for mib in (1, 2, 4, 8, 16):
            ways[f"pvr+pwrite {mib} MiB"] = (by_pwrite(mib * MiB), 0)
        ways["pvr+pwrite 2 threads 8 MiB"] = (by_two_threads(8 * MiB), 0)
        ways["pvr into mmap 8 MiB"] = (by_mmap(8 * MiB), 0)
        ways["pvr+vmsplice+splice 1 MiB"] = (by_vmsplice(MiB), 0)
        ways["O_DIRECT 2 MiB 2 threads"] = (by_two_threads(2 * MiB, direct=True), os.O_DIRECT)
        ways["O_DIRECT 8 MiB 2 threads"] = (by_two_threads(8 * MiB, direct=True), os.O_DIRECT)
        ways["O_DIRECT 16 MiB 2 threads"] = (by_two_threads(16 * MiB, direct=True), os.O_DIRECT)
        for name in ("pvr+pwrite 4 MiB", "pvr+pwrite 8 MiB", "pvr into mmap 8 MiB"):
            ways[f"{name} +sha256"] = ways[name]
        ways["pvr+pwrite 2 threads 8 MiB +sha256"] = ways["pvr+pwrite 2 threads 8 MiB"]
        ways["O_DIRECT 2 MiB 2 threads +sha256"] = ways["O_DIRECT 2 MiB 2 threads"]
        ways["O_DIRECT 8 MiB 2 threads +sha256"] = ways["O_DIRECT 8 MiB 2 threads"]
        results: dict[str, float | str] = {}
        for name, (copier, flags) in ways.items():
            if args.only not in name:
                continue
            times = []
            for _ in range(RUNS):
                with tempfile.NamedTemporaryFile(dir=args.dir) as out:
                    fd = os.open(out.name, os.O_RDWR | flags)
                    try:
                        t = time.perf_counter()
                        try:
                            copier(child.pid, extents, fd, name.endswith("+sha256"))
                        except OSError as err:
                            results[name] = f"unavailable ({err.strerror})"
                            break
                        os.fsync(fd)
                        times.append(time.perf_counter() - t)
                    finally:
                        os.close(fd)
            if times:
                results[name] = statistics.median(times)
            value = results.get(name)
            shown = (
                f"{value:9.3f} {total / value / 1e9:6.2f}" if isinstance(value, float) else value
            )
            print(f"{name:<36} {shown}", flush=True)
    finally:
        child.kill()
        child.wait()
    timed = {k: v for k, v in results.items() if isinstance(v, float) and "sha256" not in k}
    if timed:
        print(f"\nfastest without hashing: {min(timed, key=lambda k: timed[k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
