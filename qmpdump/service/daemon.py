"""The qmpdump daemon: VMs kept connected, a durable FIFO of dump jobs, the API, systemd.

Lifecycle (:meth:`Daemon.run`), in a fixed order:

1. start: take the single-instance lock on ``state_dir``; open the job store; fail the jobs a
   crash left ``running``; remove ``.partial`` files under ``dump_dir``; start one
   :class:`~qmpdump.service.supervisor.VMSupervisor` per VM; the scheduler; the API socket;
   ``READY=1``. A VM the daemon had paused (journalled before ``stop``) is resumed as soon as its
   supervisor connects, if it is still paused, before any job gets the connection (a dump
   started first would find the VM paused, leave it so, and be resumed under).
2. run: jobs start in FIFO order, one at a time per VM, at most ``max_concurrent_dumps`` at once;
   after each success the VM's retention is applied.
3. SIGTERM/SIGINT: ``STOPPING=1``; the API stops accepting; running dumps get
   ``shutdown_grace_s`` to finish, then are cancelled (the engines resume what they paused);
   queued jobs stay queued for the next start; supervisors disconnect; the socket is removed;
   exit 0.

One :class:`asyncio.TaskGroup` owns every long-lived task.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qmpdump import __version__
from qmpdump.engines.backend import BackendDumpRequest
from qmpdump.engines.qemu import Progress, QemuDumpRequest
from qmpdump.engines.run import DumpOutcome, run_dump
from qmpdump.engines.snapshot import SnapshotDumpRequest
from qmpdump.errors import (
    Conflict,
    DumpCancelled,
    NotFound,
    QmpdumpError,
    Unavailable,
    UsageError,
)
from qmpdump.output import PARTIAL_SUFFIX, sidecar_path
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.service import sdnotify
from qmpdump.service.config import Config, ResolvedVM
from qmpdump.service.retention import retention_victims
from qmpdump.service.store import Job, JobError, JobResult, JobState, JobStore
from qmpdump.service.supervisor import VMSupervisor
from qmpdump.service.views import (
    ConnectionState,
    DumpRequest,
    DumpView,
    HealthView,
    JobErrorView,
    JobResultView,
    JobView,
    ProgressView,
    VMView,
)
from qmpdump.survey import survey

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

#: Jobs one VM may have waiting; one more is a 409.
MAX_QUEUED_PER_VM = 16
_PROGRESS_EVERY_S = 1.0
_EXTENSIONS = {"elf": "elf", "win-dmp": "dmp"}


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _dump_name(vm: str, job_id: str, fmt: str, now: float) -> str:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    ext = _EXTENSIONS.get(fmt, "kdump" if fmt.startswith("kdump") else fmt)
    return f"{vm}-{stamp}-{job_id[-8:]}.{ext}"


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Metrics:
    dumps: dict[tuple[str, str], int] = field(default_factory=dict)  # (vm, result) -> count
    bytes_total: dict[str, int] = field(default_factory=dict)
    duration_sum: dict[str, float] = field(default_factory=dict)
    paused_sum: dict[str, float] = field(default_factory=dict)

    def count(self, vm: str, result: str) -> None:
        self.dumps[vm, result] = self.dumps.get((vm, result), 0) + 1

    def done(self, vm: str, outcome: DumpOutcome) -> None:
        self.bytes_total[vm] = self.bytes_total.get(vm, 0) + outcome.size
        self.duration_sum[vm] = self.duration_sum.get(vm, 0.0) + outcome.duration_s
        self.paused_sum[vm] = self.paused_sum.get(vm, 0.0) + (outcome.paused_s or 0.0)


class Daemon:
    """The service core (implements :class:`qmpdump.service.views.ServiceCore`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.daemon
        self.resolved: list[ResolvedVM] = config.resolve_vms()
        if not self.resolved:
            raise UsageError("the configuration names no VM (no [[vm]], no socket discovered)")
        self.supervisors = {
            vm.name: VMSupervisor(
                vm, self.settings, on_connect=self._resume_journaled_hook(vm.name)
            )
            for vm in self.resolved
        }
        self.store: JobStore | None = None
        self.running: dict[str, _Running] = {}
        self.metrics_data = _Metrics()
        self.stopping = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock_fd = -1

    # ------------------------------------------------------------------ lifecycle

    def _prepare_dirs(self) -> None:
        for folder in (self.settings.state_dir, self.settings.dump_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        for vm in self.resolved:
            vm.dump_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            vm.dump_dir.chmod(0o700)

    def _take_lock(self) -> None:
        path = self.settings.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise UsageError(f"another qmpdump daemon holds {path}") from err
        self._lock_fd = fd

    def _remove_partials(self) -> list[Path]:
        removed = []
        for vm in self.resolved:
            for partial in vm.dump_dir.glob(f"*{PARTIAL_SUFFIX}"):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        return removed

    def setup(self) -> None:
        """Everything before the tasks start (synchronous, fails fast with UsageError)."""
        os.umask(0o077)  # dumps, sidecars, the job store: nobody else's business
        self._prepare_dirs()
        self._take_lock()
        self.store = JobStore.in_state_dir(self.settings.state_dir)
        for job in self.store.recover_after_crash():
            log.warning("job %s of VM %s failed: the daemon restarted during it", job.id, job.vm)
            self.metrics_data.count(job.vm, "failed")
        for partial in self._remove_partials():
            log.warning("removed %s, left by a crash", partial)

    def request_stop(self) -> None:
        """Begin the shutdown (the signal handlers call this)."""
        self._stop.set()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        from qmpdump.service.api import make_app, serve_unix, stop_serving  # noqa: PLC0415

        self.setup()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        runner = None
        try:
            async with asyncio.TaskGroup() as group:
                sup_tasks = [
                    group.create_task(s.run(), name=f"vm-{s.vm.name}")
                    for s in self.supervisors.values()
                ]
                scheduler = group.create_task(self._schedule(), name="scheduler")
                watchdog = group.create_task(self._watchdog(), name="watchdog")
                runner = await serve_unix(
                    make_app(self),
                    self.settings.api_socket,
                    mode=self.settings.api_socket_mode,
                    group=self.settings.api_socket_group,
                )
                sdnotify.notify("READY=1", f"STATUS=serving {len(self.resolved)} VM(s)")
                log.info("qmpdump %s serving on %s", __version__, self.settings.api_socket)
                await self._stop.wait()
                sdnotify.notify("STOPPING=1", "STATUS=stopping")
                self.stopping = True
                await stop_serving(runner, self.settings.api_socket)
                runner = None
                await self._drain()
                for task in (*sup_tasks, scheduler, watchdog):
                    task.cancel()
        finally:
            if runner is not None:
                await stop_serving(runner, self.settings.api_socket)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.store is not None:
                self.store.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
        return 0

    async def _drain(self) -> None:
        """Let running dumps finish for ``shutdown_grace_s``, then cancel them and wait."""
        tasks = [r.task for r in self.running.values()]
        if not tasks:
            return
        log.info(
            "waiting up to %g s for %d running dump(s)", self.settings.shutdown_grace_s, len(tasks)
        )
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        for r in self.running.values():
            r.cancel.set()
        if pending:
            await asyncio.wait(pending)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval_s() if self.settings.watchdog else None
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _resume_journaled_hook(self, name: str) -> Callable[[QMPSession], Awaitable[None]]:
        async def hook(session: QMPSession) -> None:
            await self._resume_journaled(name, session)
            self._wake.set()  # jobs queued while the VM was away may start

        return hook

    async def _resume_journaled(self, name: str, session: QMPSession) -> None:
        """Resume the VM if the daemon paused it and could not resume it (a crash, a lost
        connection); called on a new session before jobs may use it."""
        assert self.store is not None
        for pause in self.store.pending_pauses():
            if pause.vm != name or pause.job_id in self.running:
                continue
            try:
                status = await session.execute("query-status")
                if status.get("status") == "paused":
                    await session.execute("cont")
                    log.warning(
                        "VM %s: resumed, the daemon had paused it before a restart", pause.vm
                    )
                self.store.clear_pause(pause.vm)
            except QmpdumpError as err:
                log.warning("VM %s: could not check the journalled pause: %s", pause.vm, err)

    # ------------------------------------------------------------------ jobs

    async def _schedule(self) -> None:
        assert self.store is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self.stopping and len(self.running) < self.settings.max_concurrent_dumps:
                busy = {r.job.vm for r in self.running.values()}
                job = self.store.next_queued(busy=busy)
                if job is None:
                    break
                job = self.store.mark_running(job.id)
                task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
                self.running[job.id] = _Running(job, task)

    async def _run_job(self, job: Job) -> None:
        assert self.store is not None
        store = self.store
        running = self.running[job.id]
        vm = next(v for v in self.resolved if v.name == job.vm)
        last = 0.0

        def progress(p: Progress) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                store.update_progress(job.id, p.written, p.total or None)

        def on_pause() -> None:
            store.journal_pause(vm.name, vm.qmp, job.id)

        def on_resume() -> None:
            store.clear_pause(vm.name)

        try:
            session = await self._session_for(vm.name, running.cancel)
            target = vm.dump_dir / _dump_name(vm.name, job.id, job.format, time.time())
            outcome = await run_dump(
                session,
                target,
                engine=job.engine,
                qemu=QemuDumpRequest(format=job.format),
                backend=BackendDumpRequest(
                    live=job.mode == "live", on_pause=on_pause, on_resume=on_resume
                ),
                snapshot=SnapshotDumpRequest(on_pause=on_pause, on_resume=on_resume),
                progress=progress,
                cancel=running.cancel,
                timeout_s=self.settings.dump_timeout_s,
            )
        except DumpCancelled as err:
            store.finish(job.id, JobState.CANCELLED, error=JobError.from_exception(err))
            self.metrics_data.count(vm.name, "cancelled")
        except QmpdumpError as err:
            store.finish(job.id, JobState.FAILED, error=JobError.from_exception(err))
            self.metrics_data.count(vm.name, "failed")
        except Exception as err:
            log.exception("job %s failed unexpectedly", job.id)
            store.finish(job.id, JobState.FAILED, error=JobError.from_exception(err))
            self.metrics_data.count(vm.name, "failed")
        else:
            store.update_progress(job.id, outcome.size, outcome.size)
            store.finish(
                job.id,
                JobState.SUCCEEDED,
                result=JobResult(
                    outcome.path, outcome.size, outcome.sha256, outcome.engine, outcome.paused_s
                ),
            )
            store.record_dump(
                vm.name,
                outcome.path,
                outcome.size,
                time.time(),
                sha256=outcome.sha256,
                job_id=job.id,
            )
            self.metrics_data.count(vm.name, "succeeded")
            self.metrics_data.done(vm.name, outcome)
            self._apply_retention(vm)
        finally:
            self.running.pop(job.id, None)
            self._wake.set()

    async def _session_for(self, name: str, cancel: asyncio.Event) -> QMPSession:
        """The VM's session once connected (up to qmp_timeout_s); a cancel ends the wait."""
        connected = asyncio.create_task(
            self.supervisors[name].wait_connected(self.settings.qmp_timeout_s)
        )
        cancelled = asyncio.create_task(cancel.wait())
        try:
            await asyncio.wait({connected, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connected, cancelled):
                task.cancel()
            await asyncio.wait({connected, cancelled})
        if connected.cancelled():
            raise DumpCancelled(f"cancelled while waiting for VM {name} to connect")
        return connected.result()

    def _apply_retention(self, vm: ResolvedVM) -> None:
        assert self.store is not None
        victims = retention_victims(
            self.store.dumps(vm.name), vm.retention.keep_count, vm.retention.keep_bytes
        )
        for dump in victims:
            dump.path.unlink(missing_ok=True)
            sidecar_path(dump.path).unlink(missing_ok=True)
            self.store.forget_dump(dump.path)
            log.info("retention: removed %s", dump.path)

    # ------------------------------------------------------------------ ServiceCore

    def _supervisor(self, name: str) -> VMSupervisor:
        sup = self.supervisors.get(name)
        if sup is None:
            raise NotFound(f"no VM named {name!r}")
        return sup

    def _vm_view(self, sup: VMSupervisor) -> VMView:
        assert self.store is not None
        vm = sup.vm
        running = next((r.job.id for r in self.running.values() if r.job.vm == vm.name), None)
        return VMView(
            name=vm.name,
            qmp=vm.qmp,
            origin=vm.origin,
            connection=sup.state,
            reason=sup.reason,
            run_state=sup.run_state,
            qemu_version=sup.qemu_version,
            pid=sup.pid,
            running_job=running,
            queued_jobs=len(self.store.list(vm=vm.name, state=JobState.QUEUED, limit=1000)),
            default_engine=vm.engine,
            default_format=vm.format,
            default_mode=vm.mode,
        )

    def vms(self) -> list[VMView]:
        return [self._vm_view(s) for s in self.supervisors.values()]

    def vm(self, name: str) -> VMView:
        return self._vm_view(self._supervisor(name))

    async def vm_map(self, name: str) -> MapReport:
        session = self._supervisor(name).require_session()
        return (await survey(session)).report()

    def submit(self, name: str, request: DumpRequest) -> JobView:
        assert self.store is not None
        if self.stopping:
            raise Unavailable("the daemon is shutting down")
        vm = self._supervisor(name).vm
        engine = request.engine or vm.engine
        fmt = request.format or vm.format
        mode = request.mode or vm.mode
        if engine in ("backend", "snapshot") and fmt != "elf":
            raise UsageError(f"the {engine} engine writes ELF only, not {fmt!r}")
        if engine == "snapshot" and mode == "live":
            raise UsageError("live mode is for the backend engine (a snapshot is one instant)")
        if engine == "qemu" and mode == "live":
            raise UsageError("live mode is for the backend engine (QEMU pauses the VM to dump)")
        if len(self.store.list(vm=name, state=JobState.QUEUED, limit=1000)) >= MAX_QUEUED_PER_VM:
            raise Conflict(f"VM {name} is busy: {MAX_QUEUED_PER_VM} dumps are already waiting")
        job = self.store.create(name, engine, fmt, mode)
        self._wake.set()
        return self._job_view(job)

    def _job_view(self, job: Job) -> JobView:
        return JobView(
            id=job.id,
            vm=job.vm,
            engine=job.engine,  # type: ignore[arg-type]
            format=job.format,
            mode=job.mode,  # type: ignore[arg-type]
            state=job.state.value,
            created=_iso(job.created) or "",
            started=_iso(job.started),
            ended=_iso(job.ended),
            progress=ProgressView(written=job.written, total=job.total),
            result=None
            if job.result is None
            else JobResultView(
                file=job.result.path.name,
                size=job.result.size,
                sha256=job.result.sha256,
                engine=job.result.engine,
                paused_s=job.result.paused_s,
            ),
            error=None
            if job.error is None
            else JobErrorView(
                message=job.error.message,
                error_class=job.error.error_class,
                exit_code=job.error.exit_code,
            ),
        )

    def jobs(self, vm: str | None, state: str | None, limit: int) -> list[JobView]:
        assert self.store is not None
        if vm is not None:
            self._supervisor(vm)
        try:
            wanted = None if state is None else JobState(state)
        except ValueError as err:
            raise UsageError(f"no job state {state!r}") from err
        return [self._job_view(j) for j in self.store.list(vm=vm, state=wanted, limit=limit)]

    def job(self, job_id: str) -> JobView:
        assert self.store is not None
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return self._job_view(job)

    def cancel(self, job_id: str) -> JobView:
        assert self.store is not None
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if job.finished:
            raise Conflict(f"job {job_id} has already {job.state.value}")
        running = self.running.get(job_id)
        if running is not None:
            running.cancel.set()
            return self._job_view(job)
        err = JobError(
            message="cancelled before it started", error_class="DumpCancelled", exit_code=41
        )
        return self._job_view(self.store.finish(job_id, JobState.CANCELLED, error=err))

    def dumps(self, vm: str | None) -> list[DumpView]:
        assert self.store is not None
        if vm is not None:
            self._supervisor(vm)
        return [
            DumpView(
                vm=d.vm,
                file=d.path.name,
                size=d.size,
                created=_iso(d.created) or "",
                sha256=d.sha256,
                job_id=d.job_id,
            )
            for d in self.store.dumps(vm)
        ]

    def health(self) -> HealthView:
        assert self.store is not None
        sups = self.supervisors.values()
        return HealthView(
            status="stopping" if self.stopping else "ok",
            version=__version__,
            vms=len(self.supervisors),
            connected=sum(s.state is ConnectionState.CONNECTED for s in sups),
            running_jobs=len(self.running),
            queued_jobs=len(self.store.list(state=JobState.QUEUED, limit=100000)),
        )

    def metrics(self) -> str:
        return "".join(self._metric_lines())

    def _metric_lines(self) -> Iterator[str]:
        m = self.metrics_data
        yield "# HELP qmpdump_dumps_total Dump jobs ended, by VM and result.\n"
        yield "# TYPE qmpdump_dumps_total counter\n"
        for (vm, result), n in sorted(m.dumps.items()):
            yield f'qmpdump_dumps_total{{vm="{vm}",result="{result}"}} {n}\n'
        for name, help_text, data in (
            ("qmpdump_dump_bytes_total", "Bytes of dumps written.", m.bytes_total),
            ("qmpdump_dump_duration_seconds_total", "Seconds spent dumping.", m.duration_sum),
            ("qmpdump_vm_paused_seconds_total", "Seconds VMs were paused by dumps.", m.paused_sum),
        ):
            yield f"# HELP {name} {help_text}\n# TYPE {name} counter\n"
            for vm, value in sorted(data.items()):
                yield f'{name}{{vm="{vm}"}} {value}\n'
        yield "# HELP qmpdump_vm_connected Whether the daemon's QMP connection is up.\n"
        yield "# TYPE qmpdump_vm_connected gauge\n"
        for name, sup in self.supervisors.items():
            up = int(sup.state is ConnectionState.CONNECTED)
            yield f'qmpdump_vm_connected{{vm="{name}"}} {up}\n'
        yield "# HELP qmpdump_jobs_running Dump jobs running now.\n"
        yield "# TYPE qmpdump_jobs_running gauge\n"
        yield f"qmpdump_jobs_running {len(self.running)}\n"
