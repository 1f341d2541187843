"""The daemon end to end: ``qmpdump daemon`` as a real subprocess, real HTTP over its UNIX socket,
real QEMU.

Every test writes a TOML configuration in ``tmp_path`` (API socket, dump folder and state folder
there too), starts the installed ``qmpdump daemon --config FILE`` with its output in a log file,
and speaks to it with :class:`~qmpdump.service.client.ApiClient` and ``curl --unix-socket``. The
:func:`daemons` fixture always stops what it started (SIGTERM, then SIGKILL by pid), checks that
a daemon stopped by SIGTERM exited 0 and removed its socket, that no daemon logged a traceback,
and prints the logs (pytest shows them when a test fails).

The VMs are bare testbed VMs (QEMU at reset, no kernel; ``cont`` runs SeaBIOS when a *running*
VM matters). A dump that must last long enough to be interrupted is made long by the VM's size:
QEMU's engine reads all of RAM, the backend engine reads what the host wrote into a file
backend (written away from the memory SeaBIOS uses: below 64 MiB and the top 64 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qmpdump.engines.spec import DumpFormat, EngineName, Mode
from qmpdump.errors import Conflict, NotFound, Unavailable, UsageError
from qmpdump.service.client import ApiClient
from qmpdump.service.views import ConnectionState, DumpRequest, JobView, VMView
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VMSpec

from .clirun import QMPDUMP, run_cli
from .conftest import VMFactory

FINISHED = ("succeeded", "failed", "cancelled")
#: where host-written data starts in a bare VM's RAM (SeaBIOS lives below, and at the top)
DATA_START = 64 * MiB
_T = TypeVar("_T")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Setup:
    """A configuration file and the paths it names."""

    config: Path
    api_socket: Path
    dump_dir: Path
    state_dir: Path

    def vm_dir(self, vm: str) -> Path:
        """The folder the service keeps a VM's dumps in."""
        return self.dump_dir / vm


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string for what we write
    raise TypeError(f"no TOML for {value!r}")


def write_config(
    tmp_path: Path,
    vms: Mapping[str, Path | str],
    *,
    name: str = "qmpdump.toml",
    retention: Mapping[str, object] | None = None,
    **daemon: object,
) -> Setup:
    """A daemon configuration in ``tmp_path``: its API socket, dumps and state there too."""
    setup = Setup(
        config=tmp_path / name,
        api_socket=tmp_path / "api.sock",
        dump_dir=tmp_path / "dumps",
        state_dir=tmp_path / "state",
    )
    keys: dict[str, object] = {
        "api_socket": setup.api_socket,
        "api_socket_mode": "0600",
        "dump_dir": setup.dump_dir,
        "state_dir": setup.state_dir,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "qmp_timeout_s": 10.0,
        "shutdown_grace_s": 10.0,
        "watchdog": False,
    }
    keys.update(daemon)
    lines = ["[daemon]", *(f"{k} = {_toml(v)}" for k, v in keys.items())]
    if retention:
        lines += ["", "[retention]", *(f"{k} = {_toml(v)}" for k, v in retention.items())]
    for vm, qmp in vms.items():
        lines += ["", "[[vm]]", f"name = {_toml(vm)}", f"qmp = {_toml(qmp)}"]
    setup.config.write_text("\n".join(lines) + "\n")
    return setup


# ----------------------------------------------------------------------------- the daemon process


@dataclass
class Service:
    """One ``qmpdump daemon`` process."""

    setup: Setup
    proc: asyncio.subprocess.Process
    log: Path
    api: ApiClient
    #: the exit code its stop must give; None once it was killed on purpose
    expected_exit: int | None = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


class Daemons:
    """Starts daemons for one test and always stops them; see :func:`daemons`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.services: list[Service] = []

    async def start(self, setup: Setup, *, connected: int = 0, timeout_s: float = 20.0) -> Service:
        """Start a daemon on ``setup``; return once ``/healthz`` answers ``ok`` and at least
        ``connected`` VMs are connected."""
        log = self.tmp_path / f"daemon-{len(self.services)}.log"
        fd = _open_log(log)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        try:
            proc = await asyncio.create_subprocess_exec(
                QMPDUMP,
                "daemon",
                "--config",
                str(setup.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
            )
        finally:
            os.close(fd)
        service = Service(setup, proc, log, ApiClient(setup.api_socket, timeout_s=10.0))
        self.services.append(service)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.returncode is not None:
                raise AssertionError(
                    f"the daemon exited with {proc.returncode} at start:\n{service.log_text()}"
                )
            with contextlib.suppress(Unavailable):
                health = await service.api.health()
                if health.status == "ok" and health.connected >= connected:
                    return service
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the daemon was not ready (and {connected} VM(s) connected) within "
                    f"{timeout_s:g} s:\n{service.log_text()}"
                )
            await asyncio.sleep(0.05)

    async def stop(self, service: Service, *, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL by pid; the exit code."""
        await service.api.close()
        proc = service.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.pid, signal.SIGKILL)
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode

    async def kill(self, service: Service) -> None:
        """SIGKILL by pid, as a crash would; the daemon is expected to leave things behind."""
        service.expected_exit = None
        await service.api.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGKILL)
        await service.proc.wait()

    async def close(self) -> list[str]:
        """Stop every daemon still running; the problems found."""
        problems: list[str] = []
        for service in self.services:
            running = service.proc.returncode is None
            code = await self.stop(service)
            text = service.log_text()
            print(f"----- {service.log.name} (pid {service.pid}, exit {code}) -----\n{text}")
            if service.expected_exit is None:
                continue
            if code != service.expected_exit:
                problems.append(f"{service.log.name}: exit {code}, not {service.expected_exit}")
            if running and service.setup.api_socket.exists():
                problems.append(f"{service.log.name}: left its socket behind")
            if "Traceback" in text:
                problems.append(f"{service.log.name}: logged a traceback")
        # The dumps are large (and guest memory): they go; the configuration and logs stay.
        for setup in {s.setup for s in self.services}:
            shutil.rmtree(setup.dump_dir, ignore_errors=True)
            shutil.rmtree(setup.state_dir, ignore_errors=True)
        sockets = [p for p in self.tmp_path.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
        problems.extend(f"socket left behind: {p}" for p in sockets)
        return problems


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    """Start daemons with ``await daemons.start(setup)``; all are stopped when the test ends."""
    owner = Daemons(tmp_path)
    try:
        yield owner
    finally:
        problems = await owner.close()
    assert not problems, "; ".join(problems)


# ----------------------------------------------------------------------------- helpers


async def eventually(
    check: Callable[[], Awaitable[_T | None]],
    what: str,
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
) -> _T:
    """Poll ``check`` until it returns something other than None (or fail, naming ``what``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(interval_s)


async def wait_job(
    api: ApiClient, job_id: str, states: tuple[str, ...] = FINISHED, timeout_s: float = 60.0
) -> JobView:
    """The job once it is in one of ``states``."""

    async def check() -> JobView | None:
        job = await api.job(job_id)
        return job if job.state in states else None

    return await eventually(check, f"job {job_id} in {states}", timeout_s=timeout_s)


async def wait_written(api: ApiClient, job_id: str) -> JobView:
    """The job once it runs and has written something (a dump well under way)."""

    async def check() -> JobView | None:
        job = await api.job(job_id)
        assert job.state in ("queued", "running"), job
        return job if job.state == "running" and job.progress.written > 0 else None

    return await eventually(check, f"job {job_id} running with progress", timeout_s=60.0)


async def run_state(vm: VM) -> str:
    """The VM's run state, asked over the testbed's own QMP session."""
    assert vm.qmp is not None
    return str((await vm.qmp.execute("query-status"))["status"])


async def settled_state(vm: VM, timeout_s: float = 10.0) -> str:
    """The run state once QEMU has left ``save-vm`` (it resumes just after a dump)."""

    async def check() -> str | None:
        state = await run_state(vm)
        return None if state == "save-vm" else state

    return await eventually(check, "QEMU out of save-vm", timeout_s=timeout_s, interval_s=0.02)


async def bare_vm(
    vm_factory: VMFactory,
    name: str,
    ram_size: int,
    *,
    backend: Backend = Backend.DEFAULT,
    data: int = 0,
    running: bool = True,
    no_reboot: bool = True,
) -> VM:
    """A bare VM; ``data`` bytes written by the host into its file-backed RAM; then ``cont``.
    ``no_reboot=False``: a ``system_reset`` resets it instead of ending QEMU."""
    spec = VMSpec(
        name=name, guest=False, ram_size=ram_size, ram_backend=backend, no_reboot=no_reboot
    )
    vm = await vm_factory(spec)
    assert vm.qmp is not None
    if data:
        assert backend is Backend.FILE
        assert DATA_START + data <= ram_size - 64 * MiB, "keep clear of SeaBIOS's memory"
        await asyncio.to_thread(fill, vm.backing_file("ram0"), DATA_START, data)
    if running:
        await vm.qmp.execute("cont")
        assert await run_state(vm) == "running"
    return vm


def fill(path: Path, offset: int, size: int) -> None:
    """Write ``size`` bytes of a non-zero pattern at ``offset`` of a backing file."""
    chunk = (bytes(range(1, 256)) * (64 * MiB // 255 + 1))[: 64 * MiB]
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            done += os.pwrite(fd, chunk[: min(len(chunk), size - done)], offset + done)
    finally:
        os.close(fd)


def files_in(folder: Path) -> list[str]:
    """File names in a folder (partials and sidecars included), sorted; [] if it is missing."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sidecar(dump: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(dump.with_name(dump.name + ".json").read_text())
    return record


def interval(record: Mapping[str, Any]) -> tuple[datetime, datetime]:
    """A sidecar's started and ended times (milliseconds)."""
    return datetime.fromisoformat(record["started"]), datetime.fromisoformat(record["ended"])


def check_dump_name(job: JobView, ext: str = "elf") -> str:
    """The service's name of a succeeded job's dump: ``VM-STAMP-IDTAIL.EXT``."""
    assert job.result is not None
    pattern = rf"{re.escape(job.vm)}-\d{{8}}T\d{{6}}Z-{job.id[-8:]}\.{ext}"
    assert re.fullmatch(pattern, job.result.file), job.result.file
    return job.result.file


@dataclass
class CurlAnswer:
    status: int
    body: Any


async def curl(sock: Path, method: str, url: str, body: str | None = None) -> CurlAnswer:
    """One request with ``curl --unix-socket``: the status and the JSON body."""
    args = ["--silent", "--show-error", "--unix-socket", str(sock), "-X", method]
    args += ["--write-out", "\n%{http_code}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", body]
    proc = await asyncio.create_subprocess_exec(
        "curl",
        *args,
        f"http://qmpdump{url}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    text, _, status = out.decode().rpartition("\n")
    return CurlAnswer(int(status), json.loads(text))


@dataclass
class Snapshots:
    """The states of a set of jobs, polled over the API: one list (in job order) per poll."""

    ids: list[str]
    seen: list[list[str]] = field(default_factory=list)

    async def follow(self, api: ApiClient, *, timeout_s: float = 120.0) -> list[JobView]:
        """Poll until every job has finished; the final views, in job order."""
        deadline = time.monotonic() + timeout_s
        while True:
            by_id = {j.id: j for j in await api.jobs(limit=1000)}
            jobs = [by_id[i] for i in self.ids]
            self.seen.append([j.state for j in jobs])
            if all(j.state in FINISHED for j in jobs):
                return jobs
            assert time.monotonic() < deadline, f"jobs still not finished: {self.seen[-1]}"
            await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- jobs


@pytest.mark.bare
async def test_two_vms_dump_in_parallel(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    # a: the backend engine reads 384 MiB the host wrote; b: QEMU's engine reads all of 384 MiB.
    a = await bare_vm(vm_factory, "par-a", 1 * GiB, backend=Backend.FILE, data=384 * MiB)
    b = await bare_vm(vm_factory, "par-b", 384 * MiB)
    setup = write_config(
        tmp_path, {"a": a.qmp_path, "b": b.qmp_path}, max_concurrent_dumps=2, default_format="elf"
    )
    svc = await daemons.start(setup, connected=2)
    api = svc.api

    job_a = await api.request("a", DumpRequest(engine=EngineName.BACKEND))
    job_b = await api.request("b", DumpRequest(engine=EngineName.QEMU))
    follow = Snapshots([job_a.id, job_b.id])
    job_a, job_b = await follow.follow(api)
    assert ["running", "running"] in follow.seen, follow.seen
    assert (job_a.state, job_b.state) == ("succeeded", "succeeded"), (job_a, job_b)
    assert job_a.result is not None
    assert job_b.result is not None
    assert (job_a.result.engine, job_b.result.engine) == ("backend", "qemu")

    # Files named by the service, 0600, in 0700 folders, each with its sidecar.
    assert mode_of(setup.dump_dir) == 0o700
    listed = {(d.vm, d.file): d for d in await api.dumps()}
    records = {}
    for job in (job_a, job_b):
        assert job.result is not None
        name = check_dump_name(job)
        folder = setup.vm_dir(job.vm)
        assert mode_of(folder) == 0o700
        assert files_in(folder) == [name, f"{name}.json"]
        dump = folder / name
        assert mode_of(dump) == 0o600
        assert mode_of(folder / f"{name}.json") == 0o600
        assert dump.stat().st_size == job.result.size
        assert await asyncio.to_thread(sha256_of, dump) == job.result.sha256
        record = sidecar(dump)
        assert (record["sha256"], record["engine"]) == (job.result.sha256, job.result.engine)
        records[job.vm] = record
        view = listed.pop((job.vm, name))
        assert (view.size, view.sha256, view.job_id) == (
            job.result.size,
            job.result.sha256,
            job.id,
        )
    assert not listed
    # Both ran at once: their intervals (the sidecars' milliseconds) overlap.
    (a_start, a_end), (b_start, b_end) = interval(records["a"]), interval(records["b"])
    assert a_start < b_end
    assert b_start < a_end
    assert await run_state(a) == "running"
    assert await settled_state(b) == "running"


@pytest.mark.bare
async def test_a_vm_configured_for_kdump_gets_our_kdump_file(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    """The daemon's config names a kdump format: the backend engine writes the kdump file."""
    vm = await bare_vm(vm_factory, "kd", 512 * MiB, backend=Backend.FILE, data=64 * MiB)
    setup = write_config(tmp_path, {"kd": vm.qmp_path}, default_format="kdump-lzo")
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("kd", DumpRequest())
    (job,) = await Snapshots([job.id]).follow(svc.api)
    assert job.state == "succeeded", job
    assert job.result is not None
    assert (job.format, job.result.engine) == ("kdump-lzo", "backend")
    name = check_dump_name(job, "kdump")
    dump = setup.vm_dir("kd") / name
    assert dump.read_bytes()[:8] == b"KDUMP   "
    assert mode_of(dump) == 0o600
    record = sidecar(dump)
    assert (record["format"], record["request"]["codec"]) == ("kdump-lzo", "lzo")
    assert record["sha256"] == job.result.sha256 == await asyncio.to_thread(sha256_of, dump)
    assert job.progress.completed == job.progress.total  # guest bytes read, of those to read
    assert await run_state(vm) == "running"


@pytest.mark.bare
async def test_requests_on_one_vm_run_fifo_one_at_a_time_and_retention_keeps_two(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    vm = await bare_vm(vm_factory, "queue", 512 * MiB, backend=Backend.FILE, data=256 * MiB)
    setup = write_config(
        tmp_path,
        {"q": vm.qmp_path},
        max_concurrent_dumps=2,
        default_engine=EngineName.BACKEND,
        retention={"keep_count": 2},
    )
    svc = await daemons.start(setup, connected=1)
    api = svc.api

    ids = [(await api.request("q")).id for _ in range(3)]
    follow = Snapshots(ids)
    jobs = await follow.follow(api)
    assert [j.state for j in jobs] == ["succeeded"] * 3, jobs

    # Every poll saw: the finished ones first, then at most one running, then the queued ones.
    shape = re.compile(r"(succeeded )*(running )?(queued )*")
    for states in follow.seen:
        assert shape.fullmatch("".join(f"{s} " for s in states)), follow.seen
    # ... and each job in turn was seen running, in the order they were asked for.
    running = [ids[states.index("running")] for states in follow.seen if "running" in states]
    assert list(dict.fromkeys(running)) == ids, follow.seen
    for before, after in itertools.pairwise(jobs):
        assert before.ended is not None
        assert after.started is not None
        assert before.ended <= after.started  # no overlap

    # Retention (keep_count = 2): the oldest dump and its sidecar are gone, the newest two stay.
    names = [check_dump_name(j) for j in jobs]
    folder = setup.vm_dir("q")
    assert files_in(folder) == sorted([*names[1:], *(f"{n}.json" for n in names[1:])])
    assert [(d.file, d.job_id) for d in await api.dumps("q")] == [
        (names[1], ids[1]),
        (names[2], ids[2]),
    ]
    # The job of the deleted dump keeps its record.
    assert (await api.job(ids[0])).result is not None
    assert await run_state(vm) == "running"


@pytest.mark.bare
async def test_progress_of_a_compressed_qemu_dump_goes_through_the_middle_to_100(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    # kdump-zlib writes far fewer bytes than it covers: the job's percentage is guest bytes
    # done of guest bytes to do (QEMU's counters), never bytes written against that total.
    vm = await bare_vm(vm_factory, "kdprog", 2 * GiB, backend=Backend.FILE, data=1 * GiB)
    setup = write_config(
        tmp_path, {"k": vm.qmp_path}, default_engine=EngineName.QEMU, default_format="kdump-zlib"
    )
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("k")
    seen: list[JobView] = []

    async def check() -> JobView | None:
        view = await svc.api.job(job.id)
        seen.append(view)
        return view if view.state in FINISHED else None

    done = await eventually(check, "the kdump job finished", timeout_s=120.0, interval_s=0.2)
    assert done.state == "succeeded", done
    assert done.result is not None
    final = done.progress
    assert final.total is not None
    assert final.completed == final.total >= 2 * GiB - 64 * MiB  # all RAM, as QEMU counts it
    assert final.written == done.result.size < final.total // 2  # compressed
    middle = [
        v.progress
        for v in seen
        if v.state == "running" and v.progress.total and 0 < v.progress.completed < v.progress.total
    ]
    assert middle, [v.progress for v in seen]
    fractions = [p.completed / (p.total or 1) for p in middle]
    assert fractions == sorted(fractions)
    assert any(p.written < p.completed for p in middle)


@pytest.mark.bare
async def test_cancel_running_queued_and_finished_jobs(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    # QEMU's engine reads all 2 GiB: several seconds, cancelled well before the end.
    vm = await bare_vm(vm_factory, "cancel", 2 * GiB)
    setup = write_config(tmp_path, {"c": vm.qmp_path}, default_engine=EngineName.QEMU)
    svc = await daemons.start(setup, connected=1)
    api = svc.api

    first = await api.request("c")
    second = await api.request("c")
    await wait_written(api, first.id)
    assert (await api.job(second.id)).state == "queued"
    assert (await api.vm("c")).running_job == first.id

    # A queued job: cancelled at once, never started.
    queued = await api.cancel(second.id)
    assert queued.state == "cancelled"
    assert queued.started is None
    assert queued.error is not None
    assert queued.error.message == "cancelled before it started"

    # The running one: the answer is the job as it is; it ends cancelled shortly after.
    t0 = time.monotonic()
    answer = await api.cancel(first.id)
    assert answer.id == first.id
    assert answer.state in ("running", "cancelled")
    done = await wait_job(api, first.id, timeout_s=20)
    took = time.monotonic() - t0
    assert done.state == "cancelled", done
    assert done.error is not None
    assert done.error.error_class == "DumpCancelled"
    assert done.result is None
    assert took < 10, f"the cancel took {took:.1f} s"

    # Finished jobs cannot be cancelled: 409, from ApiClient and from curl alike.
    for job_id in (first.id, second.id):
        with pytest.raises(Conflict, match="already cancelled"):
            await api.cancel(job_id)
        answer_409 = await curl(setup.api_socket, "DELETE", f"/v1/jobs/{job_id}")
        assert answer_409.status == 409
        assert answer_409.body["error"]["status"] == 409

    # Nothing on disk, nothing listed, the VM runs again.
    assert files_in(setup.vm_dir("c")) == []
    assert await api.dumps() == []
    assert await settled_state(vm) == "running"
    view = await api.vm("c")
    assert view.running_job is None
    assert view.queued_jobs == 0


async def kill_while_paused_by_a_dump(daemons: Daemons, svc: Service, vm: VM) -> str:
    """Ask ``svc`` for a consistent dump, SIGKILL it once the dump has paused the VM; the job id.

    The backend engine keeps the VM paused while it copies: about 1 s for the 1.5 GiB the test
    writes (measured here: 1.5 GB/s), against a poll of the run state every 10 ms through the
    testbed's own QMP session; the kill lands early in the copy.
    """
    job = await svc.api.request("k", DumpRequest(engine=EngineName.BACKEND, mode=Mode.CONSISTENT))

    async def paused_by_the_dump() -> str | None:
        if await run_state(vm) == "paused":
            return "paused"
        state = (await svc.api.job(job.id)).state
        assert state in ("queued", "running"), f"the dump ended ({state}) before it paused the VM"
        return None

    await eventually(paused_by_the_dump, "the dump pausing the VM", interval_s=0.01)
    await daemons.kill(svc)
    return job.id


async def check_failed_by_the_restart(api: ApiClient, job_id: str) -> None:
    failed = await api.job(job_id)
    assert failed.state == "failed", failed
    assert failed.error is not None
    assert failed.error.message == "daemon restarted during the dump"
    # In the CLI's terms: a dump that did not complete (issue 11, item 8).
    assert (failed.error.error_class, failed.error.exit_code) == ("DumpError", 44)
    assert failed.result is None


@pytest.mark.bare
async def test_sigkill_during_a_consistent_dump_then_restart_resumes_the_vm(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    vm = await bare_vm(vm_factory, "sigkill", 2 * GiB, backend=Backend.FILE, data=1536 * MiB)
    setup = write_config(tmp_path, {"k": vm.qmp_path})
    folder = setup.vm_dir("k")
    svc = await daemons.start(setup, connected=1)
    first = await kill_while_paused_by_a_dump(daemons, svc, vm)

    # The crash left the VM paused (what the pause journal is for) and a partial file.
    assert await run_state(vm) == "paused"
    partials = [n for n in files_in(folder) if n.endswith(".partial")]
    assert len(partials) == 1, files_in(folder)
    assert setup.api_socket.exists()  # stale: nobody serves it
    await asyncio.sleep(1.0)
    assert await run_state(vm) == "paused"

    # Restart on the same configuration: the VM runs again, the job failed, no partial left.
    t0 = time.monotonic()
    again = await daemons.start(setup)

    async def running() -> str | None:
        return "running" if await run_state(vm) == "running" else None

    await eventually(running, "the VM resumed after the restart", timeout_s=5, interval_s=0.02)
    print(f"the VM ran again {time.monotonic() - t0:.2f} s after the restart began")
    await check_failed_by_the_restart(again.api, first)
    assert files_in(folder) == []
    assert await again.api.dumps() == []
    log = again.log_text()
    assert f"job {first} of VM k failed: the daemon restarted during it" in log
    assert "VM k: resumed, the daemon had paused it before a restart" in log
    assert f"{partials[0]}, left by a crash" in log

    # Once more, and this time a dump is asked for the moment the restarted daemon answers: it
    # must not start on the VM the crash left paused (it would leave it paused, and be resumed
    # under by the journal), but on the resumed VM, which it pauses itself.
    second = await kill_while_paused_by_a_dump(daemons, again, vm)
    assert await run_state(vm) == "paused"
    third = await daemons.start(setup)
    follow_up = await third.api.request(
        "k", DumpRequest(engine=EngineName.BACKEND, mode=Mode.CONSISTENT)
    )
    done = await wait_job(third.api, follow_up.id)
    assert done.state == "succeeded", done
    assert done.result is not None
    # paused_s is the time the dump's own stop/cont kept the VM paused; None had it found the
    # VM paused already.
    assert done.result.paused_s is not None
    assert sidecar(folder / done.result.file)["request"]["mode"] == "consistent"
    await check_failed_by_the_restart(third.api, second)
    assert await run_state(vm) == "running"
    assert files_in(folder) == [done.result.file, f"{done.result.file}.json"]


# ----------------------------------------------------------------------------- connections


@pytest.mark.bare
async def test_qemu_restarted_under_the_daemon_is_reconnected(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    first = await bare_vm(vm_factory, "restart-a", 128 * MiB)
    link = tmp_path / "vm.qmp"
    link.symlink_to(first.qmp_path)
    setup = write_config(tmp_path, {"r": link}, default_engine=EngineName.QEMU)
    svc = await daemons.start(setup, connected=1)
    api = svc.api

    view = await api.vm("r")
    assert (view.connection, view.pid, view.reason) == (ConnectionState.CONNECTED, first.pid, None)
    assert view.run_state == "running"
    assert view.qmp == str(link)

    await first.stop()

    async def disconnected() -> VMView | None:
        v = await api.vm("r")
        return v if v.connection is not ConnectionState.CONNECTED else None

    down = await eventually(disconnected, "the daemon noticing QEMU is gone", timeout_s=10)
    assert down.reason
    # While the socket dangles the daemon keeps trying, and says why it is not connected.
    await asyncio.sleep(1.5)
    still = await api.vm("r")
    assert still.connection is not ConnectionState.CONNECTED
    assert still.reason is not None
    assert still.reason.endswith("no QMP socket at this path (is QEMU running?)"), still.reason
    health = await api.health()
    assert (health.status, health.connected) == ("ok", 0)

    second = await bare_vm(vm_factory, "restart-b", 128 * MiB)
    tmp_link = tmp_path / "vm.qmp.new"
    tmp_link.symlink_to(second.qmp_path)
    tmp_link.replace(link)

    async def reconnected() -> VMView | None:
        v = await api.vm("r")
        return v if v.connection is ConnectionState.CONNECTED and v.pid == second.pid else None

    up = await eventually(reconnected, "the daemon reconnecting to the new QEMU", timeout_s=10)
    assert up.reason is None
    assert up.run_state == "running"
    # The operator's CLI, waiting for the outcome: a dump with the VM's defaults.
    sock = str(setup.api_socket)
    code, out, err = await run_cli("request", "r", "--wait", "--json", "--socket", sock)
    assert code == 0, err
    done = JobView.model_validate_json(out)
    assert done.state == "succeeded", done
    assert done.result is not None
    assert done.result.engine == "qemu"
    assert sidecar(setup.vm_dir("r") / done.result.file)["vm"]["pid"] == second.pid
    assert await settled_state(second) == "running"


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.bare
async def test_bad_requests_are_4xx_and_never_break_the_daemon(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    vm = await bare_vm(vm_factory, "badreq", 128 * MiB, running=False)
    setup = write_config(tmp_path, {"v": vm.qmp_path})
    svc = await daemons.start(setup, connected=1)
    api = svc.api
    unknown_job = "0" * 32

    # Through the typed client.
    with pytest.raises(NotFound, match="no VM named 'nope'"):
        await api.request("nope")
    with pytest.raises(NotFound, match="no VM named 'nope'"):
        await api.vm("nope")
    with pytest.raises(NotFound, match="no job"):
        await api.job(unknown_job)
    with pytest.raises(NotFound, match="no job"):
        await api.cancel(unknown_job)
    with pytest.raises(UsageError, match="does not write 'win-dmp'"):
        await api.request("v", DumpRequest(engine=EngineName.BACKEND, format=DumpFormat.WIN_DMP))
    with pytest.raises(UsageError, match="does not write 'kdump-zstd'"):
        await api.request("v", DumpRequest(engine=EngineName.QEMU, format=DumpFormat.KDUMP_ZSTD))
    with pytest.raises(UsageError, match="live mode"):
        await api.request("v", DumpRequest(engine=EngineName.QEMU, mode=Mode.LIVE))

    # Through curl, including what the client would never send.
    sock = setup.api_socket
    cases: list[tuple[str, str, str | None, int, str]] = [
        ("POST", "/v1/vms/nope/dumps", "{}", 404, "no VM named"),
        ("POST", "/v1/vms/v/dumps", '{"path": "/etc/shadow"}', 400, "path"),
        ("POST", "/v1/vms/v/dumps", '{"engine":"backend","format":"win-dmp"}', 400, "win-dmp"),
        ("POST", "/v1/vms/v/dumps", '{"engine":"qemu","mode":"live"}', 400, "live"),
        ("POST", "/v1/vms/v/dumps", "{not json", 400, "not JSON"),
        ("POST", "/v1/vms/v/dumps", "[1, 2]", 400, "JSON object"),
        ("POST", "/v1/vms/v/dumps", '{"engine": "fast"}', 400, "engine"),
        ("GET", f"/v1/jobs/{unknown_job}", None, 404, "no job"),
        ("DELETE", f"/v1/jobs/{unknown_job}", None, 404, "no job"),
        ("GET", "/v1/jobs?state=lost", None, 400, "state"),
        ("GET", "/v1/dumps?vm=nope", None, 404, "no VM named"),
    ]
    for method, url, body, status, words in cases:
        answer = await curl(sock, method, url, body)
        assert answer.status == status, (method, url, body, answer)
        error = answer.body["error"]
        assert error["status"] == status
        assert words in error["message"] + json.dumps(error["fields"]), (url, body, error)
    fields = (await curl(sock, "POST", "/v1/vms/v/dumps", '{"path": "/x"}')).body["error"]
    assert [f["field"] for f in fields["fields"]] == ["path"]

    # Through the operator's CLI: one line each, the exit code of the error.
    sock_arg = ("--socket", str(sock))
    for argv, want_code, words in [
        (["request", "nope"], 51, "no VM named 'nope'"),
        (["request", "v", "--engine", "qemu", "--live"], 2, "live mode"),
        (["request", "v", "--engine", "backend", "--format", "win-dmp"], 2, "not write"),
        (["job", unknown_job], 51, "no job"),
        (["cancel", unknown_job], 51, "no job"),
        (["dumps", "--vm", "nope"], 51, "no VM named 'nope'"),
    ]:
        code, out, err = await run_cli(*argv, *sock_arg)
        assert (code, out) == (want_code, ""), (argv, code, out, err)
        assert err.count("\n") == 1, err
        assert err.startswith("qmpdump: error: ")
        assert words in err, err

    # No job was created, the daemon is healthy, and it logged no traceback.
    assert await api.jobs() == []
    health = await api.health()
    assert (health.status, health.connected, health.queued_jobs) == ("ok", 1, 0)
    log = svc.log_text()
    assert "Traceback" not in log
    assert "internal error" not in log


# ----------------------------------------------------------------------------- SIGTERM


@pytest.mark.bare
@pytest.mark.parametrize(("engine", "grace_s"), [("qemu", 1.0), ("backend", 0.3)])
async def test_sigterm_cancels_a_long_dump_at_the_grace_deadline(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path, engine: str, grace_s: float
) -> None:
    # QEMU's engine: QEMU pauses the VM and resumes it when the dump fails; it reads 2 GiB
    # through a pipe (several seconds). The backend engine (consistent): the daemon paused the
    # VM itself and must resume it on its way out; it copies 2.75 GiB (about 2 s at 1.5 GB/s),
    # so its grace is shorter.
    if engine == "qemu":
        vm = await bare_vm(vm_factory, "term-qemu", 2 * GiB)
    else:
        vm = await bare_vm(
            vm_factory, "term-backend", 3 * GiB, backend=Backend.FILE, data=2816 * MiB
        )
    setup = write_config(
        tmp_path, {"t": vm.qmp_path}, default_engine=engine, shutdown_grace_s=grace_s
    )
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("t")
    await wait_written(svc.api, job.id)
    assert await run_state(vm) == ("save-vm" if engine == "qemu" else "paused")

    t0 = time.monotonic()
    code = await daemons.stop(svc)
    took = time.monotonic() - t0
    assert code == 0, svc.log_text()
    assert grace_s <= took < 10, f"the daemon took {took:.1f} s to stop with a {grace_s} s grace"
    assert not setup.api_socket.exists()
    assert files_in(setup.vm_dir("t")) == []
    assert await settled_state(vm) == "running"
    assert f"waiting up to {grace_s:g} s for 1 running dump(s)" in svc.log_text()

    again = await daemons.start(setup, connected=1)
    ended = await again.api.job(job.id)
    assert ended.state == "cancelled", ended
    assert ended.error is not None
    assert ended.error.error_class == "DumpCancelled"
    assert "cancel" in ended.error.message
    assert await again.api.dumps() == []
    assert files_in(setup.vm_dir("t")) == []
    log = again.log_text()
    assert "left by a crash" not in log
    assert "restarted during" not in log
    assert "had paused it" not in log  # the pause journal was cleared on the way out


@pytest.mark.bare
async def test_sigterm_lets_a_short_dump_finish_within_the_grace(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    vm = await bare_vm(vm_factory, "term-short", 1 * GiB, backend=Backend.FILE, data=768 * MiB)
    setup = write_config(
        tmp_path, {"s": vm.qmp_path}, default_engine=EngineName.BACKEND, shutdown_grace_s=60.0
    )
    svc = await daemons.start(setup, connected=1)
    # The dump must still run when SIGTERM arrives, whatever the machine's speed: QEMU is held
    # (SIGSTOP) so the job waits on its first QMP answer, and let go once the daemon said it
    # waits for the dump. A copy that finished first would leave nothing to wait for.
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        job = await svc.api.request("s")
        await wait_job(svc.api, job.id, ("running",))
        os.kill(svc.pid, signal.SIGTERM)

        async def waits() -> bool | None:
            return "waiting up to 60 s for 1 running dump(s)" in svc.log_text() or None

        await eventually(waits, "the daemon waits for the running dump", timeout_s=5.0)
    finally:
        os.kill(vm.pid, signal.SIGCONT)

    code = await daemons.stop(svc)
    assert code == 0, svc.log_text()
    assert not setup.api_socket.exists()
    assert await run_state(vm) == "running"

    again = await daemons.start(setup)
    done = await again.api.job(job.id)
    assert done.state == "succeeded", done
    name = check_dump_name(done)
    assert files_in(setup.vm_dir("s")) == [name, f"{name}.json"]
    assert [d.file for d in await again.api.dumps()] == [name]


# ----------------------------------------------------------------------------- start-up


async def test_start_up_removes_partials_refuses_a_second_daemon_and_bad_configs(
    daemons: Daemons, tmp_path: Path
) -> None:
    # The VM's QMP socket does not exist: the daemon serves all the same, and says why. A
    # partial file its own store does not name is not its to remove (another daemon may share
    # the dump folder; its own crash's partials are removed, see the SIGKILL test).
    setup = write_config(tmp_path, {"gone": tmp_path / "no-such.qmp"})
    folder = setup.vm_dir("gone")
    folder.mkdir(parents=True, mode=0o700)
    (folder / "gone-20240101T000000Z-deadbeef.elf.partial").write_bytes(b"half a dump")
    (folder / "keep.elf").write_bytes(b"not ours to remove")

    svc = await daemons.start(setup)
    assert files_in(folder) == ["gone-20240101T000000Z-deadbeef.elf.partial", "keep.elf"]
    assert "left by a crash" not in svc.log_text()
    view = await svc.api.vm("gone")
    assert view.connection is not ConnectionState.CONNECTED
    assert view.reason
    for d in (setup.dump_dir, setup.state_dir, folder):
        assert mode_of(d) == 0o700
    assert mode_of(setup.api_socket) == 0o600

    # A second daemon on the same state folder (its own socket): one line, non-zero, nothing
    # of the first one touched.
    other = tmp_path / "other"
    other.mkdir()
    second = write_config(other, {"gone": tmp_path / "no-such.qmp"})
    text = second.config.read_text().replace(str(other / "state"), str(setup.state_dir))
    second.config.write_text(text)
    code, out, err = await run_cli("daemon", "--config", str(second.config), timeout_s=30)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1, err
    assert err.startswith("qmpdump: error: another qmpdump daemon holds ")
    assert str(setup.state_dir / "daemon.lock") in err
    assert "Traceback" not in err
    assert not second.api_socket.exists()
    assert (await svc.api.health()).status == "ok"

    # A bad configuration: one line naming the key, exit 2, with or without --check.
    bad = tmp_path / "bad.toml"
    text = setup.config.read_text().replace("shutdown_grace_s", "shutdown_grace")
    bad.write_text(text)
    for extra in ([], ["--check"]):
        code, out, err = await run_cli("daemon", "--config", str(bad), *extra)
        assert code == 2, (code, out, err)
        assert out == ""
        assert err.count("\n") == 1, err
        assert f"{bad}: daemon.shutdown_grace: unknown key" in err
        assert "did you mean 'shutdown_grace_s'?" in err
    bad.write_text(
        setup.config.read_text().replace("reconnect_min_s = 0.2", 'reconnect_min_s = "0.2"')
    )
    code, _out, err = await run_cli("daemon", "--config", str(bad))
    assert code == 2
    assert err.count("\n") == 1, err
    assert "daemon.reconnect_min_s" in err
    code, out, err = await run_cli("daemon", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert err.count("\n") == 1, err
    assert "missing.toml" in err

    # The good one checks out.
    code, out, err = await run_cli("daemon", "--config", str(setup.config), "--check")
    assert (code, err) == (0, "")
    assert out == f"{setup.config}: valid; 1 VM(s): gone\n"
