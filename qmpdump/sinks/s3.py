"""Store a finished dump in an S3-compatible bucket: multipart upload, bounded memory, abort on
any failure, the sha256 in the object's metadata, the sidecar beside it as ``NAME.json``.

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

Why "dump locally, then upload" (the issue allows "instead of (or after) the local dump folder")
rather than piping the engine's bytes straight into the upload:

* S3 takes an object's metadata only when the upload begins (``CreateMultipartUpload``); the
  sha256 of the whole dump is known only when the engine ends. Streaming would need a second,
  server-side copy of the object to attach it.
* No engine produces a final sequential stream: the backend engine writes its planned ELF with
  ``pwrite`` at offsets (the header first, data in parallel copies), QEMU's ELF header is fixed
  after the fact, and ``--seekable`` kdump is rebuilt at offsets.
* The engine keeps its own speed (and its pause of the VM stays as short as today): the upload
  begins once the VM runs again. The spool is a private 0700 folder, removed whatever happens.

Memory stays bounded: the file is read one part at a time (``part_size``), and at most
``max_in_flight`` parts are in memory or on the wire (botocore holds about one more copy of a
part while it signs and sends it: ``bench/s3_upload.py`` measures the peak). The sha256 in the
metadata is the engine's, which every engine computes over the bytes it wrote into this very
file; it is not computed a second time (that pass costs as much CPU as the upload's own
signing), but the file's size must not change while it is uploaded. Any failure or cancel
aborts the multipart upload, so no part stays stored and nothing is visible; a sidecar that
cannot be stored removes the object again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
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

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PART_SIZE",
    "S3Location",
    "S3Settings",
    "StoredObject",
    "UploadProgress",
    "check_bucket",
    "open_client",
    "upload_dump",
]

#: 16 MiB parts: 10,000 parts (S3's limit) cover 156 GiB; a larger dump gets larger parts.
DEFAULT_PART_SIZE = 16 << 20
DEFAULT_MAX_IN_FLIGHT = 4
MIN_PART_SIZE = 5 << 20  # S3: every part but the last is at least 5 MiB
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

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise UsageError(f"the part size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if self.max_in_flight < 1 or (self.max_attempts is not None and self.max_attempts < 1):
            raise UsageError("uploads in flight and attempts must be at least 1")

    def part_size_for(self, size: int) -> int:
        """The part size for an object of ``size`` bytes: ours, grown to stay within 10,000."""
        needed = -(-size // MAX_PARTS)
        return max(self.part_size, -(-needed // (1 << 20)) * (1 << 20))


@dataclass(frozen=True, slots=True)
class UploadProgress:
    """Bytes of the dump the object store has acknowledged, of ``total``."""

    uploaded: int
    total: int


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


async def upload_dump(
    client: S3Client,
    location: S3Location,
    name: str,
    dump: Path,
    *,
    sha256: str,
    sidecar: Mapping[str, Any],
    settings: S3Settings,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> StoredObject:
    """Upload the file ``dump`` as ``name`` under ``location``, then its sidecar beside it.

    ``sha256`` (the engine's, over this file) goes into the object's metadata. On failure the
    multipart upload is aborted and :class:`SinkError` raised; on a cancel (``Task.cancel()``,
    which :class:`qmpdump.engines.run.DumpTask` turns into DumpCancelled) it is aborted too and
    the cancel goes on.
    """
    job = _Upload(client, location, name, settings, progress)
    return await job.run(dump, sha256, sidecar, metadata or {})


@dataclass
class _Upload:
    """One dump's multipart upload and its sidecar."""

    client: S3Client
    location: S3Location
    name: str
    settings: S3Settings
    progress: Callable[[UploadProgress], None] | None

    @property
    def key(self) -> str:
        return self.location.key(self.name)

    @property
    def url(self) -> str:
        return self.location.url(self.name)

    async def run(
        self, dump: Path, sha256: str, sidecar: Mapping[str, Any], metadata: Mapping[str, str]
    ) -> StoredObject:
        client, bucket, key = self.client, self.location.bucket, self.key
        fd = os.open(dump, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            created = await _call(
                self.url,
                client.create_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    ContentType="application/octet-stream",
                    Metadata={**metadata, "sha256": sha256},
                ),
            )
            upload_id = created["UploadId"]
            try:
                parts = await self._send_parts(upload_id, fd, size)
                done = await _call(
                    self.url,
                    client.complete_multipart_upload(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                )
            except BaseException as err:
                aborted = await _abort(client, bucket, key, upload_id)
                if not aborted and isinstance(err, SinkError):
                    raise type(err)(
                        f"{err} (the multipart upload {upload_id} could not be aborted either: "
                        "its parts stay invisible until a lifecycle rule "
                        "AbortIncompleteMultipartUpload, or an abort, removes them)"
                    ) from err
                raise
        finally:
            os.close(fd)
        sidecar_key = self.location.key(self.name + ".json")
        record = {**sidecar, "object": self.url}
        body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        try:
            await _call(
                self.location.url(self.name + ".json"),
                client.put_object(
                    Bucket=bucket, Key=sidecar_key, Body=body, ContentType="application/json"
                ),
            )
        except BaseException:
            # a dump without its sidecar is not presented: take the object back
            with contextlib.suppress(Exception):
                await asyncio.shield(client.delete_object(Bucket=bucket, Key=key))
            raise
        return StoredObject(
            url=self.url,
            bucket=bucket,
            key=key,
            sidecar_key=sidecar_key,
            size=size,
            sha256=sha256,
            parts=len(parts),
            etag=str(done.get("ETag", "")).strip('"'),
        )

    async def _send_parts(self, upload_id: str, fd: int, size: int) -> list[CompletedPartTypeDef]:
        """Read the parts in file order; upload up to ``max_in_flight`` at once."""
        part_size = self.settings.part_size_for(size)
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        etags: dict[int, str] = {}
        uploaded = 0

        def read(offset: int, length: int) -> bytes:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise SinkError(f"the spooled dump shrank while it was uploaded (at {offset:#x})")
            return data

        async def send(number: int, data: bytes) -> None:
            nonlocal uploaded
            try:
                reply = await _call(
                    f"{self.url} part {number}",
                    self.client.upload_part(
                        Bucket=self.location.bucket,
                        Key=self.key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                    ),
                )
            finally:
                slots.release()
            etags[number] = reply["ETag"]
            uploaded += len(data)
            if self.progress is not None:
                self.progress(UploadProgress(uploaded, size))

        try:
            async with asyncio.TaskGroup() as group:
                offset = 0
                number = 1
                while offset < size or number == 1:
                    length = min(part_size, size - offset)
                    await slots.acquire()
                    try:
                        data = await asyncio.to_thread(read, offset, length)
                    except BaseException:
                        slots.release()
                        raise
                    group.create_task(send(number, data))
                    offset += length
                    number += 1
        except BaseExceptionGroup as group_err:
            # one failed part ends the upload: report the first failure as itself
            first = group_err.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from first.__cause__
        if os.fstat(fd).st_size != size:
            raise SinkError("the spooled dump changed size while it was uploaded")
        return [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]


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
