"""Move a dump from QEMU's pipe into the output file, hashing it on the way (blocking, threaded).

The bytes go pipe -> file with ``splice(2)`` (no copy through Python); the sha256 is computed by
reading back each chunk just written, from the page cache, into one reused buffer. The loop
waits on ``poll`` with a short timeout so that a stop request lands within a fraction of a second
even while QEMU writes nothing. For ELF output the first bytes (ELF header, program and section
headers, notes) are read whole and rewritten by :func:`qmpdump.elf.fixup.fix_qemu_header`.

:func:`unflatten` is the relay for kdump output in the standard layout. QEMU 7.2 writes kdump
formats only in makedumpfile's *flattened* layout, whatever the fd (``dump/dump.c``:
``write_start_flat_header``, ``write_buffer``; the raw layout came with QEMU 8.2's
``kdump-raw-*`` formats): a 4096-byte header whose first bytes are ``makedumpfile``, then records
of a big-endian (offset, size) pair and ``size`` bytes to be placed at ``offset``, ended by an
offset of -1. :func:`unflatten` writes each record at its offset, as ``makedumpfile -R`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import struct
import threading
from dataclasses import dataclass, field

from qmpdump.elf.fixup import fix_qemu_header
from qmpdump.elf.format import prefix_needed

__all__ = ["CHUNK", "FLAT_SIGNATURE", "RelayState", "relay", "unflatten"]

CHUNK = 1 << 20
_POLL_MS = 100

#: makedumpfile's flattened layout (``makedumpfile.h``: MAX_SIZE_MDF_HEADER, struct
#: makedumpfile_data_header, END_FLAG_FLAT_HEADER)
FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096
_FLAT_RECORD = struct.Struct(">qq")
_FLAT_END = -1


@dataclass
class RelayState:
    """Shared between the relay thread and its owner: progress out, stop request in."""

    stop: threading.Event = field(default_factory=threading.Event)
    written: int = 0
    #: True once QEMU closed its end (end of the dump stream)
    eof: bool = False
    sha256: str = ""


def _wait_readable(poller: select.poll, state: RelayState) -> bool:
    """Wait until the pipe has data or hung up; False when a stop was requested."""
    while not state.stop.is_set():
        if poller.poll(_POLL_MS):
            return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        done = os.write(fd, view)
        view = view[done:]


def _read_exact(src: int, size: int, poller: select.poll, state: RelayState) -> bytes | None:
    """``size`` bytes from the pipe; fewer at its end; None when a stop was requested."""
    buf = bytearray()
    while len(buf) < size:
        if not _wait_readable(poller, state):
            return None
        try:
            chunk = os.read(src, size - len(buf))
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _read_prefix(src: int, poller: select.poll, state: RelayState) -> bytes | None:
    buf = bytearray()
    while (need := prefix_needed(bytes(buf))) > len(buf):
        if not _wait_readable(poller, state):
            return None
        try:
            chunk = os.read(src, need - len(buf))
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(buf)  # ended early: pass on what there is, QEMU reports why
        buf += chunk
    return bytes(buf)


def relay(src: int, dst: int, state: RelayState, *, fix_elf: bool) -> None:
    """Copy the non-blocking pipe ``src`` to the file ``dst`` until EOF or a stop request.

    Raises ``OSError`` from the file side (ENOSPC, EIO); the caller maps it.
    """
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLHUP | select.POLLERR)
    offset = 0
    try:
        if fix_elf:
            prefix = _read_prefix(src, poller, state)
            if prefix is None:
                return
            with contextlib.suppress(ValueError):  # not as expected: relay QEMU's bytes as is
                prefix = fix_qemu_header(prefix)
            _write_all(dst, prefix)
            hasher.update(prefix)
            offset = state.written = len(prefix)
        while _wait_readable(poller, state):
            try:
                moved = os.splice(src, dst, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                continue
            if moved == 0:
                state.eof = True
                return
            got = os.preadv(dst, [view[:moved]], offset)
            hasher.update(view[:got])
            offset += moved
            state.written = offset
    finally:
        state.sha256 = hasher.hexdigest()


def unflatten(src: int, dst: int, state: RelayState) -> None:
    """Rebuild the standard kdump layout in the file ``dst`` from a flattened stream on ``src``.

    ``state.written`` counts the bytes placed so far; ``state.sha256`` stays empty (the file is
    not written in order: hash it afterwards). Raises ``OSError`` from the file side, and
    ``ValueError`` when the stream is not in the flattened layout.
    """
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLHUP | select.POLLERR)
    header = _read_exact(src, FLAT_HEADER_SIZE, poller, state)
    if header is None or len(header) < FLAT_HEADER_SIZE:
        return  # stopped, or cut short: QEMU reports why
    if not header.startswith(FLAT_SIGNATURE):
        raise ValueError("the kdump stream does not start with makedumpfile's flattened header")
    while True:
        record = _read_exact(src, _FLAT_RECORD.size, poller, state)
        if record is None or len(record) < _FLAT_RECORD.size:
            return  # stopped, or cut short: QEMU reports why
        offset, size = _FLAT_RECORD.unpack(record)
        if offset == _FLAT_END:
            state.eof = True
            return
        if offset < 0 or size < 0:
            raise ValueError(f"bad flattened record: offset {offset:#x}, size {size:#x}")
        while size:
            if not _wait_readable(poller, state):
                return
            try:
                moved = os.splice(
                    src,
                    dst,
                    min(size, CHUNK),
                    offset_dst=offset,
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
            except BlockingIOError:
                continue
            if moved == 0:
                return  # cut short: QEMU reports why
            offset += moved
            size -= moved
            state.written += moved
