"""One QMP session with one QEMU: connect, execute with timeouts, events, disconnect.

This package is the only place that imports ``qemu.qmp`` (the QMP library kept in QEMU's tree,
``python/qemu/qmp``). Errors from it are translated into qmpdump's tree (:mod:`qmpdump.errors`)
with the cause kept; ``asyncio.CancelledError`` passes through untouched.

The socket is opened here rather than by the library so that a missing socket, a permission
problem and a peer that is not QEMU are told apart, and so that the peer's pid can be read with
``SO_PEERCRED`` (later code reads QEMU's ``/proc`` entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import struct
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
)
from qemu.qmp.error import QMPError as LibQMPError
from qemu.qmp.message import Message

from qmpdump.errors import (
    FdPassingUnavailable,
    NotQEMU,
    QMPCommandError,
    QMPConnectError,
    QMPDisconnected,
    QMPTimeout,
    SocketMissing,
    SocketPermission,
)
from qmpdump.qmp.events import Event

__all__ = ["EventQueue", "QMPAddress", "QMPSession", "parse_address"]

log = logging.getLogger(__name__)

#: A UNIX socket path, or (host, port) for TCP.
QMPAddress = str | tuple[str, int]

DEFAULT_TIMEOUT_S = 10.0


def parse_address(text: str) -> QMPAddress:
    """Read an operator's ``--qmp`` value: a path, or ``tcp:HOST:PORT`` / ``HOST:PORT``."""
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or ":" not in text:
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return text
    return (host.strip("[]"), int(port))


def _describe(address: QMPAddress) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a UNIX socket (SO_PEERCRED), if any."""
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None


def _open_socket(address: QMPAddress, timeout_s: float) -> socket.socket:
    """Open a connected, non-blocking socket, classifying the usual failures."""
    where = _describe(address)
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout_s)
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address, timeout=timeout_s)
    except FileNotFoundError as err:
        raise SocketMissing(where, "no QMP socket at this path (is QEMU running?)", err) from err
    except PermissionError as err:
        raise SocketPermission(where, "permission denied opening the QMP socket", err) from err
    except ConnectionRefusedError as err:
        raise SocketMissing(where, "connection refused (nothing listens there)", err) from err
    except TimeoutError as err:
        raise QMPTimeout("connect", timeout_s) from err
    except OSError as err:
        if err.errno == errno.ENOTSOCK:
            raise NotQEMU(where, "this path is not a socket", err) from err
        raise QMPConnectError(where, f"cannot connect: {err.strerror or err}", err) from err
    sock.setblocking(False)
    return sock


class _Listener(EventListener):
    """An EventListener without ``history``: the library's keeps every event forever, which in a
    daemon that runs for months is a leak. Events still queue until taken."""

    async def put(self, event: Message) -> None:
        if self.accept(event):
            await self._queue.put(event)


def _never(_event: Message) -> bool:
    return False


class EventQueue:
    """The events one :meth:`QMPSession.listen` block heard, as typed :class:`Event` models."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener

    async def get(self) -> Event:
        """The next event (waits for one)."""
        return Event.model_validate(dict(await self._listener.get()))

    def drain(self) -> list[Event]:
        """Every event heard and not yet taken, without waiting."""
        return [Event.model_validate(dict(m)) for m in self._listener.clear()]


class QMPSession:
    """A connected QMP session with one QEMU process.

    Use as ``async with QMPSession(path) as qmp: ...``. Every command has a timeout;
    :meth:`disconnect` is idempotent.
    """

    def __init__(
        self, address: QMPAddress, *, timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "qmpdump"
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._client = QMPClient(name)
        # The library's default all-events listener queues and records every event and nobody
        # reads it: make it accept none.
        self._client.events.event_filter = _never
        self._pid: int | None = None
        self._connected = False

    @property
    def where(self) -> str:
        """The address as an operator would write it."""
        return _describe(self.address)

    @property
    def pid(self) -> int | None:
        """QEMU's pid from SO_PEERCRED (None over TCP)."""
        return self._pid

    @property
    def connected(self) -> bool:
        """Whether the session is up (False once QEMU hung up or :meth:`disconnect` ran)."""
        return self._connected and self._client.runstate == Runstate.RUNNING

    @property
    def can_pass_fds(self) -> bool:
        """Whether file descriptors can be passed to QEMU (SCM_RIGHTS: UNIX sockets only)."""
        return isinstance(self.address, str)

    async def pass_fd(self, fd: int, *, prefix: str = "qmpdump") -> str:
        """Hand ``fd`` to QEMU (``SCM_RIGHTS``, then ``getfd``); return the name QEMU knows it by.

        Raises :class:`~qmpdump.errors.FdPassingUnavailable` over TCP. The caller still owns
        its own copy of ``fd``; QEMU's copy is released with :meth:`close_fd`.
        """
        if not self.can_pass_fds:
            raise FdPassingUnavailable(self.where)
        fdname = f"{prefix}-{secrets.token_hex(6)}"
        try:
            self._client.send_fd_scm(fd)
        except (LibQMPError, OSError) as err:
            raise QMPDisconnected(f"{self.where}: cannot pass a file descriptor: {err}") from err
        await self.execute("getfd", {"fdname": fdname})
        return fdname

    async def close_fd(self, fdname: str) -> None:
        """Release QEMU's copy of a passed fd (``closefd``); quiet if QEMU has gone or let go."""
        with contextlib.suppress(QMPCommandError, QMPDisconnected, QMPTimeout):
            await self.execute("closefd", {"fdname": fdname}, timeout_s=2.0)

    async def connect(self) -> None:
        """Open the socket, read the greeting and negotiate capabilities."""
        sock = await asyncio.to_thread(_open_socket, self.address, self.timeout_s)
        self._pid = _peer_pid(sock)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.connect(sock)
        except TimeoutError as err:
            sock.close()
            await self._quiet_disconnect()
            raise QMPTimeout(
                "QMP greeting (QEMU serves one client per QMP socket: is another one connected?)",
                self.timeout_s,
            ) from err
        except ConnectError as err:
            sock.close()
            raise NotQEMU(
                self.where, f"the peer did not complete a QMP handshake ({err.exc!r})", err
            ) from err
        self._connected = True
        log.debug("connected to %s (pid %s)", self.where, self._pid)

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value (JSON, as QEMU sent it)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._client.execute(command, arguments)
        except TimeoutError as err:
            raise QMPTimeout(command, limit) from err
        except ExecuteError as err:
            raise QMPCommandError(command, err.error_class, str(err)) from err
        except ExecInterruptedError as err:
            raise QMPDisconnected(f"{self.where}: connection lost during {command!r}") from err
        except LibQMPError as err:
            raise QMPDisconnected(f"{self.where}: {command!r} failed: {err}") from err

    async def hmp(self, command_line: str, *, timeout_s: float | None = None) -> str:
        """Run a human monitor command through QMP and return its text."""
        out = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout_s=timeout_s
        )
        return str(out)

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventQueue]:
        """Queue the named events (all, if none is named) while the block runs."""
        listener = _Listener(names or None)
        with self._client.listen(listener):
            yield EventQueue(listener)

    async def _quiet_disconnect(self) -> None:
        with contextlib.suppress(LibQMPError, OSError, EOFError):
            await self._client.disconnect()

    async def disconnect(self) -> None:
        """Close the session. Safe to call more than once and after the peer went away."""
        self._connected = False
        await self._quiet_disconnect()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()
