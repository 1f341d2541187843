"""The operator's commands as clients of the API: ``qmpdump vms|request|jobs|job|cancel|dumps``.

The installed ``qmpdump`` console script runs as a subprocess and speaks real HTTP over a real
UNIX socket to the API served in this test process. The core behind the API is the in-memory
fake of :mod:`tests.test_api` (the daemon core is tested end to end elsewhere with real QEMU):
it lets a job be walked through queued -> running -> an outcome on purpose, one step per
``GET /v1/jobs/{id}``, so that ``request --wait`` can be held to each exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines.spec import DumpFormat, EngineName, Mode
from qmpdump.service.api import make_app, serve_unix, stop_serving
from qmpdump.service.views import DumpRequest, JobView

from .clirun import QMPDUMP, run_cli
from .test_api import FakeCore, Served, as_core, dumped


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    core = FakeCore()
    sock = tmp_path / "api.sock"
    runner = await serve_unix(make_app(as_core(core)), sock, mode=0o660)
    try:
        yield Served(core, sock)
    finally:
        await stop_serving(runner, sock)
    assert not sock.exists()


async def cli(served: Served, *args: str) -> tuple[int, str, str]:
    return await run_cli(*args, "--socket", str(served.sock))


async def cli_json(served: Served, *args: str) -> Any:
    code, out, err = await cli(served, *args, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def one_line(text: str) -> str:
    assert text.endswith("\n")
    assert text.count("\n") == 1, text
    return text.strip()


# ----------------------------------------------------------------------------- listings


async def test_vms(served: Served) -> None:
    views = list(served.core.vm_views.values())
    assert await cli_json(served, "vms") == dumped(views)
    code, out, err = await cli(served, "vms")
    assert (code, err) == (0, "")
    header, web1, db1 = out.splitlines()
    assert header.split()[:3] == ["NAME", "QMP", "RUN"]
    assert web1.split()[:4] == ["web1", "connected", "running", "8.2.2"]
    assert "auto/elf/consistent" in web1
    assert db1.startswith("db1 ")
    assert db1.endswith("no socket at /run/qemu/db1.qmp")


async def test_the_socket_comes_from_the_environment(served: Served) -> None:
    code, out, _ = await run_cli("vms", "--json", env={"QMPDUMP_SOCKET": str(served.sock)})
    assert code == 0
    assert [v["name"] for v in json.loads(out)] == ["web1", "db1"]


async def test_jobs_job_and_dumps(served: Served) -> None:
    core = served.core
    done = core.add_job(
        "web1",
        "succeeded",
        result={
            "file": "web1-x.elf",
            "size": 3 << 30,
            "sha256": "ef" * 32,
            "engine": "backend",
            "paused_s": None,
        },
    )
    failed = core.add_job(
        "db1", "failed", error={"message": "QEMU went away", "error_class": "QEMUGone"}
    )
    assert await cli_json(served, "jobs") == dumped([failed, done])
    assert await cli_json(
        served, "jobs", "--vm", "web1", "--state", "succeeded", "--limit", "3"
    ) == (dumped([done]))
    assert core.last_call() == ("jobs", ("web1", "succeeded", 3))
    code, out, _ = await cli(served, "jobs")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "VM", "STATE"]
    assert lines[1].split()[:3] == [failed.id, "db1", "failed"]
    assert lines[1].endswith("QEMU went away")
    assert lines[2].split()[:3] == [done.id, "web1", "succeeded"]
    assert "3 GiB" in lines[2]
    assert lines[2].endswith("web1-x.elf")

    assert await cli_json(served, "job", done.id) == done.model_dump(mode="json")
    code, out, _ = await cli(served, "job", done.id)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line)
    assert fields["state"] == "succeeded"
    assert fields["sha256"] == "ef" * 32

    assert await cli_json(served, "dumps") == dumped(core.dump_views)
    assert await cli_json(served, "dumps", "--vm", "db1") == dumped(core.dump_views[1:])
    code, out, _ = await cli(served, "dumps")
    assert code == 0
    assert out.splitlines()[1].split()[:4] == ["web1", "web1-20240501T110000Z.elf", "1", "GiB"]


async def test_empty_listings(served: Served) -> None:
    served.core.dump_views.clear()
    assert await cli(served, "jobs") == (0, "no jobs\n", "")
    assert await cli(served, "dumps") == (0, "no dumps\n", "")
    assert await cli_json(served, "jobs") == []


# ----------------------------------------------------------------------------- request


async def test_request_without_wait_prints_the_queued_job(served: Served) -> None:
    doc = await cli_json(served, "request", "web1", "--engine", "qemu", "--format", "kdump-zlib")
    job = JobView.model_validate(doc)
    assert (job.state, job.engine, job.format) == ("queued", "qemu", "kdump-zlib")
    assert served.core.calls == [
        ("submit", ("web1", DumpRequest(engine=EngineName.QEMU, format=DumpFormat.KDUMP_ZLIB)))
    ]
    code, out, _ = await cli(served, "request", "web1", "--live")
    assert code == 0
    assert out.startswith("job ")
    assert "queued" in out
    assert served.core.last_call() == ("submit", ("web1", DumpRequest(mode=Mode.LIVE)))


async def test_request_wait_follows_the_job_to_success(served: Served) -> None:
    code, out, err = await cli(served, "request", "web1", "--wait", "--json")
    assert (code, err) == (0, "")
    final = JobView.model_validate_json(out)
    assert final.state == "succeeded"
    # queued (the POST) -> running -> succeeded: one GET per step, every 0.5 s
    assert [method for method, _ in served.core.calls] == ["submit", "job", "job"]
    assert served.core.job_views[final.id] == final

    code, out, err = await cli(served, "request", "web1", "--wait")
    assert (code, err) == (0, "")
    assert "succeeded" in out
    assert "web1-20240501T120000Z.elf" in out


@pytest.mark.parametrize(
    ("outcome", "exit_code", "words"),
    [
        ("failed", 43, "failed: no space left on /var/lib/qmpdump"),
        ("failed-bare", 44, "failed: something broke"),
        ("cancelled", 41, "cancelled: cancelled by the operator"),
    ],
)
async def test_request_wait_exits_with_the_jobs_outcome(
    served: Served, outcome: str, exit_code: int, words: str
) -> None:
    served.core.outcome["web1"] = outcome
    code, out, err = await cli(served, "request", "web1", "--wait", "--json")
    assert code == exit_code
    assert JobView.model_validate_json(out).state == outcome.partition("-")[0]
    line = one_line(err)
    assert line.startswith("qmpdump: error: job ")
    assert line.endswith(words)


async def test_ctrl_c_stops_waiting_but_not_the_job(served: Served) -> None:
    served.core.outcome["web1"] = "never"
    proc = await asyncio.create_subprocess_exec(
        QMPDUMP,
        "request",
        "web1",
        "--wait",
        "--socket",
        str(served.sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            await served.core.wait_for_calls("job", 2)  # it is waiting, and polling
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    line = one_line(err.decode())
    assert "stopped waiting" in line
    assert "goes on in the daemon" in line
    assert out == b""
    (job,) = served.core.job_views.values()
    assert job.state == "running"
    assert "cancel" not in [method for method, _ in served.core.calls]


async def test_the_progress_bar_goes_to_a_terminal_on_stderr(served: Served) -> None:
    """With stderr a terminal (a pty here), ``--wait`` draws a bar there; stdout stays JSON."""
    main_fd, sub_fd = os.openpty()
    drawn = bytearray()
    loop = asyncio.get_running_loop()

    def drain() -> None:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the last writer has gone
            chunk = b""
        if chunk:
            drawn.extend(chunk)
        else:
            loop.remove_reader(main_fd)

    loop.add_reader(main_fd, drain)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                QMPDUMP,
                "request",
                "web1",
                "--wait",
                "--json",
                "--socket",
                str(served.sock),
                stdout=asyncio.subprocess.PIPE,
                stderr=sub_fd,
                env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
            )
        finally:
            os.close(sub_fd)  # the child has its copy
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        drain()
    finally:
        loop.remove_reader(main_fd)
        os.close(main_fd)
    assert proc.returncode == 0
    assert JobView.model_validate_json(out).state == "succeeded"
    text = drawn.decode(errors="replace")
    assert "web1 running" in text
    assert "GiB" in text


async def test_job_wait_follows_an_existing_job(served: Served) -> None:
    job = await served.core.submit("web1", DumpRequest())
    code, out, _ = await cli(served, "job", job.id, "--wait", "--json")
    assert code == 0
    assert JobView.model_validate_json(out).state == "succeeded"


# ----------------------------------------------------------------------------- cancel


async def test_cancel(served: Served) -> None:
    served.core.outcome["web1"] = "never"
    job = await served.core.submit("web1", DumpRequest())
    doc = await cli_json(served, "cancel", job.id)
    assert JobView.model_validate(doc).state == "cancelled"
    assert served.core.last_call() == ("cancel", (job.id,))
    code, out, err = await cli(served, "cancel", job.id)  # already cancelled: 409
    assert code == 52
    assert out == ""
    assert one_line(err) == f"qmpdump: error: job {job.id} already cancelled; nothing to cancel"


# ----------------------------------------------------------------------------- errors


async def test_unknown_vm_exits_51_with_one_line(served: Served) -> None:
    for args in (("request", "nope"), ("jobs", "--vm", "nope"), ("dumps", "--vm", "nope")):
        code, out, err = await cli(served, *args)
        assert code == 51
        assert out == ""
        assert one_line(err) == "qmpdump: error: no VM named 'nope'"
    code, _, err = await cli(served, "job", "0123")
    assert (code, one_line(err)) == (51, "qmpdump: error: no job '0123'")


async def test_busy_vm_exits_52_and_unconnected_vm_53(served: Served) -> None:
    served.core.busy.add("web1")
    code, _, err = await cli(served, "request", "web1")
    assert (code, one_line(err)) == (52, "qmpdump: error: VM 'web1' already has a dump queued")
    served.core.raise_in["vms"] = RuntimeError("boom")
    code, _, err = await cli(served, "vms")
    assert code == 50
    assert "internal error" in one_line(err)


async def test_daemon_not_running(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    for args in (("vms",), ("request", "web1", "--wait"), ("cancel", "x"), ("dumps", "--json")):
        code, out, err = await run_cli(*args, "--socket", str(sock))
        assert code == 53
        assert out == ""
        assert one_line(err) == f"qmpdump: error: is the daemon running? no socket at {sock}"


async def test_bad_arguments_exit_2(served: Served) -> None:
    for args in (
        ("jobs", "--limit", "0"),
        ("jobs", "--state", "bogus"),
        ("request", "web1", "--engine", "gdb"),
        ("request", "web1", "--live", "--consistent"),
        ("request",),
    ):
        code, out, err = await cli(served, *args)
        assert code == 2, args
        assert out == ""
        assert "usage:" in err
    assert served.core.calls == []
