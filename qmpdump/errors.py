"""The one error tree of qmpdump.

Every error qmpdump raises on purpose derives from :class:`QmpdumpError`. Each class says when it
is raised and carries its details as attributes; its message is one sentence an operator can act
on (addresses in hex). The CLI maps a class to an exit code through :attr:`QmpdumpError.exit_code`
and the API (later) to an HTTP status, so that mapping lives here and nowhere else.

``asyncio.CancelledError`` is never wrapped.

::

    QmpdumpError
     +-- UsageError              bad arguments or configuration (exit 2)
     |    +-- FdPassingUnavailable  the engine must pass an fd, and QMP runs over TCP (exit 2)
     +-- TestbedError            the built-in test/demo VMs (exit 10)
     |    +-- GuestBuildError    the guest kernel/initramfs could not be built
     |    +-- QemuFetchError     the cached QEMU build could not be fetched or unpacked
     |    +-- LaunchError        QEMU exited or failed to start
     |    +-- GuestTimeout       the guest did not reach a state in time
     +-- QMPConnectError         no QMP session could be opened (exit 20..24)
     |    +-- SocketMissing      no socket at the path (exit 21)
     |    +-- SocketPermission   the socket exists but may not be opened (exit 22)
     |    +-- NotQEMU            the peer does not speak QMP (exit 23)
     |    +-- LibvirtError       libvirt could not give us the domain (exit 60)
     |         +-- LibvirtUnavailable   libvirtd cannot be reached (exit 61)
     |         +-- LibvirtPermission    libvirt denied access (exit 62)
     |         +-- DomainNotFound       no domain of that name (exit 63)
     |         +-- DomainNotRunning     the domain is not running (exit 64)
     +-- QMPTimeout              QEMU did not answer in time (exit 24)
     +-- QMPCommandError         QEMU answered a command with an error (exit 25)
     |    +-- UnsafeThroughLibvirt  a command qmpdump won't send through libvirt (exit 65)
     +-- QMPDisconnected         the QMP connection dropped (exit 26)
     +-- QMPReplyError           QEMU's reply does not have the expected shape (exit 27)
     +-- LayoutError             the guest memory layout could not be built (exit 30)
     +-- HostAccessError         a host-side fact (backing file, /proc) could not be read (exit 31)
     +-- ElfFormatError          bytes are not the ELF64 core expected (exit 32)
     +-- DumpError               a dump did not complete; nothing was left behind
          +-- DumpBusy           QEMU is already running a dump (exit 40)
          +-- DumpCancelled      the operator cancelled it (exit 41)
          +-- QEMUGone           QEMU exited or the QMP connection dropped mid-dump (exit 42)
          +-- DiskFull           the target filesystem is full (exit 43)
          +-- DumpFailed         QEMU reported the dump as failed (exit 44)
          +-- SourceUnproven     the backend engine cannot prove what it would read (exit 49)
          +-- SinkError          the dump could not be stored in object storage (exit 45)
               +-- SinkCredentials    no credentials, or the server refused them (exit 46)
               +-- SinkBucketMissing  the bucket does not exist (exit 47)
               +-- SinkUnreachable    the object store did not answer (exit 48)
          +-- MigrationStreamError  QEMU's migration stream cannot be read (exit 55)
          +-- SnapshotRefused    the snapshot engine will not run on this VM (exit 56)
     +-- ServiceError            the daemon's answers (exit 50..53; HTTP status on the class)
          +-- NotFound           no such VM, job or dump (404)
          +-- Conflict           the request conflicts with the state (409)
          +-- Unavailable        the VM is not connected, or the daemon is stopping (503)
          +-- BadGateway         QEMU answered with something qmpdump cannot use (502)
          +-- GatewayTimeout     QEMU did not answer in time: hung or overloaded (504)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BadGateway",
    "Conflict",
    "DiskFull",
    "DomainNotFound",
    "DomainNotRunning",
    "DumpBusy",
    "DumpCancelled",
    "DumpError",
    "DumpFailed",
    "ElfFormatError",
    "FdPassingUnavailable",
    "GatewayTimeout",
    "GuestBuildError",
    "GuestTimeout",
    "HostAccessError",
    "LaunchError",
    "LayoutError",
    "LibvirtError",
    "LibvirtPermission",
    "LibvirtUnavailable",
    "MigrationStreamError",
    "NotFound",
    "NotQEMU",
    "QEMUGone",
    "QMPCommandError",
    "QMPConnectError",
    "QMPDisconnected",
    "QMPReplyError",
    "QMPTimeout",
    "QemuFetchError",
    "QmpdumpError",
    "ServiceError",
    "SinkBucketMissing",
    "SinkCredentials",
    "SinkError",
    "SinkUnreachable",
    "SnapshotRefused",
    "SocketMissing",
    "SocketPermission",
    "SourceUnproven",
    "TestbedError",
    "Unavailable",
    "UnsafeThroughLibvirt",
    "UsageError",
]


class QmpdumpError(Exception):
    """Root of every error qmpdump raises on purpose."""

    #: process exit code the CLI uses for this class of failure
    exit_code: int = 1


class UsageError(QmpdumpError):
    """Raised when arguments or configuration are invalid; nothing was started."""

    exit_code = 2


class FdPassingUnavailable(UsageError):
    """Raised when a dump needs to pass a pipe to QEMU and the QMP session runs over TCP (file
    descriptors travel only over UNIX sockets, ``SCM_RIGHTS``)."""

    def __init__(self, address: str, engine: str | None = None) -> None:
        self.address = address
        self.engine = engine
        who = f"the {engine} engine" if engine else "this dump"
        super().__init__(
            f"{address}: {who} passes a pipe to QEMU, which QMP over TCP cannot carry; "
            "give qmpdump QEMU's UNIX QMP socket"
        )


class TestbedError(QmpdumpError):
    """Raised by the built-in VM testbed (used by the demo and the test suite)."""

    __test__ = False  # not a pytest test class, despite its name
    exit_code = 10


class GuestBuildError(TestbedError):
    """Raised when the test guest (kernel and initramfs) cannot be fetched or built."""


class QemuFetchError(TestbedError):
    """Raised when a cached QEMU build (bookworm-backports' 10.0) cannot be fetched or unpacked."""


class LaunchError(TestbedError):
    """Raised when QEMU fails to start or exits while it was expected to run.

    Carries QEMU's exit code (None if it still ran), the full command line and QEMU's own log.
    """

    def __init__(self, reason: str, *, exit_code: int | None, argv: Sequence[str], log: str):
        self.reason = reason
        self.qemu_exit_code = exit_code
        self.argv = list(argv)
        self.log = log
        super().__init__(
            f"{reason} (QEMU exit code {exit_code}).\n"
            f"command line: {' '.join(self.argv)}\n"
            f"QEMU log:\n{log.rstrip() or '(empty)'}"
        )


class GuestTimeout(TestbedError):
    """Raised when a test VM does not reach an expected state (booted, plugged) in time."""

    def __init__(self, what: str, timeout_s: float, log_tail: str = "", *, vcpus: str = ""):
        self.what = what
        self.timeout_s = timeout_s
        self.log_tail = log_tail
        #: Where QEMU's vCPUs were when it was given up (run state, instruction pointers).
        self.vcpus = vcpus
        tail = f"\nlast serial output:\n{log_tail}" if log_tail else ""
        state = f"\n{vcpus}" if vcpus else ""
        super().__init__(f"{what} did not happen within {timeout_s:g} s.{tail}{state}")


class QMPConnectError(QmpdumpError, ConnectionError):
    """Raised when no QMP session can be opened; the cause is kept in :attr:`exc`."""

    exit_code = 20

    def __init__(self, address: str, message: str, exc: BaseException | None = None):
        self.address = address
        self.exc = exc
        super().__init__(f"{address}: {message}")


class SocketMissing(QMPConnectError):
    """Raised when there is no socket at the QMP path (QEMU not running, or a wrong path)."""

    exit_code = 21


class SocketPermission(QMPConnectError):
    """Raised when the QMP socket exists but this user may not connect to it."""

    exit_code = 22


class NotQEMU(QMPConnectError):
    """Raised when the peer answers, but not with a QMP greeting and capabilities handshake."""

    exit_code = 23


class LibvirtError(QMPConnectError):
    """Raised when libvirt cannot give qmpdump the domain or its monitor; libvirt's own error
    (a ``libvirt.libvirtError``) is kept in :attr:`exc`. ``address`` names URI and domain."""

    exit_code = 60


class LibvirtUnavailable(LibvirtError):
    """Raised when libvirtd cannot be reached at the URI (not running, wrong URI)."""

    exit_code = 61


class LibvirtPermission(LibvirtError):
    """Raised when libvirt refuses this user (socket permissions, polkit, ACLs)."""

    exit_code = 62


class DomainNotFound(LibvirtError, LookupError):
    """Raised when libvirt knows no domain of the given name (or UUID)."""

    exit_code = 63


class DomainNotRunning(LibvirtError):
    """Raised when the domain exists but its QEMU is not running (shut off)."""

    exit_code = 64


class QMPTimeout(QmpdumpError, TimeoutError):
    """Raised when QEMU does not answer a command (or the greeting) within its timeout."""

    exit_code = 24

    def __init__(self, command: str, timeout_s: float):
        self.command = command
        self.timeout_s = timeout_s
        super().__init__(f"QEMU did not answer {command!r} within {timeout_s:g} s.")


class QMPCommandError(QmpdumpError):
    """Raised when QEMU answers a command with an error; keeps what was sent and the error class."""

    exit_code = 25

    def __init__(self, command: str, error_class: str, description: str):
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"QEMU refused {command!r}: {error_class}: {description}")


class UnsafeThroughLibvirt(QMPCommandError):
    """Raised instead of sending a command through libvirt's monitor passthrough that would harm
    libvirt (``dump-guest-memory``: libvirt 9.0's libvirtd crashes on the DUMP_COMPLETED event of
    a dump it did not start); the operation goes through libvirt's own API instead."""

    exit_code = 65


class QMPDisconnected(QmpdumpError, ConnectionError):
    """Raised when the QMP connection drops while a command or wait is outstanding."""

    exit_code = 26


class QMPReplyError(QmpdumpError):
    """Raised when a QMP reply lacks a member qmpdump needs or has a wrong type."""

    exit_code = 27

    def __init__(self, command: str, problem: str):
        self.command = command
        self.problem = problem
        super().__init__(f"unexpected reply to {command!r}: {problem}")


class LayoutError(QmpdumpError):
    """Raised when the guest-physical layout cannot be built; names the offending input."""

    exit_code = 30


class HostAccessError(QmpdumpError, OSError):
    """Raised when a host-side fact (a backing file's extents, QEMU's /proc) can't be read."""

    exit_code = 31


class ElfFormatError(QmpdumpError, ValueError):
    """Raised when bytes that should be an ELF64 little-endian core are not (or are cut short)."""

    exit_code = 32


class DumpError(QmpdumpError):
    """Base of the errors that end a dump; the partial output has been removed."""

    exit_code = 44


class DumpBusy(DumpError):
    """Raised when QEMU already runs a ``dump-guest-memory`` (ours or someone else's)."""

    exit_code = 40


class DumpCancelled(DumpError):
    """Raised when a dump is cancelled before it completed."""

    exit_code = 41


class QEMUGone(DumpError, ConnectionError):
    """Raised when QEMU exits, or its QMP connection drops, while a dump runs."""

    exit_code = 42


class DiskFull(DumpError, OSError):
    """Raised when the dump's filesystem has no space left (ENOSPC, EDQUOT)."""

    exit_code = 43


class DumpFailed(DumpError):
    """Raised when QEMU reports the dump as failed, with QEMU's reason."""

    exit_code = 44


class SourceUnproven(DumpError):
    """Raised before the backend engine reads anything, when it cannot prove that the source it
    would read (a backing file, QEMU's address space) holds the guest's bytes: QEMU's pid unknown
    (QMP over TCP) or the QMP peer not QEMU (a proxy), a private mapping it cannot read without
    allocating, an unexpected mapping.
    ``region`` names the region (None when ``reason`` names it); ``--engine auto`` would have
    chosen QEMU's engine instead."""

    exit_code = 49

    def __init__(self, region: str | None, reason: str) -> None:
        self.region = region
        self.reason = reason
        where = f"{region}: " if region is not None else ""
        super().__init__(
            f"the backend engine cannot dump this VM: {where}{reason}; "
            "QEMU's own engine can (--engine qemu)"
        )


class SinkError(DumpError):
    """Raised when a dump cannot be stored in its sink (an S3 bucket) for a reason the server
    gave; no object and no pending multipart upload was left (or, if the server vanished before
    the abort, the message names the upload that could not be aborted)."""

    exit_code = 45


class SinkCredentials(SinkError, PermissionError):
    """Raised when no credentials were found, or the object store refused them (or refused
    this bucket to them): invalid key id, bad signature, access denied."""

    exit_code = 46


class SinkBucketMissing(SinkError, LookupError):
    """Raised when the sink's bucket does not exist on the object store."""

    exit_code = 47


class SinkUnreachable(SinkError, ConnectionError):
    """Raised when the object store does not answer (refused connection, timeout, dropped
    connection) after every retry."""

    exit_code = 48


class ServiceError(QmpdumpError):
    """Base of the errors the daemon answers with; ``http_status`` is its HTTP status."""

    exit_code = 50
    http_status = 500


class NotFound(ServiceError, LookupError):
    """Raised when a VM, job or dump named in a request does not exist."""

    exit_code = 51
    http_status = 404


class Conflict(ServiceError):
    """Raised when a request conflicts with the current state (a full queue, a finished job)."""

    exit_code = 52
    http_status = 409


class Unavailable(ServiceError):
    """Raised when the VM is not connected or the daemon is shutting down."""

    exit_code = 53
    http_status = 503


class BadGateway(ServiceError):
    """Raised by the daemon when a request asked QEMU something and its answer could not be
    used (a layout qmpdump cannot read, a refused command)."""

    http_status = 502


class GatewayTimeout(ServiceError):
    """Raised by the daemon when a request asked QEMU something and QEMU did not answer in
    time (hung: SIGSTOP, an overloaded host)."""

    exit_code = 24
    http_status = 504


class MigrationStreamError(DumpError, ValueError):
    """Raised when QEMU's migration stream is not what the snapshot engine can read."""

    exit_code = 55


class SnapshotRefused(DumpError):
    """Raised when the snapshot engine will not run on this VM (QEMU version, host memory)."""

    exit_code = 56
