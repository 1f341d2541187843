"""Typed models of the QMP replies qmpdump reads (pydantic, at the edge only).

Each model follows a QAPI type of QEMU's schema (``qapi/*.json``, cited per class) and was
checked against ``query-qmp-schema`` and real replies of QEMU 7.2. The models are lenient: QEMU
adds members between versions, so unknown members are ignored (``extra="ignore"``), and members
a newer or older QEMU may lack are optional. QAPI spells members with dashes (``max-size``);
the models use underscores and accept either spelling.

Enumerations QEMU may extend (run states, dump states, formats) are kept as plain strings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from qmpdump.errors import LayoutError, QMPReplyError

__all__ = [
    "DumpCapability",
    "DumpQueryResult",
    "MemdevInfo",
    "MemoryDeviceInfo",
    "ObjectPropertyInfo",
    "OtherMemoryDevice",
    "StatusInfo",
    "VersionInfo",
    "VersionTriple",
    "VirtioMemDevice",
    "VirtioMemInfo",
    "parse_memory_devices",
    "parse_reply",
]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class QMPModel(BaseModel):
    """Base of every reply model: ignores unknown members, accepts dashed or underscored names."""

    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, alias_generator=_dashed, frozen=True
    )


class VirtioMemInfo(QMPModel):
    """One virtio-mem device: QAPI ``VirtioMEMDeviceInfo`` (qapi/machine.json, since 5.1).

    ``size`` is what the guest has plugged now; the device's memory region is mapped whole at
    ``memaddr`` (``max_size`` bytes) whatever is plugged.
    """

    #: the device's id (``-device ...,id=``); QAPI makes it optional
    id: str | None = None
    #: guest-physical address where the device's memory region starts
    memaddr: int = Field(ge=0)
    #: bytes plugged by the guest now
    size: int = Field(ge=0)
    #: bytes the device can provide at most (the size of its memory region)
    max_size: int = Field(gt=0)
    #: plug granularity in bytes
    block_size: int = Field(gt=0)
    #: bytes the host asked the guest to plug
    requested_size: int = Field(ge=0)
    #: NUMA node
    node: int = 0
    #: QOM path of the memory backend, e.g. ``/objects/mem-vmem0``
    memdev: str

    @property
    def memdev_id(self) -> str:
        """The memory backend's id (last component of :attr:`memdev`)."""
        return self.memdev.rstrip("/").rpartition("/")[2]


class VirtioMemDevice(QMPModel):
    """A ``query-memory-devices`` item of type ``virtio-mem`` (``VirtioMEMDeviceInfoWrapper``)."""

    type: Literal["virtio-mem"]
    data: VirtioMemInfo


class OtherMemoryDevice(QMPModel):
    """Any other ``query-memory-devices`` item: dimm, nvdimm, virtio-pmem, sgx-epc, later kinds.

    Kept unparsed: qmpdump does not use them (their RAM shows in ``info mtree -f`` anyway).
    """

    type: str
    data: dict[str, Any] = Field(default_factory=dict)


_M = TypeVar("_M", bound=BaseModel)


def parse_reply(model: type[_M], raw: object, command: str) -> _M:
    """Validate one QMP reply against its model; a wrong shape is a :class:`QMPReplyError`."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise QMPReplyError(command, str(err).replace("\n", "; ")) from err


def _memory_device_tag(value: object) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "virtio-mem" if kind == "virtio-mem" else "other"


#: One item of ``query-memory-devices``: QAPI union ``MemoryDeviceInfo`` (qapi/machine.json),
#: discriminated by ``type``; only virtio-mem is modelled in full.
MemoryDeviceInfo = Annotated[
    Annotated[VirtioMemDevice, Tag("virtio-mem")] | Annotated[OtherMemoryDevice, Tag("other")],
    Discriminator(_memory_device_tag),
]

_MEMORY_DEVICES: TypeAdapter[list[MemoryDeviceInfo]] = TypeAdapter(list[MemoryDeviceInfo])


def parse_memory_devices(raw: object) -> list[VirtioMemInfo]:
    """The virtio-mem devices in a ``query-memory-devices`` reply, in QEMU's order.

    Other device types are ignored. Raises :class:`LayoutError` when the reply is not a list of
    ``{type, data}`` objects or a virtio-mem entry lacks a member or has a wrong type.
    """
    try:
        devices = _MEMORY_DEVICES.validate_python(raw)
    except ValidationError as err:
        raise LayoutError(f"query-memory-devices: unexpected reply: {err}") from err
    return [d.data for d in devices if isinstance(d, VirtioMemDevice)]


class StatusInfo(QMPModel):
    """``query-status``: QAPI ``StatusInfo`` (qapi/run-state.json).

    ``status`` is a ``RunState`` name: ``prelaunch``, ``running``, ``paused``, ``save-vm`` (during
    ``dump-guest-memory``), ``shutdown``, ``guest-panicked``... (7.2 also sends ``singlestep``,
    deprecated and ignored here).
    """

    running: bool
    status: str


class CpuInfoFast(QMPModel):
    """One entry of ``query-cpus-fast``: QAPI ``CpuInfoFast`` (qapi/machine.json).

    ``thread-id`` is the host thread (TID) running the vCPU, a thread of QEMU's own process.
    """

    cpu_index: int
    thread_id: int


class VersionTriple(QMPModel):
    """QAPI ``VersionTriple`` (qapi/control.json)."""

    major: int
    minor: int
    micro: int

    def as_tuple(self) -> tuple[int, int, int]:
        """``(major, minor, micro)``, for comparisons."""
        return (self.major, self.minor, self.micro)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


class VersionInfo(QMPModel):
    """``query-version``: QAPI ``VersionInfo`` (qapi/control.json)."""

    qemu: VersionTriple
    #: the distribution's package version (``Debian 1:7.2+dfsg-7+deb12u18+b3``), or empty
    package: str = ""


class DumpCapability(QMPModel):
    """``query-dump-guest-memory-capability``: QAPI ``DumpGuestMemoryCapability`` (qapi/dump.json).

    ``formats`` lists the ``DumpGuestMemoryFormat`` names this build supports: ``elf``,
    ``kdump-zlib``, ``kdump-lzo``, ``kdump-snappy``, ``win-dmp``.
    """

    formats: list[str]


class DumpQueryResult(QMPModel):
    """``query-dump``: QAPI ``DumpQueryResult`` (qapi/dump.json).

    ``status`` is a ``DumpStatus``: ``none``, ``active``, ``completed`` or ``failed``.
    ``completed`` and ``total`` are bytes of guest memory.
    """

    status: str
    completed: int = Field(ge=0)
    total: int = Field(ge=0)


class MemdevInfo(QMPModel):
    """One ``query-memdev`` item: QAPI ``Memdev`` (qapi/machine.json).

    It has no backend type and no file path: read those with ``qom-get /objects/ID``.
    """

    #: the backend's id (QAPI: optional)
    id: str | None = None
    size: int = Field(ge=0)
    merge: bool | None = None
    dump: bool | None = None
    prealloc: bool | None = None
    #: since 6.1
    share: bool | None = None
    #: since 6.1, optional
    reserve: bool | None = None
    host_nodes: list[int] = Field(default_factory=list)
    #: a ``HostMemPolicy``: ``default``, ``preferred``, ``bind``, ``interleave``
    policy: str | None = None


class ObjectPropertyInfo(QMPModel):
    """One ``qom-list`` item: QAPI ``ObjectPropertyInfo`` (qapi/qom.json)."""

    name: str
    #: the property's type: ``int``, ``bool``, ``string``, ``child<...>``, ``link<...>``...
    type: str
    description: str | None = None
    default_value: Any = None
