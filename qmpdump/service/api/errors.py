"""The API's error wire format and the one middleware that maps every error to an answer.

Every 4xx and 5xx answers ``{"error": {"status": N, "message": "...", "fields": [...]}}``:
invalid input (body, query) 400; :class:`~qmpdump.errors.ServiceError` its ``http_status``
(NotFound 404, Conflict 409, Unavailable 503); :class:`~qmpdump.errors.UsageError` 400;
aiohttp's own HTTP errors keep their status (unknown route 404, 405 with ``Allow``, body too
large 413); anything else is a bug: 500 with a generic message, the traceback only in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field

from qmpdump.errors import ServiceError, UsageError

__all__ = [
    "ErrorDetail",
    "ErrorView",
    "FieldErrorView",
    "InvalidInput",
    "error_middleware",
    "json_response",
]

log = logging.getLogger("qmpdump.service.api")

_INTERNAL_ERROR: Final = "internal error in the qmpdump daemon; its log has the details"


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(data) + "\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


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
    return json_response(body.model_dump(mode="json"), status=status, headers=headers)


def _http_error_message(request: web.Request, err: web.HTTPException) -> str:
    if isinstance(err, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(err.allowed_methods))
        return f"method {err.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(err, web.HTTPNotFound):
        return f"no route {request.method} {request.path}; GET /v1/openapi.json lists them"
    default = f"{err.status}: {err.reason}"
    return err.text if err.text and err.text != default else err.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
