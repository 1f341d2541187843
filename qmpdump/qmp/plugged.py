"""Exact plugged virtio-mem ranges, read from the program headers of QEMU's own ELF dump.

QMP has no per-block plug bitmap (QEMU 7.2), but ``dump-guest-memory`` (``dump/dump.c``) builds
its PT_LOAD list from the guest's physical blocks through the RamDiscardManager, so unplugged
virtio-mem blocks are left out. We start a full ELF dump into a pipe, read the ELF header,
program headers and notes (a few KiB), and close the pipe at once: QEMU's next write fails with
EPIPE, the dump ends as ``failed`` and QEMU restores the run state.

Hazards handled here (see ``shared/FACTS.md``):

* While the dump runs the VM is in ``save-vm`` (paused). Holding the pipe open unread would keep
  it paused, so the read has a deadline and the pipe is closed in a ``finally``.
* QEMU reads guest pages into the pipe before it notices; the pipe is shrunk to one page so that
  it reads as little as possible (on a shmem backend, reading a hole allocates it).
"""

from __future__ import annotations

import asyncio
import os

from qmpdump.elf.format import PT_LOAD, parse_program_headers, prefix_needed
from qmpdump.errors import ElfFormatError
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.guestdump import DumpArguments, guest_dump
from qmpdump.qmp.session import QMPSession

__all__ = ["dump_loads", "probe_dump_loads", "read_dump_prefix"]

#: one page: QEMU reads as little guest memory as it can before it notices the closed pipe
_PIPE_SIZE = 4096


async def _read_prefix(fd: int, timeout_s: float) -> bytes:
    """Read from a non-blocking pipe until the ELF headers and notes are complete."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    async with asyncio.timeout(timeout_s):
        while (need := prefix_needed(bytes(buf))) > len(buf):
            try:
                chunk = os.read(fd, need - len(buf))
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            if not chunk:
                raise ElfFormatError(
                    f"QEMU's dump ended after {len(buf)} bytes, before its headers were complete"
                )
            buf += chunk
    return bytes(buf[:need])


async def read_dump_prefix(session: QMPSession, *, timeout_s: float = 10.0) -> bytes:
    """Start an ELF ``dump-guest-memory`` into a pipe, read its headers and notes, stop it.

    Returns the bytes from offset 0 to the end of the notes. On return QEMU has reported the
    (deliberately failed) dump as completed and the VM's run state is what it was before.
    """
    own = getattr(session, "read_dump_prefix", None)
    if own is not None:  # a session with its own route to QEMU's dump (libvirt passthrough)
        prefix: bytes = await own(timeout_s=timeout_s)
        return prefix
    async with guest_dump(session, DumpArguments(format="elf"), pipe_size=_PIPE_SIZE) as dump:
        try:
            data = await _read_prefix(dump.read_fd, timeout_s)
        finally:
            dump.close_pipe()  # QEMU's next write fails with EPIPE: the dump stops
        await dump.finished(timeout_s)
    return data


def dump_loads(prefix: bytes) -> RangeSet:
    """Guest-physical ranges a QEMU dump holds (its PT_LOADs): RAM minus unplugged memory."""
    return RangeSet.from_ranges(
        (ph.paddr, ph.memsz)
        for ph in parse_program_headers(prefix)
        if ph.type == PT_LOAD and ph.memsz > 0
    )


async def probe_dump_loads(session: QMPSession, *, timeout_s: float = 10.0) -> RangeSet:
    """Guest-physical ranges QEMU's dump would hold: every RAM block minus unplugged memory."""
    return dump_loads(await read_dump_prefix(session, timeout_s=timeout_s))
