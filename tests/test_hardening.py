"""Faults that must end clean: hostile QMP peers, bad input, crashes, a full disk.

Each test reproduces one case of issue 11 on the real thing (the installed ``qmpdump`` command,
a real daemon subprocess, real UNIX sockets, real QEMU) and checks that it ends with a clear
error, a final job and a daemon that stays up. The daemon helpers come from ``test_daemon``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpdump.engines.spec import EngineName
from qmpdump.service.views import DumpRequest
from qmpdump.testbed.vm import MiB

from .clirun import run_cli
from .conftest import VMFactory
from .test_daemon import (
    Daemons,
    bare_vm,
    daemons,  # noqa: F401  (the fixture)
    eventually,
    wait_job,
    write_config,
)

#: one more byte than the QMP library's line limit (10 MiB, like libvirt's)
HUGE_LINE = 10 * MiB + 1


# ----------------------------------------------------------------------------- a hostile peer


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, object]]:
    """The JSON objects a QMP client sends (not newline-delimited: QEMU parses a stream)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                msg, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break
            buffer = buffer.lstrip()[end:]
            yield msg


class HugeLinePeer:
    """A UNIX socket that speaks QMP until it sends one line longer than the library's limit.

    A fake peer because real QEMU cannot be made to send a 10 MiB line: its replies are bounded
    by what it has to say. ``where`` is ``"greeting"`` (the greeting itself is huge) or
    ``"reply"`` (a normal greeting and handshake, then a huge reply to the next command).
    """

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        capabilities = ["x" * HUGE_LINE] if self.where == "greeting" else []
        greeting = {"QMP": {"version": version, "capabilities": capabilities}}
        try:
            if self.where == "greeting":
                writer.write(json.dumps(greeting).encode() + b"\n")
                await writer.drain()
                await reader.read()
                return
            writer.write(json.dumps(greeting).encode() + b"\n")
            await writer.drain()
            async for msg in _messages(reader):
                if msg.get("execute") == "qmp_capabilities":
                    reply: dict[str, object] = {"return": {}, "id": msg.get("id")}
                else:
                    reply = {"return": "y" * HUGE_LINE, "id": msg.get("id")}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def __aenter__(self) -> HugeLinePeer:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.path.unlink(missing_ok=True)


@pytest.fixture
async def huge_reply_peer(tmp_path: Path) -> AsyncIterator[HugeLinePeer]:
    async with HugeLinePeer(tmp_path / "huge-reply.qmp", "reply") as peer:
        yield peer


@pytest.fixture
async def huge_greeting_peer(tmp_path: Path) -> AsyncIterator[HugeLinePeer]:
    async with HugeLinePeer(tmp_path / "huge-greeting.qmp", "greeting") as peer:
        yield peer


@pytest.mark.parametrize("which", ["reply", "greeting"])
async def test_a_huge_qmp_line_is_a_clear_cli_error(
    which: str, huge_reply_peer: HugeLinePeer, huge_greeting_peer: HugeLinePeer
) -> None:
    peer = huge_reply_peer if which == "reply" else huge_greeting_peer
    code, _out, err = await run_cli("map", "--qmp", str(peer.path), timeout_s=60)
    print(code, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert code in (23, 26), (code, err)
    assert "10 MiB" in err, err


@pytest.mark.bare
async def test_a_huge_qmp_line_never_takes_the_daemon_down(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
    huge_reply_peer: HugeLinePeer,
    huge_greeting_peer: HugeLinePeer,
) -> None:
    vm = await bare_vm(vm_factory, "neighbour", 128 * MiB)
    setup = write_config(
        tmp_path,
        {"good": vm.qmp_path, "reply": huge_reply_peer.path, "greet": huge_greeting_peer.path},
        default_engine=EngineName.QEMU,
    )
    svc = await daemons.start(setup, connected=1)

    async def retried() -> int | None:
        n = min(huge_reply_peer.clients, huge_greeting_peer.clients)
        return n if n >= 3 else None

    await eventually(retried, "both hostile peers tried three times", timeout_s=30)
    assert svc.proc.returncode is None
    for name in ("reply", "greet"):
        view = await svc.api.vm(name)
        assert view.connection != "connected"
        assert view.reason is not None
        assert "10 MiB" in view.reason, view.reason
    job = await svc.api.request("good", DumpRequest())
    done = await wait_job(svc.api, job.id)
    assert done.state == "succeeded", done
    assert (await svc.api.health()).status == "ok"
