"""Tests of qmpdump.service.store (a real SQLite file in tmp_path) and of retention_victims.

Crash recovery is tested the way a crash looks to the store: the file is closed with jobs left
running and queued and a pause journalled, then opened again. Durability of a commit is checked
by reading it through a second, independent connection while the store is still open.
Retention is a pure function: hypothesis properties against its definition, plus examples.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpdump.errors import QEMUGone, UsageError
from qmpdump.service.retention import retention_victims
from qmpdump.service.store import (
    DAEMON_RESTARTED,
    MIGRATIONS,
    SCHEMA_VERSION,
    STORE_FILE,
    DumpRecord,
    JobError,
    JobResult,
    JobState,
    JobStore,
    migrate,
    new_job_id,
)


class Clock:
    """A clock that ticks one second per reading."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / STORE_FILE


@pytest.fixture
def store(db_path: Path) -> Iterator[JobStore]:
    with JobStore(db_path, clock=Clock()) as s:
        yield s


RESULT = JobResult(
    path=Path("/var/lib/qmpdump/dumps/vm1/vm1-20240101T000000Z.elf"),
    size=4096,
    sha256="ab" * 32,
    engine="backend",
    paused_s=0.25,
)


# --- jobs ---


def test_create_and_get(store: JobStore) -> None:
    job = store.create("vm1", "auto", "elf", "consistent")
    assert re.fullmatch(r"[0-9a-f]{32}", job.id)
    assert job.state is JobState.QUEUED
    assert (job.vm, job.engine, job.format, job.mode) == ("vm1", "auto", "elf", "consistent")
    assert job.started is None
    assert job.ended is None
    assert (job.written, job.total) == (0, None)
    assert job.result is None
    assert job.error is None
    assert not job.finished
    assert store.get(job.id) == job
    assert store.get("0" * 32) is None


def test_job_ids_sort_by_time() -> None:
    ids = [new_job_id(t) for t in (1.0, 1.001, 2.5, 1_700_000_000.0, 1_700_000_000.002)]
    assert ids == sorted(ids)
    assert len({new_job_id(5.0) for _ in range(100)}) == 100


def test_fifo_per_vm_and_overall(store: JobStore) -> None:
    a1 = store.create("a", "auto", "elf", "consistent")
    b1 = store.create("b", "auto", "elf", "consistent")
    a2 = store.create("a", "qemu", "kdump-zlib", "consistent")
    assert store.next_queued("a") == a1
    assert store.next_queued("b") == b1
    assert store.next_queued("c") is None
    assert store.next_queued() == a1
    assert store.next_queued(busy={"a"}) == b1
    assert store.next_queued(busy=["a", "b"]) is None
    store.mark_running(a1.id)
    assert store.next_queued("a") == a2
    assert store.next_queued() == b1


def test_lifecycle_success(store: JobStore) -> None:
    job = store.create("vm1", "auto", "elf", "consistent")
    running = store.mark_running(job.id)
    assert running.state is JobState.RUNNING
    assert running.started is not None
    assert running.started > job.created
    assert store.update_progress(job.id, 1024, 8192)
    got = store.get(job.id)
    assert got is not None
    assert (got.written, got.total) == (1024, 8192)
    done = store.finish(job.id, JobState.SUCCEEDED, result=RESULT)
    assert done.state is JobState.SUCCEEDED
    assert done.finished
    assert done.result == RESULT
    assert done.error is None
    assert done.ended is not None
    assert done.started is not None
    assert done.ended > done.started
    assert not store.update_progress(job.id, 2048, 8192)


def test_lifecycle_failure_keeps_the_error(store: JobStore) -> None:
    job = store.create("vm1", "qemu", "elf", "consistent")
    store.mark_running(job.id)
    error = JobError.from_exception(QEMUGone("QEMU exited while the dump ran"))
    assert error == JobError("QEMU exited while the dump ran", "QEMUGone", 42)
    failed = store.finish(job.id, JobState.FAILED, error=error)
    assert failed.state is JobState.FAILED
    assert failed.error == error
    assert failed.result is None


def test_from_exception_of_a_builtin() -> None:
    assert JobError.from_exception(OSError()) == JobError("OSError", "OSError", None)


def test_cancel_a_queued_job(store: JobStore) -> None:
    job = store.create("vm1", "auto", "elf", "consistent")
    cancelled = store.finish(job.id, JobState.CANCELLED)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.started is None
    assert cancelled.error is None
    assert store.next_queued("vm1") is None


def test_invalid_transitions(store: JobStore) -> None:
    job = store.create("vm1", "auto", "elf", "consistent")
    with pytest.raises(ValueError, match="it cannot become succeeded"):
        store.finish(job.id, JobState.SUCCEEDED, result=RESULT)
    store.mark_running(job.id)
    with pytest.raises(ValueError, match="is running, not queued"):
        store.mark_running(job.id)
    with pytest.raises(ValueError, match="takes a result"):
        store.finish(job.id, JobState.SUCCEEDED)
    with pytest.raises(ValueError, match="takes an error"):
        store.finish(job.id, JobState.FAILED)
    with pytest.raises(ValueError, match="takes no result"):
        store.finish(job.id, JobState.CANCELLED, result=RESULT)
    with pytest.raises(ValueError, match="not a final state"):
        store.finish(job.id, JobState.QUEUED)
    store.finish(job.id, JobState.CANCELLED, error=JobError("operator cancelled"))
    with pytest.raises(ValueError, match="is cancelled; it cannot become failed"):
        store.finish(job.id, JobState.FAILED, error=JobError("late"))
    with pytest.raises(LookupError, match="no job 'nope'"):
        store.mark_running("nope")
    with pytest.raises(LookupError):
        store.finish("nope", JobState.CANCELLED)


def test_list_filters_newest_first(store: JobStore) -> None:
    a1 = store.create("a", "auto", "elf", "consistent")
    b1 = store.create("b", "auto", "elf", "consistent")
    a2 = store.create("a", "auto", "elf", "live")
    store.mark_running(a1.id)
    assert [j.id for j in store.list()] == [a2.id, b1.id, a1.id]
    assert [j.id for j in store.list(vm="a")] == [a2.id, a1.id]
    assert [j.id for j in store.list(state=JobState.QUEUED)] == [a2.id, b1.id]
    assert [j.id for j in store.list(vm="a", state=JobState.RUNNING)] == [a1.id]
    assert [j.id for j in store.list(limit=1)] == [a2.id]
    assert store.list(vm="zz") == []


def test_prune_finished(store: JobStore) -> None:
    old = store.create("a", "auto", "elf", "consistent")
    store.finish(old.id, JobState.CANCELLED)
    cutoff = store.create("a", "auto", "elf", "consistent").created  # stays queued
    newer = store.create("a", "auto", "elf", "consistent")
    store.finish(newer.id, JobState.CANCELLED)
    assert store.prune_finished(older_than=cutoff) == 1
    assert store.get(old.id) is None
    assert len(store.list()) == 2


def test_concurrent_threads(store: JobStore) -> None:
    def work(vm: str) -> None:
        for _ in range(20):
            job = store.create(vm, "auto", "elf", "consistent")
            store.mark_running(job.id)
            store.update_progress(job.id, 1, 2)
            store.finish(job.id, JobState.SUCCEEDED, result=RESULT)

    threads = [threading.Thread(target=work, args=(f"vm{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = store.list(limit=1000)
    assert len(jobs) == 80
    assert all(j.state is JobState.SUCCEEDED for j in jobs)


# --- durability and crash recovery ---


def test_file_format(store: JobStore, db_path: Path) -> None:
    assert store.schema_version == SCHEMA_VERSION
    peer = sqlite3.connect(db_path)
    try:
        assert peer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert peer.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        peer.close()


def test_commits_are_visible_to_another_connection(store: JobStore, db_path: Path) -> None:
    job = store.create("vm1", "auto", "elf", "consistent")
    store.journal_pause("vm1", "/run/vm1.qmp", job.id)
    peer = sqlite3.connect(db_path)
    try:
        assert peer.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchall() == [
            ("queued",)
        ]
        assert peer.execute("SELECT vm, job_id FROM pauses").fetchall() == [("vm1", job.id)]
    finally:
        peer.close()


def test_recover_after_crash(db_path: Path) -> None:
    clock = Clock()
    with JobStore(db_path, clock=clock) as before:
        done = before.create("a", "auto", "elf", "consistent")
        before.mark_running(done.id)
        before.finish(done.id, JobState.SUCCEEDED, result=RESULT)
        running = before.create("a", "auto", "elf", "consistent")
        before.mark_running(running.id)
        before.update_progress(running.id, 100, 200)
        queued_a = before.create("a", "auto", "elf", "consistent")
        queued_b = before.create("b", "auto", "elf", "consistent")
    # the daemon "crashed": a new one opens the same file
    with JobStore(db_path, clock=clock) as after:
        [failed] = after.recover_after_crash()
        assert failed.id == running.id
        assert failed.state is JobState.FAILED
        assert failed.error == DAEMON_RESTARTED
        assert failed.error.message == "daemon restarted during the dump"
        assert failed.ended is not None
        assert (failed.written, failed.total) == (100, 200)
        kept = after.get(done.id)
        assert kept is not None
        assert kept.state is JobState.SUCCEEDED
        assert kept.result == RESULT
        assert after.next_queued() == queued_a
        assert after.next_queued("b") == queued_b
        assert after.recover_after_crash() == []


def test_pause_journal_survives_reopen(db_path: Path) -> None:
    with JobStore(db_path, clock=Clock()) as before:
        first = before.journal_pause("vm1", "/run/vm1.qmp", "j1")
        before.journal_pause("vm2", "tcp:127.0.0.1:4444")
        assert before.pending_pauses()[0] == first
    with JobStore(db_path, clock=Clock(2e9)) as after:
        pending = after.pending_pauses()
        assert [(p.vm, p.qmp_address, p.job_id) for p in pending] == [
            ("vm1", "/run/vm1.qmp", "j1"),
            ("vm2", "tcp:127.0.0.1:4444", None),
        ]
        assert pending[0] == first
        # a second pause of the same VM replaces the record that was never cleared
        again = after.journal_pause("vm1", "/run/vm1.qmp", "j3")
        assert after.clear_pause("vm2")
        assert not after.clear_pause("vm2")
        assert after.pending_pauses() == [again]
    with JobStore(db_path) as last:
        assert last.pending_pauses() == [again]
        assert last.clear_pause("vm1")
        assert last.pending_pauses() == []


def test_migration_settings_journal_survives_reopen(db_path: Path) -> None:
    with JobStore(db_path, clock=Clock()) as before:
        first = before.journal_migration_settings(
            "vm1",
            "/run/vm1.qmp",
            "j1",
            {"background-snapshot": False},
            {"max-bandwidth": 134217728},
            qemu_pid=4242,
            qemu_start=77,
        )
        before.journal_migration_settings(
            "vm2", "tcp:127.0.0.1:4444", None, {}, {"max-bandwidth": 1}
        )
        assert before.pending_migration_settings()[0] == first
    with JobStore(db_path, clock=Clock(2e9)) as after:
        pending = after.pending_migration_settings()
        assert pending[0] == first
        assert [(m.vm, m.job_id, m.capabilities, m.parameters, m.qemu_pid) for m in pending] == [
            ("vm1", "j1", {"background-snapshot": False}, {"max-bandwidth": 134217728}, 4242),
            ("vm2", None, {}, {"max-bandwidth": 1}, None),
        ]
        # The same QEMU again (a restore that failed): the first values are the originals.
        again = after.journal_migration_settings(
            "vm1",
            "/run/vm1.qmp",
            "j3",
            {"background-snapshot": True},
            {"max-bandwidth": 1 << 40, "downtime-limit": 300},
            qemu_pid=4242,
            qemu_start=77,
        )
        assert again.capabilities == {"background-snapshot": False}
        assert again.parameters == {"max-bandwidth": 134217728, "downtime-limit": 300}
        assert again.job_id == "j3"
        # Another QEMU process: its own values replace the record.
        other = after.journal_migration_settings(
            "vm2",
            "tcp:127.0.0.1:4444",
            "j4",
            {"background-snapshot": False},
            {},
            qemu_pid=99,
            qemu_start=1,
        )
        assert other.capabilities == {"background-snapshot": False}
        assert other.parameters == {}
        assert after.clear_migration_settings("vm2")
        assert not after.clear_migration_settings("vm2")
        assert after.pending_migration_settings() == [again]
    with JobStore(db_path) as last:
        assert last.pending_migration_settings() == [again]
        assert last.clear_migration_settings("vm1")
        assert last.pending_migration_settings() == []


def test_a_store_of_schema_4_opens_with_its_jobs_and_pauses(db_path: Path) -> None:
    """A file the previous qmpdump wrote (schema 4, no migration settings journal) opens: its
    jobs and pauses are kept and the new journal is there, empty."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for version in range(4):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(
        "INSERT INTO jobs (id, vm, engine, format, mode, state, created) "
        "VALUES ('00', 'vm1', 'auto', 'elf', 'consistent', 'queued', 1.0)"
    )
    conn.execute(
        "INSERT INTO pauses (vm, qmp_address, job_id, paused_at, qemu_pid, qemu_start) "
        "VALUES ('vm1', '/run/vm1.qmp', '00', 2.0, 10, 20)"
    )
    conn.close()
    with JobStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        job = store.get("00")
        assert job is not None
        assert job.state is JobState.QUEUED
        assert [(p.vm, p.qemu_pid, p.qemu_start) for p in store.pending_pauses()] == [
            ("vm1", 10, 20)
        ]
        assert store.pending_migration_settings() == []
        store.journal_migration_settings(
            "vm1", "/run/vm1.qmp", "00", {"background-snapshot": False}, {}
        )
        assert [m.vm for m in store.pending_migration_settings()] == ["vm1"]


def test_migrate_from_empty(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "raw.sqlite3", isolation_level=None)
    try:
        assert migrate(conn) == 0
        assert migrate(conn) == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "pauses", "dumps", "migration_settings"} <= tables
    finally:
        conn.close()


def test_newer_schema_is_refused(db_path: Path) -> None:
    JobStore(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UsageError, match=rf"schema version {SCHEMA_VERSION + 1}; this qmpdump"):
        JobStore(db_path)


def test_not_a_database(db_path: Path) -> None:
    db_path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(UsageError, match="not a usable job store"):
        JobStore(db_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="job store"):
        JobStore(tmp_path / "no" / "such" / STORE_FILE)


def test_in_state_dir_and_close(tmp_path: Path) -> None:
    store = JobStore.in_state_dir(tmp_path)
    assert store.path == tmp_path / STORE_FILE
    store.close()
    store.close()
    with pytest.raises(ValueError, match="is closed"):
        store.list()


# --- the dump catalogue ---


def test_dump_catalogue(store: JobStore, db_path: Path) -> None:
    d2 = store.record_dump("a", Path("/d/a/2.elf"), 200, 2.0, sha256="22", job_id="j2")
    d1 = store.record_dump("a", Path("/d/a/1.elf"), 100, 1.0)
    b1 = store.record_dump("b", Path("/d/b/1.elf"), 300, 1.5, sha256="33")
    assert store.dumps("a") == [d1, d2]
    assert store.dumps() == [d1, b1, d2]
    assert d2 == DumpRecord(Path("/d/a/2.elf"), "a", 200, 2.0, "22", "j2")
    assert store.forget_dump(Path("/d/a/1.elf"))
    assert not store.forget_dump(Path("/d/a/1.elf"))
    store.close()
    with JobStore(db_path) as again:
        assert again.dumps("a") == [d2]


# --- retention ---


@dataclass(frozen=True)
class Dump:
    created: float
    size: int
    tag: int


def test_retention_examples() -> None:
    dumps = [Dump(float(t), 10, t) for t in (3, 1, 4, 2)]
    assert retention_victims(dumps, None, None) == []
    assert [d.tag for d in retention_victims(dumps, 2, None)] == [1, 2]
    assert [d.tag for d in retention_victims(dumps, None, 25)] == [1, 2]
    assert [d.tag for d in retention_victims(dumps, 3, 20)] == [1, 2]
    assert [d.tag for d in retention_victims(dumps, 1, None)] == [1, 2, 3]
    # the newest is kept even when it alone is over the byte limit
    assert [d.tag for d in retention_victims(dumps, None, 5)] == [1, 2, 3]
    # an old small dump is not kept in place of a newer large one
    mixed = [Dump(1.0, 1, 1), Dump(2.0, 100, 2), Dump(3.0, 10, 3)]
    assert [d.tag for d in retention_victims(mixed, None, 50)] == [1, 2]
    assert retention_victims([], 1, 0) == []


def test_retention_works_on_store_records(store: JobStore) -> None:
    for i in range(5):
        store.record_dump("a", Path(f"/d/a/{i}.elf"), 10, float(i))
    victims = retention_victims(store.dumps("a"), 2, None)
    assert [v.path.name for v in victims] == ["0.elf", "1.elf", "2.elf"]


def test_retention_refuses_bad_limits() -> None:
    with pytest.raises(ValueError, match="keep_count"):
        retention_victims([], 0, None)
    with pytest.raises(ValueError, match="keep_bytes"):
        retention_victims([], None, -1)


dump_lists = st.lists(
    st.builds(
        Dump,
        created=st.integers(0, 20).map(float),  # coarse, so that ties happen
        size=st.integers(0, 100),
        tag=st.just(0),
    ),
    max_size=12,
).map(lambda ds: [Dump(d.created, d.size, i) for i, d in enumerate(ds)])
counts = st.none() | st.integers(1, 15)
byte_limits = st.none() | st.integers(0, 600)


def fits(dumps: list[Dump], keep_count: int | None, keep_bytes: int | None) -> bool:
    return (keep_count is None or len(dumps) <= keep_count) and (
        keep_bytes is None or sum(d.size for d in dumps) <= keep_bytes
    )


@given(dump_lists, counts, byte_limits)
def test_retention_properties(
    dumps: list[Dump], keep_count: int | None, keep_bytes: int | None
) -> None:
    victims = retention_victims(dumps, keep_count, keep_bytes)
    ordered = sorted(dumps, key=lambda d: d.created)  # stable: ties keep the given order
    # oldest first: the victims are exactly the oldest dumps, in order
    assert victims == ordered[: len(victims)]
    kept = ordered[len(victims) :]
    if dumps:
        # never the newest
        assert kept
        assert kept[-1] == ordered[-1]
        # the rest fits the limits whenever the newest alone does
        if fits(kept[-1:], keep_count, keep_bytes):
            assert fits(kept, keep_count, keep_bytes)
        else:
            assert kept == ordered[-1:]
    # minimal: sparing the youngest victim would break a limit
    if victims:
        assert not fits(ordered[len(victims) - 1 :], keep_count, keep_bytes)
