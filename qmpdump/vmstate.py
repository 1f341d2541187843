"""The device state at the end of a migration stream, decoded with the stream's own description.

Device sections carry VMState with no lengths (:mod:`qmpdump.migstream`), but QEMU ends the
stream with a JSON description of what it wrote (``QEMU_VM_VMDESCRIPTION``, built by
``vmstate_save_state`` in ``migration/vmstate.c``): for each section its name, instance id,
version and fields, each with the bytes one element took on the wire (``size``) and how many
elements there are (``array_len``), then the subsections it wrote. With it every section can be
walked field by field. The tail of the stream, from the first device section after the pages::

    0x04 FULL: be32 section_id, u8 len + idstr, be32 instance_id, be32 version_id
      the fields, then each subsection: 0x05, u8 len + name, be32 version, its fields (and its
      own subsections)
      0x7e FOOTER: be32 section_id
    ... one FULL section per device ...
    0x00 EOF
    0x06 VMDESCRIPTION: be32 length, the JSON

The walk is a proof: every section must be found in the description, every subsection where the
description puts it, every footer must name its section, and the sections must end exactly at
EOF, which must be followed by the description and nothing else. A stream that does not walk
is an error, never a guess (pure: bytes in, values out).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from qmpdump.errors import MigrationStreamError

__all__ = ["DeviceSection", "DeviceState", "Field", "parse_device_state"]

_FULL: Final = 0x04
_SUBSECTION: Final = 0x05
_DESCRIPTION: Final = 0x06
_EOF: Final = 0x00
_FOOTER: Final = 0x7E
#: the description is a few hundred KiB at most for machines with many devices
_MAX_DESCRIPTION: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class Field:
    """One top-level field of a section: its description and its bytes on the wire."""

    name: str
    type: str
    #: bytes one element took
    size: int
    count: int
    data: bytes
    #: for ``struct`` fields: the struct's own field descriptions
    struct: tuple[Mapping[str, Any], ...] = ()

    def element(self, index: int) -> bytes:
        """The bytes of element ``index``."""
        if not 0 <= index < self.count:
            raise MigrationStreamError(f"field {self.name} has {self.count} elements, not {index}")
        return self.data[index * self.size : (index + 1) * self.size]

    def uint(self, index: int = 0) -> int:
        """Element ``index`` as a big-endian unsigned integer."""
        return int.from_bytes(self.element(index), "big")

    def member(self, index: int, name: str) -> int:
        """Member ``name`` of struct element ``index``, a big-endian unsigned integer."""
        at = 0
        raw = self.element(index)
        for desc in self.struct:
            size = int(desc["size"]) * int(desc.get("array_len", 1))
            if desc["name"] == name:
                return int.from_bytes(raw[at : at + size], "big")
            at += size
        raise MigrationStreamError(f"struct field {self.name} has no member {name!r}")


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """One device's state: its fields by name (top level; subsections are walked, not kept)."""

    name: str
    instance_id: int
    version: int
    fields: Mapping[str, Field]

    def field(self, name: str, *, type_: str | None = None, size: int | None = None) -> Field:
        """The field ``name``, checked to be of ``type_`` and ``size`` bytes per element."""
        found = self.fields.get(name)
        if found is None:
            raise MigrationStreamError(f"section {self.name} {self.instance_id} has no {name}")
        if (type_ is not None and found.type != type_) or (size is not None and found.size != size):
            raise MigrationStreamError(
                f"section {self.name} field {name} is {found.type} of {found.size} bytes"
            )
        return found


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Every device section of the stream's tail, in stream order."""

    sections: tuple[DeviceSection, ...]

    def named(self, name: str) -> list[DeviceSection]:
        """The sections called ``name``, by instance id."""
        return sorted((s for s in self.sections if s.name == name), key=lambda s: s.instance_id)


def _description_at(data: bytes) -> int:
    """Where the VMDESCRIPTION record starts: its length must reach exactly to the end."""
    end = len(data)
    at = data.rfind(b"{")
    while at >= 5:
        start = at - 5
        if (
            data[start] == _DESCRIPTION
            and int.from_bytes(data[start + 1 : at], "big") == end - at
            and start >= 1
            and data[start - 1] == _EOF
        ):
            return start
        at = data.rfind(b"{", 0, at)
    raise MigrationStreamError("the device state does not end with QEMU's JSON description")


class _Cursor:
    def __init__(self, data: bytes, end: int) -> None:
        self.data = data
        self.at = 0
        self.end = end

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > self.end:
            raise MigrationStreamError(
                f"the device state ends inside a field ({size} bytes at {self.at:#x})"
            )
        out = self.data[self.at : self.at + size]
        self.at += size
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> str:
        return self.take(self.u8()).decode("ascii", "replace")


def _field_bytes(desc: Mapping[str, Any]) -> tuple[int, int]:
    try:
        size, count = int(desc["size"]), int(desc.get("array_len", 1))
    except (KeyError, TypeError, ValueError) as err:
        raise MigrationStreamError(f"a field description without a size: {desc!r}") from err
    if size < 0 or count < 0:
        raise MigrationStreamError(f"a field description of negative size: {desc!r}")
    return size, count


def _walk_fields(cur: _Cursor, fields: Sequence[Mapping[str, Any]]) -> Iterator[Field]:
    for desc in fields:
        size, count = _field_bytes(desc)
        struct = desc.get("struct")
        members = tuple(struct.get("fields", ())) if isinstance(struct, dict) else ()
        yield Field(
            str(desc.get("name")),
            str(desc.get("type")),
            size,
            count,
            cur.take(size * count),
            members,
        )


def _walk_subsections(cur: _Cursor, subsections: Sequence[Mapping[str, Any]], owner: str) -> None:
    for sub in subsections:
        if cur.u8() != _SUBSECTION:
            raise MigrationStreamError(
                f"section {owner}: subsection {sub.get('vmsd_name')} missing"
            )
        name = cur.string()
        if name != sub.get("vmsd_name"):
            raise MigrationStreamError(
                f"section {owner}: subsection {name!r} where {sub.get('vmsd_name')!r} was described"
            )
        cur.be32()  # version
        for _ in _walk_fields(cur, sub.get("fields", ())):
            pass
        _walk_subsections(cur, sub.get("subsections", ()), owner)


def parse_device_state(data: bytes) -> DeviceState:
    """Decode the stream's tail (from the first FULL section's type byte to the end)."""
    described = _description_at(data)
    length = int.from_bytes(data[described + 1 : described + 5], "big")
    if length > _MAX_DESCRIPTION:
        raise MigrationStreamError(f"a device description of {length} bytes")
    try:
        description = json.loads(data[described + 5 :])
        devices = description["devices"]
        by_key = {(str(d["name"]), int(d["instance_id"])): d for d in devices}
    except (ValueError, KeyError, TypeError) as err:
        raise MigrationStreamError(f"QEMU's device description is not understood: {err}") from err
    cur = _Cursor(data, described - 1)  # up to the EOF byte
    sections: list[DeviceSection] = []
    while cur.at < cur.end:
        kind = cur.u8()
        if kind != _FULL:
            raise MigrationStreamError(f"device state: section type {kind:#04x} at {cur.at - 1:#x}")
        section_id = cur.be32()
        name = cur.string()
        instance = cur.be32()
        version = cur.be32()
        desc = by_key.get((name, instance))
        if desc is None:
            raise MigrationStreamError(f"device section {name} {instance} is not described")
        fields = {f.name: f for f in _walk_fields(cur, desc.get("fields", ()))}
        _walk_subsections(cur, desc.get("subsections", ()), name)
        if cur.u8() != _FOOTER or cur.be32() != section_id:
            raise MigrationStreamError(
                f"device section {name} {instance} does not end where described"
            )
        sections.append(DeviceSection(name, instance, version, fields))
    return DeviceState(tuple(sections))
