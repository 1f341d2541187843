"""Choosing an engine on real QEMU: live mode never pauses, QMP over TCP cannot pass a pipe.

Bare VMs (seconds). The TCP case goes through a byte relay in the test (TCP to QEMU's UNIX QMP
socket): the testbed's QEMU listens on UNIX sockets only, and the relay changes nothing but the
transport, which is what is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpdump.engines import run as run_module
from qmpdump.engines.run import choose_engine, run_dump
from qmpdump.engines.spec import DumpSpec, EngineName, Mode
from qmpdump.errors import DumpError, UsageError
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey, survey
from qmpdump.testbed.vm import VM, MiB, VMSpec

from .clirun import run_cli
from .conftest import VMFactory


async def bare_running(vm_factory: VMFactory, name: str) -> VM:
    vm = await vm_factory(VMSpec(name=name, guest=False, ram_size=256 * MiB))
    assert vm.qmp is not None
    await vm.qmp.execute("cont")
    return vm


def unreadable(before: Survey) -> Survey:
    """The same VM as the sparse reader would see it if no RAM region could be read from the
    host (as for QEMU on another host, or RAM it cannot open)."""
    return dataclasses.replace(before, access={})


@pytest.mark.bare
async def test_live_auto_refuses_rather_than_fall_back_to_a_pausing_engine(
    vm_factory: VMFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = await bare_running(vm_factory, "live-auto")
    assert vm.qmp is not None
    async with QMPSession(str(vm.qmp_path)) as session:
        before = await survey(session)
        blind = unreadable(before)
        # Consistent mode: auto falls back to QEMU's engine and says why.
        engine, why = choose_engine(DumpSpec(), blind, session)
        assert engine.traits.name is EngineName.QEMU
        assert "cannot be read from the host" in why
        # Live mode: no fallback to an engine that pauses the VM.
        with pytest.raises(UsageError, match="live mode needs engine backend") as refused:
            choose_engine(DumpSpec(mode=Mode.LIVE), blind, session)
        assert "cannot be read from the host" in str(refused.value)
        # Asked for by name, the backend engine refuses with its reason: no file is made.
        with pytest.raises(DumpError, match=r"the backend engine cannot dump this VM: .* host"):
            choose_engine(DumpSpec(engine=EngineName.BACKEND, mode=Mode.LIVE), blind, session)
        # The whole path: refused before any pause, nothing written.
        monkeypatch.setattr(run_module, "survey", lambda _session: _returns(blind))
        with vm.qmp.listen("STOP") as stops:
            with pytest.raises(UsageError, match="live mode"):
                await run_dump(session, tmp_path / "live.elf", DumpSpec(mode=Mode.LIVE))
            await asyncio.sleep(0.2)
            assert stops.drain() == []
    assert list(tmp_path.iterdir()) == []
    assert (await vm.qmp.execute("query-status"))["status"] == "running"


async def _returns(value: Survey) -> Survey:
    return value


@contextlib.asynccontextmanager
async def tcp_relay(unix_path: Path) -> AsyncIterator[int]:
    """A TCP port on 127.0.0.1 whose connections are relayed byte for byte to ``unix_path``."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(unix_path))
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            t = asyncio.create_task(task)
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.bare
async def test_qmp_over_tcp_with_an_fd_passing_engine_is_a_clear_usage_error(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    vm = await bare_running(vm_factory, "tcp-fd")
    async with tcp_relay(vm.qmp_path) as port:
        where = f"tcp:127.0.0.1:{port}"
        code, _out, err = await run_cli("map", "--qmp", where)  # the relay itself works
        assert code == 0, err
        for engine in ("qemu", "backend", "auto"):
            target = tmp_path / f"{engine}.elf"
            code, out, err = await run_cli(
                "dump", "--qmp", where, "--engine", engine, "-o", str(target)
            )
            assert (code, out) == (2, ""), err
            assert "QMP over TCP cannot carry" in err, err
            assert "Traceback" not in err
            assert err.startswith("qmpdump: error: 127.0.0.1:"), err
    assert list(tmp_path.iterdir()) == []
    assert vm.qmp is not None
    assert (await vm.qmp.execute("query-status"))["status"] == "running"
