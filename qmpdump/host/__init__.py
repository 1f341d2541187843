"""Host-side facts about a running QEMU, read from the kernel and never through QMP.

* :mod:`qmpdump.host.extents`: the populated extents of a backing file (memfd, ``/dev/shm``,
  any filesystem) by ``lseek(SEEK_DATA/SEEK_HOLE)``, without reading a byte.
* :mod:`qmpdump.host.procfs`: ``/proc/PID/maps`` as typed records, and the file behind a host
  virtual address of QEMU (a ``/proc/PID/fd/N`` path that opens that very file).
* :mod:`qmpdump.host.pagemap`: the populated pages of QEMU's anonymous guest RAM, by the
  ``PAGEMAP_SCAN`` ioctl on ``/proc/PID/pagemap`` (pages mapped to the zero page excluded).

Every result is a :class:`~qmpdump.memmap.ranges.RangeSet` in the address space its name says
(file offsets or host virtual addresses, ``hva``); mapping them to guest-physical addresses is the
caller's business (the layout comes from QMP). Every failure to read a fact raises
:class:`~qmpdump.errors.HostAccessError` naming the file or ``/proc`` entry, with the ``OSError``
chained (``raise ... from err``) and its ``errno`` copied.
"""

from __future__ import annotations

import errno

from qmpdump.errors import HostAccessError

__all__ = ["host_access_error", "proc_error"]


def host_access_error(message: str, cause: OSError | None = None) -> HostAccessError:
    """Build a :class:`HostAccessError` carrying ``cause.errno``; the caller raises it ``from``.

    ``message`` is the whole sentence an operator reads, path included. Only ``errno`` is copied:
    setting ``strerror`` or ``filename`` on an ``OSError`` makes ``str()`` replace the sentence
    with ``[Errno N] ...``.
    """
    err = HostAccessError(message)
    if cause is not None:
        err.errno = cause.errno
    return err


def proc_error(pid: int, proc_path: str, verb: str, err: OSError) -> HostAccessError:
    """The error for a failed access to a ``/proc/PID`` entry of QEMU, saying why in words."""
    if err.errno in (errno.ENOENT, errno.ESRCH):
        reason = f"process {pid} is gone"
    elif err.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied (ptrace read access to the process is needed)"
    else:
        reason = err.strerror or str(err)
    return host_access_error(f"cannot {verb} {proc_path}: {reason}", err)
