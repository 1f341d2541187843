"""Tests of the copier's process-memory pipeline and its hasher, without QEMU.

The peer is this test process itself: ``process_vm_readv`` on our own pid is the same kernel
path as on QEMU's, and here the memory layout can be made what a test needs (ranges that are not
page-aligned, more ranges than one system call takes, an unmapped hole). The real-QEMU proof
(every byte equal to QEMU's own dump) is ``tests/test_dump_backend.py``; these tests pin down the
corner cases the pipeline must get right: the order of the hash across header, holes, spliced
and gathered bytes, buffer reuse, errors and stops from the reader thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from qmpdump.engines import copier
from qmpdump.engines.copier import (
    PIPELINE_CHUNK,
    CopyState,
    FileSource,
    ProcessSource,
    Source,
    Stopped,
    copy_ops_into,
    hash_output,
)
from qmpdump.engines.copyplan import CopyOp
from qmpdump.errors import HostAccessError
from qmpdump.host.procmem import IOV_MAX, read_process_vectors

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def memory() -> tuple[mmap.mmap, int]:
    """40 MiB of this process's anonymous memory with a distinct byte pattern, and its address."""
    size = 40 * MiB
    area = mmap.mmap(-1, size)
    pattern = bytes(range(251)) * (size // 251 + 1)  # a prime period: every page differs
    area[:] = pattern[:size]
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    return area, address


@pytest.fixture
def no_access() -> Iterator[int]:
    """The address of 4 pages of this process that cannot be read (PROT_NONE): EFAULT."""
    area = mmap.mmap(-1, 4 * PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(4 * PAGE), 0) == 0
    yield address
    # The mapping stays until the fixture's frame goes: nothing else can land at that address.
    del area


def run_copy(
    out: Path, header: bytes, ops: list[CopyOp], sources: Mapping[str, Source], size: int
) -> str:
    """What the backend engine does: header, copier and hasher threads, finish, digest."""
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, header, 0)
        state = CopyState()
        digest: list[str] = []
        failure: list[BaseException] = []

        def hash_it() -> None:
            try:
                digest.append(hash_output(fd, state))
            except BaseException as err:
                failure.append(err)

        hasher = threading.Thread(target=hash_it)
        hasher.start()
        state.advance(0, len(header))
        try:
            copy_ops_into(fd, ops, sources, state)
            os.ftruncate(fd, size)
            state.finish(size)
        finally:
            if not state.finished:
                state.stop.set()
            hasher.join()
        if failure:
            raise failure[0]
        return digest[0]
    finally:
        os.close(fd)


def expected_file(
    header: bytes, ops: list[CopyOp], regions: Mapping[str, bytes], size: int
) -> bytes:
    data = bytearray(size)
    data[: len(header)] = header
    for op in ops:
        region = regions[op.region]
        data[op.file_offset : op.file_offset + op.size] = region[
            op.region_offset : op.region_offset + op.size
        ]
    return bytes(data)


def test_gathered_process_memory_and_spliced_file_in_file_order(
    memory: tuple[mmap.mmap, int], tmp_path: Path
) -> None:
    """Runs back to back (one gather), holes between runs, an odd-sized run, more than one
    buffer's worth (buffers are reused), and a memfd region in between: the file holds exactly
    the expected bytes, and the digest is the file's sha256."""
    area, address = memory
    memfd = os.memfd_create("qmpdump-test")
    file_bytes = os.urandom(3 * MiB)
    os.write(memfd, file_bytes)
    try:
        base = 8 * PAGE
        ops = [
            CopyOp(base, 2 * MiB, "anon", 0),
            CopyOp(base + 2 * MiB, 5 * PAGE, "anon", 7 * MiB),  # back to back: same batch
            CopyOp(base + 2 * MiB + 9 * PAGE, 3 * PAGE + 100, "anon", 9 * MiB),  # odd size
            CopyOp(base + 3 * MiB, 3 * MiB, "file", 0),  # spliced, read back by the hasher
            CopyOp(
                base + 6 * MiB, 5 * PIPELINE_CHUNK + 3 * PAGE, "anon", 12 * MiB
            ),  # several buffers
            CopyOp(
                base + 6 * MiB + 6 * PIPELINE_CHUNK, 4 * PAGE, "anon", 1 * MiB + 5
            ),  # unaligned hva
        ]
        size = ops[-1].file_offset + ops[-1].size + 3 * PAGE  # a zero tail, like ftruncate's
        header = b"HEAD" * 1000
        sources: dict[str, Source] = {
            "anon": ProcessSource(os.getpid(), address),
            "file": FileSource(memfd),
        }
        out = tmp_path / "core"
        digest = run_copy(out, header, ops, sources, size)
        written = out.read_bytes()
        assert written == expected_file(
            header, ops, {"anon": bytes(area), "file": file_bytes}, size
        )
        assert digest == hashlib.sha256(written).hexdigest()
    finally:
        os.close(memfd)


def test_many_small_runs_take_more_than_one_system_call(
    memory: tuple[mmap.mmap, int], tmp_path: Path
) -> None:
    """Three times IOV_MAX small runs back to back in the core (less than one buffer's worth):
    split at IOV_MAX ranges."""
    area, address = memory
    count = 3 * IOV_MAX + 7
    run = 256
    ops = [CopyOp(PAGE + i * run, run, "anon", 2 * i * run + 3) for i in range(count)]
    batches = list(copier._batches(ops, {"anon": ProcessSource(os.getpid(), address)}))
    assert [len(b.remote) for b in batches] == [IOV_MAX, IOV_MAX, IOV_MAX, 7]
    size = PAGE + count * run
    out = tmp_path / "core"
    digest = run_copy(out, b"h" * PAGE, ops, {"anon": ProcessSource(os.getpid(), address)}, size)
    written = out.read_bytes()
    assert written == expected_file(b"h" * PAGE, ops, {"anon": bytes(area)}, size)
    assert digest == hashlib.sha256(written).hexdigest()


def test_read_process_vectors_gathers_in_order(memory: tuple[mmap.mmap, int]) -> None:
    area, address = memory
    remote = [(address + 5 * MiB + 3, 10), (address, PAGE), (address + 20 * MiB, 2 * MiB)]
    buf = memoryview(bytearray(4 * MiB))
    got = read_process_vectors(os.getpid(), remote, buf)
    assert got == 10 + PAGE + 2 * MiB
    want = area[5 * MiB + 3 : 5 * MiB + 13] + area[:PAGE] + area[20 * MiB : 22 * MiB]
    assert bytes(buf[:got]) == want


def test_read_process_vectors_names_the_unreadable_address(
    memory: tuple[mmap.mmap, int], no_access: int
) -> None:
    """A range after a readable one that cannot be read: the error names its address."""
    _area, address = memory
    buf = memoryview(bytearray(3 * PAGE))
    with pytest.raises(HostAccessError, match=f"{no_access:#x}"):
        read_process_vectors(os.getpid(), [(address, PAGE), (no_access, 2 * PAGE)], buf)


def test_a_read_error_in_the_reader_thread_reaches_the_copier(
    no_access: int, tmp_path: Path
) -> None:
    ops = [CopyOp(PAGE, 4 * PAGE, "anon", 0)]
    with pytest.raises(HostAccessError):
        run_copy(
            tmp_path / "core", b"h", ops, {"anon": ProcessSource(os.getpid(), no_access)}, 5 * PAGE
        )


def test_a_stop_ends_the_pipeline(memory: tuple[mmap.mmap, int], tmp_path: Path) -> None:
    """Stop set before the copy: the copier raises Stopped, the reader thread ends."""
    _area, address = memory
    fd = os.open(tmp_path / "core", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        state = CopyState()
        state.stop.set()
        before = threading.active_count()
        with pytest.raises(Stopped):
            copy_ops_into(
                fd,
                [CopyOp(0, 4 * PIPELINE_CHUNK, "anon", 0)],
                {"anon": ProcessSource(os.getpid(), address)},
                state,
            )
        assert threading.active_count() == before
    finally:
        os.close(fd)
