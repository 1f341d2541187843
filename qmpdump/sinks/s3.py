"""Store a dump in an S3-compatible bucket while it is written: multipart upload, bounded
memory, abort on any failure, the sha256 in the object's metadata, the sidecar beside it as
``NAME.json``.

Client: **aiobotocore** (botocore on aiohttp). qmpdump already runs on asyncio and aiohttp, and
botocore brings what this module must not write itself: SigV4 signing, the standard AWS
configuration chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, the shared credentials and config files), retries with
exponential backoff and jitter (the ``standard`` retry mode: throttling, 5xx, dropped
connections), and errors whose codes (``NoSuchBucket``, ``InvalidAccessKeyId``) tell the causes
apart. obstore (Rust ``object_store``) is fast too but reads neither the shared credentials file
nor profiles, and reports errors as strings. Credentials never come from qmpdump's own
configuration; a ``[[sink]]`` may name an endpoint and region (several sinks cannot all share
one ``AWS_ENDPOINT_URL``), else the AWS chain decides.

Streamed (:class:`StreamedUpload`): the engine writes into a local spool file, and every part
of the multipart upload whose bytes the engine has *settled* goes while it writes the rest, so
a dump to S3 takes about max(dump, upload), not their sum. Part ``n`` holds the file's bytes
``[(n - 1) * P, n * P)``; the engines' progress reports (:class:`qmpdump.engines.base.Progress`)
say which byte ranges are final and bound the file's size, which fixes ``P`` before the first
part goes (16 MiB, larger only for dumps above 156 GiB). The backend's ELF is final below the
mark its own hasher follows (header first, data in file order); its kdump is final in its head
and in the page data below the cursor, while the 2nd bitmap and the page descriptors come
last: the parts holding them go when the engine ends, as does the short last part. Nothing is
uploaded twice, and an engine that reports nothing (QEMU's) is uploaded whole when it ends.
The spool stays the scratch space: it is what lets the engines write at offsets and rewrite
their tables at the end, and what a part is read from (``pread``, page cache). Rejected: a
truly sequential stream from the writer into the upload, without a spool. The kdump layouts
are not sequential, and back pressure would tie the engine to the network: a slow store would
keep the VM paused longer. With the spool the engine keeps its speed (the VM's pause is the
same as with ``-o``) and the upload only follows it. Measured (``bench/s3_upload.py``): on
this 2-core host, with the S3 server on the same cores, every part sent during the dump
slows the engine (4 parts in flight: the backend's dump 4x slower; 1 part: 3x), so by default
only ``stream_in_flight`` = 1 part goes while the engine writes and all ``max_in_flight``
after; ``stream_in_flight`` = 0 uploads only after the dump.

The sha256: S3 takes an object's metadata only in ``CreateMultipartUpload``, and the sha256
of the dump is known only when the engine ends. So the upload is created with the final key
and no sha256; once complete, the object is copied onto itself with ``MetadataDirective
REPLACE`` and the metadata (``sha256``, ``engine``, ``format``): a metadata-only request (10
ms on SeaweedFS for 256 MiB, measured; server-side on AWS), then the sidecar follows, as
before. Above CopyObject's 5 GiB limit the copy onto itself is a multipart ``UploadPartCopy``
(server-side too). Rejected, measured: completing under a hidden temporary key and copying to
the final key costs a full server-side data copy (12 s for 768 MiB on SeaweedFS here, a third
of the upload itself: slower than not streaming). What this costs: the object is visible for
the few milliseconds between ``CompleteMultipartUpload`` and the copy without its sha256, and
without its sidecar until that is stored (as before): the sidecar is the sign of a complete
dump. A failure or cancel in that window deletes the object again.

Memory stays bounded: parts are read one at a time (``part_size``), and at most
``max_in_flight`` are in memory or on the wire (botocore holds about one more copy of a part
while it signs and sends it: ``bench/s3_upload.py`` measures the peak). The sha256 in the
metadata is the engine's, which every engine computes over the bytes it wrote into this very
file; it is not computed a second time. A failure or cancel of the dump or of the upload ends
both (one task group): the multipart upload is aborted, so no part stays stored and nothing is
visible; a sidecar that cannot be stored removes the object again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from qmpdump.errors import (
    SinkBucketMissing,
    SinkCredentials,
    SinkError,
    SinkUnreachable,
    UsageError,
)
from qmpdump.memmap.ranges import RangeSet

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PART_SIZE",
    "DEFAULT_STREAM_IN_FLIGHT",
    "S3Location",
    "S3Settings",
    "StoredObject",
    "StreamedUpload",
    "UploadProgress",
    "check_bucket",
    "first_error",
    "open_client",
]

#: 16 MiB parts: 10,000 parts (S3's limit) cover 156 GiB; a larger dump gets larger parts.
DEFAULT_PART_SIZE = 16 << 20
DEFAULT_MAX_IN_FLIGHT = 4
#: one part in flight while the engine writes: more slows the engine (bench/s3_upload.py)
DEFAULT_STREAM_IN_FLIGHT = 1
MIN_PART_SIZE = 5 << 20  # S3: every part but the last is at least 5 MiB
CONTENT_TYPE = "application/octet-stream"
MAX_PARTS = 10_000

# S3's rules for bucket names (3 to 63 of a-z 0-9 . -), which also keep a URL unambiguous.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
    "Forbidden",
}
_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix (empty, or ending in ``/``): where a sink puts dumps."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Read ``s3://BUCKET/PREFIX/`` (the prefix is optional; a missing ``/`` is added)."""
        if not url.startswith("s3://"):
            raise UsageError(f"{url!r} is not an s3://BUCKET/PREFIX/ URL")
        bucket, _, prefix = url[5:].partition("/")
        return cls.of(bucket, prefix)

    @classmethod
    def of(cls, bucket: str, prefix: str = "") -> S3Location:
        """Validate a bucket name and a prefix (letters, digits, ``. _ - /``; no ``..``)."""
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise UsageError(
                f"{bucket!r} is not an S3 bucket name (3 to 63 of a-z 0-9 . -, starting and "
                "ending with a letter or digit)"
            )
        prefix = prefix.strip("/")
        parts = prefix.split("/") if prefix else []
        if not _PREFIX_RE.fullmatch(prefix) or any(p in ("", ".", "..") for p in parts):
            raise UsageError(
                f"{prefix!r} is not a key prefix qmpdump uses: segments of A-Z a-z 0-9 . _ - "
                "separated by single slashes, none of them . or .."
            )
        return cls(bucket, prefix + "/" if prefix else "")

    def key(self, name: str) -> str:
        """The object key of ``name`` (a name the service chose, never a client's)."""
        return self.prefix + name

    def url(self, name: str) -> str:
        """``s3://bucket/key`` of ``name``."""
        return f"s3://{self.bucket}/{self.key(name)}"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """How to talk to the object store; ``None`` leaves a value to the AWS configuration chain."""

    endpoint_url: str | None = None
    region: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    #: attempts per request in botocore's ``standard`` retry mode (exponential backoff with
    #: jitter); None: ``AWS_MAX_ATTEMPTS`` or the AWS config file, else botocore's 3
    max_attempts: int | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    #: the largest object given its metadata by one CopyObject (S3's limit: 5 GiB); above it,
    #: a multipart copy in parts of ``copy_part_size``
    copy_limit: int = 5 << 30
    copy_part_size: int = 1 << 30
    #: parts in flight while the dump is still being written (0: none, upload after the dump):
    #: on a host short of CPU the upload slows the engine, and a stopped VM stays paused longer
    stream_in_flight: int = DEFAULT_STREAM_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise UsageError(f"the part size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if self.max_in_flight < 1 or (self.max_attempts is not None and self.max_attempts < 1):
            raise UsageError("uploads in flight and attempts must be at least 1")
        if not 0 <= self.stream_in_flight <= self.max_in_flight:
            raise UsageError("parts in flight while dumping must be 0 to max_in_flight")

    def part_size_for(self, size: int) -> int:
        """The part size for an object of ``size`` bytes: ours, grown to stay within 10,000."""
        needed = -(-size // MAX_PARTS)
        return max(self.part_size, -(-needed // (1 << 20)) * (1 << 20))


@dataclass(frozen=True, slots=True)
class UploadProgress:
    """Bytes of the dump the object store has acknowledged, of ``total`` (``None`` while the
    dump is still being written: its size is not known yet)."""

    uploaded: int
    total: int | None


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A dump stored in a bucket, with its sidecar beside it."""

    url: str
    bucket: str
    key: str
    sidecar_key: str
    size: int
    sha256: str
    parts: int
    etag: str
    #: parts uploaded while the dump was still being written
    early_parts: int = 0


def open_client(settings: S3Settings) -> Any:
    """An aiobotocore S3 client context (``async with open_client(s) as client``)."""
    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if settings.max_attempts is not None:
        retries["max_attempts"] = settings.max_attempts
    config = AioConfig(
        retries=retries,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_pool_connections=settings.max_in_flight + 2,
        # path-style URLs work on every S3-compatible server (an IP endpoint has no subdomains)
        s3={"addressing_style": "path"},
        # request checksums (a CRC32 per part, checked by the server: integrity over HTTPS,
        # where SigV4 does not hash the payload) follow the AWS chain too: an older
        # S3-compatible server without flexible checksums needs
        # AWS_REQUEST_CHECKSUM_CALCULATION=when_required
    )
    return get_session().create_client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def _client_error(err: ClientError, where: str) -> SinkError:
    info = err.response.get("Error", {})
    code = str(info.get("Code", ""))
    message = info.get("Message") or code
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _CREDENTIAL_CODES:
        return SinkCredentials(
            f"{where}: the object store refused the credentials ({code}: {message})"
        )
    if code in _BUCKET_CODES:
        return SinkBucketMissing(f"{where}: the bucket does not exist ({code})")
    return SinkError(f"{where}: the object store answered {status} {code}: {message}")


def sink_error(err: BaseException, where: str) -> SinkError:
    """The :class:`SinkError` for a client error: credentials, bucket, reachability, other."""
    if isinstance(err, SinkError):
        return err
    if isinstance(err, ClientError):
        return _client_error(err, where)
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return SinkCredentials(
            f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"or AWS_PROFILE and the shared credentials file): {err}"
        )
    if isinstance(err, BotoConnectionError | HTTPClientError | aiohttp.ClientError | OSError):
        return SinkUnreachable(f"{where}: the object store did not answer: {err}")
    return SinkError(f"{where}: {type(err).__name__}: {err}")


_T = TypeVar("_T")


async def _call(where: str, request: Awaitable[_T]) -> _T:
    """Await one client request; its failure becomes a :class:`SinkError` (retries were
    botocore's)."""
    try:
        return await request
    except (BotoCoreError, ClientError, aiohttp.ClientError, OSError) as err:
        raise sink_error(err, where) from err


async def check_bucket(client: S3Client, location: S3Location) -> None:
    """Fail early (before a VM is paused) when the bucket is missing or the credentials are
    refused."""
    await _call(f"s3://{location.bucket}", client.head_bucket(Bucket=location.bucket))


class StreamedUpload:
    """One dump's multipart upload, fed while the dump is written (see the module docstring).

    Use as ``async with StreamedUpload(...) as up``: entering creates the multipart upload;
    leaving with an exception (or a cancel) aborts it, or deletes the object if it was already
    completed. Meanwhile :meth:`pump` uploads parts as :meth:`settle` and :meth:`finish` make
    them ready, and :meth:`publish` completes the object, writes its metadata and its sidecar.
    """

    def __init__(
        self,
        client: S3Client,
        location: S3Location,
        name: str,
        settings: S3Settings,
        progress: Callable[[UploadProgress], None] | None = None,
    ) -> None:
        self.client = client
        self.location = location
        self.name = name
        self.settings = settings
        self.progress = progress
        self.upload_id: str | None = None
        self.completed = False
        #: the part size, fixed by the first size bound (or the final size)
        self.part_size: int | None = None
        #: the dump's final size, once the engine is done
        self.size: int | None = None
        #: parts taken (read or sent), and the ETags of those acknowledged
        self.taken: set[int] = set()
        self.etags: dict[int, str] = {}
        #: parts uploaded before the dump ended (for the record and the tests)
        self.early_parts = 0
        self.uploaded = 0
        self._settled = RangeSet.empty()
        self._fd = -1
        self._wake = asyncio.Event()

    @property
    def key(self) -> str:
        return self.location.key(self.name)

    @property
    def url(self) -> str:
        return self.location.url(self.name)

    async def __aenter__(self) -> StreamedUpload:
        created = await _call(
            self.url,
            self.client.create_multipart_upload(
                Bucket=self.location.bucket, Key=self.key, ContentType=CONTENT_TYPE
            ),
        )
        self.upload_id = created["UploadId"]
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if exc is None:
            return
        bucket, key = self.location.bucket, self.key
        if self.completed:
            # visible already (without its sha256 or sidecar): take it back
            with contextlib.suppress(Exception):
                await asyncio.shield(self.client.delete_object(Bucket=bucket, Key=key))
            return
        assert self.upload_id is not None
        aborted = await _abort(self.client, bucket, key, self.upload_id)
        if not aborted and isinstance(exc, SinkError):
            raise type(exc)(
                f"{exc} (the multipart upload {self.upload_id} could not be aborted either: its "
                "parts stay invisible until a lifecycle rule AbortIncompleteMultipartUpload, or "
                "an abort, removes them)"
            ) from exc

    # -- fed by the dump's progress (on the event loop) --------------------------------------

    def settle(self, spool_file: Path, settled: RangeSet, size_bound: int) -> None:
        """The engine wrote ``settled`` of ``spool_file`` for good (cumulative), and the file
        will not grow past ``size_bound``: the parts inside it may go now."""
        if self.size is not None or not self.settings.stream_in_flight:
            return
        if self._fd < 0:
            try:
                self._fd = os.open(spool_file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return  # not there (yet): the parts go when the dump ends, not a failure of it
        if self.part_size is None:
            self.part_size = self.settings.part_size_for(size_bound)
        self._settled = settled
        self._wake.set()

    def finish(self, spool_file: Path, size: int) -> None:
        """The dump is complete: ``spool_file`` has its final ``size`` bytes."""
        if self._fd < 0:
            self._fd = os.open(spool_file, os.O_RDONLY | os.O_CLOEXEC)
        if self.part_size is None:
            self.part_size = self.settings.part_size_for(size)
        self.size = size
        self._wake.set()
        if self.progress is not None and len(self.etags) == max(1, -(-size // self.part_size)):
            # every part went while the dump ran: report the total once it is known
            self.progress(UploadProgress(self.uploaded, size))

    def _ready(self) -> list[int]:
        """Part numbers that can go now and have not been taken (part ``n`` holds bytes
        ``[(n - 1) * part_size, n * part_size)``; the last may be shorter)."""
        part = self.part_size
        if part is None:
            return []
        if self.size is not None:
            count = max(1, -(-self.size // part))
            if count > MAX_PARTS or any(n > count for n in self.taken):
                raise SinkError(
                    f"the dump's size ({self.size} bytes) is not what its engine announced: "
                    "it cannot be uploaded in the parts already sent"
                )
            numbers: Iterable[int] = range(1, count + 1)
        else:
            numbers = (
                n
                for r in self._settled
                for n in range(-(-r.start // part) + 1, r.end // part + 1)
                if n <= MAX_PARTS
            )
        return [n for n in numbers if n not in self.taken]

    # -- the upload -----------------------------------------------------------------------------

    async def pump(self) -> None:
        """Upload parts as they become ready, up to ``max_in_flight`` at once, until every part
        of the finished dump is stored. The first failure ends it (raised as itself)."""
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        early = asyncio.Semaphore(max(1, self.settings.stream_in_flight))
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    self._wake.clear()
                    for number in self._ready():
                        held = [slots] if self.size is not None else [early, slots]
                        for slot in held:
                            await slot.acquire()
                        self.taken.add(number)
                        try:
                            data = await asyncio.to_thread(self._read, number)
                        except BaseException:
                            for slot in held:
                                slot.release()
                            raise
                        group.create_task(self._send(number, data, held))
                    if self.size is not None and not self._ready():
                        break
                    await self._wake.wait()
        except BaseExceptionGroup as group_err:
            raise first_error(group_err) from None

    def _read(self, number: int) -> bytes:
        assert self.part_size is not None
        offset = (number - 1) * self.part_size
        length = self.part_size
        if self.size is not None:
            length = max(0, min(length, self.size - offset))
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SinkError(f"the spooled dump is shorter than announced (at {offset:#x})")
        return data

    async def _send(self, number: int, data: bytes, slots: list[asyncio.Semaphore]) -> None:
        assert self.upload_id is not None
        early = self.size is None
        try:
            reply = await _call(
                f"{self.url} part {number}",
                self.client.upload_part(
                    Bucket=self.location.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=data,
                ),
            )
        finally:
            for slot in slots:
                slot.release()
        self.etags[number] = reply["ETag"]
        self.uploaded += len(data)
        self.early_parts += early
        if self.progress is not None:
            self.progress(UploadProgress(self.uploaded, self.size))

    async def publish(
        self,
        *,
        sha256: str,
        sidecar: Mapping[str, Any],
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Complete the object, give it its metadata (with ``sha256``), store its sidecar."""
        assert self.upload_id is not None
        assert self.size is not None
        if os.fstat(self._fd).st_size != self.size:
            raise SinkError("the spooled dump changed size while it was uploaded")
        client, bucket, key = self.client, self.location.bucket, self.key
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)
        ]
        done = await _call(
            self.url,
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            ),
        )
        self.completed = True
        meta = {**(metadata or {}), "sha256": sha256}
        etag = await _replace_metadata(
            client, bucket=bucket, key=key, size=self.size, metadata=meta, settings=self.settings
        )
        sidecar_key = self.location.key(self.name + ".json")
        record = {**sidecar, "object": self.url}
        body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        await _call(
            self.location.url(self.name + ".json"),
            client.put_object(
                Bucket=bucket, Key=sidecar_key, Body=body, ContentType="application/json"
            ),
        )
        return StoredObject(
            url=self.url,
            bucket=bucket,
            key=key,
            sidecar_key=sidecar_key,
            size=self.size,
            sha256=sha256,
            parts=len(parts),
            etag=etag or str(done.get("ETag", "")).strip('"'),
            early_parts=self.early_parts,
        )


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error of a task group that is not a cancel (else its first)."""
    leaves: list[BaseException] = []

    def walk(err: BaseException) -> None:
        if isinstance(err, BaseExceptionGroup):
            for inner in err.exceptions:
                walk(inner)
        else:
            leaves.append(err)

    walk(group)
    for err in leaves:
        if not isinstance(err, asyncio.CancelledError):
            return err
    return leaves[0]


async def _replace_metadata(
    client: S3Client,
    *,
    bucket: str,
    key: str,
    size: int,
    metadata: Mapping[str, str],
    settings: S3Settings,
) -> str:
    """Give the completed object ``metadata``: a copy onto itself with the ``REPLACE``
    directive (metadata only, no data through qmpdump); above CopyObject's limit a multipart
    copy onto itself (``UploadPartCopy``). Returns the new ETag."""
    url = f"s3://{bucket}/{key}"
    source: Any = {"Bucket": bucket, "Key": key}
    if size <= settings.copy_limit:
        reply = await _call(
            f"{url} (metadata)",
            client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource=source,
                MetadataDirective="REPLACE",
                Metadata=dict(metadata),
                ContentType=CONTENT_TYPE,
            ),
        )
        return str(reply.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
    created = await _call(
        f"{url} (metadata)",
        client.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata=dict(metadata), ContentType=CONTENT_TYPE
        ),
    )
    upload_id = created["UploadId"]
    piece = max(settings.copy_part_size, -(-size // MAX_PARTS))
    slots = asyncio.Semaphore(settings.max_in_flight)
    etags: dict[int, str] = {}

    async def copy(number: int, offset: int) -> None:
        async with slots:
            last = min(offset + piece, size) - 1
            reply = await _call(
                f"{url} (metadata) part {number}",
                client.upload_part_copy(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={offset}-{last}",
                ),
            )
            etags[number] = reply["CopyPartResult"]["ETag"]

    try:
        try:
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, piece), 1):
                    group.create_task(copy(number, offset))
        except BaseExceptionGroup as group_err:
            raise first_error(group_err) from None
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)
        ]
        done = await _call(
            f"{url} (metadata)",
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
    except BaseException:
        await _abort(client, bucket, key, upload_id)
        raise
    return str(done.get("ETag", "")).strip('"')


async def _abort(client: S3Client, bucket: str, key: str, upload_id: str) -> bool:
    """Abort the multipart upload (shielded from a second cancel); whether it worked."""
    try:
        await asyncio.shield(
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        return False
    return True
