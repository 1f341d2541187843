"""The daemon's wire formats (API schema ``qmpdump.api/1``) and the core the API is served from.

Strict pydantic models (``extra="forbid"``): qmpdump owns these formats, and a client sending an
unknown field -- a file path above all: clients never name files -- gets a 400 naming the field.
Times are UTC ISO 8601 strings; sizes are integers of bytes.

:class:`ServiceCore` is what the HTTP layer needs from the daemon; the daemon implements it, and
the API module depends only on this protocol. Errors are :class:`qmpdump.errors.ServiceError`
subclasses (NotFound 404, Conflict 409, Unavailable 503) or :class:`qmpdump.errors.UsageError`
(400); each carries its HTTP status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, RootModel

from qmpdump.engines.spec import DumpFormat, EngineName, Mode
from qmpdump.report import MapReport

__all__ = [
    "ConnectionState",
    "DumpRequest",
    "DumpView",
    "HealthView",
    "JobErrorView",
    "JobResultView",
    "JobView",
    "LibvirtMapView",
    "ProgressView",
    "ServiceCore",
    "VMView",
]

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConnectionState(StrEnum):
    """The daemon's QMP connection to one VM."""

    CONNECTED = "connected"
    CONNECTING = "connecting"
    DISCONNECTED = "disconnected"


class VMView(_Strict):
    """One VM the daemon looks after."""

    name: str
    qmp: str
    origin: str
    connection: ConnectionState
    #: why it is not connected (the last error), or None
    reason: str | None = None
    run_state: str | None = None
    qemu_version: str | None = None
    pid: int | None = None
    running_job: str | None = None
    queued_jobs: int = 0
    default_engine: EngineName
    default_format: DumpFormat
    default_mode: Mode
    #: the ``[[sink]]`` its dumps go to by default; None: the dump folder
    default_sink: str | None = None


class DumpRequest(_Strict):
    """``POST /v1/vms/{vm}/dumps``: every field optional; the VM's defaults fill the rest.

    Which combinations are valid is the dump specification's rule
    (:class:`qmpdump.engines.spec.DumpSpec`): a 400 names the problem. ``sink`` names a
    configured ``[[sink]]`` (or ``"local"``: the dump folder); the object's name is chosen by
    the service, as a file's is.
    """

    engine: EngineName | None = None
    format: DumpFormat | None = None
    mode: Mode | None = None
    sink: str | None = Field(default=None, max_length=64)


class ProgressView(_Strict):
    """Where a running dump stands: ``completed`` of ``total`` guest bytes (the percentage),
    and ``written`` bytes of output so far (fewer for compressed formats)."""

    written: int = 0
    total: int | None = None
    completed: int = 0
    #: for a dump going to a sink: bytes the object store has acknowledged
    uploaded: int | None = None


class JobResultView(_Strict):
    """What a succeeded job produced: ``file`` is a name in the VM's dump folder, or, when
    ``url`` is set, the object's name in its sink (``s3://bucket/prefix/file``)."""

    file: str
    size: int
    sha256: str
    #: the engine that ran (``auto`` resolved)
    engine: EngineName
    paused_s: float | None
    url: str | None = None


class JobErrorView(_Strict):
    """Why a job failed or was cancelled."""

    message: str
    error_class: str | None = None
    exit_code: int | None = None


class JobView(_Strict):
    """One dump job."""

    id: str
    vm: str
    engine: EngineName
    format: DumpFormat
    mode: Mode
    sink: str | None = None
    state: JobStateName
    created: str
    started: str | None = None
    ended: str | None = None
    progress: ProgressView
    result: JobResultView | None = None
    error: JobErrorView | None = None


class DumpView(_Strict):
    """One dump on disk."""

    vm: str
    file: str
    size: int
    created: str
    sha256: str | None = None
    job_id: str | None = None


class HealthView(_Strict):
    """``GET /healthz``."""

    status: Literal["ok", "stopping"]
    version: str
    vms: int
    connected: int
    running_jobs: int
    queued_jobs: int


class LibvirtMapView(RootModel[dict[str, Any]]):
    """``GET /v1/vms/{vm}/map`` of a libvirt domain in supported monitor mode: the map from the
    domain XML plus host facts (``qmpdump.libvirt-map/1``: regions, no guest-physical layout;
    :class:`qmpdump.libvirt.supported.SupportedMap`)."""


class ServiceCore(Protocol):
    """What the HTTP API serves from. Every method raises ServiceError/UsageError subclasses."""

    def vms(self) -> list[VMView]:
        """All VMs, in configuration order."""
        ...

    def vm(self, name: str) -> VMView:
        """One VM; NotFound if unknown."""
        ...

    async def vm_map(self, name: str) -> MapReport | LibvirtMapView:
        """A fresh memory map of a connected VM; NotFound, Unavailable."""
        ...

    async def submit(self, name: str, request: DumpRequest) -> JobView:
        """Queue a dump; NotFound, Conflict (queue full), UsageError (bad engine/format)."""
        ...

    def jobs(self, vm: str | None, state: str | None, limit: int) -> list[JobView]:
        """Jobs, newest first."""
        ...

    def job(self, job_id: str) -> JobView:
        """One job; NotFound."""
        ...

    async def cancel(self, job_id: str) -> JobView:
        """Cancel a queued or running job; NotFound, Conflict if already finished."""
        ...

    def dumps(self, vm: str | None) -> list[DumpView]:
        """Dumps on disk, oldest first."""
        ...

    def health(self) -> HealthView:
        """Liveness summary."""
        ...

    def metrics(self) -> str:
        """Prometheus text exposition (format 0.0.4)."""
        ...
