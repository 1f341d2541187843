"""qmpdump's own kdump-compressed files, opened by the real readers (guest tier, real QEMU).

One stopped guest (the shared one, resumed afterwards) is dumped once as our ELF (the
reference: other tests prove it equal to QEMU's own dump) and once per codec as kdump, with zero
pages excluded (the default) and, for one codec, shared. Then, for every codec each reader on
this host opens (probed as ``auto`` probes: ``makedumpfile -v``, crash's linked libraries; drgn
reads all four):

* drgn (libkdumpfile): physical memory equals the ELF's, page for page, over all RAM; a page the
  kdump leaves out ("excluded") must be zero in the ELF, and a page it has must not be missing
  from the ELF;
* crash ``--osrelease`` prints the guest kernel's release (from the header's utsname);
* makedumpfile ``--dump-dmesg`` extracts the kernel log (it needs VMCOREINFO from the sub
  header, ``phys_base`` and the kernel's pages), and re-filters with ``-d 31`` into a new kdump
  file that drgn opens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpdump.engines.run import run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName
from qmpdump.kdump.codecs import CODECS, reader_support
from qmpdump.kdump.format import HEADER, KDUMP_SIGNATURE
from qmpdump.kdump.plan import ZeroPages
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.guest import build_guest
from qmpdump.testbed.vm import start as start_vm

from .conftest import SHARED_GUEST
from .test_dump_qemu import mode_of, run_tool, scratch_dir, sha256_of, sidecar

PAGE = 4096
CHUNK_PAGES = 256


@dataclass(frozen=True)
class Dumps:
    """Our ELF and our kdump files of one stopped guest."""

    elf: Path
    kdump: dict[str, Path]  # "zlib", ... (default zero pages), "zlib-shared", "zlib-exclude"
    ram: RangeSet


@pytest.fixture(scope="module")
async def dumps() -> AsyncIterator[Dumps]:
    """A guest of its own (the shared guest's shape), stopped, dumped as ELF and as kdump per codec.

    Not the shared guest: other modules dump that one with QEMU's engine, which allocates every
    hole of its shmem RAM, and these tests need memory the host never populated.
    """
    vm = await start_vm(dataclasses.replace(SHARED_GUEST, name="kdump-readers"))
    try:
        assert vm.qmp is not None
        await vm.qmp.execute("stop")
        with scratch_dir("kdump-readers") as folder:
            async with QMPSession(str(vm.qmp_path)) as qmp:
                backend = EngineName.BACKEND
                elf = await run_dump(qmp, folder / "guest.elf", DumpSpec(engine=backend))
                files: dict[str, Path] = {}
                for name in CODECS:
                    spec = DumpSpec(engine=backend, format=DumpFormat(f"kdump-{name}"))
                    out = await run_dump(qmp, folder / f"guest.{name}.kdump", spec)
                    files[name] = out.path
                for mode in (ZeroPages.SHARED, ZeroPages.EXCLUDE):
                    spec = DumpSpec(
                        engine=backend, format=DumpFormat.KDUMP_ZLIB, kdump_zero_pages=mode
                    )
                    out = await run_dump(qmp, folder / f"guest.zlib-{mode}.kdump", spec)
                    files[f"zlib-{mode}"] = out.path
            ram = RangeSet.from_ranges((r["gpa"], r["size"]) for r in _loads(elf.path))
            yield Dumps(elf.path, files, ram)
    finally:
        await vm.stop()


def _loads(elf: Path) -> Iterator[dict[str, int]]:
    """PT_LOADs of an ELF core (gpa, size)."""
    with elf.open("rb") as f:
        head = f.read(64)
        phoff, phnum = struct.unpack_from("<Q", head, 32)[0], struct.unpack_from("<H", head, 56)[0]
        f.seek(phoff)
        table = f.read(56 * phnum)
    for i in range(phnum):
        ptype, _flags, _off, _vaddr, paddr, _filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", table, 56 * i
        )
        if ptype == 1 and memsz:
            yield {"gpa": paddr, "size": memsz}


def _program(path: Path) -> object:
    import drgn  # noqa: PLC0415 - heavy import, test tier only

    prog = drgn.Program(drgn.host_platform)
    prog.set_core_dump(str(path))
    return prog


def compare_with_elf(
    elf: Path, kdump: Path, ram: RangeSet, *, filtered: bool = False
) -> tuple[int, int]:
    """Read all RAM through drgn from both files; return (pages equal, pages excluded).

    Raises AssertionError at the first page that differs, or that is excluded but not zero
    (unless ``filtered``: makedumpfile -d 31 leaves out pages that hold data).
    """
    import drgn  # noqa: PLC0415

    ours = _program(kdump)
    ref = _program(elf)
    zero = bytes(PAGE)
    equal = excluded = 0
    for rng in ram:
        for start in range(rng.start, rng.end, PAGE * CHUNK_PAGES):
            size = min(PAGE * CHUNK_PAGES, rng.end - start)
            expect = ref.read(start, size, True)  # type: ignore[attr-defined]
            try:
                got = ours.read(start, size, True)  # type: ignore[attr-defined]
            except drgn.FaultError:
                got = None
            if got is not None:
                assert got == expect, f"{kdump.name}: bytes differ in [{start:#x}, +{size:#x})"
                equal += size // PAGE
                continue
            for at in range(start, start + size, PAGE):
                want = expect[at - start : at - start + PAGE]
                try:
                    page = ours.read(at, PAGE, True)  # type: ignore[attr-defined]
                except drgn.FaultError:
                    assert filtered or want == zero, f"{kdump.name}: {at:#x} excluded, not zero"
                    excluded += 1
                    continue
                assert page == want, f"{kdump.name}: page {at:#x} differs"
                equal += 1
    return equal, excluded


@pytest.mark.guest
async def test_kdump_files_are_committed_with_their_sidecar(dumps: Dumps) -> None:
    for name, path in dumps.kdump.items():
        assert path.read_bytes()[:8] == KDUMP_SIGNATURE
        assert mode_of(path) == 0o600
        doc = sidecar(path)
        codec = name.split("-")[0]
        assert doc["format"] == f"kdump-{codec}"
        assert doc["engine"] == "backend"
        assert doc["request"]["codec"] == codec
        assert doc["bytes"] == path.stat().st_size
        assert doc["sha256"] == await asyncio.to_thread(sha256_of, path)
        # Far smaller than the ELF of the same memory.
        assert path.stat().st_size < dumps.elf.stat().st_size / 2


@pytest.mark.guest
@pytest.mark.parametrize("name", [*CODECS, "zlib-shared", "zlib-exclude"])
async def test_drgn_reads_the_same_physical_memory_as_our_elf(dumps: Dumps, name: str) -> None:
    path = dumps.kdump[name]
    equal, excluded = await asyncio.to_thread(compare_with_elf, dumps.elf, path, dumps.ram)
    assert equal + excluded == dumps.ram.total // PAGE
    assert equal > 0
    doc = sidecar(path)["request"]
    ram_pages = dumps.ram.total // PAGE
    assert doc["ram_pages"] == ram_pages
    assert equal == doc["dumped_pages"]
    if name.endswith("-shared"):
        assert excluded == 0  # every RAM page is in the dump, zero pages shared
    elif name.endswith("-exclude"):
        # Every zero page left out: the populated ones found zero too.
        assert doc["dumped_pages"] == doc["read_pages"] - doc["zero_read_pages"]
        assert doc["zero_read_pages"] > 0
    else:
        # Only what the host never populated is left out (and it is zero in the ELF).
        assert doc["dumped_pages"] == doc["read_pages"] < ram_pages


@pytest.mark.guest
@pytest.mark.parametrize("name", list(CODECS))
async def test_crash_prints_the_release(dumps: Dumps, name: str) -> None:
    if name not in reader_support().get("crash", set()):
        pytest.skip(f"this host's crash does not read {name}")
    seen = await asyncio.to_thread(run_tool, "crash", "--osrelease", str(dumps.kdump[name]))
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert seen.stdout.strip() == build_guest().release
    # The header's utsname says the same.
    fields = HEADER.unpack_from(dumps.kdump[name].read_bytes()[: HEADER.size])
    assert fields[2].rstrip(b"\0") == b"Linux"
    assert fields[4].rstrip(b"\0").decode() == build_guest().release
    assert fields[6].rstrip(b"\0") == b"x86_64"
    # ... and the kernel's own version string, read from init_uts_ns
    assert fields[5].startswith(b"#1 SMP")


@pytest.mark.guest
@pytest.mark.parametrize("name", [*CODECS, "zlib-shared"])
async def test_makedumpfile_dumps_dmesg_and_refilters(dumps: Dumps, name: str) -> None:
    codec = name.removesuffix("-shared")
    if codec not in reader_support().get("makedumpfile", set()):
        pytest.skip(f"this host's makedumpfile does not read {codec}")
    path = dumps.kdump[name]
    work = path.parent
    log = work / f"dmesg.{name}.txt"
    done = await asyncio.to_thread(run_tool, "makedumpfile", "--dump-dmesg", str(path), str(log))
    assert done.returncode == 0, done.stdout + done.stderr
    text = log.read_text(errors="replace")
    assert "Linux version " + build_guest().release in text
    assert "virtio_mem" in text
    refiltered = work / f"refiltered.{name}.kdump"
    done = await asyncio.to_thread(
        run_tool, "makedumpfile", "-c", "-d", "31", str(path), str(refiltered)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert refiltered.read_bytes()[:8] == KDUMP_SIGNATURE
    # drgn opens makedumpfile's output, and its pages are ours.
    equal, _excluded = await asyncio.to_thread(
        compare_with_elf, dumps.elf, refiltered, dumps.ram, filtered=True
    )
    assert equal > 0
    os.unlink(refiltered)
