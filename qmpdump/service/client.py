"""A typed client of the daemon's API (:mod:`qmpdump.service.api`, schema ``qmpdump.api/1``).

:class:`ApiClient` talks HTTP over the daemon's UNIX socket with aiohttp and returns the wire
views of :mod:`qmpdump.service.views`. Error answers come back as the error classes the daemon
raised, with the daemon's message: 400 :class:`~qmpdump.errors.UsageError`, 404
:class:`~qmpdump.errors.NotFound`, 409 :class:`~qmpdump.errors.Conflict`, 503
:class:`~qmpdump.errors.Unavailable`, anything else :class:`~qmpdump.errors.ServiceError`. A
daemon that cannot be reached (no socket, nobody listening, no permission, no answer in time)
is an :class:`~qmpdump.errors.Unavailable` that says so; an answer that does not match the
schema is a :class:`~qmpdump.errors.ServiceError`.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import Field, TypeAdapter, ValidationError

from qmpdump.errors import Conflict, NotFound, ServiceError, Unavailable, UsageError
from qmpdump.report import MapReport
from qmpdump.service.api import ErrorView
from qmpdump.service.views import (
    DumpRequest,
    DumpView,
    HealthView,
    JobView,
    LibvirtMapView,
    VMView,
)

__all__ = ["DEFAULT_TIMEOUT_S", "ApiClient"]

#: a map surveys the VM over QMP, so give it time; everything else answers at once
DEFAULT_TIMEOUT_S: Final = 60.0
_BASE: Final = "http://qmpdump"
_ERRORS: Final[dict[int, type[ServiceError] | type[UsageError]]] = {
    400: UsageError,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}

_T = TypeVar("_T")
_VMS: Final = TypeAdapter(list[VMView])
_JOBS: Final = TypeAdapter(list[JobView])
_DUMPS: Final = TypeAdapter(list[DumpView])


def _segment(text: str) -> str:
    return quote(text, safe="")


class ApiClient:
    """The daemon's API over its UNIX socket; use as ``async with ApiClient(path) as api``."""

    def __init__(self, socket_path: Path | str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=_BASE,
                connector=aiohttp.UnixConnector(path=str(self.socket_path)),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    # ------------------------------------------------------------------ the routes

    async def vms(self) -> list[VMView]:
        """``GET /v1/vms``."""
        return await self._get(_VMS, "/v1/vms")

    async def vm(self, name: str) -> VMView:
        """``GET /v1/vms/{vm}``; NotFound."""
        return await self._get(TypeAdapter(VMView), f"/v1/vms/{_segment(name)}")

    async def map(self, name: str) -> MapReport | LibvirtMapView:
        """``GET /v1/vms/{vm}/map``; NotFound, Unavailable. A libvirt domain in supported
        monitor mode has a :class:`LibvirtMapView` (``qmpdump.libvirt-map/1``)."""
        adapter: TypeAdapter[MapReport | LibvirtMapView] = TypeAdapter(
            Annotated[MapReport | LibvirtMapView, Field(union_mode="left_to_right")]
        )
        return await self._get(adapter, f"/v1/vms/{_segment(name)}/map")

    async def request(self, vm: str, request: DumpRequest | None = None) -> JobView:
        """``POST /v1/vms/{vm}/dumps``: the queued job; NotFound, Conflict, UsageError."""
        body = (request or DumpRequest()).model_dump(mode="json", exclude_none=True)
        raw = await self._call("POST", f"/v1/vms/{_segment(vm)}/dumps", json=body)
        return self._parse(TypeAdapter(JobView), raw, "POST", "/v1/vms/{vm}/dumps")

    async def jobs(
        self, vm: str | None = None, state: str | None = None, limit: int | None = None
    ) -> list[JobView]:
        """``GET /v1/jobs``, newest first; the daemon's limit (100) when ``limit`` is None."""
        params: dict[str, str] = {}
        if vm is not None:
            params["vm"] = vm
        if state is not None:
            params["state"] = state
        if limit is not None:
            params["limit"] = str(limit)
        return await self._get(_JOBS, "/v1/jobs", params)

    async def job(self, job_id: str) -> JobView:
        """``GET /v1/jobs/{id}``; NotFound."""
        return await self._get(TypeAdapter(JobView), f"/v1/jobs/{_segment(job_id)}")

    async def cancel(self, job_id: str) -> JobView:
        """``DELETE /v1/jobs/{id}``: the job after the request; NotFound, Conflict if finished."""
        raw = await self._call("DELETE", f"/v1/jobs/{_segment(job_id)}")
        return self._parse(TypeAdapter(JobView), raw, "DELETE", "/v1/jobs/{id}")

    async def dumps(self, vm: str | None = None) -> list[DumpView]:
        """``GET /v1/dumps``, oldest first."""
        return await self._get(_DUMPS, "/v1/dumps", {"vm": vm} if vm is not None else None)

    async def health(self) -> HealthView:
        """``GET /healthz``; a stopping daemon (503) still answers its health."""
        raw = await self._call("GET", "/healthz", accept=(200, 503))
        return self._parse(TypeAdapter(HealthView), raw, "GET", "/healthz")

    async def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        raw = await self._call("GET", "/metrics")
        return raw.decode()

    async def openapi(self) -> dict[str, Any]:
        """``GET /v1/openapi.json``."""
        return await self._get(TypeAdapter(dict[str, Any]), "/v1/openapi.json")

    # ------------------------------------------------------------------ plumbing

    async def _get(
        self, adapter: TypeAdapter[_T], path: str, params: dict[str, str] | None = None
    ) -> _T:
        raw = await self._call("GET", path, params=params)
        return self._parse(adapter, raw, "GET", path)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        accept: tuple[int, ...] = (200, 202),
    ) -> bytes:
        where = self.socket_path
        try:
            async with self._http().request(method, path, params=params, json=json) as resp:
                raw = await resp.read()
                status = resp.status
                reason = resp.reason or ""
        except aiohttp.ClientConnectorError as err:
            raise _unreachable(where, err.os_error) from err
        except aiohttp.ServerDisconnectedError as err:
            raise Unavailable(
                f"the daemon at {where} closed the connection before answering {method} {path}"
            ) from err
        except TimeoutError as err:
            raise Unavailable(
                f"the daemon at {where} did not answer {method} {path} within {self.timeout_s:g} s"
            ) from err
        except aiohttp.ClientError as err:
            raise Unavailable(f"talking to the daemon at {where} failed: {err}") from err
        if status not in accept:
            raise _error_from(status, reason, raw, method, path)
        return raw

    @staticmethod
    def _parse(adapter: TypeAdapter[_T], raw: bytes, method: str, path: str) -> _T:
        try:
            return adapter.validate_json(raw)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "(body)"
            raise ServiceError(
                f"the daemon's answer to {method} {path} is not qmpdump.api/1 "
                f"({err.error_count()} problem(s), first: {where}: {first['msg']}); "
                "are the daemon and this client the same version?"
            ) from err


def _unreachable(path: Path, err: OSError) -> Unavailable:
    if err.errno == errno.ENOENT:
        return Unavailable(f"is the daemon running? no socket at {path}")
    if err.errno == errno.ECONNREFUSED:
        return Unavailable(f"is the daemon running? nothing listens on {path}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return Unavailable(
            f"no permission to connect to {path}: join the socket's group, or run as its owner"
        )
    return Unavailable(f"cannot connect to the daemon at {path}: {err.strerror or err}")


def _error_from(
    status: int, reason: str, raw: bytes, method: str, path: str
) -> ServiceError | UsageError:
    try:
        message = ErrorView.model_validate_json(raw).error.message
    except ValidationError:
        message = f"the daemon answered {method} {path} with {status} {reason}".rstrip()
    cls = _ERRORS.get(status, ServiceError)
    err = cls(message)
    if isinstance(err, ServiceError) and cls is ServiceError:
        err.http_status = status
    return err
