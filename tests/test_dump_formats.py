"""Every format ``query-dump-guest-memory-capability`` lists, on whichever QEMU the run selects.

QEMU 7.2 (Debian) lists elf, kdump-zlib and win-dmp; 10.0 (bookworm-backports) adds
kdump-raw-zlib, the standard kdump layout written by QEMU itself into a seekable file. The
formats come from QEMU, never from a list here, so a QEMU built with lzo or snappy is covered
too. Guest tier: each format of the shared guest (paused, so every dump holds the same memory) is
opened by the tool that consumes it (pyelftools, ``crash --osrelease``, ``makedumpfile -R``);
win-dmp of a Linux guest fails cleanly. Bare tier: a cancel of QEMU's raw kdump (QEMU has no
cancel command: the memfd it writes into is sealed) leaves nothing and the VM runs on; on 7.2
the same test covers the flattened stream reassembled from our pipe.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from qmpdump.engines.base import Progress
from qmpdump.engines.run import DumpTask
from qmpdump.engines.spec import DumpFormat
from qmpdump.errors import DumpCancelled
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.guest import build_guest
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VMSpec

from .clirun import run_cli as cli
from .conftest import VMFactory
from .test_dump_qemu import (
    FLAT_SIGNATURE,
    KDUMP_SIGNATURE,
    dump_args,
    dump_status,
    files_in,
    mode_of,
    qemu_spec,
    run_qemu_dump,
    run_state,
    run_tool,
    scratch_dir,
    settled_state,
    sha256_of,
    sidecar,
)


async def offered(vm: VM) -> list[str]:
    assert vm.qmp is not None
    reply = await vm.qmp.execute("query-dump-guest-memory-capability")
    return [str(f) for f in reply["formats"]]


def standard_kdump_ok(path: Path, release: str) -> None:
    assert path.read_bytes()[:8] == KDUMP_SIGNATURE
    seen = run_tool("crash", "--osrelease", str(path))
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert seen.stdout.strip() == release


@pytest.mark.guest
async def test_every_offered_format_reads_in_its_consumer(shared_guest: VM) -> None:
    assert shared_guest.qmp is not None
    release = build_guest().release
    formats = await offered(shared_guest)
    assert {"elf", "kdump-zlib"} <= set(formats)
    await shared_guest.qmp.execute("stop")
    try:
        with scratch_dir("formats") as folder:
            for fmt in formats:
                target = folder / f"guest.{fmt}"
                code, _out, err = await cli(*dump_args(shared_guest, target, "--format", fmt))
                if fmt == "win-dmp":  # a Windows format: QEMU refuses a Linux guest's
                    assert code == 44
                    assert "win-dump" in err
                    assert "Traceback" not in err
                    assert not target.exists()
                    continue
                assert code == 0, f"{fmt}: {err}"
                assert mode_of(target) == 0o600
                doc = sidecar(target)
                assert doc["sha256"] == sha256_of(target)
                assert doc["request"]["qemu_format"] == fmt
                if fmt == "elf":
                    with target.open("rb") as f:
                        elf = ELFFile(f)
                        assert elf.header.e_type == "ET_CORE"
                        assert elf.num_segments() > 1
                elif fmt.startswith("kdump-raw-"):
                    assert doc["request"]["kdump_layout"] == "standard"
                    await asyncio.to_thread(standard_kdump_ok, target, release)
                else:  # kdump-*: makedumpfile's flattened stream through our pipe
                    assert doc["request"]["kdump_layout"] == "flattened"
                    assert target.read_bytes()[:12] == FLAT_SIGNATURE
                    rebuilt = folder / f"rebuilt.{fmt}"
                    done = await asyncio.to_thread(
                        run_tool, "makedumpfile", "-R", str(rebuilt), stdin=target
                    )
                    assert done.returncode == 0, done.stdout + done.stderr
                    await asyncio.to_thread(standard_kdump_ok, rebuilt, release)
            assert await run_state(shared_guest) == "paused"
    finally:
        await shared_guest.qmp.execute("cont")
    assert await run_state(shared_guest) == "running"


@pytest.mark.guest
async def test_seekable_kdump_is_qemus_raw_layout_where_offered(shared_guest: VM) -> None:
    """``--seekable`` asks QEMU for kdump-raw-zlib where it has it (10.0), else rebuilds the
    flattened stream (7.2); either way the file equals ``makedumpfile -R`` of the flattened
    dump of the same paused guest, byte for byte."""
    assert shared_guest.qmp is not None
    raw_offered = "kdump-raw-zlib" in await offered(shared_guest)
    await shared_guest.qmp.execute("stop")
    try:
        with scratch_dir("seekable") as folder:
            flat, standard = folder / "flat.kdump", folder / "standard.kdump"
            code, _out, err = await cli(*dump_args(shared_guest, flat, "--format", "kdump-zlib"))
            assert code == 0, err
            code, _out, err = await cli(
                *dump_args(shared_guest, standard, "--format", "kdump-zlib", "--seekable")
            )
            assert code == 0, err
            doc = sidecar(standard)
            assert doc["request"]["kdump_layout"] == "standard"
            assert doc["request"]["qemu_format"] == (
                "kdump-raw-zlib" if raw_offered else "kdump-zlib"
            )
            assert doc["bytes"] == standard.stat().st_size
            rebuilt = folder / "rebuilt.kdump"
            done = await asyncio.to_thread(run_tool, "makedumpfile", "-R", str(rebuilt), stdin=flat)
            assert done.returncode == 0, done.stdout + done.stderr
            assert sha256_of(standard) == sha256_of(rebuilt)
    finally:
        await shared_guest.qmp.execute("cont")


def fill_random(path: Path, offset: int, size: int) -> None:
    """Incompressible bytes at ``offset`` of a backing file, so that a kdump takes seconds."""
    with path.open("r+b") as f:
        f.seek(offset)
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


@pytest.mark.bare
async def test_cancel_of_a_seekable_kdump_leaves_nothing_and_the_vm_runs(
    vm_factory: VMFactory,
) -> None:
    # On 10.0 this is QEMU's kdump-raw-zlib into a memfd that the cancel seals (QEMU has no
    # cancel command); on 7.2 the flattened stream through the pipe that the cancel closes.
    vm_spec = VMSpec(
        name="bare-kdump-cancel", guest=False, ram_backend=Backend.FILE, ram_size=1 * GiB
    )
    vm = await vm_factory(vm_spec)
    await asyncio.to_thread(fill_random, vm.backing_file("ram0"), 16 * MiB, 384 * MiB)
    assert vm.qmp is not None
    await vm.qmp.execute("cont")
    seen: list[Progress] = []
    tasks: list[DumpTask] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.written > 0:
            tasks[0].cancel()

    spec = qemu_spec(format=DumpFormat.KDUMP_ZLIB, seekable=True)
    with scratch_dir("kdump-cancel") as folder:
        async with QMPSession(str(vm.qmp_path)) as qmp:
            tasks.append(DumpTask(run_qemu_dump(qmp, folder / "vm.kdump", spec, progress=progress)))
            with pytest.raises(DumpCancelled):
                await tasks[0].result()
            assert seen[-1].written > 0
            assert seen[-1].completed < seen[-1].total
            assert files_in(folder) == []
            assert await settled_state(vm) == "running"
            assert await dump_status(vm) == "failed"
            # QEMU is not stuck: the next dump runs to the end.
            again = await run_qemu_dump(
                qmp, folder / "again.elf", qemu_spec(begin=0, length=1 * MiB)
            )
        assert again.size > 1 * MiB
    assert await run_state(vm) == "running"
