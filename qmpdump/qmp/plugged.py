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
import contextlib
import fcntl
import os
import secrets

from qmpdump.elf.format import PT_LOAD, parse_program_headers, prefix_needed
from qmpdump.errors import DumpBusy, ElfFormatError, QMPCommandError, QMPDisconnected, QMPTimeout
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.session import QMPSession

__all__ = [
    "dump_busy",
    "dump_loads",
    "probe_dump_loads",
    "read_dump_prefix",
    "wait_out_save_vm",
]

F_SETPIPE_SZ = 1031  # fcntl.h; Python exposes it only as fcntl.F_SETPIPE_SZ on 3.10+ Linux
_PIPE_SIZE = 4096


def dump_busy(err: QMPCommandError) -> bool:
    """Whether QEMU refused a dump because one is running (7.2: "There is a dump in process,
    please wait.")."""
    return any(s in err.description for s in ("in process", "in progress", "already"))


async def wait_out_save_vm(session: QMPSession, was_running: bool) -> None:
    """Return once QEMU has left ``save-vm`` after a dump (it resumes the VM it paused).

    No ``cont``: QEMU restores the run state itself (``dump_cleanup``), and a VM that is paused
    afterwards was paused by someone else, whose decision that is. DUMP_COMPLETED comes before
    the RESUME, so without this wait a caller could see the VM still paused.
    """
    if not was_running or not session.connected:
        return
    with contextlib.suppress(QMPDisconnected, QMPTimeout, QMPCommandError):
        for _ in range(200):
            status = await session.execute("query-status")
            if status.get("status") != "save-vm":
                return
            await asyncio.sleep(0.025)


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
    was = await session.execute("query-status")
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    fdname = f"qmpdump-probe-{secrets.token_hex(4)}"
    handed_over = False
    try:
        fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), _PIPE_SIZE)
        os.set_blocking(read_fd, False)
        session.client.send_fd_scm(write_fd)
        await session.execute("getfd", {"fdname": fdname})
        os.close(write_fd)
        write_fd = -1
        with session.listen("DUMP_COMPLETED") as completed:
            try:
                await session.execute(
                    "dump-guest-memory",
                    {"paging": False, "protocol": f"fd:{fdname}", "detach": True, "format": "elf"},
                )
            except QMPCommandError as err:
                with contextlib.suppress(QMPCommandError):
                    await session.execute("closefd", {"fdname": fdname})
                if dump_busy(err):
                    raise DumpBusy(f"QEMU is already dumping: {err.description}") from err
                raise
            handed_over = True
            try:
                data = await _read_prefix(read_fd, timeout_s)
            finally:
                os.close(read_fd)  # QEMU's next write fails with EPIPE: the dump stops
                read_fd = -1
                try:
                    async with asyncio.timeout(timeout_s):
                        await completed.get()
                except TimeoutError as err:
                    raise QMPTimeout(
                        "DUMP_COMPLETED after closing the probe pipe", timeout_s
                    ) from err
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if not handed_over:
            with contextlib.suppress(QMPCommandError):
                await session.execute("closefd", {"fdname": fdname})
    await wait_out_save_vm(session, bool(was["running"]))
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
