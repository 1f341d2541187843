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

Errors, every one decided in one place (:func:`.errors.error_middleware`), always answer
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

from qmpdump.service.api.errors import (
    ErrorDetail,
    ErrorView,
    FieldErrorView,
    InvalidInput,
)
from qmpdump.service.api.handlers import METRICS_CONTENT_TYPE
from qmpdump.service.api.inputs import DEFAULT_JOB_LIMIT, MAX_JOB_LIMIT, parse_dump_request
from qmpdump.service.api.routes import API_SCHEMA, MAX_BODY_SIZE, make_app, openapi_document
from qmpdump.service.api.unix import DEFAULT_SHUTDOWN_TIMEOUT_S, serve_unix, stop_serving

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
