"""The CLI's journal of migration settings: what ``qmpdump dump`` changed on a VM, to put back.

The snapshot engine turns on ``background-snapshot`` and raises ``max-bandwidth`` for a dump,
and restores them at the end. The daemon journals them in its store; the CLI has no store, so a
CLI killed mid-dump (SIGKILL, a crash) would leave the capability on, and the operator's next
real migration would silently become a background snapshot. This module is the CLI's journal:

* **where**: :func:`runtime_dir`, ``$QMPDUMP_RUNTIME_DIR``, else ``/run/qmpdump`` for root, else
  ``$XDG_RUNTIME_DIR/qmpdump``, else ``qmpdump-UID`` under the temp folder; a 0700 folder owned
  by the user (one that is not, or that others may write to, is refused: a journal someone else
  can plant would make qmpdump send their settings to a VM).
* **what**: one JSON file per VM, named from a hash of its QMP address (never a path component
  a client chose), holding the address, the QEMU process (pid from ``SO_PEERCRED`` or libvirt,
  and its start time: :func:`~qmpdump.host.procfs.process_start_ticks`) and the settings to put
  back. Written atomically (a 0600 temporary file, fsync, rename) by the engine's
  ``before_migration_settings`` hook, before the change; removed by ``after_migration_settings``.
* **when it is read**: at the start of every ``qmpdump dump`` on a QMP session, before the dump
  (:func:`restore_orphaned`): an entry whose writer (another ``qmpdump dump``: pid and start
  time) still runs is that run's, and the new dump is refused as busy; otherwise an entry of the
  same QEMU process is a killed run's; its orphaned
  background snapshot is cancelled, its settings are sent back, the file is removed and one
  warning line says what was restored. An entry of another process (QEMU restarted on the same
  socket) is removed with a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, ValidationError

from qmpdump.engines.base import PauseHooks
from qmpdump.errors import DumpBusy, HostAccessError, QmpdumpError
from qmpdump.host.procfs import process_start_ticks
from qmpdump.qmp.migsettings import (
    MIGRATION_IDLE,
    MigrationSettings,
    describe_settings,
    end_orphaned_migration,
    migration_status,
    restore_migration_settings,
)
from qmpdump.qmp.passthrough import LibvirtQMPSession
from qmpdump.qmp.session import QMPSession

__all__ = [
    "JournalEntry",
    "SettingsJournal",
    "journal_address",
    "journal_hooks",
    "restore_orphaned",
    "runtime_dir",
]

#: the environment variable that chooses the journal's folder
RUNTIME_DIR_ENV = "QMPDUMP_RUNTIME_DIR"
#: the system-wide folder for root (systemd's RuntimeDirectory= would be the same)
ROOT_RUNTIME_DIR = Path("/run/qmpdump")
#: the entry format's version (the file is ours: strict)
JOURNAL_VERSION = 1


def runtime_dir(env: dict[str, str] | None = None, euid: int | None = None) -> Path:
    """The journal's folder (not created): see the module docstring for the order."""
    env = dict(os.environ) if env is None else env
    euid = os.geteuid() if euid is None else euid
    if env.get(RUNTIME_DIR_ENV):
        return Path(env[RUNTIME_DIR_ENV])
    if euid == 0:
        return ROOT_RUNTIME_DIR
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "qmpdump"
    return Path(tempfile.gettempdir()) / f"qmpdump-{euid}"


def journal_address(session: QMPSession) -> str:
    """The address that names a VM's journal: an absolute socket path (the same VM from any
    working folder), ``HOST:PORT``, or libvirt's URI and domain."""
    if isinstance(session, LibvirtQMPSession) or not isinstance(session.address, str):
        return session.where
    return os.path.abspath(session.address)


class JournalEntry(BaseModel):
    """One VM's journal file: what a running ``qmpdump dump`` changed, to put back."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: int = JOURNAL_VERSION
    #: the QMP address, as :func:`journal_address` spells it
    qmp_address: str
    #: the QEMU process the settings were changed on: only it gets them back
    qemu_pid: int
    qemu_start: int
    #: ``migrate-set-capabilities`` entries to restore: ``{capability: state}``
    capabilities: dict[str, bool]
    #: ``migrate-set-parameters`` arguments to restore
    parameters: dict[str, int]
    #: when (seconds since the epoch)
    changed_at: float
    #: the ``qmpdump dump`` process that wrote it (pid and start time): while it runs, its
    #: entry is not a killed run's (entries written before these fields: unknown)
    writer_pid: int | None = None
    writer_start: int | None = None


def _private_dir(directory: Path, *, create: bool) -> bool:
    """Whether ``directory`` exists as a folder of ours that others cannot write to (created
    0700 if ``create``); HostAccessError if it exists and is not."""
    try:
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise HostAccessError(
            f"cannot create the journal folder {directory}: {err.strerror or err}"
        ) from err
    if not stat.S_ISDIR(st.st_mode):
        raise HostAccessError(f"the journal folder {directory} is not a folder (or is a link)")
    if st.st_uid != os.geteuid():
        raise HostAccessError(f"the journal folder {directory} belongs to uid {st.st_uid}")
    if st.st_mode & 0o022:
        raise HostAccessError(
            f"the journal folder {directory} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o})"
        )
    return True


@dataclass(frozen=True, slots=True)
class SettingsJournal:
    """The journal file of one VM (its QMP address) in ``directory``."""

    directory: Path
    qmp_address: str

    @property
    def path(self) -> Path:
        """``migration-<sha256 of the address, 32 hex digits>.json``."""
        digest = hashlib.sha256(self.qmp_address.encode()).hexdigest()[:32]
        return self.directory / f"migration-{digest}.json"

    def read(self) -> JournalEntry | None:
        """The entry, None if there is none; HostAccessError if it cannot be read or parsed,
        or lies in a folder others could have planted it in."""
        if not _private_dir(self.directory, create=False):
            return None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise HostAccessError(f"cannot read {self.path}: {err.strerror or err}") from err
        try:
            return JournalEntry.model_validate_json(data)
        except ValidationError as err:
            raise HostAccessError(f"{self.path} is not a qmpdump journal entry") from err

    def write(self, entry: JournalEntry) -> None:
        """Replace the entry atomically: a 0600 temporary file beside it, fsync, rename, fsync
        of the folder (a crash leaves the old entry or the new one, never half of one)."""
        _private_dir(self.directory, create=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".migration-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp: 0600
                f.write(entry.model_dump_json().encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise HostAccessError(f"cannot write {self.path}: {err.strerror or err}") from err

    def remove(self) -> None:
        """Remove the entry (quiet if there is none)."""
        try:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.directory)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise HostAccessError(f"cannot remove {self.path}: {err.strerror or err}") from err

    def record(self, pid: int, settings: MigrationSettings) -> bool:
        """Journal ``settings`` to put back on QEMU process ``pid``; False if it is gone.

        An entry of the same process (one a failed restore left) keeps its values: they are
        the originals, the new ones may be what the engine had set (as the daemon's store).
        """
        start = process_start_ticks(pid)
        if start is None:
            return False
        capabilities = dict(settings.capabilities)
        parameters = dict(settings.parameters)
        try:
            old = self.read()
        except HostAccessError:
            old = None  # unreadable: replaced by what we know
        if old is not None and (old.qemu_pid, old.qemu_start) == (pid, start):
            capabilities = {**capabilities, **old.capabilities}
            parameters = {**parameters, **old.parameters}
        self.write(
            JournalEntry(
                qmp_address=self.qmp_address,
                qemu_pid=pid,
                qemu_start=start,
                capabilities=capabilities,
                parameters=parameters,
                changed_at=time.time(),
                writer_pid=os.getpid(),
                writer_start=process_start_ticks(os.getpid()),
            )
        )
        return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_hooks(journal: SettingsJournal, session: QMPSession) -> PauseHooks:
    """The engine's hooks that journal its migration settings in ``journal``.

    A failure to write the entry fails the dump before any setting is changed (a
    :class:`~qmpdump.errors.HostAccessError`): better no snapshot than one a kill can't undo.
    """

    async def before(settings: MigrationSettings) -> None:
        pid = session.pid
        # Without QEMU's pid (QMP over TCP, a remote libvirt) a later run could not tell this
        # QEMU from another one on the same address, and would put settings back on a process
        # that never had them changed: no journal then (the settings stay changed if we die).
        if pid is None:
            return
        await asyncio.to_thread(journal.record, pid, settings)

    async def after() -> None:
        # The settings are back: an entry we could not remove only makes the next run send
        # the same values again, which changes nothing. The dump is not failed for it.
        with contextlib.suppress(HostAccessError):
            await asyncio.to_thread(journal.remove)

    return PauseHooks(before_migration_settings=before, after_migration_settings=after)


async def restore_orphaned(journal: SettingsJournal, session: QMPSession, err: TextIO) -> None:
    """Put back what a killed ``qmpdump dump`` left changed on this VM, before a new dump.

    Same QEMU process (pid and start time): cancel its orphaned background snapshot if QEMU
    still runs it, restore the settings, remove the entry, one warning line on ``err``.
    Another process (or a gone one): the entry is removed with a note. A failed restore: a
    warning, the entry stays for the next run, and the dump goes on unless a migration still
    runs (:class:`~qmpdump.errors.DumpBusy`). If only the capability could not be put back the
    dump goes on: the snapshot engine then finds ``background-snapshot`` already on and leaves
    it so, the other engines do not migrate.
    """
    try:
        entry = await asyncio.to_thread(journal.read)
    except HostAccessError as exc:
        err.write(f"qmpdump: warning: {exc}; it is left in place\n")
        return
    if entry is None:
        return
    if entry.writer_pid is not None and entry.writer_pid != os.getpid():
        writer_start = await asyncio.to_thread(process_start_ticks, entry.writer_pid)
        if writer_start is not None and writer_start == entry.writer_start:
            # Not a killed run's: another qmpdump dump is taking a snapshot of this VM now.
            # Ending "its orphaned snapshot" would end that dump.
            raise DumpBusy(
                f"another qmpdump dump (pid {entry.writer_pid}) is taking a snapshot of this VM "
                "and has changed its migration settings; try again once it has ended"
            )
    same = (
        session.pid == entry.qemu_pid
        and await asyncio.to_thread(process_start_ticks, entry.qemu_pid) == entry.qemu_start
    )
    if not same:
        with contextlib.suppress(HostAccessError):  # tried again next time
            await asyncio.to_thread(journal.remove)
        err.write(
            f"qmpdump: note: removed a journal of migration settings for QEMU pid "
            f"{entry.qemu_pid} on {entry.qmp_address}: that QEMU no longer serves it\n"
        )
        return
    what = describe_settings(entry)
    try:
        cancelled = await end_orphaned_migration(session)
        await restore_migration_settings(session, entry)
    except QmpdumpError as exc:
        err.write(
            f"qmpdump: warning: could not restore the migration settings a killed qmpdump "
            f"changed ({what}): {exc}; kept in {journal.path} for the next run\n"
        )
        if await migration_status(session) not in MIGRATION_IDLE:
            raise DumpBusy(
                "a migration a killed qmpdump started still runs on this VM and did not end "
                "on migrate_cancel"
            ) from exc
        return
    try:
        await asyncio.to_thread(journal.remove)
    except HostAccessError as exc:  # the next run sends the same values again: harmless
        err.write(f"qmpdump: warning: {exc}\n")
    err.write(
        f"qmpdump: warning: restored the migration settings a killed qmpdump dump had "
        f"changed on this VM ({what})"
        + (", after cancelling its orphaned background snapshot" if cancelled else "")
        + "\n"
    )
