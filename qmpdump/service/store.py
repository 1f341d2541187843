"""The daemon's durable memory: jobs, the pause journal, the migration settings journal and the
dump catalogue, in one SQLite file.

One file (:data:`STORE_FILE` under ``state_dir``), opened in WAL mode with ``synchronous=FULL``:
every state change is on disk when its method returns, so the daemon can act on it (send
``stop`` after :meth:`JobStore.journal_pause`) and find it again after a crash. The one exception
is :meth:`JobStore.update_progress`, committed with ``synchronous=NORMAL`` -- a lost progress
figure does no harm, and the next FULL commit makes it durable anyway (SQLite's WAL is ordered).

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` holds one list of
statements per version step, each step applied in its own transaction (:func:`migrate`).

Jobs (``queued -> running -> succeeded | failed | cancelled``; a queued job may also end
``failed`` or ``cancelled`` without running):

* Ids are 32 hex digits: the creation time in milliseconds (12 digits), then 80 random bits, so
  ids sort by creation to the millisecond (two ids of one millisecond may not). FIFO order
  comes from an insertion counter, never from the id.
* After a crash (:meth:`JobStore.recover_after_crash`) a ``running`` job becomes ``failed`` with
  "daemon restarted during the dump": its output was a ``.partial`` file the daemon removes at
  start. ``queued`` jobs stay queued and run when the daemon is back, in their original order:
  the operator asked for them and nothing about them was lost.

The two journals name what a crash must not leave behind on a VM: a pause the daemon made
(:meth:`JobStore.journal_pause`, before ``stop``) and migration settings an engine changed
(:meth:`JobStore.journal_migration_settings`, before the change, with the values to put back).
Each is written before the daemon acts and cleared once it has undone what it did; at start-up
(or on a new QMP session) an entry still there is undone on the same QEMU process.

Times are seconds since the epoch (UTC), as floats. Every method is synchronous and quick; the
connection is shared between threads (``check_same_thread=False``) behind a lock, so the daemon
may call methods directly or through ``asyncio.to_thread``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qmpdump.errors import QmpdumpError, UsageError

__all__ = [
    "DAEMON_RESTARTED",
    "FINAL_STATES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STORE_FILE",
    "DumpRecord",
    "Job",
    "JobError",
    "JobResult",
    "JobState",
    "JobStore",
    "MigrationSettingsRecord",
    "PauseRecord",
    "migrate",
    "new_job_id",
]

#: The store's file name under ``state_dir``.
STORE_FILE = "qmpdump.sqlite3"


class JobState(StrEnum):
    """Where a job stands."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The states a job never leaves.
FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a succeeded job produced."""

    #: the dump file the service chose (its sidecar is next to it)
    path: Path
    size: int
    sha256: str
    #: the engine that ran (``auto`` resolved to ``backend`` or ``qemu``)
    engine: str
    #: how long the VM was paused, None if the engine could not tell
    paused_s: float | None
    #: ``s3://bucket/key`` when the dump went to a sink (then ``path`` is only its name)
    url: str | None = None


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed or was cancelled."""

    message: str
    #: the exception's class name, e.g. ``QEMUGone``; None when no exception was involved
    error_class: str | None = None
    #: the exit code the CLI would give it (:attr:`qmpdump.errors.QmpdumpError.exit_code`)
    exit_code: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> JobError:
        """The record of an exception: its message, class name and exit code."""
        return cls(
            message=str(exc) or type(exc).__name__,
            error_class=type(exc).__name__,
            exit_code=exc.exit_code if isinstance(exc, QmpdumpError) else None,
        )


#: The error a ``running`` job gets when the daemon finds it after a restart: a dump that did
#: not complete, in the CLI's terms (:class:`qmpdump.errors.DumpError`, exit 44).
DAEMON_RESTARTED = JobError(
    message="daemon restarted during the dump", error_class="DumpError", exit_code=44
)


@dataclass(frozen=True, slots=True)
class Job:
    """One dump request and what became of it."""

    id: str
    vm: str
    #: as requested: ``auto``, ``backend`` or ``qemu`` (the one that ran is in :attr:`result`)
    engine: str
    format: str
    #: ``consistent`` or ``live``
    mode: str
    state: JobState
    created: float
    started: float | None
    ended: float | None
    #: bytes written to the dump so far
    written: int
    #: guest bytes to dump (when known), and those done (see :class:`qmpdump.engines.base.Progress`)
    total: int | None
    result: JobResult | None
    error: JobError | None
    completed: int = 0
    #: the ``[[sink]]`` the dump goes to; None: the VM's dump folder
    sink: str | None = None
    #: bytes of the dump the sink has stored so far (None before the upload starts)
    uploaded: int | None = None
    #: the dump file this job writes (its ``.partial`` while it runs), once chosen
    target: Path | None = None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINAL_STATES


@dataclass(frozen=True, slots=True)
class PauseRecord:
    """The daemon's intent to pause a VM, journalled before it sends ``stop``."""

    vm: str
    #: as the configuration spells it: a socket path or ``tcp:HOST:PORT``
    qmp_address: str
    job_id: str | None
    paused_at: float
    #: the QEMU process paused: its pid and its start time (``/proc/PID/stat`` field 22, clock
    #: ticks since boot), so that a restart resumes only the QEMU the daemon paused
    qemu_pid: int | None = None
    qemu_start: int | None = None


@dataclass(frozen=True, slots=True)
class MigrationSettingsRecord:
    """Migration settings an engine is about to change on a VM, journalled with the values to
    put back (the snapshot engine's ``background-snapshot`` and ``max-bandwidth``)."""

    vm: str
    #: as the configuration spells it: a socket path or ``tcp:HOST:PORT``
    qmp_address: str
    job_id: str | None
    changed_at: float
    #: ``migrate-set-capabilities`` entries to restore: ``{capability: state}``
    capabilities: dict[str, bool]
    #: ``migrate-set-parameters`` arguments to restore
    parameters: dict[str, int]
    #: the QEMU process changed (as in :class:`PauseRecord`): only it is put back
    qemu_pid: int | None = None
    qemu_start: int | None = None


@dataclass(frozen=True, slots=True)
class DumpRecord:
    """A dump file the service wrote and keeps under retention."""

    path: Path
    vm: str
    size: int
    created: float
    sha256: str | None
    job_id: str | None


def new_job_id(now: float) -> str:
    """A job id: the time in milliseconds (12 hex digits) and 80 random bits (20 hex digits)."""
    return f"{round(now * 1000) & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


# --- schema ---

_STATES = ", ".join(f"'{s.value}'" for s in JobState)

#: MIGRATIONS[i] takes the schema from version i to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            vm TEXT NOT NULL,
            engine TEXT NOT NULL,
            format TEXT NOT NULL,
            mode TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_STATES})),
            created REAL NOT NULL,
            started REAL,
            ended REAL,
            written INTEGER NOT NULL DEFAULT 0,
            total INTEGER,
            result_path TEXT,
            result_size INTEGER,
            result_sha256 TEXT,
            result_engine TEXT,
            result_paused_s REAL,
            error_message TEXT,
            error_class TEXT,
            error_exit_code INTEGER
        )""",
        "CREATE INDEX jobs_by_state ON jobs (state, vm, seq)",
        "CREATE INDEX jobs_by_vm ON jobs (vm, seq)",
        """CREATE TABLE pauses (
            vm TEXT PRIMARY KEY,
            qmp_address TEXT NOT NULL,
            job_id TEXT,
            paused_at REAL NOT NULL
        )""",
        """CREATE TABLE dumps (
            path TEXT PRIMARY KEY,
            vm TEXT NOT NULL,
            size INTEGER NOT NULL,
            created REAL NOT NULL,
            sha256 TEXT,
            job_id TEXT
        )""",
        "CREATE INDEX dumps_by_vm ON dumps (vm, created)",
    ),
    # 2: guest bytes done, beside bytes written: the one Progress of every engine
    ("ALTER TABLE jobs ADD COLUMN completed INTEGER NOT NULL DEFAULT 0",),
    # 3: the [[sink]] a job's dump goes to (NULL: the dump folder), where it went, and how
    # much of it the sink has stored
    (
        "ALTER TABLE jobs ADD COLUMN sink TEXT",
        "ALTER TABLE jobs ADD COLUMN result_url TEXT",
        "ALTER TABLE jobs ADD COLUMN uploaded INTEGER",
    ),
    # 4: what a crash can leave behind, so that start-up removes only this daemon's own
    # partial files and resumes only the QEMU process it paused
    (
        "ALTER TABLE jobs ADD COLUMN target TEXT",
        "ALTER TABLE pauses ADD COLUMN qemu_pid INTEGER",
        "ALTER TABLE pauses ADD COLUMN qemu_start INTEGER",
        # pruning by age: finished jobs by the time they ended
        "CREATE INDEX jobs_by_end ON jobs (ended) WHERE ended IS NOT NULL",
    ),
    # 5: migration settings an engine changed (the snapshot engine's capability and
    # bandwidth), with the values to put back after a crash; JSON objects
    (
        """CREATE TABLE migration_settings (
            vm TEXT PRIMARY KEY,
            qmp_address TEXT NOT NULL,
            job_id TEXT,
            changed_at REAL NOT NULL,
            capabilities TEXT NOT NULL,
            parameters TEXT NOT NULL,
            qemu_pid INTEGER,
            qemu_start INTEGER
        )""",
    ),
)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, source: str = "the job store") -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; return the version found before.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises :class:`UsageError`
    if the file was written by a newer qmpdump.
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise UsageError(
            f"{source} has schema version {found}; this qmpdump knows up to {SCHEMA_VERSION} "
            "(was it written by a newer qmpdump?)"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return found


# --- the store ---

#: :meth:`JobStore.count`'s query by (a state is given, a VM is given)
_COUNT_SQL: dict[tuple[bool, bool], str] = {
    (False, False): "SELECT COUNT(*) FROM jobs",
    (True, False): "SELECT COUNT(*) FROM jobs WHERE state = ?",
    (False, True): "SELECT COUNT(*) FROM jobs WHERE vm = ?",
    (True, True): "SELECT COUNT(*) FROM jobs WHERE state = ? AND vm = ?",
}


def _job(row: sqlite3.Row) -> Job:
    result = None
    if row["result_path"] is not None:
        result = JobResult(
            path=Path(row["result_path"]),
            size=row["result_size"],
            sha256=row["result_sha256"],
            engine=row["result_engine"],
            paused_s=row["result_paused_s"],
            url=row["result_url"],
        )
    error = None
    if row["error_message"] is not None:
        error = JobError(
            message=row["error_message"],
            error_class=row["error_class"],
            exit_code=row["error_exit_code"],
        )
    return Job(
        id=row["id"],
        vm=row["vm"],
        engine=row["engine"],
        format=row["format"],
        mode=row["mode"],
        state=JobState(row["state"]),
        created=row["created"],
        started=row["started"],
        ended=row["ended"],
        written=row["written"],
        total=row["total"],
        result=result,
        error=error,
        completed=row["completed"],
        sink=row["sink"],
        uploaded=row["uploaded"],
        target=None if row["target"] is None else Path(row["target"]),
    )


def _pause(row: sqlite3.Row) -> PauseRecord:
    return PauseRecord(
        vm=row["vm"],
        qmp_address=row["qmp_address"],
        job_id=row["job_id"],
        paused_at=row["paused_at"],
        qemu_pid=row["qemu_pid"],
        qemu_start=row["qemu_start"],
    )


def _migration_settings(row: sqlite3.Row) -> MigrationSettingsRecord:
    return MigrationSettingsRecord(
        vm=row["vm"],
        qmp_address=row["qmp_address"],
        job_id=row["job_id"],
        changed_at=row["changed_at"],
        capabilities={str(k): bool(v) for k, v in json.loads(row["capabilities"]).items()},
        parameters={str(k): int(v) for k, v in json.loads(row["parameters"]).items()},
        qemu_pid=row["qemu_pid"],
        qemu_start=row["qemu_start"],
    )


def _dump(row: sqlite3.Row) -> DumpRecord:
    return DumpRecord(
        path=Path(row["path"]),
        vm=row["vm"],
        size=row["size"],
        created=row["created"],
        sha256=row["sha256"],
        job_id=row["job_id"],
    )


class JobStore:
    """Jobs, the two journals and the dump catalogue in one SQLite file; see the module doc.

    Unknown job ids raise :class:`LookupError`; a transition a job's state does not allow (e.g.
    finishing a finished job) raises :class:`ValueError`. Both are the daemon's bugs or races
    that it must turn into API answers.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (creating if needed) the store at ``path`` and migrate it.

        Raises :class:`UsageError` if the file cannot be opened or is not a job store this
        qmpdump can use. The directory must exist.
        """
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        #: a second, read-only connection for queries: WAL lets it read while the writer
        #: commits (and fsyncs) in the store's thread, so a read on the event loop never waits
        #: for a write (issue 11, item 12)
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except sqlite3.Error as err:
            raise UsageError(f"{self.path}: cannot open the job store: {err}") from err
        try:
            conn.row_factory = sqlite3.Row
            journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise UsageError(
                    f"{self.path}: the job store needs WAL mode, SQLite gave {journal!r}"
                )
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn, str(self.path))
        except sqlite3.Error as err:
            conn.close()
            raise UsageError(f"{self.path}: not a usable job store: {err}") from err
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        try:
            reader = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as err:
            conn.close()
            self._conn = None
            raise UsageError(f"{self.path}: cannot open the job store: {err}") from err
        self._reader = reader

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, clock: Callable[[], float] = time.time) -> Self:
        """The store at ``state_dir/``:data:`STORE_FILE`."""
        return cls(state_dir / STORE_FILE, clock=clock)

    # --- plumbing ---

    def close(self) -> None:
        """Close the connection; idempotent. Further calls raise :class:`ValueError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the job store {self.path} is closed")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (durably) on success, rolled back otherwise."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (SQLITE_FULL) may or may not have rolled back already: make
                # sure no transaction stays open, and keep the first error.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[sqlite3.Row]:
        with self._read_lock:
            if self._reader is None:
                raise ValueError(f"the job store {self.path} is closed")
            return self._reader.execute(sql, args).fetchall()

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        return int(self._query("PRAGMA user_version")[0][0])

    # --- jobs ---

    def create(self, vm: str, engine: str, format: str, mode: str, sink: str | None = None) -> Job:
        """Queue a new job and return it (``sink``: a ``[[sink]]`` name, None for local)."""
        now = self._clock()
        job_id = new_job_id(now)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO jobs (id, vm, engine, format, mode, state, created, sink) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, vm, engine, format, mode, JobState.QUEUED.value, now, sink),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def _must_get(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise LookupError(f"no job {job_id!r}")
        return job

    def next_queued(self, vm: str | None = None, *, busy: Collection[str] = ()) -> Job | None:
        """The oldest queued job (of ``vm`` if given, of no VM in ``busy``), or None."""
        rows = self._query(
            "SELECT * FROM jobs WHERE state = ?1 AND (?2 IS NULL OR vm = ?2) "
            "AND vm NOT IN (SELECT value FROM json_each(?3)) ORDER BY seq LIMIT 1",
            (JobState.QUEUED.value, vm, json.dumps(sorted(busy))),
        )
        return _job(rows[0]) if rows else None

    def mark_running(self, job_id: str) -> Job:
        """Move a queued job to ``running`` and stamp its start."""
        with self._tx() as conn:
            changed = conn.execute(
                "UPDATE jobs SET state = ?, started = ? WHERE id = ? AND state = ?",
                (JobState.RUNNING.value, self._clock(), job_id, JobState.QUEUED.value),
            ).rowcount
        job = self._must_get(job_id)
        if not changed:
            raise ValueError(f"job {job_id} is {job.state}, not queued")
        return job

    def set_target(self, job_id: str, target: Path) -> None:
        """Record, durably, the file a running job is about to write (before it creates it)."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET target = ? WHERE id = ?", (str(target), job_id))

    def update_progress(
        self,
        job_id: str,
        written: int,
        total: int | None,
        completed: int | None = None,
        uploaded: int | None = None,
    ) -> bool:
        """Record a running job's progress; False if it is not running (any more).

        Committed without an fsync; callers should still throttle it (about once a second).
        """
        with self._lock:
            conn = self._connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with self._tx() as tx:
                    changed = tx.execute(
                        "UPDATE jobs SET written = ?, total = ?, completed = ?, uploaded = ? "
                        "WHERE id = ? AND state = ?",
                        (written, total, completed or 0, uploaded, job_id, JobState.RUNNING.value),
                    ).rowcount
            finally:
                conn.execute("PRAGMA synchronous = FULL")
        return bool(changed)

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
    ) -> Job:
        """End a job: ``succeeded`` (running, with a result), ``failed`` (with an error) or
        ``cancelled`` (error optional); failed and cancelled may also end a queued job."""
        state = JobState(state)
        if state is JobState.SUCCEEDED:
            if result is None or error is not None:
                raise ValueError("a succeeded job takes a result and no error")
            allowed = (JobState.RUNNING, JobState.RUNNING)
        elif state is JobState.FAILED:
            if error is None or result is not None:
                raise ValueError("a failed job takes an error and no result")
            allowed = (JobState.QUEUED, JobState.RUNNING)
        elif state is JobState.CANCELLED:
            if result is not None:
                raise ValueError("a cancelled job takes no result")
            allowed = (JobState.QUEUED, JobState.RUNNING)
        else:
            raise ValueError(f"{state} is not a final state")
        r = result
        e = error
        with self._tx() as conn:
            changed = conn.execute(
                "UPDATE jobs SET state = ?, ended = ?, "
                "result_path = ?, result_size = ?, result_sha256 = ?, result_engine = ?, "
                "result_paused_s = ?, result_url = ?, "
                "error_message = ?, error_class = ?, error_exit_code = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (
                    state.value,
                    self._clock(),
                    None if r is None else str(r.path),
                    None if r is None else r.size,
                    None if r is None else r.sha256,
                    None if r is None else r.engine,
                    None if r is None else r.paused_s,
                    None if r is None else r.url,
                    None if e is None else e.message,
                    None if e is None else e.error_class,
                    None if e is None else e.exit_code,
                    job_id,
                    allowed[0].value,
                    allowed[1].value,
                ),
            ).rowcount
        job = self._must_get(job_id)
        if not changed:
            raise ValueError(f"job {job_id} is {job.state}; it cannot become {state}")
        return job

    def list(
        self, vm: str | None = None, state: JobState | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally of one VM and in one state; at most ``limit``."""
        rows = self._query(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR vm = ?1) AND (?2 IS NULL OR state = ?2) "
            "ORDER BY seq DESC LIMIT ?3",
            (vm, None if state is None else JobState(state).value, limit),
        )
        return [_job(row) for row in rows]

    def recover_after_crash(self) -> builtins.list[Job]:
        """At start-up: fail the jobs left ``running`` (:data:`DAEMON_RESTARTED`), return them.

        Queued jobs stay queued (see the module doc). Call it before starting any job.
        """
        with self._tx() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE state = ? ORDER BY seq",
                    (JobState.RUNNING.value,),
                )
            ]
            conn.execute(
                "UPDATE jobs SET state = ?, ended = ?, error_message = ?, error_class = ?, "
                "error_exit_code = ? WHERE state = ?",
                (
                    JobState.FAILED.value,
                    self._clock(),
                    DAEMON_RESTARTED.message,
                    DAEMON_RESTARTED.error_class,
                    DAEMON_RESTARTED.exit_code,
                    JobState.RUNNING.value,
                ),
            )
        return [self._must_get(job_id) for job_id in ids]

    def prune_finished(self, older_than: float, keep: int | None = None) -> int:
        """Delete finished jobs that ended before ``older_than``, and beyond the newest
        ``keep`` finished ones; return how many. Queued and running jobs are never touched."""
        finals = sorted(s.value for s in FINAL_STATES)
        with self._tx() as conn:
            gone = conn.execute(
                "DELETE FROM jobs WHERE state IN (?, ?, ?) AND ended < ?",
                (*finals, older_than),
            ).rowcount
            if keep is not None:
                gone += conn.execute(
                    "DELETE FROM jobs WHERE state IN (?1, ?2, ?3) AND seq <= ("
                    "SELECT seq FROM jobs WHERE state IN (?1, ?2, ?3) "
                    "ORDER BY seq DESC LIMIT 1 OFFSET ?4)",
                    (*finals, keep),
                ).rowcount
        return gone

    def count(self, vm: str | None = None, state: JobState | None = None) -> int:
        """How many jobs (of ``vm``, in ``state``): an index count, not a listing."""
        # Only the conditions given, so that SQLite counts on an index (jobs_by_state,
        # jobs_by_vm) rather than scanning the table for "?1 IS NULL OR ...".
        args = tuple(
            a for a in (None if state is None else JobState(state).value, vm) if a is not None
        )
        return int(self._query(_COUNT_SQL[state is not None, vm is not None], args)[0][0])

    # --- the pause journal ---

    def journal_pause(
        self,
        vm: str,
        qmp_address: str,
        job_id: str | None = None,
        *,
        qemu_pid: int | None = None,
        qemu_start: int | None = None,
    ) -> PauseRecord:
        """Record, durably, that the daemon is about to ``stop`` the VM. Call it before ``stop``.

        Replaces an earlier record of the same VM (one the daemon could not clear).
        """
        record = PauseRecord(
            vm=vm,
            qmp_address=qmp_address,
            job_id=job_id,
            paused_at=self._clock(),
            qemu_pid=qemu_pid,
            qemu_start=qemu_start,
        )
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pauses "
                "(vm, qmp_address, job_id, paused_at, qemu_pid, qemu_start) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.vm,
                    record.qmp_address,
                    record.job_id,
                    record.paused_at,
                    record.qemu_pid,
                    record.qemu_start,
                ),
            )
        return record

    def clear_pause(self, vm: str) -> bool:
        """Forget the VM's pause record once ``cont`` succeeded; False if there was none."""
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM pauses WHERE vm = ?", (vm,)).rowcount)

    def pending_pauses(self) -> builtins.list[PauseRecord]:
        """The VMs the daemon paused and did not see resumed, oldest first.

        At start-up, resume each one that is still paused, then clear its record.
        """
        rows = self._query("SELECT * FROM pauses ORDER BY paused_at, vm")
        return [_pause(row) for row in rows]

    # --- the migration settings journal ---

    def journal_migration_settings(
        self,
        vm: str,
        qmp_address: str,
        job_id: str | None,
        capabilities: dict[str, bool],
        parameters: dict[str, int],
        *,
        qemu_pid: int | None = None,
        qemu_start: int | None = None,
    ) -> MigrationSettingsRecord:
        """Record, durably, the migration settings to put back before an engine changes them.

        An earlier record of the same VM and the same QEMU process (one a failed restore left)
        keeps its values: they are the originals, the new ones may be what the engine set. A
        record of another QEMU process is replaced.
        """
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM migration_settings WHERE vm = ?", (vm,)).fetchone()
            if row is not None:
                old = _migration_settings(row)
                if (old.qemu_pid, old.qemu_start) == (qemu_pid, qemu_start):
                    capabilities = {**capabilities, **old.capabilities}
                    parameters = {**parameters, **old.parameters}
            record = MigrationSettingsRecord(
                vm=vm,
                qmp_address=qmp_address,
                job_id=job_id,
                changed_at=self._clock(),
                capabilities=dict(capabilities),
                parameters=dict(parameters),
                qemu_pid=qemu_pid,
                qemu_start=qemu_start,
            )
            conn.execute(
                "INSERT OR REPLACE INTO migration_settings (vm, qmp_address, job_id, "
                "changed_at, capabilities, parameters, qemu_pid, qemu_start) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.vm,
                    record.qmp_address,
                    record.job_id,
                    record.changed_at,
                    json.dumps(record.capabilities, sort_keys=True),
                    json.dumps(record.parameters, sort_keys=True),
                    record.qemu_pid,
                    record.qemu_start,
                ),
            )
        return record

    def clear_migration_settings(self, vm: str) -> bool:
        """Forget the VM's record once its settings are back; False if there was none."""
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM migration_settings WHERE vm = ?", (vm,)).rowcount)

    def pending_migration_settings(self) -> builtins.list[MigrationSettingsRecord]:
        """The VMs whose migration settings the daemon changed and did not see restored,
        oldest first. On a new session to the same QEMU, restore them, then clear the record.
        """
        rows = self._query("SELECT * FROM migration_settings ORDER BY changed_at, vm")
        return [_migration_settings(row) for row in rows]

    # --- the dump catalogue ---

    def record_dump(
        self,
        vm: str,
        path: Path,
        size: int,
        created: float,
        *,
        sha256: str | None = None,
        job_id: str | None = None,
    ) -> DumpRecord:
        """Add a committed dump file to the catalogue (replacing a record of the same path)."""
        record = DumpRecord(
            path=Path(path), vm=vm, size=size, created=created, sha256=sha256, job_id=job_id
        )
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO dumps (path, vm, size, created, sha256, job_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (str(record.path), vm, size, created, sha256, job_id),
            )
        return record

    def dumps(self, vm: str | None = None) -> builtins.list[DumpRecord]:
        """The catalogued dumps (of one VM), oldest first."""
        if vm is None:
            rows = self._query("SELECT * FROM dumps ORDER BY created, rowid")
        else:
            rows = self._query("SELECT * FROM dumps WHERE vm = ? ORDER BY created, rowid", (vm,))
        return [_dump(row) for row in rows]

    def forget_dump(self, path: Path) -> bool:
        """Remove a dump from the catalogue (after deleting it); False if it was not there."""
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM dumps WHERE path = ?", (str(path),)).rowcount)
