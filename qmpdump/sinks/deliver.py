"""A dump into a sink: spool it locally with any engine, then store it in the bucket.

The seam to the engines is one callable, ``write(path) -> DumpOutcome``: "write the dump, with
its sidecar, at this local path" (:func:`qmpdump.engines.run.run_dump`). Not a
:class:`qmpdump.output.DumpTarget`: its ``commit`` is synchronous and runs in a worker thread,
where an upload would need an event loop of its own; wrapping ``run_dump`` keeps the upload on
the caller's loop, cancellable as a whole by ``Task.cancel()``. The spool is a fresh 0700
folder (``mkdtemp``) holding only this dump; it is removed whatever happens, so a dump sent to
a bucket leaves nothing on the host.
The bucket and the credentials are checked before the engine starts, so a wrong bucket or a
refused key never pauses a VM.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qmpdump.engines.run import DumpOutcome
from qmpdump.sinks.s3 import (
    S3Location,
    S3Settings,
    StoredObject,
    UploadProgress,
    check_bucket,
    open_client,
    upload_dump,
)

__all__ = ["SinkOutcome", "dump_to_s3"]


@dataclass(frozen=True, slots=True)
class SinkOutcome:
    """A dump that was written by an engine and is now an object in a bucket."""

    dump: DumpOutcome
    stored: StoredObject
    upload_s: float


async def dump_to_s3(
    write: Callable[[Path], Awaitable[DumpOutcome]],
    *,
    location: S3Location,
    name: str,
    settings: S3Settings | None = None,
    spool_root: Path | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> SinkOutcome:
    """Check the bucket, let ``write`` dump into the spool as ``name``, upload, clean up.

    A cancel is ``Task.cancel()`` of the task running this (as for :func:`run_dump`): the
    engine stops, or the multipart upload is aborted, and the spool is removed."""
    settings = settings or S3Settings()
    loop = asyncio.get_running_loop()
    async with open_client(settings) as client:
        await check_bucket(client, location)
        spool = Path(tempfile.mkdtemp(prefix="qmpdump-spool-", dir=spool_root))
        try:
            outcome = await write(spool / name)
            t0 = loop.time()
            stored = await upload_dump(
                client,
                location,
                name,
                outcome.path,
                sha256=outcome.sha256,
                sidecar=outcome.record.to_json(),
                settings=settings,
                metadata={"engine": outcome.engine.value, "format": outcome.format.value},
                progress=progress,
            )
            upload_s = loop.time() - t0
        finally:
            await asyncio.to_thread(shutil.rmtree, spool, True)
    return SinkOutcome(dump=outcome, stored=stored, upload_s=upload_s)
