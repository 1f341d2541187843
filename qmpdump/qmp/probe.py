"""Read a VM's memory layout over QMP and build the pure :class:`~qmpdump.memmap.layout.Layout`.

Sources, the same on QEMU 7.2 and 10.0:

* ``info mtree -f`` (HMP): the system FlatView's RAM pieces (:mod:`qmpdump.qmp.mtree`);
* ``qom-list /objects`` and ``qom-get`` of ``size``, ``share``, ``mem-path``: the memory backend
  objects (``backends/hostmem*.c``; ``query-memdev`` carries neither type nor path);
* ``info ramblock`` (HMP): sizes of RAM that is no backend object (``pc.bios``, ``pc.rom``), and
  on QEMU 10.0 each block's host virtual address;
* ``query-memory-devices``: virtio-mem devices;
* ``gpa2hva`` (HMP): QEMU's host virtual address of a region where ``info ramblock`` lacks it
  (7.2), to find its file or pages.

QEMU 10.0 has no structured QMP command for any of the HMP text read here: ``x-query-ramblock``
and the other ``x-query-*`` commands return the same text (``HumanReadableText``), and there is
no QMP form of ``info mtree`` or ``gpa2hva``. So the HMP path serves both versions, its text
parsed by meaning (header names, region names), not by column position.

Nothing here reads guest memory or pauses the VM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpdump.errors import LayoutError, QMPCommandError, QMPReplyError
from qmpdump.memmap.layout import Backend, BackendType, Layout, Piece, VirtioMem, build_layout
from qmpdump.memmap.ranges import Range
from qmpdump.qmp.models import (
    CpuInfoFast,
    StatusInfo,
    VersionInfo,
    parse_memory_devices,
    parse_reply,
)
from qmpdump.qmp.mtree import parse_system_flatview
from qmpdump.qmp.ramblock import parse_ramblocks, ramblock_for_region
from qmpdump.qmp.session import QMPSession

__all__ = [
    "VMFacts",
    "query_status",
    "read_layout",
    "read_vm_facts",
    "region_host_addresses",
    "vcpu_thread_ids",
]

_BACKEND_TYPES = {
    "memory-backend-memfd": BackendType.MEMFD,
    "memory-backend-file": BackendType.FILE,
    "memory-backend-ram": BackendType.RAM,
}
_CHILD = re.compile(r"^child<(?P<type>memory-backend-[\w-]+)>$")
_GPA2HVA = re.compile(
    r"Host virtual address for 0x[0-9a-fA-F]+ \((?P<region>.*)\) is 0x(?P<hva>[0-9a-fA-F]+)"
)
_OBJECTS = "/objects/"


@dataclass(frozen=True, slots=True)
class VMFacts:
    """Who the VM is: QEMU's version, pid and run state."""

    address: str
    pid: int | None
    qemu_version: str
    qemu_package: str
    run_state: str
    running: bool
    name: str | None


async def query_status(session: QMPSession) -> StatusInfo:
    """The VM's run state now (``query-status``)."""
    return parse_reply(StatusInfo, await session.execute("query-status"), "query-status")


async def read_vm_facts(session: QMPSession) -> VMFacts:
    """QEMU version, pid (SO_PEERCRED), run state and guest name."""
    version = parse_reply(VersionInfo, await session.execute("query-version"), "query-version")
    status = await query_status(session)
    name_reply = await session.execute("query-name")
    q = version.qemu
    return VMFacts(
        address=session.where,
        pid=session.pid,
        qemu_version=f"{q.major}.{q.minor}.{q.micro}",
        qemu_package=version.package.strip(),
        run_state=status.status,
        running=status.running,
        name=name_reply.get("name") if isinstance(name_reply, dict) else None,
    )


async def _backends(session: QMPSession) -> dict[str, Backend]:
    children = await session.execute("qom-list", {"path": "/objects"})
    found: dict[str, Backend] = {}
    for child in children:
        m = _CHILD.match(str(child.get("type", "")))
        if not m:
            continue
        obj_id = str(child["name"])
        path = _OBJECTS + obj_id
        kind = _BACKEND_TYPES.get(m["type"], BackendType.RAM)
        size = int(await session.execute("qom-get", {"path": path, "property": "size"}))
        share = bool(await session.execute("qom-get", {"path": path, "property": "share"}))
        mem_path = None
        if kind is BackendType.FILE:
            mem_path = str(await session.execute("qom-get", {"path": path, "property": "mem-path"}))
        found[obj_id] = Backend(
            region=obj_id, type=kind, size=size, id=obj_id, mem_path=mem_path, share=share
        )
    return found


async def read_layout(session: QMPSession) -> Layout:
    """The guest-physical layout: RAM pieces joined with backends, plus virtio-mem devices."""
    entries = parse_system_flatview(await session.hmp("info mtree -f"))
    backends = await _backends(session)
    ramblocks = parse_ramblocks(await session.hmp("info ramblock"))
    devices = [
        VirtioMem(
            id=d.id or f"virtio-mem@{d.memaddr:#x}",
            memaddr=d.memaddr,
            max_size=d.max_size,
            block_size=d.block_size,
            size=d.size,
            requested_size=d.requested_size,
            memdev=d.memdev.removeprefix(_OBJECTS),
            node=d.node,
        )
        for d in parse_memory_devices(await session.execute("query-memory-devices"))
    ]
    pieces = []
    for entry in entries:
        region = entry.region.removeprefix(_OBJECTS)
        backend = backends.get(region)
        if backend is None:
            block = ramblock_for_region(ramblocks, region)
            if block is None:
                raise LayoutError(
                    f"info mtree line {entry.line_no}: RAM region {region!r} is neither a memory "
                    "backend nor a RAM block QEMU lists"
                )
            backend = Backend(region=region, type=BackendType.ANONYMOUS, size=block.used)
            backends[region] = backend
        pieces.append(
            Piece(
                gpa=Range(entry.gpa, entry.size),
                region=region,
                region_offset=entry.offset,
                backend=backend,
                readonly=entry.kind == "rom",
            )
        )
    return build_layout(pieces, devices)


async def vcpu_thread_ids(session: QMPSession) -> tuple[int, ...]:
    """The host thread ids of the VM's vCPUs (``query-cpus-fast``): threads of QEMU's process."""
    raw = await session.execute("query-cpus-fast")
    if not isinstance(raw, list):
        raise QMPReplyError("query-cpus-fast", f"expected a list, got {type(raw).__name__}")
    return tuple(parse_reply(CpuInfoFast, cpu, "query-cpus-fast").thread_id for cpu in raw)


async def region_host_addresses(session: QMPSession, layout: Layout) -> dict[str, int]:
    """QEMU's host virtual address of offset 0 of every RAM region.

    A RAM block is one contiguous host mapping, so one address per region is enough. QEMU 10.0
    prints it in ``info ramblock`` (``HVA``), all regions in one command; where that column is
    missing (7.2), one ``gpa2hva`` per region gives it.
    """
    blocks = parse_ramblocks(await session.hmp("info ramblock"))
    bases: dict[str, int] = {}
    for backend in layout.backends:
        block = ramblock_for_region(blocks, backend.region)
        if block is not None and block.hva is not None:
            bases[backend.region] = block.hva
            continue
        piece = layout.pieces_of(backend.region)[0]
        try:
            text = await session.hmp(f"gpa2hva {piece.gpa.start:#x}")
        except QMPCommandError as err:
            raise LayoutError(f"gpa2hva {piece.gpa.start:#x} failed: {err.description}") from err
        m = _GPA2HVA.search(text)
        if m is None:
            raise LayoutError(f"gpa2hva {piece.gpa.start:#x}: unexpected answer {text.strip()!r}")
        bases[backend.region] = int(m["hva"], 16) - piece.region_offset
    return bases
