"""The CLI's journal of migration settings (:mod:`qmpdump.cli.settings_journal`), on its own.

Real files in real folders; real processes for "the same QEMU" and "another one" (this test's
own process and a child that exits). The restore path against a real QEMU is in
``test_dump_snapshot.py``. Where a session is needed, :class:`_NoQMP` stands in for it: these
tests check that a stale entry is dropped *without* any QMP command, which a stand-in that
fails on every command proves and a real QEMU could not.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, cast

import pytest

from qmpdump.cli.settings_journal import (
    JournalEntry,
    SettingsJournal,
    journal_address,
    journal_hooks,
    restore_orphaned,
    runtime_dir,
)
from qmpdump.errors import DumpBusy, HostAccessError
from qmpdump.host.procfs import process_start_ticks
from qmpdump.qmp.migsettings import MigrationSettings, describe_settings
from qmpdump.qmp.session import QMPSession

SETTINGS = MigrationSettings({"background-snapshot": False}, {"max-bandwidth": 134217728})


class _NoQMP:
    """A session that knows its peer's pid and fails on any command."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    async def execute(self, command: str, *_args: Any, **_kw: Any) -> Any:
        raise AssertionError(f"no QMP command expected, got {command!r}")


def _session(pid: int | None) -> QMPSession:
    return cast(QMPSession, _NoQMP(pid))


def _gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- where


def test_runtime_dir_order() -> None:
    assert runtime_dir({"QMPDUMP_RUNTIME_DIR": "/x/y", "XDG_RUNTIME_DIR": "/r"}, 0) == Path("/x/y")
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, 0) == Path("/run/qmpdump")
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == Path(
        "/run/user/1000/qmpdump"
    )
    assert runtime_dir({}, 1000) == Path(tempfile.gettempdir()) / "qmpdump-1000"
    assert runtime_dir({"QMPDUMP_RUNTIME_DIR": ""}, 1000) == runtime_dir({}, 1000)


def test_the_address_names_the_file_through_a_hash(tmp_path: Path) -> None:
    rel = QMPSession("vm.sock")
    assert journal_address(rel) == os.path.join(os.getcwd(), "vm.sock")
    assert journal_address(QMPSession(("127.0.0.1", 4444))) == "127.0.0.1:4444"
    hostile = SettingsJournal(tmp_path, "../../etc/passwd")
    digest = hashlib.sha256(b"../../etc/passwd").hexdigest()[:32]
    assert hostile.path == tmp_path / f"migration-{digest}.json"
    assert SettingsJournal(tmp_path, "/a.sock").path != SettingsJournal(tmp_path, "/b.sock").path


# ---------------------------------------------------------------- files


def test_write_makes_a_0700_folder_and_a_0600_file(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        journal = SettingsJournal(tmp_path / "run" / "qmpdump", "/vm.sock")
        assert journal.record(os.getpid(), SETTINGS)
    finally:
        os.umask(old)
    assert stat.S_IMODE(journal.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
    assert [p.name for p in journal.directory.iterdir()] == [journal.path.name]
    entry = journal.read()
    assert entry is not None
    assert entry.qemu_pid == os.getpid()
    assert entry.qemu_start == process_start_ticks(os.getpid())
    assert entry.qmp_address == "/vm.sock"
    assert (entry.capabilities, entry.parameters) == (SETTINGS.capabilities, SETTINGS.parameters)
    journal.remove()
    assert not journal.path.exists()
    journal.remove()  # idempotent


def test_a_failed_write_keeps_the_old_entry_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    assert journal.record(os.getpid(), SETTINGS)
    before = journal.path.read_bytes()

    def no_rename(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(HostAccessError, match="No space left"):
        journal.record(os.getpid(), MigrationSettings({"background-snapshot": True}, {}))
    assert journal.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [journal.path.name]


def test_an_entry_of_the_same_process_keeps_the_originals(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    assert journal.record(os.getpid(), SETTINGS)
    # A second run after a failed restore: what it reads as "before" is what we had set.
    assert journal.record(os.getpid(), MigrationSettings({}, {"max-bandwidth": 1 << 40}))
    entry = journal.read()
    assert entry is not None
    assert entry.parameters == {"max-bandwidth": 134217728}
    assert entry.capabilities == {"background-snapshot": False}


def test_no_entry_for_a_process_that_is_gone(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    assert not journal.record(_gone_pid(), SETTINGS)
    assert not journal.path.exists()


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "file"])
def test_a_folder_others_could_plant_in_is_refused(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "j"
    if kind == "world-writable":
        directory.mkdir()
        directory.chmod(0o777)
    elif kind == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        directory.symlink_to(tmp_path / "real")
    else:
        directory.write_text("")
    journal = SettingsJournal(directory, "/vm.sock")
    with pytest.raises(HostAccessError, match="journal folder"):
        journal.record(os.getpid(), SETTINGS)
    with pytest.raises(HostAccessError, match="journal folder"):
        journal.read()


def test_a_missing_folder_is_no_entry(tmp_path: Path) -> None:
    assert SettingsJournal(tmp_path / "none", "/vm.sock").read() is None


def test_a_corrupt_entry_is_reported(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    journal.path.write_text('{"version": 1, "qmp_address": 3}')
    with pytest.raises(HostAccessError, match="not a qmpdump journal entry"):
        journal.read()


# ---------------------------------------------------------------- hooks and restore


async def test_hooks_write_then_remove(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    hooks = journal_hooks(journal, _session(os.getpid()))
    assert hooks.before_migration_settings is not None
    assert hooks.after_migration_settings is not None
    await hooks.before_migration_settings(SETTINGS)
    assert journal.read() is not None
    await hooks.after_migration_settings()
    assert not journal.path.exists()


async def test_no_journal_without_qemus_pid(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "127.0.0.1:4444")
    hooks = journal_hooks(journal, _session(None))
    assert hooks.before_migration_settings is not None
    await hooks.before_migration_settings(SETTINGS)
    assert not journal.path.exists()


@pytest.mark.parametrize("which", ["gone", "another"])
async def test_an_entry_of_another_qemu_is_dropped_without_touching_this_one(
    tmp_path: Path, which: str
) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    pid = _gone_pid() if which == "gone" else os.getpid()
    journal.write(
        JournalEntry(
            qmp_address="/vm.sock",
            qemu_pid=pid,
            qemu_start=12345 if which == "gone" else process_start_ticks(pid) or 0,
            capabilities=SETTINGS.capabilities,
            parameters=SETTINGS.parameters,
            changed_at=0.0,
        )
    )
    # "another": the VM's socket is now served by a different process than the entry names
    session_pid = os.getppid() if which == "another" else os.getpid()
    err = io.StringIO()
    await restore_orphaned(journal, _session(session_pid), err)
    assert not journal.path.exists()
    assert "note: removed a journal" in err.getvalue()
    assert "warning" not in err.getvalue()


async def test_a_reused_pid_is_another_process(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    start = process_start_ticks(os.getpid())
    assert start is not None
    journal.write(
        JournalEntry(
            qmp_address="/vm.sock",
            qemu_pid=os.getpid(),
            qemu_start=start - 1,  # same pid, started at another time
            capabilities={},
            parameters={},
            changed_at=0.0,
        )
    )
    err = io.StringIO()
    await restore_orphaned(journal, _session(os.getpid()), err)
    assert not journal.path.exists()


async def test_an_unreadable_entry_is_kept_with_a_warning(tmp_path: Path) -> None:
    journal = SettingsJournal(tmp_path, "/vm.sock")
    journal.path.write_text("not json")
    err = io.StringIO()
    await restore_orphaned(journal, _session(os.getpid()), err)
    assert journal.path.exists()
    assert err.getvalue().startswith("qmpdump: warning:")


def test_describe_settings() -> None:
    assert describe_settings(SETTINGS) == "background-snapshot=off, max-bandwidth=134217728"
    assert describe_settings(MigrationSettings({}, {})) == "nothing"


async def test_no_entry_no_output(tmp_path: Path) -> None:
    err = io.StringIO()
    await restore_orphaned(SettingsJournal(tmp_path, "/vm.sock"), _session(1), err)
    assert err.getvalue() == ""


# ---------------------------------------------------------------- a run that still runs


def _entry(writer_pid: int | None, writer_start: int | None) -> JournalEntry:
    start = process_start_ticks(os.getpid())
    assert start is not None
    return JournalEntry(
        qmp_address="/vm.sock",
        qemu_pid=os.getpid(),
        qemu_start=start,
        capabilities=SETTINGS.capabilities,
        parameters=SETTINGS.parameters,
        changed_at=0.0,
        writer_pid=writer_pid,
        writer_start=writer_start,
    )


async def test_the_entry_of_a_dump_that_still_runs_makes_the_vm_busy(tmp_path: Path) -> None:
    # Another qmpdump dump (a real process here) is taking a snapshot of the VM: its entry is
    # not a killed run's. Ending "its orphaned snapshot" would end that dump; no QMP command
    # may be sent (the stand-in session fails on any), and the entry stays.
    writer = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        start = process_start_ticks(writer.pid)
        assert start is not None
        journal = SettingsJournal(tmp_path, "/vm.sock")
        journal.write(_entry(writer.pid, start))
        with pytest.raises(DumpBusy, match=f"another qmpdump dump \\(pid {writer.pid}\\)"):
            await restore_orphaned(journal, _session(os.getpid()), io.StringIO())
        assert journal.path.exists()
    finally:
        writer.kill()
        await writer.wait()


@pytest.mark.parametrize("writer", ["gone", "reused"])
async def test_the_entry_of_a_dump_that_ended_is_a_killed_runs(tmp_path: Path, writer: str) -> None:
    # The writer is gone (or its pid now names another process): the entry is restored as a
    # killed run's; a stand-in session that fails on any command makes the restore fail, which
    # is the path that proves it was tried (the entry is kept for the next run, with a warning).
    if writer == "gone":
        pid, start = _gone_pid(), 12345
    else:
        pid, start = os.getppid(), (process_start_ticks(os.getppid()) or 0) - 1
    journal = SettingsJournal(tmp_path, "/vm.sock")
    journal.write(_entry(pid, start))
    err = io.StringIO()
    with pytest.raises(AssertionError, match="no QMP command expected"):
        await restore_orphaned(journal, _session(os.getpid()), err)
