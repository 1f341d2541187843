"""What a libvirt domain's XML says about its memory (pure: XML text in, typed facts out).

Follows libvirt's domain XML format (``formatdomain.rst``: "Memory Allocation", "Memory
Backing", "NUMA Node Tuning"/``<cpu><numa>``, "Memory devices"). Sizes carry a ``unit``
attribute (default KiB); the live XML of a running domain also gives a virtio-mem device's
``<current>`` (plugged) size. libvirt 9.0 gives no guest-physical address of a memory device.

How QEMU names what libvirt asks for (``qemu_command.c``): a NUMA cell's RAM is the memory
backend ``ram-nodeN``; a memory device's backend is ``mem`` + its alias (``memvirtiomem0``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qmpdump.errors import LayoutError

__all__ = ["DomainMemory", "MemoryDevice", "NumaCell", "parse_domain_memory", "to_bytes"]

_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}


def to_bytes(node: ET.Element | None, *, default_unit: str = "KiB") -> int | None:
    """A libvirt scaled integer element in bytes (None when absent)."""
    if node is None or node.text is None or not node.text.strip():
        return None
    unit = (node.get("unit") or default_unit).lower()
    if unit not in _UNITS:
        raise LayoutError(f"domain XML: unknown unit {unit!r} in <{node.tag}>")
    try:
        return int(node.text.strip()) * _UNITS[unit]
    except ValueError as err:
        raise LayoutError(f"domain XML: <{node.tag}> is not an integer: {node.text!r}") from err


@dataclass(frozen=True, slots=True)
class NumaCell:
    """One guest NUMA node's RAM, and the QEMU memory backend libvirt gives it."""

    id: int
    size: int

    @property
    def backend(self) -> str:
        """QEMU's id for this cell's memory backend object."""
        return f"ram-node{self.id}"


@dataclass(frozen=True, slots=True)
class MemoryDevice:
    """A ``<memory model=...>`` device (virtio-mem, dimm, ...)."""

    model: str
    alias: str
    size: int
    block_size: int | None
    requested_size: int | None
    #: plugged size (live XML of a running domain only)
    current_size: int | None
    node: int | None

    @property
    def backend(self) -> str:
        """QEMU's id for this device's memory backend object."""
        return f"mem{self.alias}"


@dataclass(frozen=True, slots=True)
class DomainMemory:
    """A domain's memory as libvirt describes it."""

    name: str
    uuid: str
    memory: int
    max_memory: int | None
    #: ``<memoryBacking><source type>``: memfd, file, anonymous (the default)
    source: str
    #: ``<memoryBacking><access mode>``: shared or private (libvirt's default: private)
    access: str
    hugepages: bool
    cells: tuple[NumaCell, ...]
    devices: tuple[MemoryDevice, ...]

    @property
    def virtio_mem(self) -> tuple[MemoryDevice, ...]:
        """The virtio-mem devices."""
        return tuple(d for d in self.devices if d.model == "virtio-mem")


def parse_domain_memory(xml: str) -> DomainMemory:
    """Parse a domain XML (``virDomainGetXMLDesc``) into its memory facts."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML, from libvirtd
    except ET.ParseError as err:
        raise LayoutError(f"domain XML does not parse: {err}") from err
    backing = root.find("memoryBacking")
    source = "anonymous"
    access = "private"
    hugepages = False
    if backing is not None:
        src = backing.find("source")
        if src is not None:
            source = src.get("type", "anonymous")
        acc = backing.find("access")
        if acc is not None:
            access = acc.get("mode", "private")
        hugepages = backing.find("hugepages") is not None
    cells = tuple(
        NumaCell(int(c.get("id", i)), to_bytes_attr(c.get("memory"), c.get("unit")))
        for i, c in enumerate(root.findall("cpu/numa/cell"))
    )
    devices = []
    for dev in root.findall("devices/memory"):
        target = dev.find("target")
        alias = dev.find("alias")
        size = to_bytes(target.find("size")) if target is not None else None
        node = target.find("node") if target is not None else None
        devices.append(
            MemoryDevice(
                model=dev.get("model", ""),
                alias="" if alias is None else alias.get("name", ""),
                size=size or 0,
                block_size=to_bytes(target.find("block")) if target is not None else None,
                requested_size=to_bytes(target.find("requested")) if target is not None else None,
                current_size=to_bytes(target.find("current")) if target is not None else None,
                node=int(node.text) if node is not None and node.text else None,
            )
        )
    return DomainMemory(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        memory=to_bytes(root.find("memory")) or 0,
        max_memory=to_bytes(root.find("maxMemory")),
        source=source,
        access=access,
        hugepages=hugepages,
        cells=cells,
        devices=tuple(devices),
    )


def to_bytes_attr(value: str | None, unit: str | None) -> int:
    """A size given as attributes (``<cell memory='...' unit='...'>``) in bytes."""
    node = ET.Element("cell")
    node.text = value or "0"
    if unit:
        node.set("unit", unit)
    return to_bytes(node) or 0
