"""The job runner's scheduling around a shutdown and a cancel, with a real job store and no VM.

The store's worker thread is held at chosen points (a wrapped ``mark_running``) to open, every
time, windows that a real daemon only hits now and then: the store has marked a job running (an
API client already sees it so) but the runner has not heard back yet. The dump itself is
replaced (``_dump``), since what is tested here is that every job the runner took ends in a
final state and that a shutdown waits for it; dumps are tested against real QEMU elsewhere
(``tests/test_daemon.py`` stops a daemon during real dumps).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest

from qmpdump.engines.run import DumpOutcome
from qmpdump.engines.spec import DumpFormat, EngineName, Mode
from qmpdump.errors import DumpFailed
from qmpdump.service.config import DaemonConfig, ResolvedVM, Retention
from qmpdump.service.jobs import JobRunner
from qmpdump.service.metrics import DaemonMetrics
from qmpdump.service.store import Job, JobState, JobStore
from qmpdump.service.supervisor import VMSupervisor

_VM = "vm0"


class _Runner(JobRunner):
    """Dumps that wait for :attr:`release`, then fail: a failed job is as final as a
    succeeded one, and needs no file."""

    def __init__(self, store: JobStore, tmp_path: Path) -> None:
        vm = ResolvedVM(
            name=_VM,
            qmp=str(tmp_path / "qmp.sock"),
            engine=EngineName.BACKEND,
            format=DumpFormat.ELF,
            mode=Mode.CONSISTENT,
            retention=Retention(),
            dump_dir=tmp_path / "dumps" / _VM,
            origin="vm[0]",
        )
        settings = DaemonConfig(
            api_socket=tmp_path / "api.sock", dump_dir=tmp_path / "dumps", state_dir=tmp_path
        )
        # The supervisor is only looked up by the dump, which is replaced here.
        supervisors = cast(Mapping[str, VMSupervisor], {_VM: object()})
        metrics = DaemonMetrics(connected=dict, running_jobs=lambda: len(self.running))
        super().__init__(store, settings, {_VM: vm}, supervisors, metrics)
        self.release = asyncio.Event()
        self.dumps_started = 0

    async def _dump(self, job: Job, vm: ResolvedVM) -> DumpOutcome:
        self.dumps_started += 1
        await self.release.wait()
        raise DumpFailed("the test's dump ends here")


class _HeldStore(JobStore):
    """A store whose ``mark_running`` waits in the worker thread for :attr:`go`, before
    (``hold="before"``) or after (``"after"``) it marks the job."""

    def __init__(self, path: Path, hold: str) -> None:
        super().__init__(path)
        self.hold = hold
        self.entered = threading.Event()
        self.go = threading.Event()

    def mark_running(self, job_id: str) -> Job:
        if self.hold == "before":
            self.entered.set()
            self.go.wait(30)
        job = super().mark_running(job_id)
        if self.hold == "after":
            self.entered.set()
            self.go.wait(30)
        return job


@pytest.fixture
def held_store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[_HeldStore]:
    store = _HeldStore(tmp_path / "jobs.sqlite", cast(str, request.param))
    try:
        yield store
    finally:
        store.go.set()  # never leave the worker thread waiting
        store.close()


@asynccontextmanager
async def _scheduling(store: _HeldStore, tmp_path: Path) -> AsyncIterator[tuple[_Runner, Job]]:
    """A runner scheduling one queued job (woken); on the way out nothing is left waiting:
    the store's thread and the dumps are let go, the scheduler is stopped, the thread joined."""
    job = store.create(_VM, "backend", "elf", "consistent")
    runner = _Runner(store, tmp_path)
    scheduler = asyncio.create_task(runner.run())
    runner.wake()
    try:
        yield runner, job
        assert not scheduler.done(), scheduler
    finally:
        store.go.set()
        runner.release.set()
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
        runner.close()


def _job(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    assert job is not None, job_id
    return job


def _reason(job: Job) -> str:
    assert job.error is not None, job
    return job.error.message


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(600):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within 30 s: {what}")


@pytest.mark.parametrize("held_store", ["after"], indirect=True)
async def test_a_shutdown_while_the_store_marks_a_job_running_waits_for_that_job(
    held_store: _HeldStore, tmp_path: Path
) -> None:
    async with _scheduling(held_store, tmp_path) as (runner, job):
        await _until(held_store.entered.is_set, "the store's thread marking the job")
        # The store says running (an API client polling it would now send SIGTERM) ...
        assert _job(held_store, job.id).state is JobState.RUNNING
        drain = asyncio.create_task(runner.drain(grace_s=30.0))
        await asyncio.sleep(0.3)
        # ... and the shutdown waits for the job it has not heard back about yet.
        assert not drain.done(), "the drain ended without waiting for the job being started"
        held_store.go.set()
        await _until(lambda: bool(runner.dumps_started), "the dump started")
        assert runner.dumps_started == 1
        assert not drain.done()
        runner.release.set()
        await asyncio.wait_for(drain, 30)
    ended = _job(held_store, job.id)
    assert ended.state is JobState.FAILED, ended
    assert "the test's dump ends here" in _reason(ended)
    assert runner.running == {}


@pytest.mark.parametrize("held_store", ["after"], indirect=True)
async def test_a_shutdown_past_its_grace_cancels_a_job_still_being_started(
    held_store: _HeldStore, tmp_path: Path
) -> None:
    async with _scheduling(held_store, tmp_path) as (runner, job):
        await _until(held_store.entered.is_set, "the store's thread marking the job")
        drain = asyncio.create_task(runner.drain(grace_s=0.2))
        await asyncio.sleep(0.5)  # the grace is over: the job is cancelled before its dump
        held_store.go.set()
        await asyncio.wait_for(drain, 30)
    ended = _job(held_store, job.id)
    assert ended.state is JobState.CANCELLED, ended
    assert "the daemon is stopping" in _reason(ended)
    assert runner.dumps_started == 0


@pytest.mark.parametrize("held_store", ["before"], indirect=True)
async def test_a_job_cancelled_while_it_is_being_started_does_not_run(
    held_store: _HeldStore, tmp_path: Path
) -> None:
    # The API cancels a job the store still holds as queued (the daemon's cancel ends it in
    # the store when the runner does not know it yet): the runner's start then finds it no
    # longer queued, drops it and keeps scheduling.
    async with _scheduling(held_store, tmp_path) as (runner, job):
        await _until(held_store.entered.is_set, "the store's thread marking the job")
        assert job.id in runner.running  # the runner holds it while the store works
        held_store.hold = "none"
        cancelled = held_store.finish(job.id, JobState.CANCELLED)  # from this (another) thread
        assert cancelled.state is JobState.CANCELLED
        held_store.go.set()
        await _until(lambda: job.id not in runner.running, "the runner dropped the job")
        assert runner.running == {}
        # The scheduler lives on: the next job runs.
        second = held_store.create(_VM, "backend", "elf", "consistent")
        runner.wake()
        await _until(lambda: bool(runner.dumps_started), "the dump started")
        assert runner.dumps_started == 1
        runner.release.set()
        await asyncio.wait_for(runner.drain(grace_s=30.0), 30)
    assert _job(held_store, job.id).state is JobState.CANCELLED
    assert _job(held_store, second.id).state is JobState.FAILED
