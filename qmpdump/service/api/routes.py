"""The route table: what aiohttp serves, and the OpenAPI 3.1 document generated from it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from qmpdump import __version__
from qmpdump.report import MapReport
from qmpdump.service.api.errors import ErrorView, error_middleware
from qmpdump.service.api.handlers import METRICS_CONTENT_TYPE, Handlers
from qmpdump.service.api.inputs import DumpsQuery, JobsQuery, Query, query_parameters
from qmpdump.service.views import (
    DumpRequest,
    DumpView,
    HealthView,
    JobView,
    ServiceCore,
    VMView,
)

__all__ = ["API_SCHEMA", "MAX_BODY_SIZE", "ROUTES", "make_app", "openapi_document"]

API_SCHEMA: Final = "qmpdump.api/1"
#: a dump request is three short fields; anything near this is not one
MAX_BODY_SIZE: Final = 64 * 1024


_Method = Literal["GET", "POST", "DELETE"]
_HandlerMethod = Callable[[Handlers, web.Request], Awaitable[web.StreamResponse]]
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class _Param:
    name: str
    description: str
    schema: dict[str, Any]
    where: Literal["path"] = "path"


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
    #: the query parameters' model (also their OpenAPI schemas)
    query: type[Query] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""
    #: whether the answer comes from the core (which may answer 503 while the daemon stops)
    uses_core: bool = True
    #: the body of a 503 when it is not an error (the health of a stopping daemon)
    stopping_model: type[BaseModel] | None = None


_VM = _Param("vm", "the VM's name, as in the daemon's configuration", {"type": "string"})
_JOB = _Param("id", "a job id (32 hex digits)", {"type": "string"})

#: every route that asks the core may meet 503 while the daemon stops; 400 for a bad query;
#: 500 for a bug
_COMMON_ERRORS: Final = (400, 500, 503)

ROUTES: Final[tuple[_Route, ...]] = (
    _Route(
        method="GET",
        path="/v1/vms",
        handler=Handlers.list_vms,
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
        handler=Handlers.get_vm,
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
        handler=Handlers.get_vm_map,
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
        handler=Handlers.request_dump,
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
        handler=Handlers.list_jobs,
        operation_id="listJobs",
        summary="Jobs, newest first",
        ok_status=200,
        ok_description="the jobs",
        ok_model=JobView,
        ok_list=True,
        query=JobsQuery,
        errors=(404,),
    ),
    _Route(
        method="GET",
        path="/v1/jobs/{id}",
        handler=Handlers.get_job,
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
        handler=Handlers.cancel_job,
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
        handler=Handlers.list_dumps,
        operation_id="listDumps",
        summary="Dumps on disk, oldest first",
        ok_status=200,
        ok_description="the dumps",
        ok_model=DumpView,
        ok_list=True,
        query=DumpsQuery,
        errors=(404,),
    ),
    _Route(
        method="GET",
        path="/healthz",
        handler=Handlers.health,
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
        handler=Handlers.metrics,
        operation_id="metrics",
        summary="Prometheus metrics: dumps by result, bytes, durations, paused time, connections",
        ok_status=200,
        ok_description="Prometheus text exposition format 0.0.4",
        ok_raw=(METRICS_CONTENT_TYPE, {"type": "string"}),
    ),
    _Route(
        method="GET",
        path="/v1/openapi.json",
        handler=Handlers.get_openapi,
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
    parameters = [
        {
            "name": p.name,
            "in": p.where,
            "required": True,
            "description": p.description,
            "schema": p.schema,
        }
        for p in route.params
    ]
    if route.query is not None:
        parameters += query_parameters(route.query)
    if parameters:
        op["parameters"] = parameters
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
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_SIZE)
    handlers = Handlers(core, openapi_document())
    for route in ROUTES:
        handler = _bind_handler(handlers, route.handler)
        if route.method == "GET":
            app.router.add_get(route.path, handler, name=route.operation_id)  # and HEAD
        else:
            app.router.add_route(route.method, route.path, handler, name=route.operation_id)
    return app


def _bind_handler(handlers: Handlers, method: _HandlerMethod) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await method(handlers, request)

    return handle
