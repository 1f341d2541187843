"""Benchmark: which kernel copy path moves populated memfd extents into a dump file fastest.

A 1 GiB memfd (like a memory-backend-memfd) gets data in half of its 2 MiB blocks (random,
fixed seed); the populated extents (SEEK_DATA) are copied into a file on the dump filesystem
(``/var/tmp`` by default) with each candidate, then fsynced. Median of 3 per path; GB/s over the
populated bytes. ``copy_file_range`` is tried too: across filesystems (shmem -> ext4) it fails
with EXDEV, and then it is reported as unavailable. The engine (:mod:`qmpdump.engines.copier`)
uses the winner for fd-backed RAM.

Run from the repository root: ``.venv/bin/python bench/copy_paths.py [--dir DIR]``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.host.extents import data_extents
from qmpdump.memmap.ranges import RangeSet

MiB = 1 << 20
SIZE = 1024 * MiB
BLOCK = 2 * MiB
CHUNK = 8 * MiB
RUNS = 3

Copier = Callable[[int, int, RangeSet], None]


def make_source() -> tuple[int, RangeSet]:
    """A memfd with data in a random half of its blocks; its extents."""
    fd = os.memfd_create("qmpdump-bench", 0)
    os.ftruncate(fd, SIZE)
    rng = random.Random(7)  # noqa: S311 - synthetic data
    block = os.urandom(BLOCK)
    for index in range(SIZE // BLOCK):
        if rng.random() < 0.5:
            os.pwrite(fd, block, index * BLOCK)
    return fd, data_extents(fd)


def by_sendfile(src: int, dst: int, extents: RangeSet) -> None:
    for ext in extents:
        offset, left = ext.start, ext.size
        os.lseek(dst, ext.start, os.SEEK_SET)
        while left:
            sent = os.sendfile(dst, src, offset, min(left, CHUNK))
            offset += sent
            left -= sent


def by_splice(src: int, dst: int, extents: RangeSet) -> None:
    r, w = os.pipe()
    try:
        import fcntl  # noqa: PLC0415

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
        for ext in extents:
            offset, left = ext.start, ext.size
            while left:
                into = os.splice(src, w, min(left, MiB), offset_src=offset)
                moved = 0
                while moved < into:
                    moved += os.splice(r, dst, into - moved, offset_dst=offset + moved)
                offset += into
                left -= into
    finally:
        os.close(r)
        os.close(w)


def by_pread_pwrite(src: int, dst: int, extents: RangeSet) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for ext in extents:
        offset, left = ext.start, ext.size
        while left:
            got = os.preadv(src, [view[: min(left, CHUNK)]], offset)
            os.pwrite(dst, view[:got], offset)
            offset += got
            left -= got


def by_copy_file_range(src: int, dst: int, extents: RangeSet) -> None:
    for ext in extents:
        offset, left = ext.start, ext.size
        while left:
            moved = os.copy_file_range(src, dst, min(left, CHUNK), offset, offset)
            offset += moved
            left -= moved


def main() -> int:
    """Measure every path, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    src, extents = make_source()
    total = extents.total
    print(
        f"source: 1 GiB memfd, {total / MiB:.0f} MiB populated in {len(extents)} extents; "
        f"target folder {args.dir}"
    )
    paths: dict[str, Copier] = {
        "sendfile": by_sendfile,
        "splice (1 MiB pipe)": by_splice,
        "pread+pwrite (8 MiB)": by_pread_pwrite,
        "copy_file_range": by_copy_file_range,
    }
    results: dict[str, float | str] = {}
    for name, copier in paths.items():
        times = []
        for _ in range(RUNS):
            with tempfile.NamedTemporaryFile(dir=args.dir) as out:
                t = time.perf_counter()
                try:
                    copier(src, out.fileno(), extents)
                except OSError as err:
                    results[name] = f"unavailable ({err.strerror})"
                    break
                os.fsync(out.fileno())
                times.append(time.perf_counter() - t)
        if times:
            results[name] = statistics.median(times)
    print(f"\n{'path':<24} {'median s':>9} {'GB/s':>6}")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"{name:<24} {value:9.3f} {total / value / 1e9:6.2f}")
        else:
            print(f"{name:<24} {value}")
    timed = {k: v for k, v in results.items() if isinstance(v, float)}
    print(f"\nfastest: {min(timed, key=lambda k: timed[k])}")
    os.close(src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
