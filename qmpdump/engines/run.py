"""One dump, end to end: survey -> choose an engine -> run it -> commit the output and sidecar.

The output handling is the same for every engine (:class:`qmpdump.output.DumpFile`): the dump is
written as ``NAME.partial`` (0600), fsynced and renamed when the engine succeeded, removed
otherwise. The sidecar ``NAME.json`` (:class:`~qmpdump.engines.sidecar.Sidecar`) follows it.

Cancellation is ``Task.cancel()`` of the task running :func:`run_dump`; :class:`DumpTask` is the
one place that turns it into :class:`~qmpdump.errors.DumpCancelled`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmpdump import __version__
from qmpdump.engines.base import Engine, EngineJob, PauseHooks, ProgressCallback
from qmpdump.engines.registry import ENGINES
from qmpdump.engines.sidecar import Sidecar, map_summary
from qmpdump.engines.spec import (
    AUTO_ORDER,
    ENGINE_TRAITS,
    DumpFormat,
    DumpSpec,
    EngineName,
    engine_refusal,
)
from qmpdump.errors import (
    DumpCancelled,
    DumpError,
    DumpFailed,
    FdPassingUnavailable,
    QEMUGone,
    QMPDisconnected,
    SourceUnproven,
    UsageError,
)
from qmpdump.output import DumpFile, sidecar_path
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey, survey

__all__ = ["DumpOutcome", "DumpTask", "choose_engine", "run_dump"]

CANCELLED = "the dump was cancelled"


@dataclass(frozen=True, slots=True)
class DumpOutcome:
    """A dump on disk."""

    path: Path
    sidecar: Path
    size: int
    sha256: str
    engine: EngineName
    format: DumpFormat
    duration_s: float
    paused_s: float | None
    record: Sidecar


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def choose_engine(spec: DumpSpec, before: Survey, session: QMPSession) -> tuple[Engine, str]:
    """The engine for ``spec`` and why: the one asked for, or ``auto``'s first that can.

    Refuses rather than pick an engine that would not honour the spec (a live dump is never
    handed to an engine that pauses the VM): :class:`FdPassingUnavailable` when every fitting
    engine needs a UNIX QMP socket and the session has none, else :class:`UsageError` listing
    why each engine stepped aside. An engine asked for by name that cannot dump this VM
    (:meth:`~qmpdump.engines.base.Engine.assess`: the backend engine cannot prove that what it
    would read holds the guest's bytes) is a :class:`SourceUnproven` with its reason; another
    engine that cannot (the snapshot engine on a QEMU whose background snapshot is unsafe) a
    :class:`DumpError` with its reason; either before any file is created.
    """
    if spec.engine is not EngineName.AUTO:
        traits = ENGINE_TRAITS[spec.engine]
        if traits.passes_fds and not session.can_pass_fds:
            raise FdPassingUnavailable(session.where, traits.name.value)
        engine = ENGINES[spec.engine]
        ok, why = engine.assess(before)
        if not ok:
            if spec.engine is EngineName.BACKEND:  # it cannot prove what it would read
                raise SourceUnproven(None, why)
            raise DumpError(f"{traits.label} cannot dump this VM: {why}")
        return engine, "asked for"
    skipped: list[str] = []
    fd_blocked = False
    for name in AUTO_ORDER:
        traits = ENGINE_TRAITS[name]
        refusal = engine_refusal(traits, spec)
        if refusal is not None:
            skipped.append(refusal.message)
            continue
        if traits.passes_fds and not session.can_pass_fds:
            fd_blocked = True
            skipped.append(f"{traits.label} needs QMP over a UNIX socket")
            continue
        engine = ENGINES[name]
        ok, why = engine.assess(before)
        if ok:
            return engine, "; ".join(skipped) or why
        skipped.append(why)
    if fd_blocked:
        raise FdPassingUnavailable(session.where)
    raise UsageError(f"no engine can make this dump of this VM: {'; '.join(skipped)}")


async def run_dump(
    session: QMPSession,
    target: Path,
    spec: DumpSpec | None = None,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    hooks: PauseHooks | None = None,
    timeout_s: float | None = None,
) -> DumpOutcome:
    """Dump the VM into ``target`` as ``spec`` says; commit it with its sidecar."""
    spec = spec or DumpSpec()
    before = await survey(session)
    engine, reason = choose_engine(spec, before, session)
    with DumpFile.create(target, overwrite=overwrite) as output:
        started = time.time()
        t0 = time.monotonic()
        job = EngineJob(session, output, spec, before, progress, hooks or PauseHooks())
        try:
            async with asyncio.timeout(timeout_s) as limit:
                result = await engine.run(job)
        except TimeoutError as err:
            if limit.expired():
                raise DumpFailed(f"the dump did not finish within {timeout_s:g} s") from err
            raise
        except QMPDisconnected as err:
            # Once a dump has begun, a lost QMP connection means QEMU went away (exit 42),
            # whichever engine step noticed it first.
            raise QEMUGone(f"QEMU went away during the dump: {err}") from err
        duration = time.monotonic() - t0
        record = Sidecar(
            qmpdump_version=__version__,
            vm=result.survey.report().vm,
            engine=engine.traits.name,
            engine_reason=reason,
            format=spec.format,
            request=result.details,
            started=_iso(started),
            ended=_iso(started + duration),
            duration_s=round(duration, 6),
            bytes=result.size,
            sha256=result.sha256,
            paused_s=None if result.paused_s is None else round(result.paused_s, 6),
            map=map_summary(result.survey.report()),
        )
        # fsync of a large dump can take a while: not on the event loop (the daemon's API,
        # its watchdog and the other VMs' jobs run there).
        path = await asyncio.to_thread(output.commit, record.to_json())
    return DumpOutcome(
        path=path,
        sidecar=sidecar_path(path),
        size=result.size,
        sha256=result.sha256,
        engine=engine.traits.name,
        format=spec.format,
        duration_s=duration,
        paused_s=result.paused_s,
        record=record,
    )


class DumpTask:
    """A dump running in its own task; :meth:`cancel` stops it, :meth:`result` awaits it.

    The one place where a cancel becomes :class:`DumpCancelled`: a task we cancelled ends
    cancelled (every ``finally`` of the engine has run: VM resumed, partial removed), and
    :meth:`result` raises DumpCancelled with the reason. A cancel of the *awaiting* task is
    passed on to the dump and re-raised as is.
    """

    def __init__(self, coro: Coroutine[Any, Any, DumpOutcome], *, name: str = "dump") -> None:
        self.task: asyncio.Task[DumpOutcome] = asyncio.create_task(coro, name=name)
        self.reason: str | None = None

    def cancel(self, reason: str = CANCELLED) -> None:
        """Ask the dump to stop (idempotent; the first reason stays)."""
        if self.reason is None:
            self.reason = reason
        self.task.cancel()

    async def result(self) -> DumpOutcome:
        """The outcome; DumpCancelled if :meth:`cancel` stopped it."""
        try:
            await asyncio.wait([self.task])
        except asyncio.CancelledError:
            self.task.cancel()
            while not self.task.done():
                try:
                    await asyncio.wait([self.task])
                except asyncio.CancelledError:
                    continue
            raise
        if self.task.cancelled():
            raise DumpCancelled(self.reason or CANCELLED)
        return self.task.result()
