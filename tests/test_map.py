"""``qmpdump map`` end to end, virtio-mem state, exact plug ranges, and the CLI's errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from qmpdump.errors import SocketPermission
from qmpdump.host.extents import path_extents
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.models import VirtioMemInfo, parse_memory_devices
from qmpdump.qmp.session import QMPSession, _open_socket
from qmpdump.survey import survey
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec

from .clirun import run_cli
from .conftest import VMFactory


def backing_extents(vm: VM) -> dict[str, RangeSet]:
    """Populated extents of every file backend of a testbed VM."""
    return {p.name: path_extents(p) for p in sorted(vm.backing_dir.iterdir())}


RESIZABLE = VMSpec(
    name="guest-map",
    ram_backend=Backend.FILE,
    ram_size=512 * MiB,
    virtio_mem=(VirtioMemSpec(backend=Backend.FILE, max_size=1 * GiB, requested_size=256 * MiB),),
)


async def wait_plugged(qmp: QMPSession, device: str, size: int, timeout_s: float) -> VirtioMemInfo:
    """Poll ``query-memory-devices`` until ``device`` has ``size`` plugged (the guest plugs in
    its own time; FACTS.md: within about 50 ms for plugs, 1 s for unplugs)."""
    async with asyncio.timeout(timeout_s):
        while True:
            devices = {
                d.id: d for d in parse_memory_devices(await qmp.execute("query-memory-devices"))
            }
            dev = devices.get(device)
            if dev is not None and dev.size == size:
                return dev
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- guest tier


@pytest.mark.guest
async def test_plug_unplug_replug_exact_and_inferred(vm_factory: VMFactory) -> None:
    vm = await vm_factory(RESIZABLE)
    assert vm.qmp is not None
    async with QMPSession(str(vm.qmp_path)) as qmp:
        for size in (256 * MiB, 64 * MiB, 512 * MiB):
            await vm.resize("vmem0", size)
            dev = await wait_plugged(qmp, "vmem0", size, 30)
            assert dev.requested_size == size

            exact = await survey(qmp, exact_plug=True)
            inferred = await survey(qmp)
            (dev_exact,) = exact.population.devices
            (dev_inferred,) = inferred.population.devices
            region = dev_exact.device.region

            # Exact: QEMU's own view of plugged memory, block aligned, as large as plugged.
            assert dev_exact.plugged_exact
            assert dev_exact.plugged.total == size
            assert dev_exact.plugged.align_out(2 * MiB) == dev_exact.plugged
            assert dev_exact.plugged == dev_exact.plugged.clip(region)
            # Data lies only in plugged blocks; inferred plug = blocks with data, a subset.
            assert dev_exact.populated - dev_exact.plugged == RangeSet.empty()
            assert not dev_inferred.plugged_exact
            assert dev_inferred.plugged - dev_exact.plugged == RangeSet.empty()
            assert dev_inferred.plugged == dev_inferred.blocks_with_data


@pytest.mark.guest
async def test_map_changes_neither_run_state_nor_host_memory(vm_factory: VMFactory) -> None:
    vm = await vm_factory(RESIZABLE)
    assert vm.qmp is not None
    # Paused, so that the guest itself allocates nothing while we compare.
    await vm.qmp.execute("stop")
    before = backing_extents(vm)
    for extra in ([], ["--exact-plug"], ["--json", "--exact-plug"]):
        code, _out, err = await run_cli("map", "--qmp", str(vm.qmp_path), *extra)
        assert code == 0, err
        status = await vm.qmp.execute("query-status")
        assert (status["status"], status["running"]) == ("paused", False)
        assert backing_extents(vm) == before
    await vm.qmp.execute("cont")
    for extra in ([], ["--exact-plug"]):
        code, _out, err = await run_cli("map", "--qmp", str(vm.qmp_path), *extra)
        assert code == 0, err
        status = await vm.qmp.execute("query-status")
        assert (status["status"], status["running"]) == ("running", True)


@pytest.mark.guest
async def test_map_json_matches_the_schema_and_the_vm(shared_guest: VM) -> None:
    code, out, err = await run_cli("map", "--qmp", str(shared_guest.qmp_path), "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    assert doc["schema"] == "qmpdump.map/1"
    assert doc["vm"]["pid"] == shared_guest.pid
    assert doc["vm"]["run_state"] == "running"
    assert {"gpa", "size", "region", "backend", "backend_type", "file_offset"} <= set(
        doc["ranges"][0]
    )
    backends = {r["backend"] for r in doc["ranges"]}
    assert {"ram0", "mem-vmem0", None} <= backends
    (dev,) = doc["virtio_mem"]
    assert dev["id"] == "vmem0"
    assert dev["size"] == dev["requested_size"] == 256 * MiB
    assert dev["block_size"] == 2 * MiB
    assert dev["plugged_exact"] is False
    # populated is sorted, disjoint, inside RAM; totals agree with the lists
    pop = [(r["gpa"], r["size"]) for r in doc["populated"]]
    assert pop == sorted(pop)
    assert all(a + s < b for (a, s), (b, _) in itertools.pairwise(pop))
    assert doc["totals"]["populated_size"] == sum(s for _, s in pop)
    assert doc["totals"]["ram_size"] == sum(r["size"] for r in doc["ranges"])
    # the guest wrote its pattern: at least that much is populated
    assert doc["totals"]["populated_size"] >= 64 * MiB


@pytest.mark.guest
async def test_map_text_view(shared_guest: VM) -> None:
    code, out, err = await run_cli("map", "--qmp", str(shared_guest.qmp_path), "--ascii")
    assert code == 0, err
    assert "virtio-mem vmem0 at 0x140000000: max 2 GiB, block 2 MiB, plugged 256 MiB" in out
    assert "0x0000000100000000-0x000000011fffffff   512 MiB  ram0" in out
    assert "pc.bios" in out
    assert "total: RAM" in out


# ---------------------------------------------------------------- errors


@pytest.mark.bare
async def test_missing_socket_exit_code(tmp_path: Path) -> None:
    code, out, err = await run_cli("map", "--qmp", str(tmp_path / "none.sock"))
    assert (code, out) == (21, "")
    assert err.startswith("qmpdump: error: ")
    assert "no QMP socket" in err
    assert "Traceback" not in err


@pytest.mark.bare
async def test_busy_socket_times_out(vm_factory: VMFactory) -> None:
    # Real QEMU serves one client per QMP socket: while we hold it, a second client hangs.
    vm = await vm_factory(VMSpec(name="bare-busy", guest=False))
    async with QMPSession(str(vm.qmp_path)):
        code, _out, err = await run_cli("map", "--qmp", str(vm.qmp_path), "--timeout", "1")
    assert code == 24
    assert "did not answer" in err
    assert "Traceback" not in err


@pytest.mark.bare
def test_permission_denied_is_told_apart(tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    folder = tmp_path / "sockets"
    folder.mkdir()
    folder.chmod(0o755)
    tmp_path.chmod(0o755)
    path = folder / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    path.chmod(0o600)
    try:
        pid = os.fork()
        if pid == 0:  # the child drops to nobody and tries to connect
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                _open_socket(str(path), 2.0)
            except SocketPermission as err:
                code = err.exit_code
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 22
    finally:
        server.close()


@asynccontextmanager
async def fake_qmp_peer(
    path: Path, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[None]:
    server = await asyncio.start_unix_server(handler, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.bare
async def test_peer_that_is_not_qemu(tmp_path: Path) -> None:
    # A fake peer: real QEMU cannot be made to greet with garbage.
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    path = tmp_path / "ssh.sock"
    async with fake_qmp_peer(path, garbage):
        code, _out, err = await run_cli("map", "--qmp", str(path), "--timeout", "3")
    assert code == 23, err
    assert "QMP handshake" in err
    assert "Traceback" not in err


@pytest.mark.bare
async def test_unsupported_layout(tmp_path: Path) -> None:
    # A fake peer: real QEMU always prints a system FlatView; this one speaks QMP but has none.
    replies: dict[str, object] = {
        "qmp_capabilities": {},
        "query-version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
        "query-status": {"status": "running", "running": True},
        "query-name": {},
        "human-monitor-command": 'FlatView #0\n AS "io", root: io\n',
    }

    async def qmp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}
        writer.write(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode())
        writer.write(b"\r\n")
        # QMP clients send JSON objects back to back, with no newline: decode as a stream.
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := await reader.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                reply: dict[str, object] = {"return": replies.get(msg["execute"], {})}
                if "id" in msg:
                    reply["id"] = msg["id"]
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        writer.close()

    path = tmp_path / "odd.sock"
    async with fake_qmp_peer(path, qmp):
        code, _out, err = await run_cli("map", "--qmp", str(path), "--timeout", "3")
    assert code == 30, err
    assert "FlatView" in err
    assert "Traceback" not in err


@pytest.mark.bare
async def test_bad_arguments(tmp_path: Path) -> None:
    code, _out, err = await run_cli("map", "--qmp", "x", "--timeout", "0")
    assert code == 2
    assert "--timeout" in err
    code, _out, err = await run_cli("map")
    assert code == 2
    assert "--qmp" in err


@pytest.mark.guest
async def test_map_svg_picture(shared_guest: VM, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET  # noqa: PLC0415 - parsing our own output

    picture = tmp_path / "map.svg"
    code, out, err = await run_cli(
        "map", "--qmp", str(shared_guest.qmp_path), "--svg", str(picture)
    )
    assert code == 0, err
    assert f"picture: {picture}" in out
    root = ET.fromstring(picture.read_text())  # noqa: S314
    assert root.tag.endswith("svg")
    texts = " ".join("".join(t.itertext()) for t in root.iter() if t.tag.endswith("text"))
    assert "mem-vmem0" in texts
    assert "pc.bios" in texts
    assert not list(tmp_path.glob(".*partial"))
