"""What every engine is: the :class:`Engine` protocol, its input (:class:`EngineJob`), its typed
result (:class:`EngineResult`) and the one :class:`Progress` they all report.

An engine writes one dump into an :class:`~qmpdump.output.DumpTarget` (a seekable fd; the caller
commits or discards it) and returns what the sidecar records. It does not choose itself (that is
:func:`qmpdump.engines.run.choose_engine`), does not commit, and does not watch for a cancel:
a cancel is ``Task.cancel()`` of the task running it, which its ``finally`` blocks undo (VM
resumed, threads stopped, pipe closed) and :class:`qmpdump.engines.run.DumpTask` turns into
:class:`~qmpdump.errors.DumpCancelled`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from qmpdump.engines.spec import DumpSpec, EngineTraits
from qmpdump.memmap.ranges import RangeSet
from qmpdump.output import DumpTarget
from qmpdump.qmp.migsettings import MigrationSettings
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import Survey

__all__ = [
    "Engine",
    "EngineDetails",
    "EngineJob",
    "EngineResult",
    "MigrationSettings",
    "PauseHooks",
    "Progress",
    "ProgressCallback",
]


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a dump stands, the same for every engine.

    ``completed`` of ``total``: bytes of guest memory done, of those the dump covers (QEMU's
    ``query-dump`` counters; the backend's populated bytes). ``written``: bytes written to the
    output so far (compressed formats write fewer, zero-fill none). A percentage is
    ``completed / total``.

    ``settled`` (engines that track it): byte ranges of the output file that are final, which
    the engine will not write again, and ``size_bound`` an upper bound of the file's final size.
    A sink may ship settled bytes while the dump runs (:mod:`qmpdump.sinks.s3`); ``None``:
    nothing is promised until the engine returns.
    """

    written: int
    completed: int
    total: int
    settled: RangeSet | None = None
    size_bound: int | None = None

    @property
    def fraction(self) -> float | None:
        """``completed / total``, None while the total is unknown."""
        return self.completed / self.total if self.total else None


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class PauseHooks:
    """Called around a pause the engine makes itself (``stop`` ... ``cont``): the daemon journals
    its intent before the pause, and clears it after the resume."""

    before_pause: Callable[[], Awaitable[None]] | None = None
    after_resume: Callable[[], Awaitable[None]] | None = None
    #: called before the engine changes the VM's migration settings (the snapshot engine's
    #: capabilities and ``max-bandwidth``) with what to put back: QMP ``migrate-set-capabilities``
    #: entries and ``migrate-set-parameters`` arguments; the daemon journals them, so that a
    #: restart after a crash restores them
    before_migration_settings: Callable[[MigrationSettings], Awaitable[None]] | None = None
    #: called once the settings are back as they were
    after_migration_settings: Callable[[], Awaitable[None]] | None = None


class EngineDetails(BaseModel):
    """The engine's own part of the sidecar (its ``request`` member); each engine extends it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str


@dataclass(frozen=True, slots=True)
class EngineJob:
    """One dump for an engine to make."""

    session: QMPSession
    output: DumpTarget
    spec: DumpSpec
    #: the survey the choice was made on (taken just before)
    before: Survey
    progress: ProgressCallback | None = None
    hooks: PauseHooks = PauseHooks()

    def report(self, progress: Progress) -> None:
        """Pass progress on, if anyone listens."""
        if self.progress is not None:
            self.progress(progress)


@dataclass(frozen=True, slots=True)
class EngineResult:
    """A dump written (not yet committed)."""

    size: int
    sha256: str
    #: seconds the VM was paused by the dump (None if it was not running)
    paused_s: float | None
    details: EngineDetails
    #: the survey that describes the dump (the engine may have taken a fresh one)
    survey: Survey


class Engine(Protocol):
    """A dump engine."""

    @property
    def traits(self) -> EngineTraits:
        """What it offers (formats, modes, options); :data:`~.spec.ENGINE_TRAITS`' row."""
        ...

    def assess(self, before: Survey) -> tuple[bool, str]:
        """Whether it can dump this surveyed VM, and why (or why not), in a sentence."""
        ...

    async def run(self, job: EngineJob) -> EngineResult:
        """Write the dump into ``job.output``; raise a :class:`~qmpdump.errors.DumpError`."""
        ...
