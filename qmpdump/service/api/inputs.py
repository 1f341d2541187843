"""What a request may carry: the dump request body and the query parameters, as pydantic models.

The query models also give the OpenAPI document its parameter schemas
(:func:`query_parameters`), so what is accepted and what is documented cannot drift apart.
Every problem of a query (unknown, repeated, empty or invalid parameter) is collected into one
:class:`~qmpdump.service.api.errors.InvalidInput`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Final, TypeVar, get_args

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from qmpdump.service.api.errors import FieldErrorView, InvalidInput
from qmpdump.service.views import DumpRequest, JobStateName

__all__ = [
    "DEFAULT_JOB_LIMIT",
    "MAX_JOB_LIMIT",
    "DumpsQuery",
    "JobsQuery",
    "NoQuery",
    "Query",
    "dump_json",
    "parse_dump_request",
    "parse_query",
    "query_parameters",
]

DEFAULT_JOB_LIMIT: Final = 100
MAX_JOB_LIMIT: Final = 1000
_JOB_STATES: Final[tuple[str, ...]] = get_args(JobStateName)


def dump_json(model: BaseModel) -> Any:
    """A view as JSON-ready data."""
    return model.model_dump(mode="json", by_alias=True)


def _limit(text: Any) -> int:
    # int() alone would take " 5", "+5" and "5_0"
    if isinstance(text, int):
        return text
    number = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
    if number is None or not 1 <= number <= MAX_JOB_LIMIT:
        raise ValueError(f"must be an integer from 1 to {MAX_JOB_LIMIT}, not {text!r}")
    return number


def _state(text: Any) -> Any:
    if text not in _JOB_STATES:
        raise ValueError(f"must be one of {', '.join(_JOB_STATES)}, not {text!r}")
    return text


class Query(BaseModel):
    """Base of the query models: strict, no unknown parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_Q = TypeVar("_Q", bound=Query)


class NoQuery(Query):
    """Routes that take no query parameter."""


class DumpsQuery(Query):
    """``GET /v1/dumps``."""

    vm: Annotated[str | None, Field(min_length=1, description="only this VM's")] = None


class JobsQuery(Query):
    """``GET /v1/jobs``."""

    vm: Annotated[str | None, Field(min_length=1, description="only this VM's")] = None
    state: Annotated[
        JobStateName | None,
        BeforeValidator(_state),
        Field(description="only jobs in this state"),
    ] = None
    limit: Annotated[int, BeforeValidator(_limit)] = Field(
        DEFAULT_JOB_LIMIT, ge=1, le=MAX_JOB_LIMIT, description="at most this many"
    )


def query_parameters(model: type[Query]) -> list[dict[str, Any]]:
    """The OpenAPI ``parameters`` (``in: query``) of a query model."""
    schema = model.model_json_schema()
    out = []
    for name, found in schema.get("properties", {}).items():
        prop = dict(found)
        description = prop.pop("description", "")
        prop.pop("title", None)
        options = prop.pop("anyOf", None)
        if options:  # X | None: the parameter is simply left out
            prop.update(next(o for o in options if o.get("type") != "null"))
        if prop.get("default", 0) is None:
            del prop["default"]
        out.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": prop,
            }
        )
    return out


def _summarise(what: str, problems: Sequence[FieldErrorView]) -> str:
    return f"{what}: " + "; ".join(f"{p.field}: {p.message}" for p in problems)


def parse_query(request: web.Request, model: type[_Q]) -> _Q:
    """The request's query as ``model``: each parameter at most once, not empty, valid."""
    known = list(model.model_fields)
    values: dict[str, str] = {}
    seen: set[str] = set()
    problems: list[FieldErrorView] = []
    for key, text in request.query.items():
        message = None
        if key not in known:
            message = f"unknown parameter; known: {', '.join(sorted(known)) or 'none'}"
        elif key in seen:
            message = "given more than once"
        elif not text:
            message = "must not be empty"
        else:
            values[key] = text
        seen.add(key)
        if message is not None:
            problems.append(FieldErrorView(field=key, message=message))
    try:
        parsed = model.model_validate(values)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            cause = e.get("ctx", {}).get("error")
            message = str(cause) if isinstance(cause, ValueError) else e["msg"]
            field = ".".join(str(p) for p in e["loc"])
            problems.append(FieldErrorView(field=field, message=message))
    if problems:
        raise InvalidInput(_summarise("invalid query", problems), problems)
    return parsed


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
        return DumpRequest.model_validate_json(body, strict=True)
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
            elif isinstance(cause := e.get("ctx", {}).get("error"), ValueError):
                message = str(cause)
            else:
                message = e["msg"]
            problems.append(FieldErrorView(field=name, message=message))
        raise InvalidInput(_summarise("invalid dump request", problems), problems) from None
