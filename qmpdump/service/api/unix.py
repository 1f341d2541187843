"""Serving the API on a UNIX socket, following aiohttp's runner lifecycle
(``AppRunner.setup()`` -> ``site.start()`` ... ``runner.cleanup()``), on a socket that has its
mode and group before it accepts a single connection."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Final

from aiohttp import web

from qmpdump.errors import UsageError

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT_S", "serve_unix", "stop_serving"]

log = logging.getLogger("qmpdump.service.api")

#: how long :func:`stop_serving` lets running requests finish before cancelling them
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0
#: how long probing an existing socket for a live daemon may take
_PROBE_TIMEOUT_S: Final = 2.0


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isascii() and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"unknown group {group!r} for the API socket") from None


# Path metadata calls below are on a local directory (/run): they do not block in practice, so
# they run inline, in these small synchronous helpers, rather than in a thread.


def _is_socket(path: Path) -> bool | None:
    """True for a socket, False for any other file, None when nothing is there."""
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return None


def _remove_socket(path: Path) -> None:
    if _is_socket(path):
        path.unlink(missing_ok=True)


async def _clear_stale(path: Path) -> None:
    """Remove a socket nobody listens on; refuse to touch a live one or any other file."""
    kind = _is_socket(path)
    if kind is None:
        return
    if not kind:
        raise UsageError(f"{path} exists and is not a socket; not replacing it with the API socket")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                await loop.sock_connect(probe, str(path))
        except ConnectionRefusedError:
            log.info("removing the stale API socket %s", path)
            _remove_socket(path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            pass  # a full backlog: someone listens
        except OSError as err:
            raise UsageError(
                f"cannot tell whether {path} is in use: {err.strerror or err}"
            ) from err
    raise UsageError(f"another daemon already listens on {path}; not starting a second one")


def _bind(path: Path, mode: int, gid: int | None) -> socket.socket:
    """A UNIX socket bound at ``path`` with its mode and group set, not yet listening.

    Nobody can connect before ``listen()``, so there is no moment when the socket accepts
    connections with the umask's mode or the wrong group.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot create the API socket {path}: {err.strerror or err}") from err
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as err:
        sock.close()
        path.unlink(missing_ok=True)
        raise UsageError(
            f"cannot set mode {mode:#o} and group {gid} on the API socket {path}: "
            f"{err.strerror or err}"
        ) from err
    return sock


async def serve_unix(
    app: web.Application,
    path: Path,
    *,
    mode: int = 0o660,
    group: str | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> web.AppRunner:
    """Serve ``app`` on a UNIX socket at ``path`` (``mode``, group ``group``: a name or a gid).

    A stale socket at ``path`` (nobody listening) is replaced; a live one, or any other kind of
    file, is a :class:`~qmpdump.errors.UsageError` and nothing is started. The socket is bound
    and given its mode and group here rather than by ``web.UnixSite`` (which would listen first,
    and whose asyncio call silently removes whatever socket is at the path, live or not), then
    served with ``web.SockSite``. Stop with :func:`stop_serving`.
    """
    gid = _group_id(group)
    await _clear_stale(path)
    sock = _bind(path, mode, gid)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        _remove_socket(path)
        raise
    log.info("API listening on %s (mode %#o, gid %s)", path, mode, gid if gid is not None else "-")
    return runner


async def stop_serving(runner: web.AppRunner, path: Path) -> None:
    """Stop accepting, let running requests finish (to the runner's shutdown timeout, then
    cancel them), run the app's cleanup, and remove the socket."""
    try:
        await runner.cleanup()
    finally:
        _remove_socket(path)
