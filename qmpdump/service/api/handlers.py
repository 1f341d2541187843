"""The route handlers: each a thin translation between HTTP and the service core."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from qmpdump.service.api.errors import json_response
from qmpdump.service.api.inputs import (
    DumpsQuery,
    JobsQuery,
    NoQuery,
    dump_json,
    parse_dump_request,
    parse_query,
)
from qmpdump.service.metrics import CONTENT_TYPE
from qmpdump.service.views import ServiceCore

__all__ = ["METRICS_CONTENT_TYPE", "Handlers"]

#: Prometheus text exposition, format 0.0.4
METRICS_CONTENT_TYPE: Final = CONTENT_TYPE


class Handlers:
    """One method per route, each a thin translation between HTTP and :class:`ServiceCore`."""

    def __init__(self, core: ServiceCore, openapi: dict[str, Any]) -> None:
        self.core = core
        self.openapi = openapi

    async def list_vms(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response([dump_json(v) for v in self.core.vms()])

    async def get_vm(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response(dump_json(self.core.vm(request.match_info["vm"])))

    async def get_vm_map(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response(dump_json(await self.core.vm_map(request.match_info["vm"])))

    async def request_dump(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        dump_request = parse_dump_request(await request.read())
        job = await self.core.submit(request.match_info["vm"], dump_request)
        location = f"/v1/jobs/{quote(job.id, safe='')}"
        return json_response(dump_json(job), status=202, headers={"Location": location})

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        q = parse_query(request, JobsQuery)
        jobs = self.core.jobs(q.vm, q.state, q.limit)
        return json_response([dump_json(j) for j in jobs])

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response(dump_json(self.core.job(request.match_info["id"])))

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response(dump_json(await self.core.cancel(request.match_info["id"])))

    async def list_dumps(self, request: web.Request) -> web.StreamResponse:
        q = parse_query(request, DumpsQuery)
        return json_response([dump_json(d) for d in self.core.dumps(q.vm)])

    async def health(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        health = self.core.health()
        return json_response(dump_json(health), status=200 if health.status == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        text = self.core.metrics()
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def get_openapi(self, request: web.Request) -> web.StreamResponse:
        parse_query(request, NoQuery)
        return json_response(self.openapi)
