"""The qmpdump daemon: VMs kept connected, a durable FIFO of dump jobs, the API, systemd.

Lifecycle (:meth:`Daemon.run`): every start-up step registers its undo on one
:class:`contextlib.AsyncExitStack`, so the shutdown is the start-up in reverse, every undo runs
even if an earlier one failed, and every failure is logged (as aiohttp's runner does):

1. the single-instance lock on ``state_dir``; the job store (jobs a crash left ``running`` are
   failed, ``.partial`` files under ``dump_dir`` and spooled dumps under ``dump_dir/.spool``
   removed: S3 shows nothing of an upload a crash cut short); the signal handlers;
2. one task group for the long-lived tasks: one
   :class:`~qmpdump.service.supervisor.VMSupervisor` per VM, one
   :class:`~qmpdump.service.sources.LibvirtWatcher` per ``[[libvirt]]`` entry (which adds and
   removes the VMs of running domains at run time), the watchdog, and the
   :class:`~qmpdump.service.jobs.JobRunner`, whose jobs live in a task group of their own;
3. the API socket; ``READY=1``.

A VM the daemon had paused (journalled before ``stop``) is resumed as soon as its supervisor
connects, if it is still paused, before any job gets the connection. Likewise migration settings
an engine changed (journalled before the change: the snapshot engine's ``background-snapshot``
capability and ``max-bandwidth``) are put back on that connection, after cancelling the orphaned
background snapshot if QEMU still runs it: a later migration by the operator must not become a
background snapshot. Both act only on the QEMU process the journal names (pid and start time).

SIGTERM/SIGINT: ``STOPPING=1``; the API stops accepting (socket removed); running dumps get
``shutdown_grace_s`` to finish, then are cancelled (the engines resume what they paused);
queued jobs stay queued for the next start; the tasks are cancelled, supervisors disconnect;
the store closes; the lock is released; exit 0 (1 if an undo step failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from qmpdump import __version__
from qmpdump.engines.spec import DumpSpec
from qmpdump.errors import (
    BadGateway,
    Conflict,
    GatewayTimeout,
    NotFound,
    QMPConnectError,
    QMPDisconnected,
    QmpdumpError,
    QMPTimeout,
    ServiceError,
    Unavailable,
    UsageError,
)
from qmpdump.host.procfs import process_start_ticks
from qmpdump.output import PARTIAL_SUFFIX, sidecar_path
from qmpdump.qmp.migsettings import (
    describe_settings,
    end_orphaned_migration,
    restore_migration_settings,
)
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.service import sdnotify
from qmpdump.service.config import LOCAL_SINK, Config, ResolvedVM
from qmpdump.service.jobs import JobRunner, spool_dir
from qmpdump.service.metrics import DaemonMetrics
from qmpdump.service.sources import LibvirtSupervisor, LibvirtWatcher, make_supervisor
from qmpdump.service.store import Job, JobError, JobState, JobStore
from qmpdump.service.supervisor import VMSupervisor
from qmpdump.service.views import (
    ConnectionState,
    DumpRequest,
    DumpView,
    HealthView,
    JobErrorView,
    JobView,
    LibvirtMapView,
    ProgressView,
    VMView,
)

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

#: how often the ``[[discover]]`` globs are expanded again
DISCOVER_EVERY_S = 2.0
#: Jobs one VM may have waiting; one more is a 409.
MAX_QUEUED_PER_VM = 16


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class _Undo:
    """Undo steps that log their failure and let the next one run (the exit stack's callbacks)."""

    def __init__(self) -> None:
        self.failures = 0

    def sync(self, what: str, fn: Callable[[], object]) -> Callable[[], None]:
        def undo() -> None:
            try:
                fn()
            except Exception:
                self.failures += 1
                log.exception("shutdown: %s failed", what)

        return undo

    def wrap(self, what: str, fn: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        async def undo() -> None:
            try:
                await fn()
            except Exception:
                self.failures += 1
                log.exception("shutdown: %s failed", what)

        return undo


class Daemon:
    """The service core (implements :class:`qmpdump.service.views.ServiceCore`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.daemon
        self.resolved: list[ResolvedVM] = config.resolve_vms()
        if not self.resolved and not config.libvirt and not config.discover:
            raise UsageError("the configuration names no VM (no [[vm]], no socket discovered)")
        self.by_name = {vm.name: vm for vm in self.resolved}
        self.supervisors: dict[str, VMSupervisor] = {
            vm.name: self._new_supervisor(vm) for vm in self.resolved
        }
        if config.libvirt:
            from qmpdump.libvirt.connection import libvirt_module  # noqa: PLC0415

            libvirt_module()  # a UsageError now, not a retry loop, without the extra
        self.watchers = [
            LibvirtWatcher(config, i, appear=self.add_vm, gone=self.remove_vm)
            for i in range(len(config.libvirt))
        ]
        self._group: asyncio.TaskGroup | None = None
        self._vm_tasks: dict[str, asyncio.Task[None]] = {}
        self.metrics_data = DaemonMetrics(
            connected=lambda: {
                n: s.state is ConnectionState.CONNECTED for n, s in self.supervisors.items()
            },
            running_jobs=lambda: len(self.jobs_runner.running) if self._runner else 0,
        )
        self._runner: JobRunner | None = None
        self.stopping = False
        self._stop = asyncio.Event()

    def _new_supervisor(self, vm: ResolvedVM) -> VMSupervisor:
        sup = make_supervisor(vm, self.settings, on_connect=self._on_connect_hook(vm.name))
        sup.on_resume = self._on_resume_hook(vm.name)
        return sup

    async def _rediscover(self) -> None:
        """Expand the ``[[discover]]`` globs again every :data:`DISCOVER_EVERY_S` (the
        configuration's "at run time"): a socket that appears later becomes a VM
        (:meth:`add_vm`). A VM whose socket goes stays, disconnected, and says why (its jobs
        and dumps stay reachable)."""
        if not self.config.discover:
            return
        while True:
            await asyncio.sleep(DISCOVER_EVERY_S)
            try:
                found = await asyncio.to_thread(self.config.discover_vms)
            except (OSError, QmpdumpError) as err:
                log.warning("[[discover]]: %s", err)
                continue
            for vm in found.vms:
                if vm.name not in self.supervisors:
                    self.add_vm(vm)

    @property
    def jobs_runner(self) -> JobRunner:
        """The job runner (exists from start-up on)."""
        if self._runner is None:
            raise Unavailable("the daemon is starting")
        return self._runner

    @property
    def store(self) -> JobStore:
        """The job store (open from start-up on)."""
        return self.jobs_runner.store

    # ------------------------------------------------------------------ lifecycle

    def _prepare_dirs(self) -> None:
        os.umask(0o077)  # dumps, sidecars, the job store: nobody else's business
        for folder in (self.settings.state_dir, self.settings.dump_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        for vm in self.resolved:
            vm.dump_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            vm.dump_dir.chmod(0o700)
        if self.config.sink:
            spool_dir(self.settings).mkdir(mode=0o700, exist_ok=True)
            spool_dir(self.settings).chmod(0o700)

    def _take_lock(self) -> int:
        path = self.settings.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise UsageError(f"another qmpdump daemon holds {path}") from err
        return fd

    def _open_store(self) -> JobStore:
        store = JobStore.in_state_dir(self.settings.state_dir)
        try:
            recovered = store.recover_after_crash()
            for job in recovered:
                log.warning(
                    "job %s of VM %s failed: the daemon restarted during it", job.id, job.vm
                )
                self.metrics_data.ended(job.vm, "failed")
            for partial in self._remove_partials(recovered):
                log.warning("removed %s, left by a crash", partial)
        except BaseException:
            store.close()
            raise
        return store

    def _remove_partials(self, recovered: list[Job]) -> list[Path]:
        """Remove the partial files of the jobs a crash interrupted: only those this daemon's
        own store names (another daemon may share ``dump_dir``; its files are not ours)."""
        removed = []
        spool = spool_dir(self.settings)
        for job in recovered:
            if job.target is None:
                continue
            if job.target.parent.parent == spool:  # a crash mid-upload: its own spool folder
                shutil.rmtree(job.target.parent, ignore_errors=True)
                removed.append(job.target.parent)
                continue
            for final in (job.target, sidecar_path(job.target)):
                partial = final.with_name(final.name + PARTIAL_SUFFIX)
                if partial.is_file():
                    partial.unlink(missing_ok=True)
                    removed.append(partial)
        return removed

    def request_stop(self) -> None:
        """Begin the shutdown (the signal handlers call this)."""
        self._stop.set()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code (1 if a shutdown step failed).

        A start-up problem (the API socket cannot be made, ...) raises the one
        :class:`~qmpdump.errors.QmpdumpError` that says so, not the task group's
        ``ExceptionGroup`` around it: the CLI prints it as one line with its exit code.
        """
        try:
            return await self._run()
        except BaseExceptionGroup as group:
            leaves = _leaves(group)
            first = next((e for e in leaves if isinstance(e, QmpdumpError)), None)
            if first is not None and all(
                isinstance(e, QmpdumpError | asyncio.CancelledError) for e in leaves
            ):
                raise first from None
            raise

    async def _run(self) -> int:
        from qmpdump.service.api import make_app, serve_unix, stop_serving  # noqa: PLC0415

        undo = _Undo()
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.to_thread(self._prepare_dirs)
            lock_fd = await asyncio.to_thread(self._take_lock)
            stack.callback(undo.sync("releasing the lock", lambda: os.close(lock_fd)))
            if self.watchers:
                stack.push_async_callback(undo.wrap("releasing libvirt", _release_libvirt))
            store = await asyncio.to_thread(self._open_store)
            stack.callback(undo.sync("closing the job store", store.close))
            runner = JobRunner(
                store,
                self.settings,
                self.by_name,
                self.supervisors,
                self.metrics_data,
                sink_named=self.config.sink_named,
            )
            self._runner = runner
            stack.callback(undo.sync("stopping the store's thread", runner.close))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                stack.callback(undo.sync("signal handlers", partial_remove(loop, sig)))
            group = await stack.enter_async_context(asyncio.TaskGroup())
            tasks = [
                group.create_task(s.run(), name=f"vm-{s.vm.name}")
                for s in self.supervisors.values()
            ]
            self._group = group
            tasks += [group.create_task(w.run(), name=f"libvirt-{w.index}") for w in self.watchers]
            stack.callback(lambda: [t.cancel() for t in self._vm_tasks.values()])
            tasks.append(group.create_task(self._watchdog(), name="watchdog"))
            tasks.append(group.create_task(runner.run(), name="jobs"))
            tasks.append(group.create_task(runner.prune_forever(), name="prune"))
            tasks.append(group.create_task(self._rediscover(), name="discover"))
            # Undone before the group exits: tasks cancelled once the jobs have drained.
            stack.callback(undo.sync("cancelling tasks", lambda: [t.cancel() for t in tasks]))
            stack.push_async_callback(
                undo.wrap("draining jobs", lambda: runner.drain(self.settings.shutdown_grace_s))
            )
            api = await serve_unix(
                make_app(self),
                self.settings.api_socket,
                mode=self.settings.api_socket_mode,
                group=self.settings.api_socket_group,
            )
            stack.push_async_callback(
                undo.wrap("stopping the API", lambda: stop_serving(api, self.settings.api_socket))
            )
            stack.callback(self._stopping)
            runner.wake()
            sdnotify.notify("READY=1", f"STATUS=serving {len(self.resolved)} VM(s)")
            log.info("qmpdump %s serving on %s", __version__, self.settings.api_socket)
            await self._stop.wait()
        return 1 if undo.failures else 0

    def add_vm(self, vm: ResolvedVM) -> bool:
        """Serve a VM found at run time (a libvirt domain that runs); False if a VM of that name
        is served already (a ``[[vm]]``, a discovered socket or an earlier ``[[libvirt]]`` wins)."""
        if vm.name in self.supervisors or self._group is None or self.stopping:
            if vm.name in self.supervisors:
                log.info(
                    "domain %s (%s): a VM of that name is served already (%s)",
                    vm.name,
                    vm.origin,
                    self.by_name[vm.name].origin,
                )
            return False
        vm.dump_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        vm.dump_dir.chmod(0o700)
        sup = self._new_supervisor(vm)
        self.by_name[vm.name] = vm
        self.supervisors[vm.name] = sup
        self._vm_tasks[vm.name] = self._group.create_task(sup.run(), name=f"vm-{vm.name}")
        log.info("VM %s: appeared (%s, %s)", vm.name, vm.origin, vm.qmp)
        if self._runner is not None:
            self._runner.wake()  # its queued jobs may start
        return True

    async def remove_vm(self, name: str, reason: str) -> None:
        """Stop serving a VM found at run time (its domain stopped); its queued jobs fail, a
        running one ends as its dump does (the domain is gone)."""
        sup = self.supervisors.get(name)
        if not isinstance(sup, LibvirtSupervisor):
            return
        task = self._vm_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        del self.supervisors[name]
        del self.by_name[name]
        log.info("VM %s: gone (%s)", name, reason)
        if self._runner is None:
            return
        err = JobError(
            message=f"VM {name} went away before the dump started: {reason}",
            error_class="Unavailable",
            exit_code=Unavailable.exit_code,
        )
        for job in self.store.list(vm=name, state=JobState.QUEUED, limit=1000):
            await self._runner.db(self.store.finish, job.id, JobState.FAILED, error=err)
            self.metrics_data.ended(name, "failed")

    def _stopping(self) -> None:
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        self.stopping = True

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval_s() if self.settings.watchdog else None
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _on_connect_hook(self, name: str) -> Callable[[QMPSession], Awaitable[None]]:
        async def hook(session: QMPSession) -> None:
            await self._resume_journaled(name, session)
            await self._restore_journaled_migration(name, session)
            if self._runner is not None:
                self._runner.wake()  # jobs queued while the VM was away may start

        return hook

    def _on_resume_hook(self, name: str) -> Callable[[], Awaitable[None]]:
        async def hook() -> None:
            # A RESUME while none of our jobs runs on the VM is someone else's ``cont``: a
            # pause the journal still holds (a ``cont`` of ours that timed out) is over, and
            # a later pause is not ours to undo after a restart.
            runner = self._runner
            if runner is None or any(r.job.vm == name for r in runner.running.values()):
                return
            if any(p.vm == name for p in await runner.db(self.store.pending_pauses)):
                await runner.db(self.store.clear_pause, name)
                log.info("VM %s: resumed by someone else; its pause journal is cleared", name)

        return hook

    async def _resume_journaled(self, name: str, session: QMPSession) -> None:
        """Resume the VM if the daemon paused it and could not resume it (a crash, a lost
        connection); called on a new session before jobs may use it."""
        runner = self.jobs_runner
        for pause in self.store.pending_pauses():
            if pause.vm != name or pause.job_id in runner.running:
                continue
            try:
                # The process the daemon paused, named by pid and start time, is gone: this
                # is another QEMU (a restart on the same socket), not ours to resume. (Its pid,
                # not the session's peer: through libvirt's proxy the peer is not QEMU.)
                if (
                    pause.qemu_pid is not None
                    and await asyncio.to_thread(process_start_ticks, pause.qemu_pid)
                    != pause.qemu_start
                ):
                    log.warning(
                        "VM %s: the QEMU the daemon paused (pid %s) is gone; "
                        "this one is left as it is",
                        pause.vm,
                        pause.qemu_pid,
                    )
                    await runner.db(self.store.clear_pause, pause.vm)
                    continue
                status = await session.execute("query-status")
                if status.get("status") == "paused":
                    await session.execute("cont")
                    log.warning(
                        "VM %s: resumed, the daemon had paused it before a restart", pause.vm
                    )
                await runner.db(self.store.clear_pause, pause.vm)
            except QmpdumpError as err:
                log.warning("VM %s: could not check the journalled pause: %s", pause.vm, err)

    async def _restore_journaled_migration(self, name: str, session: QMPSession) -> None:
        """Put back the migration settings an engine changed and could not restore (a crash, a
        lost connection); called on a new session before jobs may use it."""
        runner = self.jobs_runner
        for record in await runner.db(self.store.pending_migration_settings):
            if record.vm != name or record.job_id in runner.running:
                continue
            try:
                if (
                    record.qemu_pid is not None
                    and await asyncio.to_thread(process_start_ticks, record.qemu_pid)
                    != record.qemu_start
                ):
                    log.warning(
                        "VM %s: the QEMU whose migration settings the daemon changed (pid %s) "
                        "is gone; this one is left as it is",
                        record.vm,
                        record.qemu_pid,
                    )
                    await runner.db(self.store.clear_migration_settings, record.vm)
                    continue
                cancelled = await end_orphaned_migration(session)
                await restore_migration_settings(session, record)
                log.warning(
                    "VM %s: %srestored the migration settings the daemon had changed before a "
                    "restart: %s",
                    record.vm,
                    "cancelled the orphaned background snapshot and " if cancelled else "",
                    describe_settings(record),
                )
                await runner.db(self.store.clear_migration_settings, record.vm)
            except QmpdumpError as err:
                log.warning(
                    "VM %s: could not restore the journalled migration settings (%s): %s",
                    record.vm,
                    describe_settings(record),
                    err,
                )

    # ------------------------------------------------------------------ ServiceCore

    def _supervisor(self, name: str) -> VMSupervisor:
        sup = self.supervisors.get(name)
        if sup is None:
            raise NotFound(f"no VM named {name!r}")
        return sup

    def _vm_view(self, sup: VMSupervisor) -> VMView:
        vm = sup.vm
        running = self._runner.running.values() if self._runner else ()
        job_id = next((r.job.id for r in running if r.job.vm == vm.name), None)
        return VMView(
            name=vm.name,
            qmp=vm.qmp,
            origin=vm.origin,
            connection=sup.state,
            reason=sup.reason,
            run_state=sup.run_state,
            qemu_version=sup.qemu_version,
            pid=sup.pid,
            running_job=job_id,
            queued_jobs=self.store.count(vm=vm.name, state=JobState.QUEUED),
            default_engine=vm.engine,
            default_format=vm.format,
            default_mode=vm.mode,
            default_sink=vm.sink,
        )

    def vms(self) -> list[VMView]:
        return [self._vm_view(s) for s in self.supervisors.values()]

    def vm(self, name: str) -> VMView:
        return self._vm_view(self._supervisor(name))

    async def vm_map(self, name: str) -> MapReport | LibvirtMapView:
        try:
            return await self._supervisor(name).map()
        except QMPTimeout as err:
            raise GatewayTimeout(
                f"VM {name}: QEMU did not answer in time (is it hung?): {err}"
            ) from err
        except (QMPDisconnected, QMPConnectError) as err:
            raise Unavailable(f"VM {name}: the QMP connection failed: {err}") from err
        except (UsageError, ServiceError):
            raise
        except QmpdumpError as err:
            raise BadGateway(f"VM {name}: QEMU's answers could not be used: {err}") from err

    async def submit(self, name: str, request: DumpRequest) -> JobView:
        if self.stopping:
            raise Unavailable("the daemon is shutting down")
        vm = self._supervisor(name).vm
        sink = request.sink if request.sink is not None else vm.sink
        self.config.sink_named(sink)  # a UsageError (400) for a name not configured
        sink = None if sink == LOCAL_SINK else sink
        spec = DumpSpec.checked(
            engine=request.engine or vm.engine,
            format=request.format or vm.format,
            mode=request.mode or vm.mode,
        )
        if self.store.count(vm=name, state=JobState.QUEUED) >= MAX_QUEUED_PER_VM:
            raise Conflict(f"VM {name} is busy: {MAX_QUEUED_PER_VM} dumps are already waiting")
        runner = self.jobs_runner
        job = await runner.db(
            self.store.create, name, spec.engine.value, spec.format.value, spec.mode.value, sink
        )
        runner.wake()
        return self._job_view(job)

    def _job_view(self, job: Job) -> JobView:
        return JobView.model_validate(
            {
                "id": job.id,
                "vm": job.vm,
                "engine": job.engine,
                "format": job.format,
                "mode": job.mode,
                "sink": job.sink,
                "state": job.state.value,
                "created": _iso(job.created) or "",
                "started": _iso(job.started),
                "ended": _iso(job.ended),
                "progress": ProgressView(
                    written=job.written,
                    total=job.total,
                    completed=job.completed,
                    uploaded=job.uploaded,
                ),
                "result": None
                if job.result is None
                else {
                    "file": job.result.path.name,
                    "size": job.result.size,
                    "sha256": job.result.sha256,
                    "engine": job.result.engine,
                    "paused_s": job.result.paused_s,
                    "url": job.result.url,
                },
                "error": None
                if job.error is None
                else JobErrorView(
                    message=job.error.message,
                    error_class=job.error.error_class,
                    exit_code=job.error.exit_code,
                ),
            }
        )

    def jobs(self, vm: str | None, state: str | None, limit: int) -> list[JobView]:
        if vm is not None:
            self._supervisor(vm)
        try:
            wanted = None if state is None else JobState(state)
        except ValueError as err:
            raise UsageError(f"no job state {state!r}") from err
        return [self._job_view(j) for j in self.store.list(vm=vm, state=wanted, limit=limit)]

    def job(self, job_id: str) -> JobView:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return self._job_view(job)

    async def cancel(self, job_id: str) -> JobView:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if job.finished:
            raise Conflict(f"job {job_id} has already {job.state.value}")
        runner = self.jobs_runner
        if runner.cancel(job_id):
            return self._job_view(job)
        err = JobError(
            message="cancelled before it started", error_class="DumpCancelled", exit_code=41
        )
        finished = await runner.db(self.store.finish, job_id, JobState.CANCELLED, error=err)
        return self._job_view(finished)

    def dumps(self, vm: str | None) -> list[DumpView]:
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
        sups = self.supervisors.values()
        problem = self.jobs_runner.store_problem
        return HealthView(
            status="stopping" if self.stopping else "degraded" if problem else "ok",
            problem=problem,
            version=__version__,
            vms=len(self.supervisors),
            connected=sum(s.state is ConnectionState.CONNECTED for s in sups),
            running_jobs=len(self.jobs_runner.running),
            queued_jobs=self.store.count(state=JobState.QUEUED),
        )

    def metrics(self) -> str:
        return self.metrics_data.text()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a (nested) exception group."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _release_libvirt() -> None:
    """Free libvirt connections that only garbage (an exception's frames) still holds while the
    loop runs: libvirt closes them through its event loop (``libvirtaio``), which fails with a
    traceback on stderr once the asyncio loop is closed."""
    await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0.1)  # the handle removals libvirt scheduled on the loop


def partial_remove(loop: asyncio.AbstractEventLoop, sig: int) -> Callable[[], object]:
    """The undo of ``loop.add_signal_handler(sig, ...)``."""
    return lambda: loop.remove_signal_handler(sig)
