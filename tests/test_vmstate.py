"""The device state of a real background snapshot, decoded into the notes QEMU writes.

The data (``tests/data/vmstate-10.0``) was captured from QEMU 10.0 with the VM stopped, so the
stream's stashed vCPU state and QEMU's own dump describe the same instant: the notes built from
the stream must be QEMU's, byte for byte. The running case is covered on real QEMU by
``tests/test_dump_snapshot.py`` and ``tests/test_consistency.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import pytest

from qmpdump.elf.x86_notes import cpus_from_state, guest_note, guest_note_ref, x86_64_notes
from qmpdump.errors import MigrationStreamError
from qmpdump.vmstate import parse_device_state

DATA = Path(__file__).parent / "data" / "vmstate-10.0"
TAIL = gzip.decompress((DATA / "device-state.bin.gz").read_bytes())
QEMU_NOTES = (DATA / "qemu-notes.bin").read_bytes()


def _notes() -> list[tuple[bytes, int, bytes]]:
    out, at = [], 0
    while at + 12 <= len(QEMU_NOTES):
        namesz, descsz, kind = struct.unpack_from("<III", QEMU_NOTES, at)
        name_end = at + 12 + -(-namesz // 4) * 4
        out.append((QEMU_NOTES[at + 12 : at + 12 + namesz - 1], kind, QEMU_NOTES[at:name_end]))
        at = name_end + -(-descsz // 4) * 4
    return out


def test_the_device_state_walks_to_its_description() -> None:
    state = parse_device_state(TAIL)
    names = [s.name for s in state.sections]
    assert names[0] == "timer"
    assert names.count("cpu") == 2
    assert "vmcoreinfo" in names
    # Every byte is accounted for: the walk ended exactly at QEMU_VM_EOF.
    assert len(state.sections) == len({(s.name, s.instance_id) for s in state.sections})


def test_notes_from_the_stream_are_qemus_notes() -> None:
    state = parse_device_state(TAIL)
    cpus = cpus_from_state(state)
    assert [c.index for c in cpus] == [0, 1]
    assert all(c.long_mode for c in cpus)
    ref = guest_note_ref(state)
    assert ref is not None
    kinds = [(name, kind) for name, kind, _ in _notes()]
    assert kinds == [(b"CORE", 1), (b"CORE", 1), (b"QEMU", 0), (b"QEMU", 0), (b"VMCOREINFO", 0)]
    cpu_notes = x86_64_notes(cpus, None)
    guest = QEMU_NOTES[len(cpu_notes) :]
    assert cpu_notes == QEMU_NOTES[: len(cpu_notes)]
    # QEMU reads ref.size bytes at ref.paddr and keeps the note's own length of them.
    assert len(guest) <= ref.size
    assert guest_note(guest + bytes(ref.size - len(guest))) == guest
    assert x86_64_notes(cpus, guest) == QEMU_NOTES


def test_a_vcpu_outside_long_mode_is_refused() -> None:
    cpus = cpus_from_state(parse_device_state(TAIL))
    real_mode = [dataclasses.replace(cpus[0], hflags=0), *cpus[1:]]
    with pytest.raises(MigrationStreamError, match="long mode"):
        x86_64_notes(real_mode, None)


def test_a_broken_guest_note_is_left_out_as_qemu_does() -> None:
    assert guest_note(b"") is None
    assert guest_note(struct.pack("<III", 11, 4096, 0) + b"VMCOREINFO\0\0" + bytes(100)) is None
    assert guest_note(struct.pack("<III", 2 << 20, 4, 0)) is None


def _corrupt(kind: str) -> bytes:
    eof = TAIL.rfind(b"\x00\x06")
    if kind == "truncated":
        return TAIL[: len(TAIL) // 2]
    if kind == "no description":
        return TAIL[:eof]
    if kind == "extra byte before EOF":
        return TAIL[:eof] + b"\x00" + TAIL[eof:]
    if kind == "unknown section":
        return TAIL.replace(b"\x05timer", b"\x05tamer", 1)
    if kind == "footer":
        first_footer = TAIL.index(b"\x7e\x00\x00\x00")
        return TAIL[:first_footer] + b"\x7f" + TAIL[first_footer + 1 :]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "no description", "extra byte before EOF", "unknown section", "footer"]
)
def test_a_stream_that_does_not_walk_is_an_error(kind: str) -> None:
    with pytest.raises(MigrationStreamError):
        cpus_from_state(parse_device_state(_corrupt(kind)))
