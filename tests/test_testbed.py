"""The harness is real: QEMU starts and stops, the guest plugs, the host sees the guest's bytes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpdump.errors import LaunchError, QMPConnectError
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed import vm as vm_module
from qmpdump.testbed.guest import PATTERN_UNIT
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec

from .conftest import SHARED_GUEST, VMFactory

PAGE = 4096
PATTERN_PAGE = PATTERN_UNIT * (PAGE // len(PATTERN_UNIT))


def data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """(offset, size) of every populated extent of a file, by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, stop - start
            pos = stop
    finally:
        os.close(fd)


def count_pattern_pages(path: Path) -> int:
    """Pages of the guest's pattern in a backing file, reading only populated extents."""
    found = 0
    with path.open("rb") as f:
        for offset, size in data_extents(path):
            f.seek(offset)
            remaining = size
            while remaining:
                chunk = f.read(min(remaining, 8 * MiB))
                remaining -= len(chunk)
                for i in range(0, len(chunk) - PAGE + 1, PAGE):
                    if chunk[i : i + PAGE] == PATTERN_PAGE:
                        found += 1
    return found


# ---------------------------------------------------------------- bare tier


@pytest.mark.bare
async def test_bare_vm_host_bytes_appear_at_guest_physical_address(vm_factory: VMFactory) -> None:
    spec = VMSpec(
        name="bare-bytes",
        guest=False,
        ram_backend=Backend.FILE,
        ram_size=256 * MiB,
        virtio_mem=(VirtioMemSpec(backend=Backend.FILE, max_size=1 * GiB, requested_size=0),),
    )
    vm = await vm_factory(spec)
    assert vm.qmp is not None
    status = await vm.qmp.execute("query-status")
    assert status["status"] == "prelaunch"
    assert status["running"] is False

    # Write a marker into main RAM's backing file at 1 MiB + 0x40 and read it back as the
    # guest sees it, through QEMU's own physical-memory view.
    marker = b"\x51\x4d\x50\x44\x55\x4d\x50\x21"  # "QMPDUMP!"
    with vm.backing_file("ram0").open("r+b") as f:
        f.seek(1 * MiB + 0x40)
        f.write(marker)
    text = await vm.qmp.hmp(f"xp /8xb {1 * MiB + 0x40:#x}")
    seen = bytes(int(tok, 16) for tok in text.split(":", 1)[1].split())
    assert seen == marker

    assert vm.backing_file("mem-vmem0").stat().st_size == 1 * GiB
    devices = await vm.memory_devices()
    assert [(d.id, d.size, d.requested_size) for d in devices] == [("vmem0", 0, 0)]


@pytest.mark.bare
async def test_stop_removes_everything_and_kills_a_hung_qemu(vm_factory: VMFactory) -> None:
    vm = await vm_factory(VMSpec(name="bare-hung", guest=False, ram_backend=Backend.FILE))
    pid, run_dir, backing = vm.pid, vm.run_dir, vm.backing_dir
    assert backing.exists()
    assert run_dir.exists()
    # A stopped (SIGSTOP) QEMU cannot answer 'quit': stop() must fall back to SIGKILL by pid.
    os.kill(pid, signal.SIGSTOP)
    await vm.stop(timeout_s=1.0)
    assert vm.proc.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{pid}").exists()
    assert not backing.exists()
    assert not run_dir.exists()
    await vm.stop()  # idempotent


def _argv_with(monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """QEMU's command line with ``extra`` appended, for every launch in the test."""
    real_argv = vm_module.qemu_argv

    def argv(*args: object, **kwargs: object) -> list[str]:
        return [*real_argv(*args, **kwargs), *extra]  # type: ignore[arg-type]

    monkeypatch.setattr(vm_module, "qemu_argv", argv)


@pytest.mark.bare
async def test_failed_launch_reports_exit_code_command_line_and_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _argv_with(monkeypatch, "-object", "no-such-object-type,id=x")
    before = vm_module.live_vms()  # the session's shared guest may be up
    with pytest.raises(LaunchError) as caught:
        await vm_module.start(VMSpec(name="bare-broken", guest=False))
    err = caught.value
    assert err.qemu_exit_code == 1
    assert "no-such-object-type" in " ".join(err.argv)
    assert "no-such-object-type" in err.log
    assert vm_module.live_vms() == before  # the failed QEMU is reaped and forgotten


@pytest.mark.guest
async def test_a_boot_that_hangs_silently_is_started_once_more_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real silent hang: the guest's QEMU held at reset (-S), so nothing ever reaches its
    # serial console. Held once, the second start boots; held always, the testbed gives up
    # after the second, naming where the vCPUs are.
    hung: list[tuple[str, str]] = []
    real_argv = vm_module.qemu_argv
    monkeypatch.setattr(vm_module, "HUNG_BOOTS", hung)
    monkeypatch.setattr(vm_module, "SILENT_BOOT_S", 1.0)
    before = vm_module.live_vms()
    spec = VMSpec(name="guest-held", ram_size=512 * MiB)

    def held_once(*args: object, **kwargs: object) -> list[str]:
        if hung:  # the second start: an ordinary boot, with the ordinary limit
            monkeypatch.setattr(vm_module, "SILENT_BOOT_S", 60.0)
            return real_argv(*args, **kwargs)  # type: ignore[arg-type]
        return [*real_argv(*args, **kwargs), "-S"]  # type: ignore[arg-type]

    monkeypatch.setattr(vm_module, "qemu_argv", held_once)
    vm = await vm_module.start(spec)
    try:
        assert "QMPDUMP-READY" in vm.serial_text()
        assert vm.qmp is not None
        assert (await vm.qmp.execute("query-status"))["status"] == "running"
    finally:
        await vm.stop()
    assert [name for name, _ in hung] == ["guest-held"]
    assert re.search(
        r"run state prelaunch; vCPUs: CPU#0 EIP=0000fff0 HLT=0 CR0=\w+ CPU#1", hung[0][1]
    )

    hung.clear()
    monkeypatch.setattr(vm_module, "SILENT_BOOT_S", 1.0)
    monkeypatch.setattr(vm_module, "qemu_argv", real_argv)
    _argv_with(monkeypatch, "-S")
    with pytest.raises(vm_module.SilentBoot) as caught:
        await vm_module.start(spec)
    assert re.fullmatch(
        r"run state prelaunch; vCPUs: CPU#0 EIP=0000fff0 HLT=0 CR0=\w+ CPU#1 .*",
        caught.value.vcpus,
    )
    assert [name for name, _ in hung] == ["guest-held"]  # one retry, then given up
    assert vm_module.live_vms() == before  # every QEMU reaped and forgotten


@pytest.mark.bare
async def test_qmp_session_reads_qemu_pid_and_classifies_a_missing_socket(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    vm = await vm_factory(VMSpec(name="bare-pid", guest=False))
    async with QMPSession(str(vm.qmp_path)) as qmp:
        assert qmp.pid == vm.pid
        version = await qmp.execute("query-version")
        assert version["qemu"]["major"] >= 7
    with pytest.raises(QMPConnectError) as caught:
        await QMPSession(str(tmp_path / "nothing.sock")).connect()
    assert caught.value.exit_code == 21


# ---------------------------------------------------------------- guest tier


@pytest.mark.guest
async def test_guest_plugs_requested_memory(shared_guest: VM) -> None:
    devices = await shared_guest.memory_devices()
    assert [(d.id, d.size) for d in devices] == [("vmem0", 256 * MiB)]
    assert all(d.size == d.requested_size for d in devices)
    serial = shared_guest.serial_text()
    assert "QMPDUMP-ERROR" not in serial
    assert f"QMPDUMP-READY pattern_mib={SHARED_GUEST.pattern_mib}" in serial


@pytest.mark.guest
async def test_guest_pattern_is_found_in_the_backing_files(shared_guest: VM) -> None:
    files = [shared_guest.backing_file("ram0"), shared_guest.backing_file("mem-vmem0")]
    pages = sum(await asyncio.gather(*(asyncio.to_thread(count_pattern_pages, f) for f in files)))
    # The guest's tmpfs file holds exactly pattern_mib MiB of whole pattern pages; page cache
    # copies may add a few more, never fewer.
    assert pages >= SHARED_GUEST.pattern_mib * MiB // PAGE


@pytest.mark.guest
async def test_resize_through_qom_set_is_seen(vm_factory: VMFactory) -> None:
    spec = VMSpec(
        name="guest-resize",
        ram_backend=Backend.MEMFD,
        ram_size=512 * MiB,
        virtio_mem=(
            VirtioMemSpec(backend=Backend.FILE, max_size=1 * GiB, requested_size=128 * MiB),
        ),
    )
    vm = await vm_factory(spec)
    assert vm.qmp is not None
    with vm.qmp.listen("MEMORY_DEVICE_SIZE_CHANGE") as listener:
        await vm.resize("vmem0", 384 * MiB)
        devices = await vm.wait_plugged(timeout_s=30)
        assert [(d.id, d.size) for d in devices] == [("vmem0", 384 * MiB)]
        event = await asyncio.wait_for(listener.get(), 10)
        assert event.event == "MEMORY_DEVICE_SIZE_CHANGE"
        data = event.data
        assert data["id"] == "vmem0"
        # QEMU rate-limits and coalesces these events: the size may be an intermediate one.
        assert 128 * MiB < data["size"] <= 384 * MiB

        await vm.resize("vmem0", 64 * MiB)  # unplug part of it
        devices = await vm.wait_plugged(timeout_s=30)
        assert [(d.id, d.size) for d in devices] == [("vmem0", 64 * MiB)]
