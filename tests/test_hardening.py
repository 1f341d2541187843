"""Faults that must end clean: hostile QMP peers, bad input, crashes, a full disk.

Each test reproduces one case of issue 11 on the real thing (the installed ``qmpdump`` command,
a real daemon subprocess, real UNIX sockets, real QEMU) and checks that it ends with a clear
error, a final job and a daemon that stays up. The daemon helpers come from ``test_daemon``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines import backend as backend_engine
from qmpdump.engines.run import DumpTask, run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName, Mode
from qmpdump.errors import DumpCancelled, DumpFailed
from qmpdump.qmp.session import QMPSession
from qmpdump.service.views import DumpRequest
from qmpdump.testbed.vm import VM, Backend, GiB, MiB

from .clirun import QMPDUMP, run_cli
from .conftest import VMFactory
from .test_daemon import (
    Daemons,
    bare_vm,
    curl,
    daemons,  # noqa: F401  (the fixture)
    eventually,
    files_in,
    run_state,
    settled_state,
    sidecar,
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


# ----------------------------------------------------------------------------- bad input


async def test_format_is_validated_once_before_anything_touches_the_disk(
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Items 2 and 16: ``format`` never reaches a path, and is refused at once for every engine
    (auto included), naming the allowed values; no job, no file, no failed dump counted."""
    setup = write_config(tmp_path, {"v": tmp_path / "absent.qmp"})
    svc = await daemons.start(setup)
    escape = tmp_path / "somewhere"
    climb = "x/" + "../" * 12 + str(escape).lstrip("/") + "/pwn"
    for engine in (None, "auto", "qemu", "backend"):
        for fmt in (climb, "elf\u0000", "x/../../../../etc/passwd", "ELF", "vmdk", ""):
            body: dict[str, object] = {"format": fmt}
            if engine is not None:
                body["engine"] = engine
            answer = await curl(setup.api_socket, "POST", "/v1/vms/v/dumps", json.dumps(body))
            assert answer.status == 400, (body, answer)
            error = answer.body["error"]
            assert [f["field"] for f in error["fields"]] == ["format"], error
            assert "passwd" not in json.dumps(error) or "exists" not in json.dumps(error)
    assert not escape.exists()
    assert await svc.api.jobs() == []
    assert files_in(setup.vm_dir("v")) == []
    doc = (await curl(setup.api_socket, "GET", "/v1/openapi.json")).body
    request = doc["components"]["schemas"]["DumpRequest"]
    refs = [r["$ref"] for r in request["properties"]["format"]["anyOf"] if "$ref" in r]
    assert refs == ["#/components/schemas/DumpFormat"], request
    assert {"elf", "kdump-zlib"} <= set(doc["components"]["schemas"]["DumpFormat"]["enum"])
    metrics = await svc.api.metrics()
    assert 'result="failed"' not in metrics


# ----------------------------------------------------------------------------- crash recovery


@pytest.mark.bare
async def test_a_second_daemon_on_the_same_dump_dir_leaves_the_first_ones_partial_alone(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 3: start-up removes only the partial files its own store says a crash left."""
    vm = await bare_vm(vm_factory, "shared-dir", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    setup = write_config(first_dir, {"k": vm.qmp_path})
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("k", DumpRequest(engine=EngineName.QEMU))

    async def partial_exists() -> list[str] | None:
        found = [n for n in files_in(setup.vm_dir("k")) if n.endswith(".partial")]
        return found or None

    partials = await eventually(partial_exists, "the first daemon's partial file", timeout_s=30)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    other = write_config(second_dir, {"k": tmp_path / "absent.qmp"})
    other.config.write_text(
        other.config.read_text().replace(str(other.dump_dir), str(setup.dump_dir))
    )
    second = await daemons.start(other)
    assert "left by a crash" not in second.log_text()
    assert set(partials) <= set(files_in(setup.vm_dir("k"))) | {
        p.removesuffix(".partial") for p in files_in(setup.vm_dir("k"))
    }
    done = await wait_job(svc.api, job.id, timeout_s=120)
    assert done.state == "succeeded", done


@pytest.mark.bare
async def test_a_restart_resumes_only_the_qemu_it_paused(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 5: the pause journal names the QEMU process (pid and start time); after a crash, a
    new QEMU on the same socket that its operator paused is left paused."""
    first = await bare_vm(vm_factory, "paused-a", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    link = tmp_path / "vm.qmp"
    link.symlink_to(first.qmp_path)
    setup = write_config(tmp_path, {"k": link})
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("k", DumpRequest(engine=EngineName.BACKEND, mode=Mode.CONSISTENT))

    async def paused() -> str | None:
        return "paused" if await run_state(first) == "paused" else None

    await eventually(paused, "the dump pausing the VM", interval_s=0.01)
    await daemons.kill(svc)
    await first.stop()
    second = await bare_vm(vm_factory, "paused-b", 128 * MiB)
    assert second.qmp is not None
    await second.qmp.execute("stop")  # the operator's own pause
    fresh = tmp_path / "vm.qmp.new"
    fresh.symlink_to(second.qmp_path)
    fresh.replace(link)
    again = await daemons.start(setup, connected=1)
    await asyncio.sleep(1.0)
    assert await run_state(second) == "paused"
    assert "is gone; this one is left as it is" in again.log_text()
    failed = await again.api.job(job.id)
    assert failed.error is not None
    assert (failed.state, failed.error.error_class, failed.error.exit_code) == (
        "failed",
        "DumpError",
        44,
    )
    assert [n for n in files_in(setup.vm_dir("k")) if n.endswith(".partial")] == []


# ----------------------------------------------------------------------------- a full store


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (the test runs as root, as CI does), unmounted at the end: a filesystem
    that fills up for real, without filling the machine's."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(folder: Path) -> Path:
    """Fill ``folder``'s filesystem to the last byte; the file that does it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xff" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.bare
async def test_a_full_state_dir_never_leaves_a_job_running(
    small_fs: Path,
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 6: the store's filesystem fills during a dump: the job ends once space is back,
    health says what is wrong meanwhile (503 "degraded"), and a new request is a 503, not a
    500."""
    vm = await bare_vm(vm_factory, "fullstore", 1 * GiB)
    setup = write_config(tmp_path, {"f": vm.qmp_path}, state_dir=small_fs / "state")
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("f", DumpRequest(engine=EngineName.QEMU))

    async def writing() -> int | None:
        return (await svc.api.job(job.id)).progress.written or None

    await eventually(writing, "the dump under way", interval_s=0.02)
    filler = fill_up(small_fs)

    async def degraded() -> dict[str, object] | None:
        health = await curl(setup.api_socket, "GET", "/healthz")
        return health.body if health.status == 503 else None

    health = await eventually(degraded, "health saying the store is full", timeout_s=60)
    assert health["status"] == "degraded", health
    assert "job store cannot be written" in str(health["problem"]), health
    answer = await curl(setup.api_socket, "POST", "/v1/vms/f/dumps", "{}")
    assert answer.status == 503, answer
    assert "job store cannot be written" in answer.body["error"]["message"]
    assert svc.proc.returncode is None

    filler.unlink()
    done = await wait_job(svc.api, job.id, timeout_s=30)
    assert done.state == "succeeded", done
    health = (await curl(setup.api_socket, "GET", "/healthz")).body
    assert (health["status"], health["running_jobs"]) == ("ok", 0), health


# ----------------------------------------------------------------------------- start-up


async def test_api_socket_problems_at_start_up_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Item 13: a missing folder, a regular file at the path, an unknown group, a path over
    the 108 bytes of ``sun_path``: one line naming the problem, exit 2, no traceback."""
    (tmp_path / "regular").write_text("not a socket")
    cases = [
        (tmp_path / "missing" / "api.sock", None, "No such file or directory"),
        (tmp_path / "regular", None, "exists and is not a socket"),
        (tmp_path / ("a" * 120), None, "path too long"),
        (tmp_path / "api.sock", "no-such-group-qmpdump", "unknown group"),
    ]
    for socket_path, group, words in cases:
        setup = write_config(tmp_path, {"v": tmp_path / "absent.qmp"})
        if group:
            setup.config.write_text(
                setup.config.read_text().replace(
                    "[daemon]", f'[daemon]\napi_socket_group = "{group}"'
                )
            )
        text = setup.config.read_text().replace(str(setup.api_socket), str(socket_path))
        setup.config.write_text(text)
        code, out, err = await run_cli("daemon", "--config", str(setup.config), timeout_s=30)
        assert (code, out) == (2, ""), (socket_path, code, out, err)
        assert err.count("\n") == 1, err
        assert err.startswith("qmpdump: error: "), err
        assert words in err, err
    assert (tmp_path / "regular").read_text() == "not a socket"


# ----------------------------------------------------------------------------- never left paused


@pytest.mark.bare
async def test_a_cont_that_times_out_is_sent_again_until_it_lands(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    """Item 4: QEMU stopped (SIGSTOP) while a backend dump keeps the VM paused: the ``cont``
    times out, is sent again, and lands once QEMU runs again; the VM runs, the dump is whole."""
    vm = await bare_vm(vm_factory, "sigstop", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    out = tmp_path / "d.elf"
    cli = asyncio.create_task(
        run_cli(
            "dump",
            "--qmp",
            str(vm.qmp_path),
            "--engine",
            "backend",
            "-o",
            str(out),
            "--timeout",
            "3",
            timeout_s=120,
        )
    )

    await _until_paused(vm, cli)
    t0 = time.monotonic()
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(8.0)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    code, _out, err = await cli
    print(f"exit {code} {time.monotonic() - t0:.1f} s after SIGSTOP: {err}")
    # The cont was sent again until it landed; the dump itself may still fail on the QMP
    # commands that follow the copy (QEMU did not answer them in time), and then says so.
    assert "sending it again" in err
    assert await run_state(vm) == "running"
    assert code in (0, 24), err
    if code:
        assert err.count("qmpdump: error: ") == 1, err
        assert files_in(tmp_path) == []


async def _until_paused(vm: VM, dump: asyncio.Future[Any]) -> None:
    """Wait until the dump running in ``dump`` has paused the VM (it must not end first)."""

    async def paused() -> str | None:
        assert not dump.done(), dump.result()
        return "paused" if await run_state(vm) == "paused" else None

    await eventually(paused, "the dump pausing the VM", interval_s=0.005)


def _hold_copy(
    monkeypatch: pytest.MonkeyPatch, name: str = "copy_ops_into"
) -> tuple[threading.Event, threading.Event]:
    """Make the backend engine's copy (``copy_ops_into``, or ``write_kdump``) wait, in its
    thread, until the second event is set; the first is set once the copy has begun. The
    caller sets the second in a ``finally``."""
    began, release = threading.Event(), threading.Event()
    real = getattr(backend_engine, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        began.set()
        release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_engine, name, held)
    return began, release


@pytest.mark.bare
async def test_a_hung_output_disk_never_keeps_the_vm_paused(
    vm_factory: VMFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consistent backend dump whose writes hang (a dead NFS server, a failing disk): after
    the stall limit the VM is resumed while the copy thread is still stuck in the kernel; once
    the write returns, the dump ends as failed, nothing presented. A real disk cannot be made
    to hang on demand here, so the copy is replaced by one that blocks until released."""
    vm = await bare_vm(vm_factory, "hungdisk", 1 * GiB, backend=Backend.FILE, data=256 * MiB)
    _, release = _hold_copy(monkeypatch)
    monkeypatch.setattr(backend_engine, "STALL_S", 2.0)
    out = tmp_path / "d.elf"
    try:
        async with QMPSession(str(vm.qmp_path)) as session:
            dump = asyncio.create_task(run_dump(session, out, DumpSpec(engine=EngineName.BACKEND)))

            async def resumed() -> str | None:
                return "running" if await run_state(vm) == "running" else None

            await _until_paused(vm, dump)
            await eventually(resumed, "the VM resumed though the copy hangs", timeout_s=30)
            assert not dump.done()  # the stuck thread is still waited for (it holds the fds)
            release.set()
            with pytest.raises(DumpFailed, match="stood still"):
                await dump
    finally:
        release.set()
    assert await run_state(vm) == "running"
    assert files_in(tmp_path) == []


@pytest.mark.bare
@pytest.mark.parametrize(
    "case",
    [
        ("cont", DumpFormat.ELF, False),
        ("system_reset", DumpFormat.ELF, False),
        ("cont", DumpFormat.KDUMP, False),
        ("cont", DumpFormat.ELF, True),
    ],
    ids=["resumed", "reset", "resumed-kdump", "resumed-operator-paused"],
)
async def test_a_vm_changed_by_another_client_during_a_consistent_dump_leaves_no_dump(
    vm_factory: VMFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, DumpFormat, bool],
) -> None:
    """Another QMP client resumes or resets the VM while a consistent backend dump reads it,
    paused by the dump or by its operator before (a reset also discards all of virtio-mem's
    memory and reloads ROMs into RAM): what was copied is not the memory of one instant, so
    the dump fails and nothing is kept. QEMU is real; only the copy is held until the change
    has landed, so that the change falls inside the copy whatever the machine's speed."""
    change, fmt, paused_before = case
    vm = await bare_vm(
        vm_factory,
        f"changed-{change}",
        1 * GiB,
        backend=Backend.FILE,
        data=64 * MiB,
        no_reboot=False,
    )
    assert vm.qmp is not None
    if paused_before:
        await vm.qmp.execute("stop")  # the operator's own pause
    copying, changed = _hold_copy(
        monkeypatch, "copy_ops_into" if fmt is DumpFormat.ELF else "write_kdump"
    )
    heard_name = "RESUME" if change == "cont" else "RESET"
    out = tmp_path / "d.dump"
    try:
        async with QMPSession(str(vm.qmp_path)) as session:
            spec = DumpSpec(engine=EngineName.BACKEND, format=fmt)
            dump = asyncio.create_task(run_dump(session, out, spec))
            assert await asyncio.to_thread(copying.wait, 60)
            assert await run_state(vm) == "paused"
            with vm.qmp.listen("RESET", "RESUME") as heard:
                await vm.qmp.execute(change)
                assert (await heard.get()).event == heard_name
            changed.set()
            with pytest.raises(DumpFailed, match=f"changed while the dump .*\\b{heard_name}\\b"):
                await dump
    finally:
        changed.set()
    assert await run_state(vm) == "running"
    assert files_in(tmp_path) == []


@pytest.mark.bare
async def test_ctrl_c_twice_while_cont_is_sent_again_still_resumes_the_vm(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    """Cancel a consistent backend dump (Ctrl-C) while QEMU is stopped (SIGSTOP): the ``cont``
    times out and is sent again; a second cancel must not end that loop. Once QEMU runs again
    the VM is resumed, and only then does the dump end, cancelled."""
    vm = await bare_vm(vm_factory, "twice", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    async with QMPSession(str(vm.qmp_path), timeout_s=1.0) as session:
        dump = DumpTask(run_dump(session, tmp_path / "d.elf", DumpSpec(engine=EngineName.BACKEND)))

        await _until_paused(vm, dump.task)
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            dump.cancel()  # the first Ctrl-C: the copy stops, the cont times out
            await asyncio.sleep(2.5)
            dump.cancel()  # the second, while the cont is being sent again
            await asyncio.sleep(1.5)
            assert not dump.task.done()  # still sending its cont
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        with pytest.raises(DumpCancelled):
            await dump.result()
    assert await run_state(vm) == "running"
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------- a hung QEMU


@pytest.mark.bare
async def test_a_hung_qemu_map_is_504_a_stalled_dump_fails_and_cancel_is_prompt(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 10: QEMU stopped (SIGSTOP) during QEMU's engine: the map answers 504 with a
    reason; the dump fails after STALL_S without progress; a cancel ends a stalled dump within
    about 2 s; the VM runs again once QEMU does."""
    from qmpdump.engines.qemu import STALL_S  # noqa: PLC0415

    vm = await bare_vm(vm_factory, "hung", 2 * GiB)
    setup = write_config(tmp_path, {"h": vm.qmp_path}, qmp_timeout_s=2.0)
    svc = await daemons.start(setup, connected=1)
    stopped = False

    async def hang_during(job_id: str) -> None:
        nonlocal stopped
        await wait_job(svc.api, job_id, states=("running",))

        async def writing() -> int | None:
            job = await svc.api.job(job_id)
            return job.progress.written or None

        await eventually(writing, "QEMU writing the dump", interval_s=0.01)
        os.kill(vm.pid, signal.SIGSTOP)
        stopped = True

    try:
        first = await svc.api.request("h", DumpRequest(engine=EngineName.QEMU))
        await hang_during(first.id)
        t0 = time.monotonic()
        answer = await curl(setup.api_socket, "GET", "/v1/vms/h/map")
        print(f"map on a hung QEMU: {answer.status} after {time.monotonic() - t0:.1f} s")
        assert answer.status == 504, answer
        assert "did not answer" in answer.body["error"]["message"]
        failed = await wait_job(svc.api, first.id, timeout_s=STALL_S + 30)
        took = time.monotonic() - t0
        print(f"stalled dump ended {took:.1f} s after the hang: {failed.error}")
        assert failed.state == "failed", failed
        assert failed.error is not None
        assert "no progress" in failed.error.message
        os.kill(vm.pid, signal.SIGCONT)
        stopped = False
        assert await settled_state(vm) == "running"

        second = await svc.api.request("h", DumpRequest(engine=EngineName.QEMU))
        await hang_during(second.id)
        t0 = time.monotonic()
        await svc.api.cancel(second.id)
        cancelled = await wait_job(svc.api, second.id, timeout_s=30)
        took = time.monotonic() - t0
        print(f"cancel of a stalled dump: {cancelled.state} after {took:.2f} s")
        assert cancelled.state == "cancelled", cancelled
        assert took < 2.5, took
    finally:
        if stopped:
            os.kill(vm.pid, signal.SIGCONT)
    assert await settled_state(vm) == "running"
    assert [n for n in files_in(setup.vm_dir("h")) if n.endswith(".partial")] == []
    assert svc.proc.returncode is None


async def _raw_http(sock: Path, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange (what curl will not send): status, headers, body."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_aiohttps_own_400s_are_the_json_error(
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 13: requests aiohttp's HTTP parser rejects answer the documented JSON error, and
    the daemon logs no traceback for them (the fixture checks the log)."""
    setup = write_config(tmp_path, {"v": tmp_path / "absent.qmp"})
    svc = await daemons.start(setup)
    cases = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ]
    for request in cases:
        status, headers, body = await _raw_http(setup.api_socket, request)
        assert status == 400, (request[:40], status, body)
        assert headers["content-type"].startswith("application/json"), headers
        error = json.loads(body)["error"]
        assert error["status"] == 400
        assert error["message"].startswith("malformed HTTP request: "), error
    assert (await svc.api.health()).status == "ok"


# ----------------------------------------------------------------------------- -o edge cases


@pytest.mark.bare
async def test_the_output_target_is_checked_before_dumping(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    """Item 14: a name too long, a folder, a FIFO or a device node at the path (``--overwrite``
    or not), an unrelated ``FILE.json``: one line, exit 2, before any dump; nothing changed."""
    vm = await bare_vm(vm_factory, "target", 128 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    folder = out / "a-folder.elf"
    folder.mkdir()
    fifo = out / "a-fifo.elf"
    os.mkfifo(fifo)
    device = out / "a-device.elf"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    taken = out / "taken.elf"
    (out / "taken.elf.json").write_text("someone else's notes\n")
    cases = [
        (out / ("n" * 250 + ".elf"), [], "name is too long"),
        (folder, ["--overwrite"], "not a regular file"),
        (fifo, ["--overwrite"], "not a regular file"),
        (device, ["--overwrite"], "not a regular file"),
        (folder, [], "not a regular file"),
        (taken, [], "taken.elf.json exists already"),
    ]
    before = sorted(os.listdir(out))
    for target, extra, words in cases:
        code, stdout, err = await run_cli(
            "dump", "--qmp", str(vm.qmp_path), "--engine", "qemu", "-o", str(target), *extra
        )
        assert (code, stdout) == (2, ""), (target.name[:20], code, stdout, err)
        assert err.count("\n") == 1, err
        assert words in err, err
    assert sorted(os.listdir(out)) == before
    assert folder.is_dir()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert stat.S_ISCHR(device.lstat().st_mode)
    assert (out / "taken.elf.json").read_text() == "someone else's notes\n"
    assert os.listdir(folder) == []
    assert await settled_state(vm) == "running"


# ----------------------------------------------------------------------------- interrupts


async def test_ctrl_c_at_any_moment_of_start_up_is_no_traceback(tmp_path: Path) -> None:
    """Item 15: SIGINT in the first fraction of a second (while Python imports qmpdump) ends
    with "interrupted" and exit 130, never a traceback from qmpdump's code. The peer is a
    socket that never greets, so the command would otherwise wait."""
    path = tmp_path / "silent.qmp"

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(silent, path=str(path))
    try:
        for delay_s in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0):
            proc = await asyncio.create_subprocess_exec(
                QMPDUMP,
                "map",
                "--qmp",
                str(path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(delay_s)
            proc.send_signal(signal.SIGINT)
            _out, err = await asyncio.wait_for(proc.communicate(), 30)
            text = err.decode()
            print(f"SIGINT after {delay_s} s: exit {proc.returncode}, {text.strip()!r}")
            if text.startswith("Fatal Python error: init_import_site"):
                # Python's own start-up (site, .pth files), before any qmpdump code runs:
                # the interpreter's doing, outside what a program can handle.
                continue
            assert "Traceback" not in text, text
            assert proc.returncode in (130, -signal.SIGINT), (delay_s, proc.returncode, text)
            if proc.returncode == 130:
                assert text == "qmpdump: interrupted\n", text
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.bare
async def test_qemu_killed_mid_backend_dump_is_qemu_gone_at_once(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    """Item 15: QEMU SIGKILLed while the backend engine copies: exit 42 ("QEMU gone") within
    about a second, no output left."""
    vm = await bare_vm(vm_factory, "killed", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    cli = asyncio.create_task(
        run_cli(
            "dump",
            "--qmp",
            str(vm.qmp_path),
            "--engine",
            "backend",
            "-o",
            str(out / "d.elf"),
            timeout_s=120,
        )
    )

    await _until_paused(vm, cli)
    t0 = time.monotonic()
    os.kill(vm.pid, signal.SIGKILL)
    code, _out, err = await cli
    took = time.monotonic() - t0
    print(f"exit {code} {took:.2f} s after SIGKILL: {err.strip()}")
    assert code == 42, err
    assert err.count("\n") == 1, err
    assert "QEMU went away" in err
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------- reconnects


@pytest.mark.bare
async def test_a_queued_job_waits_for_the_reconnect_after_qemu_restarts(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 9: QEMU restarts on the same socket path while a dump runs and another waits: the
    running one fails (QEMU gone), the queued one waits for the reconnect and succeeds on the
    new QEMU."""
    first = await bare_vm(vm_factory, "restart-1", 2 * GiB)
    second = await bare_vm(vm_factory, "restart-2", 128 * MiB)
    link = tmp_path / "vm.qmp"
    link.symlink_to(first.qmp_path)
    setup = write_config(tmp_path, {"r": link}, default_engine=EngineName.QEMU)
    svc = await daemons.start(setup, connected=1)
    running = await svc.api.request("r")
    queued = await svc.api.request("r")
    await wait_job(svc.api, running.id, states=("running",))
    fresh = tmp_path / "vm.qmp.new"
    fresh.symlink_to(second.qmp_path)
    await first.stop()
    fresh.replace(link)
    gone = await wait_job(svc.api, running.id)
    assert gone.state == "failed", gone
    done = await wait_job(svc.api, queued.id)
    assert done.state == "succeeded", done
    assert done.result is not None
    assert sidecar(setup.vm_dir("r") / done.result.file)["vm"]["pid"] == second.pid


# ----------------------------------------------------------------------------- many jobs


def _seed_jobs(state_dir: Path, vms: list[str], finished: int, old: int) -> None:
    """Write ``finished`` finished jobs spread over ``vms`` into a fresh job store, ``old`` of
    them ended 40 days ago (as a long-running daemon's store would hold them)."""
    from qmpdump.service.store import STORE_FILE, JobError, JobState, JobStore  # noqa: PLC0415

    state_dir.mkdir(mode=0o700, parents=True)
    now = time.time()
    JobStore.in_state_dir(state_dir).close()  # created and migrated
    conn = sqlite3.connect(state_dir / STORE_FILE)
    err = JobError("x", "DumpFailed", 44)
    rows = [
        (
            f"{i:032x}",
            vms[i % len(vms)],
            "qemu",
            "elf",
            "consistent",
            JobState.FAILED.value,
            now - (40 * 86400 if i < old else 60),
            now - (40 * 86400 if i < old else 60),
            err.message,
            err.error_class,
            err.exit_code,
        )
        for i in range(finished)
    ]
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, vm, engine, format, mode, state, created, ended, "
            "error_message, error_class, error_exit_code) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
    conn.close()


async def test_many_jobs_are_counted_not_listed_and_pruned_by_age_and_count(
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 7: 40 VMs and 100,000 finished jobs: the old ones are pruned at start-up (by age,
    then down to JOB_KEEP_COUNT), and ``GET /v1/vms`` counts queued jobs on an index (its time
    is printed, not asserted: speed belongs in bench/)."""
    from qmpdump.service.jobs import JOB_KEEP_COUNT  # noqa: PLC0415

    vms = [f"vm{i:02d}" for i in range(40)]
    setup = write_config(tmp_path, {v: tmp_path / f"{v}.qmp" for v in vms})
    await asyncio.to_thread(_seed_jobs, setup.state_dir, vms, 100_000, 30_000)
    svc = await daemons.start(setup)

    async def pruned() -> int | None:
        n = len(await svc.api.jobs(limit=1000))
        return n if "pruned" in svc.log_text() else None

    await eventually(pruned, "the start-up prune", timeout_s=60)
    assert f"pruned {100_000 - JOB_KEEP_COUNT} finished job(s)" in svc.log_text()
    t0 = time.monotonic()
    for _ in range(10):
        assert len(await svc.api.vms()) == 40
    took_ms = (time.monotonic() - t0) / 10 * 1000
    print(f"GET /v1/vms, 40 VMs, {JOB_KEEP_COUNT} jobs kept: {took_ms:.1f} ms")
    health = await svc.api.health()
    assert health.queued_jobs == 0


# ----------------------------------------------------------------------------- connections


async def test_idle_connections_are_capped_and_new_clients_still_served(
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 11: 1,300 idle connections (more than the cap of a quarter of the daemon's fd
    limit, 1,024 at the unit's LimitNOFILE): the daemon holds at most the cap, a new client is
    served at once, the log says so in a few lines, and the idle ones are closed."""
    from qmpdump.service.api.unix import MAX_CONNECTIONS_CAP  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    setup = write_config(tmp_path, {"v": tmp_path / "absent.qmp"})
    svc = await daemons.start(setup)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(1300):
            held.append(await asyncio.open_unix_connection(str(setup.api_socket)))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        health = await curl(setup.api_socket, "GET", "/healthz")
        took = time.monotonic() - t0
        print(f"healthz with 1,300 idle connections open: {health.status} in {took * 1000:.0f} ms")
        assert health.status == 200, health
        fds = len(os.listdir(f"/proc/{svc.pid}/fd"))

        async def some_closed() -> int | None:
            return sum(reader.at_eof() for reader, _ in held) or None

        closed = await eventually(some_closed, "the daemon closing connections", timeout_s=30)
        print(f"daemon fds: {fds}; connections the daemon closed: {closed}")
        assert fds <= MAX_CONNECTIONS_CAP + 64, fds
        # The excess goes: closed at the cap (or by the idle timeout, when opening 1,300 took
        # longer than it on a loaded machine; the rest wait in the listen backlog); the cap
        # says so in a few lines, not one a connection.
        assert closed >= 1, closed
        assert svc.log_text().count("over the cap") <= 5
    finally:
        for _, writer in held:
            writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ----------------------------------------------------------------------------- discovery


@pytest.mark.bare
async def test_a_socket_that_appears_later_is_discovered(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 17: ``[[discover]]`` globs are expanded again while the daemon runs: a QMP socket
    created after start-up becomes a VM, connects, and can be dumped."""
    sockets = tmp_path / "qmp"
    sockets.mkdir()
    setup = write_config(tmp_path, {}, default_engine=EngineName.QEMU)
    with setup.config.open("a") as f:
        f.write(f'\n[[discover]]\nglob = "{sockets}/*.qmp"\nname_from = "stem"\n')
    svc = await daemons.start(setup)
    assert await svc.api.vms() == []
    vm = await bare_vm(vm_factory, "late", 128 * MiB)
    (sockets / "late.qmp").symlink_to(vm.qmp_path)
    t0 = time.monotonic()

    async def connected() -> str | None:
        views = await svc.api.vms()
        return "up" if views and views[0].connection == "connected" else None

    await eventually(connected, "the late socket discovered and connected", timeout_s=20)
    print(f"discovered and connected {time.monotonic() - t0:.1f} s after the socket appeared")
    assert [v.name for v in await svc.api.vms()] == ["late"]
    job = await svc.api.request("late")
    done = await wait_job(svc.api, job.id)
    assert done.state == "succeeded", done


@pytest.mark.bare
async def test_a_pause_the_operator_undid_is_not_ours_to_undo_after_a_restart(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Item 5: the journal still holds a pause of ours (a ``cont`` of ours that never landed);
    the operator resumes the VM, later pauses it themselves; the daemon restarts: it leaves the
    operator's pause alone (a RESUME it did not cause cleared the journal)."""
    from qmpdump.host.procfs import process_start_ticks  # noqa: PLC0415
    from qmpdump.service.store import JobStore  # noqa: PLC0415

    vm = await bare_vm(vm_factory, "operator", 128 * MiB)
    assert vm.qmp is not None
    setup = write_config(tmp_path, {"o": vm.qmp_path})
    svc = await daemons.start(setup, connected=1)
    await vm.qmp.execute("stop")  # as our dump's stop would have
    with JobStore.in_state_dir(setup.state_dir) as store:
        store.journal_pause(
            "o", str(vm.qmp_path), None, qemu_pid=vm.pid, qemu_start=process_start_ticks(vm.pid)
        )
    await vm.qmp.execute("cont")  # the operator resumes it

    async def cleared() -> bool | None:
        # The journal is cleared first, then the line is logged: wait for both.
        with JobStore.in_state_dir(setup.state_dir) as store:
            if store.pending_pauses():
                return None
        return True if "resumed by someone else" in svc.log_text() else None

    await eventually(cleared, "the foreign RESUME clearing the pause journal", timeout_s=10)
    await vm.qmp.execute("stop")  # the operator's own pause
    assert await daemons.stop(svc) == 0
    again = await daemons.start(setup, connected=1)
    await asyncio.sleep(1.0)
    assert await run_state(vm) == "paused"
    assert "resumed, the daemon had paused it" not in again.log_text()
