"""The daemon's HTTP/JSON API (schema ``qmpdump.api/1``) on a UNIX socket, served by aiohttp.web.

Routes (every one usable with ``curl --unix-socket SOCK http://qmpdump/...``):

* ``GET /v1/vms`` -- every VM (:class:`~qmpdump.service.views.VMView`), in configuration order;
* ``GET /v1/vms/{vm}`` -- one VM;
* ``GET /v1/vms/{vm}/map`` -- a fresh memory map (:class:`~qmpdump.report.MapReport`);
* ``POST /v1/vms/{vm}/dumps`` -- queue a dump (body: ``DumpRequest``, may be empty): 202 with
  the job and ``Location: /v1/jobs/{id}``;
* ``GET /v1/jobs?vm=&state=&limit=`` -- jobs, newest first (``limit`` 1..1000, default 100);
* ``GET /v1/jobs/{id}`` -- one job; ``DELETE /v1/jobs/{id}`` -- cancel it;
* ``GET /v1/dumps?vm=`` -- dumps on disk, oldest first;
* ``GET /healthz`` -- liveness (503 with the same body while the daemon stops);
* ``GET /metrics`` -- Prometheus text exposition, format 0.0.4;
* ``GET /v1/openapi.json`` -- the OpenAPI 3.1 document of all of the above.

Every 2xx answer is 200 unless said otherwise; bodies are the views' ``model_dump(mode="json")``.

Errors, every one decided in one place (:func:`_errors`), always answer
``{"error": {"status": N, "message": "...", "fields": [{"field": ..., "message": ...}]}}``:
invalid input (body, query) 400; :class:`~qmpdump.errors.ServiceError` its ``http_status``
(NotFound 404, Conflict 409, Unavailable 503); :class:`~qmpdump.errors.UsageError` 400;
aiohttp's own HTTP errors keep their status (unknown route 404, 405 with ``Allow``, body too
large 413); anything else is a bug: 500 with a generic message, the traceback only in the log.
Clients never name files: the request body is strict (``extra="forbid"``), so ``path`` is a 400.

:func:`serve_unix` and :func:`stop_serving` follow aiohttp's runner lifecycle
(``AppRunner.setup()`` -> ``site.start()`` ... ``runner.cleanup()``) on a socket that has its
mode and group before it accepts a single connection.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qmpdump import __version__
from qmpdump.errors import ServiceError, UsageError
from qmpdump.report import MapReport
from qmpdump.service.views import (
    DumpRequest,
    DumpView,
    HealthView,
    JobStateName,
    JobView,
    ServiceCore,
    VMView,
)

__all__ = [
    "API_SCHEMA",
    "DEFAULT_JOB_LIMIT",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "MAX_BODY_SIZE",
    "MAX_JOB_LIMIT",
    "METRICS_CONTENT_TYPE",
    "ErrorDetail",
    "ErrorView",
    "FieldErrorView",
    "InvalidInput",
    "make_app",
    "openapi_document",
    "parse_dump_request",
    "serve_unix",
    "stop_serving",
]

log = logging.getLogger(__name__)

API_SCHEMA: Final = "qmpdump.api/1"
#: a dump request is three short fields; anything near this is not one
MAX_BODY_SIZE: Final = 64 * 1024
DEFAULT_JOB_LIMIT: Final = 100
MAX_JOB_LIMIT: Final = 1000
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: how long :func:`stop_serving` lets running requests finish before cancelling them
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0
#: how long probing an existing socket for a live daemon may take
_PROBE_TIMEOUT_S: Final = 2.0
_INTERNAL_ERROR: Final = "internal error in the qmpdump daemon; its log has the details"
_JOB_STATES: Final[tuple[str, ...]] = get_args(JobStateName)


# ----------------------------------------------------------------------------- error wire format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldErrorView(_Strict):
    """One invalid input: ``field`` is a body field (``engine``) or a query parameter."""

    field: str
    message: str


class ErrorDetail(_Strict):
    """What went wrong: the HTTP status again, one sentence, and the offending inputs."""

    status: int
    message: str
    fields: list[FieldErrorView] = Field(default_factory=list)


class ErrorView(_Strict):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


class InvalidInput(UsageError):
    """Raised by the API when a request's body or query is invalid; ``fields`` names each input."""

    def __init__(self, message: str, fields: Sequence[FieldErrorView] = ()) -> None:
        self.fields = list(fields)
        super().__init__(message)


def _error_response(
    status: int,
    message: str,
    fields: Sequence[FieldErrorView] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = ErrorView(error=ErrorDetail(status=status, message=message, fields=list(fields)))
    return _json(body.model_dump(mode="json"), status=status, headers=headers)


def _http_error_message(request: web.Request, err: web.HTTPException) -> str:
    if isinstance(err, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(err.allowed_methods))
        return f"method {err.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(err, web.HTTPNotFound):
        return f"no route {request.method} {request.path}; GET /v1/openapi.json lists them"
    default = f"{err.status}: {err.reason}"
    return err.text if err.text and err.text != default else err.reason


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one mapping of errors to HTTP answers."""
    try:
        return await handler(request)
    except InvalidInput as err:
        return _error_response(400, str(err), err.fields)
    except UsageError as err:
        return _error_response(400, str(err))
    except ServiceError as err:
        # a disconnected VM (503) is routine; a plain ServiceError (500) is worth a look
        level = logging.WARNING if err.http_status == 500 else logging.DEBUG
        log.log(level, "%s %s: %s", request.method, request.path, err)
        return _error_response(err.http_status, str(err))
    except web.HTTPException as err:
        if err.status < 400:
            raise
        # keep what aiohttp said in headers (Allow on a 405), but answer in our JSON
        headers = {
            k: v
            for k, v in err.headers.items()
            if k.lower() not in ("content-type", "content-length")
        }
        return _error_response(err.status, _http_error_message(request, err), headers=headers)
    except Exception:
        # A bug: the traceback goes to the log, never to the client.
        log.exception("internal error answering %s %s", request.method, request.path_qs)
        return _error_response(500, _INTERNAL_ERROR)


# ----------------------------------------------------------------------------- input


def _json(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(data) + "\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def _limit(text: str) -> int:
    # int() alone would take " 5", "+5" and "5_0"
    number = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
    if number is None or not 1 <= number <= MAX_JOB_LIMIT:
        raise ValueError(f"must be an integer from 1 to {MAX_JOB_LIMIT}, not {text!r}")
    return number


def _state(text: str) -> str:
    if text not in _JOB_STATES:
        raise ValueError(f"must be one of {', '.join(_JOB_STATES)}, not {text!r}")
    return text


def _text(text: str) -> str:
    return text


#: query parameter -> its parser (raising ValueError with the problem)
_QueryParsers = Mapping[str, Callable[[str], object]]
_NO_QUERY: Final[_QueryParsers] = {}


def _query(request: web.Request, parsers: _QueryParsers) -> dict[str, Any]:
    """The parsed query parameters, each at most once and not empty.

    Every problem (an unknown, repeated, empty or invalid parameter) is collected into one
    :class:`InvalidInput`.
    """
    values: dict[str, Any] = {}
    seen: set[str] = set()
    problems: list[FieldErrorView] = []
    for key, text in request.query.items():
        message = None
        if key not in parsers:
            message = f"unknown parameter; known: {', '.join(sorted(parsers)) or 'none'}"
        elif key in seen:
            message = "given more than once"
        elif not text:
            message = "must not be empty"
        else:
            try:
                values[key] = parsers[key](text)
            except ValueError as err:
                message = str(err)
        seen.add(key)
        if message is not None:
            problems.append(FieldErrorView(field=key, message=message))
    if problems:
        raise InvalidInput(_summarise("invalid query", problems), problems)
    return values


def _summarise(what: str, problems: Sequence[FieldErrorView]) -> str:
    return f"{what}: " + "; ".join(f"{p.field}: {p.message}" for p in problems)


_JSON_TYPES: Final = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def parse_dump_request(body: bytes) -> DumpRequest:
    """A ``POST /v1/vms/{vm}/dumps`` body; an empty body means "the VM's defaults".

    Raises :class:`InvalidInput` naming each offending field.
    """
    if not body.strip():
        return DumpRequest()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise InvalidInput(f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"the body must be a JSON object, not {_JSON_TYPES[type(data)]}")
    try:
        return DumpRequest.model_validate(data, strict=True)
    except ValidationError as err:
        allowed = ", ".join(DumpRequest.model_fields)
        problems = []
        for e in err.errors(include_url=False):
            name = ".".join(str(part) for part in e["loc"]) or "(body)"
            if e["type"] == "extra_forbidden":
                message = (
                    f"unknown field; known: {allowed} (clients never name files: "
                    "the service names dumps)"
                )
            else:
                message = e["msg"]
            problems.append(FieldErrorView(field=name, message=message))
        raise InvalidInput(_summarise("invalid dump request", problems), problems) from None


# ----------------------------------------------------------------------------- handlers


class _Handlers:
    """One method per route, each a thin translation between HTTP and :class:`ServiceCore`."""

    def __init__(self, core: ServiceCore, openapi: dict[str, Any]) -> None:
        self.core = core
        self.openapi = openapi

    async def list_vms(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json([_dump(v) for v in self.core.vms()])

    async def get_vm(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json(_dump(self.core.vm(request.match_info["vm"])))

    async def get_vm_map(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json(_dump(await self.core.vm_map(request.match_info["vm"])))

    async def request_dump(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        dump_request = parse_dump_request(await request.read())
        job = self.core.submit(request.match_info["vm"], dump_request)
        location = f"/v1/jobs/{quote(job.id, safe='')}"
        return _json(_dump(job), status=202, headers={"Location": location})

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        q = _query(request, {"vm": _text, "state": _state, "limit": _limit})
        jobs = self.core.jobs(q.get("vm"), q.get("state"), q.get("limit", DEFAULT_JOB_LIMIT))
        return _json([_dump(j) for j in jobs])

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json(_dump(self.core.job(request.match_info["id"])))

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json(_dump(self.core.cancel(request.match_info["id"])))

    async def list_dumps(self, request: web.Request) -> web.StreamResponse:
        q = _query(request, {"vm": _text})
        return _json([_dump(d) for d in self.core.dumps(q.get("vm"))])

    async def health(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        health = self.core.health()
        return _json(_dump(health), status=200 if health.status == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        text = self.core.metrics()
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def get_openapi(self, request: web.Request) -> web.StreamResponse:
        _query(request, _NO_QUERY)
        return _json(self.openapi)


# ----------------------------------------------------------------------------- the route table

_Method = Literal["GET", "POST", "DELETE"]
_HandlerMethod = Callable[[_Handlers, web.Request], Awaitable[web.StreamResponse]]
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class _Param:
    name: str
    where: Literal["path", "query"]
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class _Route:
    """One route: what aiohttp serves and what the OpenAPI document says about it."""

    method: _Method
    path: str
    handler: _HandlerMethod
    operation_id: str
    summary: str
    ok_status: int
    ok_description: str
    #: the 2xx body: a model, a list of a model, or a raw (media type, schema) pair
    ok_model: type[BaseModel] | None = None
    ok_list: bool = False
    ok_raw: tuple[str, dict[str, Any]] | None = None
    ok_headers: dict[str, str] = field(default_factory=dict)
    params: tuple[_Param, ...] = ()
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""
    #: whether the answer comes from the core (which may answer 503 while the daemon stops)
    uses_core: bool = True
    #: the body of a 503 when it is not an error (the health of a stopping daemon)
    stopping_model: type[BaseModel] | None = None


_VM = _Param("vm", "path", "the VM's name, as in the daemon's configuration", {"type": "string"})
_JOB = _Param("id", "path", "a job id (32 hex digits)", {"type": "string"})
_VM_FILTER = _Param("vm", "query", "only this VM's", {"type": "string", "minLength": 1})

#: every route that asks the core may meet 503 while the daemon stops; 400 for a bad query;
#: 500 for a bug
_COMMON_ERRORS: Final = (400, 500, 503)

ROUTES: Final[tuple[_Route, ...]] = (
    _Route(
        method="GET",
        path="/v1/vms",
        handler=_Handlers.list_vms,
        operation_id="listVMs",
        summary="Every VM the daemon looks after, in configuration order",
        ok_status=200,
        ok_description="the VMs",
        ok_model=VMView,
        ok_list=True,
    ),
    _Route(
        method="GET",
        path="/v1/vms/{vm}",
        handler=_Handlers.get_vm,
        operation_id="getVM",
        summary="One VM",
        ok_status=200,
        ok_description="the VM",
        ok_model=VMView,
        params=(_VM,),
        errors=(404,),
    ),
    _Route(
        method="GET",
        path="/v1/vms/{vm}/map",
        handler=_Handlers.get_vm_map,
        operation_id="getVMMap",
        summary="A fresh memory map of a connected VM (qmpdump.map/1); reads no guest memory",
        ok_status=200,
        ok_description="the map",
        ok_model=MapReport,
        params=(_VM,),
        errors=(404,),
    ),
    _Route(
        method="POST",
        path="/v1/vms/{vm}/dumps",
        handler=_Handlers.request_dump,
        operation_id="requestDump",
        summary="Queue a dump of the VM's memory",
        ok_status=202,
        ok_description="the queued job; follow it at its Location",
        ok_model=JobView,
        ok_headers={"Location": "the job's URL path, /v1/jobs/{id}"},
        params=(_VM,),
        body=DumpRequest,
        errors=(404, 409, 413),
        description="Every field is optional: the VM's defaults fill the rest, and an empty "
        "body asks for a dump with the defaults. Clients never name files: the service names "
        "dumps, and an unknown field (such as path) is a 400.",
    ),
    _Route(
        method="GET",
        path="/v1/jobs",
        handler=_Handlers.list_jobs,
        operation_id="listJobs",
        summary="Jobs, newest first",
        ok_status=200,
        ok_description="the jobs",
        ok_model=JobView,
        ok_list=True,
        params=(
            _VM_FILTER,
            _Param("state", "query", "only jobs in this state", {"enum": list(_JOB_STATES)}),
            _Param(
                "limit",
                "query",
                "at most this many",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_JOB_LIMIT,
                    "default": DEFAULT_JOB_LIMIT,
                },
            ),
        ),
        errors=(404,),
    ),
    _Route(
        method="GET",
        path="/v1/jobs/{id}",
        handler=_Handlers.get_job,
        operation_id="getJob",
        summary="One job: state (queued, running, succeeded, failed, cancelled), progress, result",
        ok_status=200,
        ok_description="the job",
        ok_model=JobView,
        params=(_JOB,),
        errors=(404,),
    ),
    _Route(
        method="DELETE",
        path="/v1/jobs/{id}",
        handler=_Handlers.cancel_job,
        operation_id="cancelJob",
        summary="Cancel a queued or running job",
        ok_status=200,
        ok_description="the job after the cancel request",
        ok_model=JobView,
        params=(_JOB,),
        errors=(404, 409),
        description="A finished job (succeeded, failed or cancelled) answers 409.",
    ),
    _Route(
        method="GET",
        path="/v1/dumps",
        handler=_Handlers.list_dumps,
        operation_id="listDumps",
        summary="Dumps on disk, oldest first",
        ok_status=200,
        ok_description="the dumps",
        ok_model=DumpView,
        ok_list=True,
        params=(_VM_FILTER,),
        errors=(404,),
    ),
    _Route(
        method="GET",
        path="/healthz",
        handler=_Handlers.health,
        operation_id="health",
        summary="Liveness summary",
        ok_status=200,
        ok_description="the daemon is up",
        ok_model=HealthView,
        stopping_model=HealthView,
        description="While the daemon stops, the answer is 503 with the same body "
        '(status "stopping").',
    ),
    _Route(
        method="GET",
        path="/metrics",
        handler=_Handlers.metrics,
        operation_id="metrics",
        summary="Prometheus metrics: dumps by result, bytes, durations, paused time, connections",
        ok_status=200,
        ok_description="Prometheus text exposition format 0.0.4",
        ok_raw=(METRICS_CONTENT_TYPE, {"type": "string"}),
    ),
    _Route(
        method="GET",
        path="/v1/openapi.json",
        handler=_Handlers.get_openapi,
        operation_id="openapi",
        summary="This document",
        ok_status=200,
        ok_description="the OpenAPI 3.1 document",
        ok_raw=("application/json", {"type": "object"}),
        uses_core=False,
    ),
)

_ERROR_RESPONSES: Final = {
    400: ("BadRequest", "invalid input: the body, a query parameter or a VM's settings"),
    404: ("NotFound", "no such VM, job or route"),
    405: ("MethodNotAllowed", "the path exists, not with this method (see the Allow header)"),
    409: ("Conflict", "the request conflicts with the state: a busy VM, a finished job"),
    413: ("PayloadTooLarge", f"the body is larger than {MAX_BODY_SIZE} bytes"),
    500: ("InternalError", "a bug in the daemon; the message is generic, the log has details"),
    503: ("Unavailable", "the VM is not connected, or the daemon is stopping"),
}

_MODELS: Final[tuple[type[BaseModel], ...]] = (
    ErrorView,
    VMView,
    DumpRequest,
    JobView,
    DumpView,
    HealthView,
    MapReport,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _schemas() -> dict[str, Any]:
    """Every model's JSON schema, nested definitions hoisted into one flat table."""
    out: dict[str, Any] = {}

    def put(name: str, schema: Any) -> None:
        if name in out and out[name] != schema:
            raise RuntimeError(f"two different JSON schemas are named {name}")
        out[name] = schema

    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        for name, definition in schema.pop("$defs", {}).items():
            put(name, definition)
        put(model.__name__, schema)
    return dict(sorted(out.items()))


def _operation(route: _Route) -> dict[str, Any]:
    if route.ok_raw is not None:
        media, schema = route.ok_raw
        content = {media.split(";")[0]: {"schema": schema}}
    else:
        assert route.ok_model is not None
        ref = _ref(route.ok_model)
        content = {
            "application/json": {
                "schema": {"type": "array", "items": ref} if route.ok_list else ref
            }
        }
    ok: dict[str, Any] = {"description": route.ok_description, "content": content}
    if route.ok_headers:
        ok["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in route.ok_headers.items()
        }
    responses: dict[str, Any] = {str(route.ok_status): ok}
    errors = set(route.errors) | ({*_COMMON_ERRORS} if route.uses_core else {400, 500})
    for status in sorted(errors):
        if status == 503 and route.stopping_model is not None:
            responses["503"] = {
                "description": "the daemon is stopping",
                "content": {"application/json": {"schema": _ref(route.stopping_model)}},
            }
        else:
            responses[str(status)] = {
                "$ref": f"#/components/responses/{_ERROR_RESPONSES[status][0]}"
            }
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": responses,
    }
    if route.description:
        op["description"] = route.description
    if route.params:
        op["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.where == "path",
                "description": p.description,
                "schema": p.schema,
            }
            for p in route.params
        ]
    if route.body is not None:
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    return op


def openapi_document(routes: Sequence[_Route] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes, with the models' JSON schemas as components."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qmpdump daemon API",
            "version": f"{API_SCHEMA.rsplit('/', 1)[1]} (qmpdump {__version__})",
            "summary": f"Memory dumps of live QEMU VMs; schema {API_SCHEMA}",
            "description": "Served on the daemon's UNIX socket only, e.g. "
            "`curl --unix-socket /run/qmpdump/api.sock http://qmpdump/v1/vms`. Times are UTC "
            "ISO 8601 strings, sizes integers of bytes. Every error answers an ErrorView. "
            "Any path answers 405 (MethodNotAllowed) to a method it does not serve.",
            "license": {"name": "GPL-2.0-or-later", "identifier": "GPL-2.0-or-later"},
        },
        "servers": [{"url": "http://qmpdump", "description": "the daemon's UNIX socket"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "responses": {
                name: {
                    "description": text,
                    "content": {"application/json": {"schema": _ref(ErrorView)}},
                }
                for name, text in _ERROR_RESPONSES.values()
            },
        },
    }


def make_app(core: ServiceCore) -> web.Application:
    """The aiohttp application serving ``core``; every route in :data:`ROUTES`."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_SIZE)
    handlers = _Handlers(core, openapi_document())
    for route in ROUTES:
        handler = _bind_handler(handlers, route.handler)
        if route.method == "GET":
            app.router.add_get(route.path, handler, name=route.operation_id)  # and HEAD
        else:
            app.router.add_route(route.method, route.path, handler, name=route.operation_id)
    return app


def _bind_handler(handlers: _Handlers, method: _HandlerMethod) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await method(handlers, request)

    return handle


# ----------------------------------------------------------------------------- the UNIX socket


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
