"""Dump files on disk: never a partial file presented as a dump, never readable by others.

A dump is written to ``NAME.partial`` (mode 0600, created exclusively) next to its final name,
fsynced, then renamed to ``NAME``; its sidecar ``NAME.json`` (0600) follows the same path; the
folder is fsynced so the rename survives a crash. On any failure or cancel the partial is
removed, and so are the folders created for it. Every folder qmpdump creates is 0700, parents
included. A guest memory dump holds the guest's secrets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from qmpdump.errors import DiskFull, DumpError, UsageError

__all__ = ["PARTIAL_SUFFIX", "DumpFile", "DumpTarget", "dump_name", "sidecar_path", "write_error"]

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600
DIR_MODE = 0o700


def dump_name(vm: str, job_id: str, extension: str, now: float) -> str:
    """The name qmpdump gives a dump, file or object: ``VM-YYYYMMDDTHHMMSSZ-JOB.EXT`` (UTC;
    the last 8 hex digits of the job id). ``vm`` must already be a validated VM name."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{vm}-{stamp}-{job_id[-8:]}.{extension}"


class DumpTarget(Protocol):
    """Where an engine writes a dump: a seekable fd, then committed with its sidecar or discarded.

    :class:`DumpFile` (a local file) is the one target today. A sink elsewhere (object storage)
    is another implementation: engines write ``fd`` (a local spool), ``commit`` publishes it
    with its sidecar and returns where it went, ``discard`` removes every trace.
    """

    #: where the engine writes (seekable: engines may write out of order)
    fd: int

    @property
    def final(self) -> Path:
        """The dump's name, for messages and the sidecar's neighbour."""
        ...

    def commit(self, sidecar: Mapping[str, Any] | None = None) -> Path:
        """Make the dump durable and visible; write the sidecar next to it."""
        ...

    def discard(self) -> None:
        """Remove whatever was written; idempotent."""
        ...


def sidecar_path(dump: Path) -> Path:
    """The sidecar JSON of a dump: ``NAME.json`` next to ``NAME``."""
    return dump.with_name(dump.name + ".json")


def write_error(err: OSError, path: Path) -> DumpError:
    """The dump error for a failed write: :class:`DiskFull` for ENOSPC/EDQUOT."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        full = DiskFull(f"no space left on the filesystem of {path.parent}")
        full.errno = err.errno
        return full
    return DumpError(f"cannot write {path}: {err.strerror or err}")


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents, each 0700 whatever the umask; the new ones."""
    missing: list[Path] = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    created: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue  # made by someone else meanwhile: not ours to chmod or remove
            created.append(path)
            path.chmod(DIR_MODE)
    except OSError:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return created


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DumpFile:
    """One dump being written. Use as a context manager: it is discarded unless committed."""

    def __init__(self, final: Path, fd: int, created: list[Path] | None = None) -> None:
        self.final = final
        self.partial = final.with_name(final.name + PARTIAL_SUFFIX)
        self.fd = fd
        self.committed = False
        #: folders made for this dump, parents first (removed again if it is discarded)
        self.created = list(created or [])

    @classmethod
    def create(cls, final: Path, *, overwrite: bool = False) -> DumpFile:
        """Create ``FINAL.partial`` exclusively (0600); make the folder (0700) if missing."""
        final = Path(os.path.abspath(final))
        folder = final.parent
        if final.name.endswith(PARTIAL_SUFFIX):
            raise UsageError(f"{final}: a dump's name may not end in {PARTIAL_SUFFIX}")
        if final.exists() and not overwrite:
            raise UsageError(f"{final} exists already (choose another name, or overwrite)")
        try:
            created = _make_folders(folder)
        except OSError as err:
            raise UsageError(f"cannot create the folder {folder}: {err.strerror}") from err
        dump = cls(final, -1, created)
        if not folder.is_dir():
            dump._remove_folders()
            raise UsageError(f"{folder} is not a folder")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            dump.fd = os.open(dump.partial, flags, FILE_MODE)
        except FileExistsError as err:
            dump._remove_folders()  # the partial is someone else's
            raise UsageError(
                f"{dump.partial} exists: another dump to this name is running, or one crashed "
                "(remove the file if no qmpdump is writing it)"
            ) from err
        except OSError as err:
            dump._remove_folders()
            raise UsageError(f"cannot create {dump.partial}: {err.strerror}") from err
        os.fchmod(dump.fd, FILE_MODE)  # whatever the umask said
        return dump

    def commit(self, sidecar: Mapping[str, Any] | None = None) -> Path:
        """Make the dump durable and visible under its final name; write the sidecar."""
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if sidecar is not None:
                side = sidecar_path(self.final)
                side_partial = side.with_name(side.name + PARTIAL_SUFFIX)
                data = (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
                fd = os.open(side_partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                try:
                    os.fchmod(fd, FILE_MODE)
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(side_partial, side)
            os.replace(self.partial, self.final)
            _fsync_dir(self.final.parent)
        except OSError as err:
            self.discard()
            raise write_error(err, self.final) from err
        self.committed = True
        return self.final

    def discard(self) -> None:
        """Close and remove the partial file (and a partial sidecar), and the folders made for
        it if they are empty. Safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            self.partial.unlink(missing_ok=True)
            side = sidecar_path(self.final)
            side.with_name(side.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
            self._remove_folders()

    def _remove_folders(self) -> None:
        """Remove the folders made for this dump, deepest first, while they are empty."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (someone else's files) or gone: leave it
        self.created = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.discard()
