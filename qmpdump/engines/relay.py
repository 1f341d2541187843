"""Move a dump from QEMU's pipe into the output file, hashing it on the way (blocking, threaded).

The bytes go pipe -> file with ``splice(2)`` (no copy through Python); the sha256 is computed by
reading back each chunk just written, from the page cache, into one reused buffer. The loop
waits on ``poll`` with a short timeout so that a stop request lands within a fraction of a second
even while QEMU writes nothing. For ELF output the first bytes (ELF header, program and section
headers, notes) are read whole and rewritten by :func:`qmpdump.elf.fixup.fix_qemu_header`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import threading
from dataclasses import dataclass, field

from qmpdump.elf.fixup import fix_qemu_header
from qmpdump.elf.format import prefix_needed

__all__ = ["CHUNK", "RelayState", "relay"]

CHUNK = 1 << 20
_POLL_MS = 100


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
