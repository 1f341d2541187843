"""Dump jobs: the FIFO scheduler and the run of one job, in a task group of their own.

Jobs start in FIFO order, one at a time per VM, at most ``max_concurrent_dumps`` at once. Each
job's dump runs in a :class:`~qmpdump.engines.run.DumpTask` (so a cancel is ``Task.cancel()``,
turned into DumpCancelled in that one place); after each success the VM's retention is applied.

The job store's writes (SQLite commits with fsync) and retention's unlinks of multi-GB dumps run
in a worker thread (one, so that store writes stay in order), never on the event loop where the
API and the watchdog run.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from qmpdump.engines.base import MigrationSettings, PauseHooks, Progress, ProgressCallback
from qmpdump.engines.run import DumpOutcome, DumpTask
from qmpdump.errors import DumpCancelled, QmpdumpError, Unavailable
from qmpdump.host.procfs import process_start_ticks
from qmpdump.output import dump_name, sidecar_path
from qmpdump.service.config import DaemonConfig, ResolvedVM, SinkConfig
from qmpdump.service.metrics import DaemonMetrics
from qmpdump.service.retention import retention_victims
from qmpdump.service.store import Job, JobError, JobResult, JobState, JobStore
from qmpdump.service.supervisor import VMSupervisor
from qmpdump.sinks.deliver import dump_to_s3, then
from qmpdump.sinks.s3 import StoredObject, UploadProgress

__all__ = ["JobRunner", "spool_dir"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_PROGRESS_EVERY_S = 1.0
#: the longest wait between two tries to record a job's end in a store that cannot be written
_PERSIST_RETRY_MAX_S = 5.0
#: finished jobs are kept this long, and at most this many (the newest): the store stays small
JOB_KEEP_S = 30 * 24 * 3600.0
JOB_KEEP_COUNT = 10_000
#: how often finished jobs are pruned (and once at start-up)
PRUNE_EVERY_S = 3600.0


def spool_dir(settings: DaemonConfig) -> Path:
    """Where a dump bound for a ``[[sink]]`` is written before its upload: ``dump_dir/.spool``
    (the filesystem sized for dumps; a VM name never starts with a dot)."""
    return settings.dump_dir / ".spool"


def _settled(pending: set[asyncio.Future[bool]]) -> Callable[[asyncio.Future[bool]], None]:
    """A done-callback for a progress write: forget it, and take its error (a progress
    write that failed is only a stale progress figure; :meth:`JobRunner.db` logged it)."""

    def done(future: asyncio.Future[bool]) -> None:
        pending.discard(future)
        if not future.cancelled():
            future.exception()

    return done


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None] | None = None
    dump: DumpTask | None = None
    #: why the job was cancelled, once it was (the dump, if not started yet, says so)
    cancelled: str | None = None
    #: the engine's last report (every one, not only those stored)
    last: Progress | None = None
    #: where the dump went when its job names a ``[[sink]]``
    stored: StoredObject | None = None


class JobRunner:
    """Schedules and runs jobs; :meth:`run` is the scheduler, jobs live in its task group."""

    def __init__(
        self,
        store: JobStore,
        settings: DaemonConfig,
        vms: Mapping[str, ResolvedVM],
        supervisors: Mapping[str, VMSupervisor],
        metrics: DaemonMetrics,
        *,
        sink_named: Callable[[str | None], SinkConfig | None] = lambda _name: None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.vms = vms
        self.supervisors = supervisors
        self.metrics = metrics
        #: the configured ``[[sink]]`` tables by name (``sink_named`` resolves a job's)
        self.sink_named = sink_named
        self.running: dict[str, _Running] = {}
        #: why the job store cannot be written, while it cannot
        self.store_problem: str | None = None
        self.accepting = True
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmpdump-store")

    async def db(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        """Run a blocking store (or file) call in the store's worker thread.

        A store that cannot be written (its filesystem full, an I/O error) raises
        :class:`~qmpdump.errors.Unavailable` (503), and :attr:`store_problem` says so until a
        later call succeeds.
        """
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except sqlite3.Error as err:
            self.store_problem = f"the job store cannot be written: {err}"
            log.error("%s", self.store_problem)
            raise Unavailable(self.store_problem) from err
        self.store_problem = None
        return result

    async def persist(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        """:meth:`db`, retried every few seconds until the store takes it: a job's end is never
        lost to a full disk (the job stays running here, and health says why, meanwhile)."""
        delay = 0.5
        while True:
            try:
                return await self.db(fn, *args, **kwargs)
            except Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _PERSIST_RETRY_MAX_S)

    def close(self) -> None:
        """Stop the worker thread (after every job has ended)."""
        self._executor.shutdown(wait=True)

    async def prune_forever(self) -> None:
        """Prune finished jobs (by age and count) at start-up and every hour, off the loop."""
        while True:
            try:
                gone = await self.db(
                    self.store.prune_finished, time.time() - JOB_KEEP_S, JOB_KEEP_COUNT
                )
            except Unavailable:
                gone = 0  # a full store: next time
            if gone:
                log.info("pruned %d finished job(s) from the job store", gone)
            await asyncio.sleep(PRUNE_EVERY_S)

    def wake(self) -> None:
        """Look for a job to start (a job was queued, a VM connected, a job ended)."""
        self._wake.set()

    async def run(self) -> None:
        """The scheduler: starts queued jobs in the ``jobs`` task group until cancelled; on the
        way out, cancels the jobs still running and waits for them."""
        async with asyncio.TaskGroup() as jobs:
            try:
                await self._schedule(jobs)
            finally:
                self.cancel_all("the dump was cancelled: the daemon is stopping")

    async def _schedule(self, jobs: asyncio.TaskGroup) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.accepting and len(self.running) < self.settings.max_concurrent_dumps:
                busy = {r.job.vm for r in self.running.values()} | self._absent_vms()
                job = self.store.next_queued(busy=busy)
                if job is None:
                    break
                # The job is ours from here, before the store says it runs: a shutdown that
                # comes while the store marks it waits for it like for any running job (an API
                # client may see it running at once, and then stop the daemon).
                running = self.running[job.id] = _Running(job)
                running.task = jobs.create_task(self._start_job(job), name=f"job-{job.id}")

    def _absent_vms(self) -> set[str]:
        """VMs with queued jobs that the daemon does not serve now (a libvirt domain that is
        not running): their jobs wait."""
        queued = self.store.list(state=JobState.QUEUED, limit=100000)
        return {j.vm for j in queued if j.vm not in self.supervisors}

    def cancel(self, job_id: str, reason: str = "the dump was cancelled") -> bool:
        """Cancel a running job; False if it is not running here."""
        running = self.running.get(job_id)
        if running is None:
            return False
        running.cancelled = reason
        if running.dump is not None:
            running.dump.cancel(reason)
        return True

    def cancel_all(self, reason: str) -> None:
        """Cancel every running job."""
        for job_id in list(self.running):
            self.cancel(job_id, reason)

    async def drain(self, grace_s: float) -> None:
        """Stop starting jobs; let running ones finish for ``grace_s``, then cancel and wait."""
        self.accepting = False
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if not tasks:
            return
        log.info("waiting up to %g s for %d running dump(s)", grace_s, len(tasks))
        await asyncio.wait(tasks, timeout=grace_s)
        self.cancel_all("the dump was cancelled: the daemon is stopping")
        await asyncio.wait(tasks)

    async def _start_job(self, job: Job) -> None:
        try:
            job = await self.db(self.store.mark_running, job.id)
        except Unavailable:
            # The store cannot be written: the job stays queued; look again soon.
            self.running.pop(job.id, None)
            asyncio.get_running_loop().call_later(_PERSIST_RETRY_MAX_S, self.wake)
            return
        except ValueError:
            # No longer queued: cancelled through the API while this task was being started.
            self.running.pop(job.id, None)
            self._wake.set()
            return
        self.running[job.id].job = job
        await self._run_job(job)

    async def _run_job(self, job: Job) -> None:
        running = self.running[job.id]
        vm = self.vms[job.vm]
        try:
            running.dump = DumpTask(self._dump(job, vm), name=f"dump-{job.id}")
            if running.cancelled is not None:
                running.dump.cancel(running.cancelled)
            outcome = await running.dump.result()
        except DumpCancelled as err:
            await self._end(job, JobState.CANCELLED, err, "cancelled")
        except QmpdumpError as err:
            await self._end(job, JobState.FAILED, err, "failed")
        except Exception as err:
            log.exception("job %s failed unexpectedly", job.id)
            await self._end(job, JobState.FAILED, err, "failed")
        else:
            await self._succeeded(job, vm, outcome, running.last)
        finally:
            self.running.pop(job.id, None)
            self._wake.set()

    async def _end(self, job: Job, state: JobState, err: BaseException, result: str) -> None:
        await self.persist(self.store.finish, job.id, state, error=JobError.from_exception(err))
        self.metrics.ended(job.vm, result)

    async def _succeeded(
        self, job: Job, vm: ResolvedVM, outcome: DumpOutcome, last: Progress | None
    ) -> None:
        total = last.total if last is not None and last.total else outcome.size
        stored = self.running[job.id].stored
        if stored is not None:
            await self._stored(job, vm, outcome, stored, total)
            return

        def record() -> None:
            # The dump is catalogued and retention applied before the job shows succeeded:
            # whoever sees it succeeded sees the dump folder as retention leaves it.
            self.store.update_progress(job.id, outcome.size, total, total)
            self.store.record_dump(
                vm.name,
                outcome.path,
                outcome.size,
                time.time(),
                sha256=outcome.sha256,
                job_id=job.id,
            )
            self._apply_retention(vm)
            self.store.finish(
                job.id,
                JobState.SUCCEEDED,
                result=JobResult(
                    outcome.path,
                    outcome.size,
                    outcome.sha256,
                    outcome.engine.value,
                    outcome.paused_s,
                ),
            )

        await self.persist(record)
        self.metrics.ended(vm.name, "succeeded")
        self.metrics.dumped(vm.name, outcome.size, outcome.duration_s, outcome.paused_s)

    async def _stored(
        self, job: Job, vm: ResolvedVM, outcome: DumpOutcome, stored: StoredObject, total: int
    ) -> None:
        """A dump now in a bucket: not catalogued, no retention (the bucket's rules keep it)."""

        def record() -> None:
            self.store.update_progress(job.id, outcome.size, total, total, outcome.size)
            self.store.finish(
                job.id,
                JobState.SUCCEEDED,
                result=JobResult(
                    Path(outcome.path.name),
                    outcome.size,
                    outcome.sha256,
                    outcome.engine.value,
                    outcome.paused_s,
                    url=stored.url,
                ),
            )

        await self.persist(record)
        self.metrics.ended(vm.name, "succeeded")
        self.metrics.dumped(vm.name, outcome.size, outcome.duration_s, outcome.paused_s)

    def _journal_pause(self, vm: ResolvedVM, job_id: str, pid: int | None) -> None:
        """Journal the pause about to be made, naming the QEMU process (blocking: :meth:`db`)."""
        start = None if pid is None else process_start_ticks(pid)
        self.store.journal_pause(vm.name, vm.qmp, job_id, qemu_pid=pid, qemu_start=start)

    def _journal_migration_settings(
        self, vm: ResolvedVM, job_id: str, pid: int | None, settings: MigrationSettings
    ) -> None:
        """Journal the migration settings to put back, naming the QEMU process (blocking)."""
        start = None if pid is None else process_start_ticks(pid)
        self.store.journal_migration_settings(
            vm.name,
            vm.qmp,
            job_id,
            settings.capabilities,
            settings.parameters,
            qemu_pid=pid,
            qemu_start=start,
        )

    def _hooks(self, job: Job, vm: ResolvedVM, supervisor: VMSupervisor) -> PauseHooks:
        """What the engine calls around what it changes on the VM: each change is journalled
        before it is made, and cleared once undone (the daemon undoes what a crash left)."""

        async def before_pause() -> None:
            await self.db(self._journal_pause, vm, job.id, supervisor.pid)

        async def after_resume() -> None:
            await self.db(self.store.clear_pause, vm.name)

        async def before_migration_settings(settings: MigrationSettings) -> None:
            await self.db(self._journal_migration_settings, vm, job.id, supervisor.pid, settings)

        async def after_migration_settings() -> None:
            await self.db(self.store.clear_migration_settings, vm.name)

        return PauseHooks(
            before_pause, after_resume, before_migration_settings, after_migration_settings
        )

    async def _dump(self, job: Job, vm: ResolvedVM) -> DumpOutcome:
        """The dump itself, through the VM's supervisor (cancellable as a whole)."""
        supervisor = self.supervisors[vm.name]
        spec = vm.spec(job.engine, job.format, job.mode)
        last = 0.0
        pending: set[asyncio.Future[bool]] = set()
        sent: list[int | None] = [None]  # bytes uploaded so far (parts go while dumping)

        def progress(p: Progress) -> None:
            nonlocal last
            running = self.running.get(job.id)
            if running is not None:
                running.last = p
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                update = self.store.update_progress
                done = asyncio.ensure_future(
                    self.db(update, job.id, p.written, p.total or None, p.completed, sent[0])
                )
                pending.add(done)
                done.add_done_callback(_settled(pending))

        def upload_progress(u: UploadProgress) -> None:
            # parts go while the dump runs (u.total None until it ends): its own counters stay
            nonlocal last
            sent[0] = u.uploaded
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S or u.uploaded == u.total:
                last = now
                running = self.running.get(job.id)
                p = (running.last if running else None) or Progress(0, 0, 0)
                total = p.total or u.total
                ended = u.total is not None  # the dump's size is known: it is complete
                done = asyncio.ensure_future(
                    self.db(
                        self.store.update_progress,
                        job.id,
                        u.total if ended else p.written,
                        total or None,
                        total if ended else p.completed,
                        u.uploaded,
                    )
                )
                pending.add(done)
                done.add_done_callback(_settled(pending))

        async def write(target: Path, tap: ProgressCallback | None = None) -> DumpOutcome:
            # Journalled before the file exists: a crash's clean-up removes only what it names.
            await self.db(self.store.set_target, job.id, target)
            return await supervisor.dump(
                target,
                spec,
                progress=progress if tap is None else then(progress, tap),
                hooks=self._hooks(job, vm, supervisor),
                timeout_s=self.settings.dump_timeout_s,
            )

        sink = self.sink_named(job.sink)
        name = dump_name(vm.name, job.id, spec.format.extension, time.time())
        try:
            if sink is None:
                return await write(vm.dump_dir / name)
            done = await dump_to_s3(
                write,
                location=sink.location(),
                name=name,
                settings=sink.settings(),
                spool_root=spool_dir(self.settings),
                progress=upload_progress,
            )
            self.running[job.id].stored = done.stored
            return done.dump
        finally:
            if pending:
                await asyncio.wait(pending)

    def _apply_retention(self, vm: ResolvedVM) -> None:
        """Remove the dumps retention gives up (blocking: run through :meth:`db`)."""
        victims = retention_victims(
            self.store.dumps(vm.name), vm.retention.keep_count, vm.retention.keep_bytes
        )
        for dump in victims:
            dump.path.unlink(missing_ok=True)
            sidecar_path(dump.path).unlink(missing_ok=True)
            self.store.forget_dump(dump.path)
            log.info("retention: removed %s", dump.path)
