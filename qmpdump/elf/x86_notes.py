"""The notes of an x86-64 ELF core, built from CPU state as QEMU's dump builds them (pure).

QEMU's ELF dump of an x86-64 guest in long mode (``dump/dump.c``, ``target/i386/arch_dump.c``)
writes, in this order: an ``NT_PRSTATUS`` note named ``CORE`` for every vCPU (``pid`` = the
vCPU's index + 1, the registers in the layout of Linux's ``user_regs_struct``); then a note
named ``QEMU`` (type 0) for every vCPU with QEMU's own ``QEMUCPUState`` (version 1: general
registers, segments with their hidden parts, descriptor tables, control registers,
``kernel_gs_base``); then the guest's own VMCOREINFO note, copied from guest memory where the
``vmcoreinfo`` device says the guest put it. Every note is a 12-byte header, the name and the
descriptor each padded to 4 bytes; all integers little-endian.

The snapshot engine decodes the vCPUs' state from the device state QEMU stashed at the snapshot
point (:mod:`qmpdump.vmstate`, sections ``cpu``) and reads the guest note from the snapshot's
own pages, so that the notes describe that instant and no other. Only 64-bit long mode is
built (what QEMU writes when the first vCPU is in long mode); anything else is refused.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qmpdump.errors import MigrationStreamError
from qmpdump.vmstate import DeviceSection, DeviceState

__all__ = [
    "X86CPU",
    "GuestNoteRef",
    "cpus_from_state",
    "guest_note",
    "guest_note_ref",
    "x86_64_notes",
]

_NHDR: Final = struct.Struct("<III")
NT_PRSTATUS: Final = 1
#: QEMU's limit on the guest's note (``MAX_GUEST_NOTE_SIZE`` in dump.c)
MAX_GUEST_NOTE: Final = 1 << 20
#: ``FW_CFG_VMCOREINFO_FORMAT_ELF``
_FORMAT_ELF: Final = 1
#: ``HF_LMA_MASK``: the vCPU is in long mode
_HF_LMA: Final = 1 << 14
_QEMU_CPUSTATE_VERSION: Final = 1
# Register numbers of QEMU's env->regs and env->segs.
_RAX, _RCX, _RDX, _RBX, _RSP, _RBP, _RSI, _RDI = range(8)
_ES, _CS, _SS, _DS, _FS, _GS = range(6)
_SEGMENT_FIELDS: Final = ("selector", "base", "limit", "flags")


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register or descriptor table with its hidden part."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True, slots=True)
class X86CPU:
    """What the notes need of one vCPU."""

    index: int
    regs: tuple[int, ...]  # 16: rax rcx rdx rbx rsp rbp rsi rdi r8..r15
    rip: int
    rflags: int
    hflags: int
    segs: tuple[Segment, ...]  # 6: es cs ss ds fs gs
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & _HF_LMA)


def _segment(section: DeviceSection, name: str, index: int = 0) -> Segment:
    field = section.field(name, type_="struct", size=20)
    return Segment(*(field.member(index, member) for member in _SEGMENT_FIELDS))


def _cpu(section: DeviceSection) -> X86CPU:
    def u64(name: str) -> int:
        return section.field(name, type_="uint64", size=8).uint()

    regs = section.field("env.regs", type_="uint64", size=8)
    if regs.count != 16:
        raise MigrationStreamError(f"cpu {section.instance_id}: {regs.count} registers, not 16")
    return X86CPU(
        index=section.instance_id,
        regs=tuple(regs.uint(i) for i in range(16)),
        rip=u64("env.eip"),
        rflags=u64("env.eflags"),
        hflags=section.field("env.hflags", type_="uint32", size=4).uint(),
        segs=tuple(_segment(section, "env.segs", i) for i in range(6)),
        ldt=_segment(section, "env.ldt"),
        tr=_segment(section, "env.tr"),
        gdt=_segment(section, "env.gdt"),
        idt=_segment(section, "env.idt"),
        # cr[1] is not migrated: QEMU never sets it (0 in its dumps too)
        cr=(
            u64("env.cr[0]"),
            0,
            u64("env.cr[2]"),
            u64("env.cr[3]"),
            u64("env.cr[4]"),
        ),
        kernel_gs_base=u64("env.kernelgsbase"),
    )


def cpus_from_state(state: DeviceState) -> list[X86CPU]:
    """The vCPUs of the stream's device state, by index (sections ``cpu``)."""
    cpus = [_cpu(s) for s in state.named("cpu")]
    if not cpus:
        raise MigrationStreamError("the device state has no x86 CPU")
    if [c.index for c in cpus] != list(range(len(cpus))):
        raise MigrationStreamError(f"x86 CPUs {[c.index for c in cpus]}: not 0..n-1")
    return cpus


@dataclass(frozen=True, slots=True)
class GuestNoteRef:
    """Where the guest put its VMCOREINFO note (guest-physical), and the bytes it gave."""

    paddr: int
    size: int


def guest_note_ref(state: DeviceState) -> GuestNoteRef | None:
    """The ``vmcoreinfo`` device's pointer, if the guest gave a usable one (as QEMU checks)."""
    found = state.named("vmcoreinfo")
    if not found:
        return None
    section = found[0]
    if not section.field("has_vmcoreinfo", size=1).uint():
        return None
    size = section.field("vmcoreinfo.size", size=4).uint()
    fmt = section.field("vmcoreinfo.guest_format", size=2).uint()
    paddr = section.field("vmcoreinfo.paddr", size=8).uint()
    if size < _NHDR.size or size > MAX_GUEST_NOTE or fmt != _FORMAT_ELF:
        return None
    return GuestNoteRef(paddr, size)


def guest_note(raw: bytes) -> bytes | None:
    """The note QEMU copies from the guest's ``raw`` bytes, or None where QEMU would skip it."""
    if len(raw) < _NHDR.size:
        return None
    namesz, descsz, _type = _NHDR.unpack_from(raw)
    if namesz > MAX_GUEST_NOTE or descsz > MAX_GUEST_NOTE:
        return None
    size = _NHDR.size + _pad4(namesz) + _pad4(descsz)
    if size > len(raw):
        return None
    return raw[:size]


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    namez = name + b"\0"
    return (
        _NHDR.pack(len(namez), len(desc), note_type)
        + namez.ljust(_pad4(len(namez)), b"\0")
        + desc.ljust(_pad4(len(desc)), b"\0")
    )


def _prstatus(cpu: X86CPU) -> bytes:
    r = cpu.regs
    s = cpu.segs
    user_regs = struct.pack(
        "<27Q",
        *(r[15], r[14], r[13], r[12], r[_RBP], r[_RBX], r[11], r[10], r[9], r[8]),
        *(r[_RAX], r[_RCX], r[_RDX], r[_RSI], r[_RDI]),
        0,  # orig_rax: QEMU leaves it 0
        cpu.rip,
        s[_CS].selector,
        cpu.rflags,
        r[_RSP],
        s[_SS].selector,
        s[_FS].base,
        s[_GS].base,
        s[_DS].selector,
        s[_ES].selector,
        s[_FS].selector,
        s[_GS].selector,
    )
    # struct x86_64_elf_prstatus: 32 bytes, pid, 76 bytes, the registers, 8 bytes
    return bytes(32) + struct.pack("<I", cpu.index + 1) + bytes(76) + user_regs + bytes(8)


def _qemu_segment(seg: Segment) -> bytes:
    return struct.pack("<IIIIQ", seg.selector, seg.limit, seg.flags, 0, seg.base)


def _qemu_state(cpu: X86CPU) -> bytes:
    r = cpu.regs
    s = cpu.segs
    body = (
        struct.pack("<8Q", r[_RAX], r[_RBX], r[_RCX], r[_RDX], r[_RSI], r[_RDI], r[_RSP], r[_RBP])
        + struct.pack("<8Q", *r[8:16])
        + struct.pack("<QQ", cpu.rip, cpu.rflags)
        + b"".join(_qemu_segment(s[i]) for i in (_CS, _DS, _ES, _FS, _GS, _SS))
        + b"".join(_qemu_segment(t) for t in (cpu.ldt, cpu.tr, cpu.gdt, cpu.idt))
        + struct.pack("<5Q", *cpu.cr)
        + struct.pack("<Q", cpu.kernel_gs_base)
    )
    return struct.pack("<II", _QEMU_CPUSTATE_VERSION, 8 + len(body)) + body


def x86_64_notes(cpus: Sequence[X86CPU], guest: bytes | None) -> bytes:
    """The PT_NOTE payload of QEMU's ELF dump of these vCPUs (the first must be in long mode)."""
    if not cpus:
        raise MigrationStreamError("no vCPU to describe")
    if not cpus[0].long_mode:
        raise MigrationStreamError(
            "the first vCPU is not in long mode at the snapshot point: QEMU would write a "
            "32-bit core, which qmpdump does not build"
        )
    return (
        b"".join(_note(b"CORE", NT_PRSTATUS, _prstatus(c)) for c in cpus)
        + b"".join(_note(b"QEMU", 0, _qemu_state(c)) for c in cpus)
        + (guest or b"")
    )
