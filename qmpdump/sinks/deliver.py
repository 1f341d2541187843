"""A dump into a sink: any engine writes it into a local spool file, and the parts the engine
has finished go to the bucket while it writes the rest (:class:`qmpdump.sinks.s3.StreamedUpload`).

The seam to the engines is one callable, ``write(path, tap) -> DumpOutcome``: "write the dump,
with its sidecar, at this local path, and pass every :class:`~qmpdump.engines.base.Progress` to
``tap``" (the caller wraps :func:`qmpdump.engines.run.run_dump`, chaining ``tap`` after its own
progress callback). The ``settled`` ranges and ``size_bound`` an engine puts in its progress say
which bytes of the spool file are final; engines that give none (QEMU's engine) are uploaded
when they end, as a whole. Not a :class:`qmpdump.output.DumpTarget`: its ``commit`` is
synchronous and runs in a worker thread, where an upload would need an event loop of its own;
wrapping ``run_dump`` keeps the upload on the caller's loop, cancellable as a whole by
``Task.cancel()``.

The spool is a fresh 0700 folder (``mkdtemp``) holding only this dump; it is the scratch space
that lets engines write at offsets and rewrite their tables last, and it is removed whatever
happens, so a dump sent to a bucket leaves nothing on the host. The bucket and the credentials
are checked, and the multipart upload created, before the engine starts, so a wrong bucket or a
refused key never pauses a VM. The dump and the upload run as one task group: a failed upload
stops the engine (VM resumed, spool removed), a failed dump aborts the upload.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qmpdump.engines.base import Progress, ProgressCallback
from qmpdump.engines.run import DumpOutcome
from qmpdump.output import PARTIAL_SUFFIX
from qmpdump.sinks.s3 import (
    S3Location,
    S3Settings,
    StoredObject,
    StreamedUpload,
    UploadProgress,
    check_bucket,
    first_error,
    open_client,
)

__all__ = ["SinkOutcome", "Write", "dump_to_s3", "then"]

#: write the dump at this path, passing every progress report to the callback as well
Write = Callable[[Path, ProgressCallback], Awaitable[DumpOutcome]]


def then(first: ProgressCallback | None, tap: ProgressCallback | None) -> ProgressCallback:
    """A progress callback calling ``first``, then ``tap`` (each if any)."""

    def both(p: Progress) -> None:
        if first is not None:
            first(p)
        if tap is not None:
            tap(p)

    return both


@dataclass(frozen=True, slots=True)
class SinkOutcome:
    """A dump that was written by an engine and is now an object in a bucket."""

    dump: DumpOutcome
    stored: StoredObject
    #: from the end of the dump to the sidecar stored: what the upload added to the dump
    upload_s: float


async def dump_to_s3(
    write: Write,
    *,
    location: S3Location,
    name: str,
    settings: S3Settings | None = None,
    spool_root: Path | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> SinkOutcome:
    """Check the bucket, let ``write`` dump into the spool as ``name`` while its finished parts
    are uploaded, complete the object with its metadata and sidecar, clean up.

    A cancel is ``Task.cancel()`` of the task running this (as for :func:`run_dump`): the
    engine stops, the multipart upload is aborted, and the spool is removed."""
    settings = settings or S3Settings()
    loop = asyncio.get_running_loop()
    async with open_client(settings) as client:
        await check_bucket(client, location)
        spool = Path(tempfile.mkdtemp(prefix="qmpdump-spool-", dir=spool_root))
        partial = spool / (name + PARTIAL_SUFFIX)  # where DumpFile writes until its commit
        try:
            async with StreamedUpload(client, location, name, settings, progress) as upload:

                def tap(p: Progress) -> None:
                    if p.settled is not None and p.size_bound is not None:
                        upload.settle(partial, p.settled, p.size_bound)

                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(upload.pump())
                        outcome = await write(spool / name, tap)
                        dumped_at = loop.time()
                        upload.finish(outcome.path, outcome.size)
                except BaseExceptionGroup as group_err:
                    raise first_error(group_err) from None
                stored = await upload.publish(
                    sha256=outcome.sha256,
                    sidecar=outcome.record.to_json(),
                    metadata={"engine": outcome.engine.value, "format": outcome.format.value},
                )
                upload_s = loop.time() - dumped_at
        finally:
            await asyncio.to_thread(shutil.rmtree, spool, True)
    return SinkOutcome(dump=outcome, stored=stored, upload_s=upload_s)
