"""The HTTP contract of the daemon's API: routes, status codes, bodies, OpenAPI, the socket.

The app runs for real (aiohttp on a real UNIX socket in tmp_path) and is spoken to by real
clients: :class:`~qmpdump.service.client.ApiClient`, raw aiohttp requests for malformed input,
and ``curl --unix-socket`` for the operator's view. The core behind it is an in-memory fake
(:class:`FakeCore`): the daemon core is tested end to end elsewhere with real QEMU, and here the
point is the HTTP contract -- which the fake lets every status code be reached on purpose,
including a core that raises a bug.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from qmpdump.engines.spec import DumpFormat, EngineName, Mode
from qmpdump.errors import (
    Conflict,
    NotFound,
    QMPTimeout,
    ServiceError,
    Unavailable,
    UsageError,
)
from qmpdump.report import MapReport
from qmpdump.service.api import (
    DEFAULT_JOB_LIMIT,
    MAX_BODY_SIZE,
    METRICS_CONTENT_TYPE,
    make_app,
    openapi_document,
    serve_unix,
    stop_serving,
)
from qmpdump.service.client import ApiClient
from qmpdump.service.views import (
    ConnectionState,
    DumpRequest,
    DumpView,
    HealthView,
    JobErrorView,
    JobResultView,
    JobView,
    ProgressView,
    ServiceCore,
    VMView,
)

T0 = "2024-05-01T12:00:00Z"
TOTAL = 4 << 30
INTERNAL = "internal error in the qmpdump daemon; its log has the details"

# ----------------------------------------------------------------------------- the fake core


def vm_view(name: str, **changes: Any) -> VMView:
    base: dict[str, Any] = {
        "name": name,
        "qmp": f"/run/qemu/{name}.qmp",
        "origin": "config",
        "connection": ConnectionState.CONNECTED,
        "run_state": "running",
        "qemu_version": "8.2.2",
        "pid": 4242,
        "default_engine": "auto",
        "default_format": "elf",
        "default_mode": "consistent",
    }
    return VMView.model_validate(base | changes)


SAMPLE_MAP = MapReport.model_validate(
    {
        "schema": "qmpdump.map/1",
        "vm": {
            "address": "/run/qemu/web1.qmp",
            "pid": 4242,
            "name": "web1",
            "qemu_version": "8.2.2",
            "qemu_package": "Debian 1:8.2.2",
            "run_state": "running",
        },
        "ranges": [
            {
                "gpa": 0,
                "size": 1 << 30,
                "region": "pc.ram",
                "backend": "ram0",
                "backend_type": "memfd",
                "region_offset": 0,
                "file_offset": 0,
                "readonly": False,
                "populated_size": 1 << 20,
            }
        ],
        "regions": [
            {
                "region": "pc.ram",
                "backend": "ram0",
                "backend_type": "memfd",
                "size": 1 << 30,
                "mem_path": None,
                "population_source": "seek_data",
                "exact": True,
                "note": "",
                "populated_size": 1 << 20,
            }
        ],
        "virtio_mem": [],
        "populated": [{"gpa": 0, "size": 1 << 20}],
        "unknown": [],
        "totals": {
            "ram_size": 1 << 30,
            "populated_size": 1 << 20,
            "unknown_size": 0,
            "virtio_mem_max_size": 0,
            "virtio_mem_plugged_size": 0,
            "virtio_mem_populated_size": 0,
            "populated_extents": 1,
        },
    }
)

METRICS = (
    "# HELP qmpdump_dumps_total Dumps by VM and result.\n"
    "# TYPE qmpdump_dumps_total counter\n"
    'qmpdump_dumps_total{vm="web1",result="succeeded"} 3\n'
)


class FakeCore:
    """An in-memory :class:`ServiceCore`.

    ``outcome[vm]`` decides how that VM's jobs end: ``succeeded``, ``failed`` (exit code 43),
    ``failed-bare`` (no exit code), ``cancelled`` or ``never``. A job moves one step on every
    ``job()`` call (every ``GET /v1/jobs/{id}``): queued -> running (half) -> the outcome.
    ``raise_in[method]`` makes that method raise; ``busy`` VMs answer a submit with 409.
    """

    def __init__(self) -> None:
        self.vm_views = {
            "web1": vm_view("web1"),
            "db1": vm_view(
                "db1",
                connection=ConnectionState.DISCONNECTED,
                reason="no socket at /run/qemu/db1.qmp",
                run_state=None,
                qemu_version=None,
                pid=None,
            ),
        }
        self.job_views: dict[str, JobView] = {}
        self.script: dict[str, list[JobView]] = {}
        self.dump_views = [
            DumpView(
                vm="web1",
                file="web1-20240501T110000Z.elf",
                size=1 << 30,
                created="2024-05-01T11:00:00Z",
                sha256="ab" * 32,
                job_id="0" * 31 + "a",
            ),
            DumpView(vm="db1", file="db1-20240501T113000Z.kdump", size=5 << 20, created=T0),
        ]
        self.outcome: dict[str, str] = {}
        self.busy: set[str] = set()
        self.raise_in: dict[str, Exception] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: set on every call, for a test to wait for the next one
        self.called = asyncio.Event()
        self.stopping = False
        self._next_id = 0x100

    def last_call(self) -> tuple[str, tuple[Any, ...]]:
        return self.calls[-1]

    async def wait_for_calls(self, method: str, count: int) -> None:
        """Until ``method`` has been called ``count`` times."""
        while sum(m == method for m, _ in self.calls) < count:
            self.called.clear()
            await self.called.wait()

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        self.called.set()
        if method in self.raise_in:
            raise self.raise_in[method]

    def _vm(self, name: str) -> VMView:
        try:
            return self.vm_views[name]
        except KeyError:
            raise NotFound(f"no VM named {name!r}") from None

    def add_job(self, vm: str, state: str, **changes: Any) -> JobView:
        self._next_id += 1
        job = JobView.model_validate(
            {
                "id": f"{self._next_id:032x}",
                "vm": vm,
                "engine": "auto",
                "format": "elf",
                "mode": "consistent",
                "state": state,
                "created": T0,
                "progress": {"written": 0, "total": None},
            }
            | changes
        )
        self.job_views[job.id] = job
        return job

    # --- ServiceCore

    def vms(self) -> list[VMView]:
        self._enter("vms")
        return list(self.vm_views.values())

    def vm(self, name: str) -> VMView:
        self._enter("vm", name)
        return self._vm(name)

    async def vm_map(self, name: str) -> MapReport:
        self._enter("vm_map", name)
        vm = self._vm(name)
        if vm.connection is not ConnectionState.CONNECTED:
            raise Unavailable(f"VM {name!r} is not connected: {vm.reason}")
        await asyncio.sleep(0)
        return SAMPLE_MAP

    async def submit(self, name: str, request: DumpRequest) -> JobView:
        self._enter("submit", name, request)
        vm = self._vm(name)
        if request.format == "win-dmp":
            raise UsageError("format 'win-dmp' is not one this VM offers (elf, kdump-zlib, ...)")
        if name in self.busy:
            raise Conflict(f"VM {name!r} already has a dump queued")
        job = self.add_job(
            name,
            "queued",
            engine=request.engine or vm.default_engine,
            format=request.format or vm.default_format,
            mode=request.mode or vm.default_mode,
        )
        running = job.model_copy(
            update={
                "state": "running",
                "started": T0,
                "progress": ProgressView(written=TOTAL // 2, total=TOTAL),
            }
        )
        ended: dict[str, Any] = {"ended": T0, "progress": ProgressView(written=TOTAL, total=TOTAL)}
        outcome = self.outcome.get(name, "succeeded")
        if outcome == "succeeded":
            ended |= {
                "state": "succeeded",
                "result": JobResultView(
                    file=f"{name}-20240501T120000Z.elf",
                    size=TOTAL,
                    sha256="cd" * 32,
                    engine=EngineName.BACKEND,
                    paused_s=0.25,
                ),
            }
        elif outcome == "failed":
            ended |= {
                "state": "failed",
                "error": JobErrorView(
                    message="no space left on /var/lib/qmpdump",
                    error_class="DiskFull",
                    exit_code=43,
                ),
            }
        elif outcome == "failed-bare":
            ended |= {"state": "failed", "error": JobErrorView(message="something broke")}
        elif outcome == "cancelled":
            ended |= {
                "state": "cancelled",
                "error": JobErrorView(message="cancelled by the operator", exit_code=41),
            }
        steps = [running] if outcome == "never" else [running, running.model_copy(update=ended)]
        self.script[job.id] = steps
        return job

    def jobs(self, vm: str | None, state: str | None, limit: int) -> list[JobView]:
        self._enter("jobs", vm, state, limit)
        if vm is not None:
            self._vm(vm)
        found = [
            j
            for j in self.job_views.values()
            if (vm is None or j.vm == vm) and (state is None or j.state == state)
        ]
        return sorted(found, key=lambda j: j.id, reverse=True)[:limit]

    def job(self, job_id: str) -> JobView:
        self._enter("job", job_id)
        if job_id not in self.job_views:
            raise NotFound(f"no job {job_id!r}")
        if self.script.get(job_id):
            self.job_views[job_id] = self.script[job_id].pop(0)
        return self.job_views[job_id]

    async def cancel(self, job_id: str) -> JobView:
        self._enter("cancel", job_id)
        job = self.job_views.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if job.state in ("succeeded", "failed", "cancelled"):
            raise Conflict(f"job {job_id} already {job.state}; nothing to cancel")
        self.script.pop(job_id, None)
        job = job.model_copy(
            update={
                "state": "cancelled",
                "ended": T0,
                "error": JobErrorView(message="cancelled by the operator", exit_code=41),
            }
        )
        self.job_views[job_id] = job
        return job

    def dumps(self, vm: str | None) -> list[DumpView]:
        self._enter("dumps", vm)
        if vm is not None:
            self._vm(vm)
        return [d for d in self.dump_views if vm is None or d.vm == vm]

    def health(self) -> HealthView:
        self._enter("health")
        return HealthView(
            status="stopping" if self.stopping else "ok",
            version="0.1.0",
            vms=len(self.vm_views),
            connected=1,
            running_jobs=0,
            queued_jobs=0,
        )

    def metrics(self) -> str:
        self._enter("metrics")
        return METRICS


def as_core(core: FakeCore) -> ServiceCore:
    """Proves (to mypy) that the fake is a :class:`ServiceCore`."""
    return core


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Served:
    core: FakeCore
    sock: Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The API of a fresh :class:`FakeCore`, on ``tmp_path/api.sock``."""
    core = FakeCore()
    sock = tmp_path / "api.sock"
    runner = await serve_unix(make_app(as_core(core)), sock, mode=0o660)
    try:
        yield Served(core, sock)
    finally:
        await stop_serving(runner, sock)
    assert not sock.exists()


@pytest.fixture
async def api(served: Served) -> AsyncIterator[ApiClient]:
    async with ApiClient(served.sock) as client:
        yield client


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The error document, checked for shape and for repeating the status."""
        assert self.headers["Content-Type"].startswith("application/json")
        doc = self.json()
        assert set(doc) == {"error"}
        error: dict[str, Any] = doc["error"]
        assert set(error) == {"status", "message", "fields"}
        assert error["status"] == self.status
        assert isinstance(error["message"], str)
        assert error["message"]
        return error


async def http(
    sock: Path,
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One raw request, bytes in, bytes out: for input ApiClient would never send."""
    connector = aiohttp.UnixConnector(path=str(sock))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://qmpdump{url}", data=data, headers=headers) as resp,
    ):
        return Answer(resp.status, resp.headers, await resp.read())


@dataclass
class CurlAnswer:
    status: int
    content_type: str
    headers: str
    body: str


async def curl(sock: Path, *args: str) -> CurlAnswer:
    """``curl --unix-socket``: the status, content type, response headers and body."""
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--unix-socket",
        str(sock),
        "--dump-header",
        "/dev/stderr",
        "--write-out",
        "\n%{http_code} %{content_type}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    body, _, tail = out.decode().rpartition("\n")
    status, _, content_type = tail.partition(" ")
    return CurlAnswer(int(status), content_type, err.decode(), body)


def dumped(views: list[VMView] | list[JobView] | list[DumpView]) -> list[Any]:
    return [v.model_dump(mode="json") for v in views]


# ----------------------------------------------------------------------------- happy paths


async def test_vms_and_vm(served: Served, api: ApiClient) -> None:
    assert await api.vms() == list(served.core.vm_views.values())
    assert await api.vm("db1") == served.core.vm_views["db1"]
    answer = await http(served.sock, "GET", "/v1/vms")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    assert answer.json() == dumped(list(served.core.vm_views.values()))


async def test_map(served: Served, api: ApiClient) -> None:
    assert await api.map("web1") == SAMPLE_MAP
    answer = await http(served.sock, "GET", "/v1/vms/web1/map")
    assert answer.status == 200
    doc = answer.json()
    assert doc["schema"] == "qmpdump.map/1"  # by alias, as `qmpdump map --json` prints it
    assert doc == json.loads(SAMPLE_MAP.to_json())


async def test_request_answers_202_with_the_job_and_its_location(served: Served) -> None:
    answer = await http(
        served.sock, "POST", "/v1/vms/web1/dumps", data=b'{"engine": "qemu", "mode": "live"}'
    )
    assert answer.status == 202
    job = JobView.model_validate(answer.json())
    assert (job.vm, job.state, job.engine, job.mode, job.format) == (
        "web1",
        "queued",
        "qemu",
        "live",
        "elf",
    )
    assert answer.headers["Location"] == f"/v1/jobs/{job.id}"
    followed = await http(served.sock, "GET", answer.headers["Location"])
    assert followed.status == 200
    assert JobView.model_validate(followed.json()).id == job.id
    assert served.core.calls[0] == (
        "submit",
        ("web1", DumpRequest(engine=EngineName.QEMU, mode=Mode.LIVE)),
    )


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}"])
async def test_request_with_no_fields_takes_the_defaults(served: Served, body: bytes) -> None:
    answer = await http(served.sock, "POST", "/v1/vms/web1/dumps", data=body)
    assert answer.status == 202
    assert served.core.calls == [("submit", ("web1", DumpRequest()))]


async def test_client_request_job_cancel(served: Served, api: ApiClient) -> None:
    served.core.outcome["web1"] = "never"
    job = await api.request("web1", DumpRequest(format=DumpFormat.KDUMP_ZLIB))
    assert job.state == "queued"
    assert job.format == "kdump-zlib"
    running = await api.job(job.id)
    assert running.state == "running"
    assert running.progress == ProgressView(written=TOTAL // 2, total=TOTAL)
    cancelled = await api.cancel(job.id)
    assert cancelled.state == "cancelled"
    assert await api.job(job.id) == cancelled


async def test_job_runs_to_success(served: Served, api: ApiClient) -> None:
    job = await api.request("web1")
    states = [job.state]
    while job.state in ("queued", "running"):
        job = await api.job(job.id)
        states.append(job.state)
    assert states == ["queued", "running", "succeeded"]
    assert job.result is not None
    assert job.result.size == TOTAL


async def test_jobs_filters_and_default_limit(served: Served, api: ApiClient) -> None:
    a = served.core.add_job("web1", "succeeded")
    b = served.core.add_job("db1", "failed")
    c = served.core.add_job("web1", "queued")
    assert await api.jobs() == [c, b, a]
    assert served.core.last_call() == ("jobs", (None, None, DEFAULT_JOB_LIMIT))
    assert await api.jobs(vm="web1") == [c, a]
    assert await api.jobs(vm="web1", state="succeeded", limit=5) == [a]
    assert served.core.last_call() == ("jobs", ("web1", "succeeded", 5))
    answer = await http(served.sock, "GET", "/v1/jobs?state=failed&limit=1000")
    assert answer.status == 200
    assert answer.json() == dumped([b])


async def test_dumps(served: Served, api: ApiClient) -> None:
    assert await api.dumps() == served.core.dump_views
    assert await api.dumps("db1") == served.core.dump_views[1:]
    assert served.core.last_call() == ("dumps", ("db1",))


async def test_health_and_metrics(served: Served, api: ApiClient) -> None:
    health = await api.health()
    assert health.status == "ok"
    assert health.vms == 2
    answer = await http(served.sock, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == METRICS_CONTENT_TYPE
    assert answer.body.decode() == METRICS
    assert await api.metrics() == METRICS


async def test_healthz_answers_503_while_stopping_with_the_same_body(
    served: Served, api: ApiClient
) -> None:
    served.core.stopping = True
    answer = await http(served.sock, "GET", "/healthz")
    assert answer.status == 503
    assert HealthView.model_validate(answer.json()).status == "stopping"
    assert (await api.health()).status == "stopping"


async def test_curl_speaks_to_every_kind_of_route(served: Served) -> None:
    core = served.core
    vms = await curl(served.sock, "http://qmpdump/v1/vms")
    assert (vms.status, vms.content_type) == (200, "application/json; charset=utf-8")
    assert json.loads(vms.body) == dumped(list(core.vm_views.values()))

    posted = await curl(
        served.sock, "--json", '{"engine": "backend"}', "http://qmpdump/v1/vms/web1/dumps"
    )
    assert posted.status == 202
    job = JobView.model_validate_json(posted.body)
    assert f"location: /v1/jobs/{job.id}" in posted.headers.lower()

    got = await curl(served.sock, f"http://qmpdump/v1/jobs/{job.id}")
    assert (got.status, JobView.model_validate_json(got.body).state) == (200, "running")
    deleted = await curl(served.sock, "-X", "DELETE", f"http://qmpdump/v1/jobs/{job.id}")
    assert (deleted.status, JobView.model_validate_json(deleted.body).state) == (200, "cancelled")

    metrics = await curl(served.sock, "http://qmpdump/metrics")
    assert (metrics.status, metrics.content_type, metrics.body) == (
        200,
        METRICS_CONTENT_TYPE,
        METRICS,
    )
    health = await curl(served.sock, "http://qmpdump/healthz")
    assert (health.status, json.loads(health.body)["status"]) == (200, "ok")

    # curl -d sends a form content type; the body is still read as JSON, and still strict
    form = await curl(
        served.sock, "-d", '{"path": "/etc/shadow"}', "http://qmpdump/v1/vms/web1/dumps"
    )
    assert form.status == 400
    assert json.loads(form.body)["error"]["fields"][0]["field"] == "path"

    unknown = await curl(served.sock, "http://qmpdump/v2/nothing")
    assert (unknown.status, unknown.content_type) == (404, "application/json; charset=utf-8")
    assert json.loads(unknown.body)["error"]["status"] == 404


# ----------------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{not json", None, "not JSON"),
        (b'{"engine": "qemu"', None, "not JSON"),
        (b'{"format": "\xff"}', None, "not JSON"),  # not UTF-8
        (b"[" * 30_000 + b"]" * 30_000, None, "not JSON"),  # nested past the parser's limit
        (b"[]", None, "not an array"),
        (b'"elf"', None, "not a string"),
        (b"42", None, "not a number"),
        (b"null", None, "not null"),
        (b'{"path": "/etc/shadow"}', "path", "the service names dumps"),
        (b'{"engine": "qemu", "output": "x.elf"}', "output", "unknown field"),
        (b'{"engine": "gdb"}', "engine", "auto"),
        (b'{"engine": 1}', "engine", ""),
        (b'{"format": 5}', "format", "'kdump-zlib'"),
        (b'{"format": ["elf"]}', "format", "'kdump-zlib'"),
        (b'{"mode": "fast"}', "mode", "live"),
        (b'{"mode": true}', "mode", ""),
    ],
)
async def test_bad_dump_requests_are_400(
    served: Served, body: bytes, field: str | None, words: str
) -> None:
    answer = await http(served.sock, "POST", "/v1/vms/web1/dumps", data=body)
    assert answer.status == 400
    error = answer.error()
    assert words in error["message"]
    if field is None:
        assert error["fields"] == []
    else:
        assert [f["field"] for f in error["fields"]] == [field]
        assert error["message"].startswith("invalid dump request: ")
    assert served.core.calls == []  # never reached the core


async def test_every_bad_field_is_named(served: Served) -> None:
    body = b'{"engine": "gdb", "mode": 3, "path": "/x", "format": "elf"}'
    error = (await http(served.sock, "POST", "/v1/vms/web1/dumps", data=body)).error()
    assert sorted(f["field"] for f in error["fields"]) == ["engine", "mode", "path"]


async def test_a_body_too_large_is_413(served: Served) -> None:
    body = b'{"format": "' + b"x" * MAX_BODY_SIZE + b'"}'
    answer = await http(served.sock, "POST", "/v1/vms/web1/dumps", data=body)
    assert answer.status == 413
    answer.error()


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/v1/jobs?limit=-1", "limit"),
        ("/v1/jobs?limit=abc", "limit"),
        ("/v1/jobs?limit=0", "limit"),
        ("/v1/jobs?limit=1001", "limit"),
        ("/v1/jobs?limit=1.5", "limit"),
        ("/v1/jobs?limit=%205", "limit"),
        ("/v1/jobs?limit=5_0", "limit"),
        ("/v1/jobs?limit=99999999999999999999999", "limit"),
        ("/v1/jobs?limit=1&limit=2", "limit"),
        ("/v1/jobs?state=bogus", "state"),
        ("/v1/jobs?state=", "state"),
        ("/v1/jobs?vm=", "vm"),
        ("/v1/jobs?sort=id", "sort"),
        ("/v1/dumps?vm=", "vm"),
        ("/v1/dumps?path=/etc", "path"),
        ("/v1/vms?verbose=1", "verbose"),
        ("/v1/vms/web1?x=1", "x"),
        ("/healthz?x", "x"),
    ],
)
async def test_bad_query_parameters_are_400(served: Served, url: str, field: str) -> None:
    answer = await http(served.sock, "GET", url)
    assert answer.status == 400
    error = answer.error()
    assert [f["field"] for f in error["fields"]] == [field]
    assert error["message"].startswith("invalid query: ")


async def test_every_bad_query_parameter_is_named(served: Served) -> None:
    answer = await http(served.sock, "GET", "/v1/jobs?limit=abc&state=x&foo=1&vm=web1&vm=db1")
    assert answer.status == 400
    fields = {f["field"]: f["message"] for f in answer.error()["fields"]}
    assert fields == {
        "limit": "must be an integer from 1 to 1000, not 'abc'",
        "state": "must be one of queued, running, succeeded, failed, cancelled, not 'x'",
        "foo": "unknown parameter; known: limit, state, vm",
        "vm": "given more than once",
    }
    assert served.core.calls == []


async def test_a_usage_error_of_the_core_is_400(served: Served, api: ApiClient) -> None:
    with pytest.raises(UsageError, match="format 'win-dmp' is not one this VM offers"):
        await api.request("web1", DumpRequest(format=DumpFormat.WIN_DMP))
    answer = await http(served.sock, "POST", "/v1/vms/web1/dumps", data=b'{"format": "win-dmp"}')
    assert answer.status == 400
    assert answer.error()["fields"] == []


# ----------------------------------------------------------------------------- 404 405 409 503


@pytest.mark.parametrize(
    ("method", "url", "words"),
    [
        ("GET", "/v1/vms/nope", "no VM named 'nope'"),
        ("GET", "/v1/vms/nope/map", "no VM named 'nope'"),
        ("POST", "/v1/vms/nope/dumps", "no VM named 'nope'"),
        ("GET", "/v1/jobs?vm=nope", "no VM named 'nope'"),
        ("GET", "/v1/dumps?vm=nope", "no VM named 'nope'"),
        ("GET", "/v1/jobs/0123", "no job '0123'"),
        ("DELETE", "/v1/jobs/0123", "no job '0123'"),
        ("GET", "/v1/nothing", "no route GET /v1/nothing"),
        ("GET", "/v1/vms/web1/dumps/x", "no route"),
        ("GET", "/", "no route"),
        ("GET", "/v1/vms/", "no route"),
    ],
)
async def test_unknown_things_are_404_with_a_json_body(
    served: Served, method: str, url: str, words: str
) -> None:
    answer = await http(served.sock, method, url)
    assert answer.status == 404
    assert words in answer.error()["message"]


async def test_client_raises_not_found_with_the_daemons_message(api: ApiClient) -> None:
    with pytest.raises(NotFound, match=r"^no VM named 'nope'$"):
        await api.vm("nope")
    with pytest.raises(NotFound, match="no job"):
        await api.cancel("ffff")


async def test_names_with_odd_characters_travel_intact(served: Served, api: ApiClient) -> None:
    for name in ("a/b", "a b", "ü", "..", "%2F", "a?b#c"):
        with pytest.raises(NotFound):
            await api.vm(name)
    looked_up = [args[0] for method, args in served.core.calls if method == "vm"]
    assert looked_up == ["a/b", "a b", "ü", "%2F", "a?b#c"]  # ".." never is a VM path segment


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("PUT", "/v1/vms", {"GET", "HEAD"}),
        ("POST", "/v1/jobs/0123", {"DELETE", "GET", "HEAD"}),
        ("DELETE", "/v1/vms/web1", {"GET", "HEAD"}),
        ("GET", "/v1/vms/web1/dumps", {"POST"}),
        ("POST", "/metrics", {"GET", "HEAD"}),
    ],
)
async def test_wrong_methods_are_405_with_allow(
    served: Served, method: str, url: str, allowed: set[str]
) -> None:
    answer = await http(served.sock, method, url)
    assert answer.status == 405
    assert set(answer.headers["Allow"].split(",")) == allowed
    assert f"method {method} is not allowed" in answer.error()["message"]


async def test_busy_vm_and_finished_job_are_409(served: Served, api: ApiClient) -> None:
    served.core.busy.add("web1")
    answer = await http(served.sock, "POST", "/v1/vms/web1/dumps", data=b"{}")
    assert answer.status == 409
    assert "already has a dump queued" in answer.error()["message"]
    with pytest.raises(Conflict, match="already has a dump queued"):
        await api.request("web1")
    done = served.core.add_job("web1", "succeeded")
    with pytest.raises(Conflict, match="already succeeded"):
        await api.cancel(done.id)
    assert (await http(served.sock, "DELETE", f"/v1/jobs/{done.id}")).status == 409


async def test_unavailable_from_the_core_is_503(served: Served, api: ApiClient) -> None:
    answer = await http(served.sock, "GET", "/v1/vms/db1/map")
    assert answer.status == 503
    assert "not connected" in answer.error()["message"]
    with pytest.raises(Unavailable, match="'db1' is not connected"):
        await api.map("db1")


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("secret detail /var/lib/qmpdump/state.db"),
        KeyError("secret detail"),  # a bug's LookupError is not a 404
        QMPTimeout("secret detail", 10.0),  # not a ServiceError: the core broke its contract
    ],
)
async def test_a_bug_in_the_core_is_500_without_details(
    served: Served, api: ApiClient, caplog: pytest.LogCaptureFixture, exc: Exception
) -> None:
    served.core.raise_in["vms"] = exc
    with caplog.at_level(logging.ERROR, logger="qmpdump.service.api"):
        answer = await http(served.sock, "GET", "/v1/vms")
    assert answer.status == 500
    assert answer.json() == {"error": {"status": 500, "message": INTERNAL, "fields": []}}
    assert b"secret" not in answer.body
    assert b"Traceback" not in answer.body
    (record,) = [r for r in caplog.records if r.name == "qmpdump.service.api"]
    assert record.exc_info is not None
    assert record.exc_info[1] is exc  # the traceback is in the log
    with pytest.raises(ServiceError, match="internal error") as info:
        await api.vms()
    assert type(info.value) is ServiceError
    assert info.value.http_status == 500
    assert info.value.exit_code == 50


async def test_a_plain_service_error_keeps_its_message(served: Served) -> None:
    served.core.raise_in["dumps"] = ServiceError("the dump catalogue is being rebuilt")
    answer = await http(served.sock, "GET", "/v1/dumps")
    assert answer.status == 500
    assert answer.error()["message"] == "the dump catalogue is being rebuilt"


# ----------------------------------------------------------------------------- OpenAPI


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict)
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


async def test_openapi_document(served: Served, api: ApiClient) -> None:
    answer = await curl(served.sock, "http://qmpdump/v1/openapi.json")
    assert (answer.status, answer.content_type) == (200, "application/json; charset=utf-8")
    doc = json.loads(answer.body)
    assert doc == await api.openapi() == openapi_document()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"]
    assert doc["info"]["version"]

    # every route the app serves is described, and nothing else
    app = make_app(as_core(FakeCore()))
    served_routes = {
        (route.method.lower(), resource.canonical)
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert described == served_routes
    assert len(described) == 11

    # every $ref resolves
    refs = [value for key, value in walk(doc) if key == "$ref"]
    assert len(refs) > 50
    for ref in refs:
        resolve(doc, ref)

    schemas = doc["components"]["schemas"]
    for name in ("VMView", "JobView", "DumpView", "DumpRequest", "HealthView", "MapReport"):
        assert schemas[name]["type"] == "object"
        assert schemas[name]["additionalProperties"] is False
    assert "path" not in schemas["DumpRequest"]["properties"]
    assert "schema" in schemas["MapReport"]["properties"]  # the alias, as served
    assert set(schemas["JobView"]["properties"]["state"]["enum"]) == {
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    }

    op_ids = []
    for path, ops in doc["paths"].items():
        template_params = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for method, op in ops.items():
            op_ids.append(op["operationId"])
            assert op["summary"]
            params = op.get("parameters", [])
            assert {p["name"] for p in params if p["in"] == "path"} == template_params
            for p in params:
                assert p["required"] is (p["in"] == "path")
                assert "schema" in p
            responses = op["responses"]
            ok = [code for code in responses if code.startswith("2")]
            assert len(ok) == 1
            assert "500" in responses
            assert "400" in responses  # a bad query parameter, at least
            for code, given in responses.items():
                response = resolve(doc, given["$ref"]) if "$ref" in given else given
                assert response["description"]
                (media,) = response["content"].values()
                if code[0] in "45" and (path, code) != ("/healthz", "503"):
                    assert media["schema"] == {"$ref": "#/components/schemas/ErrorView"}
            if method == "post":
                assert op["requestBody"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/DumpRequest"
                }
                assert {"202", "404", "409", "413"} <= set(responses)
                assert "Location" in responses["202"]["headers"]
    assert len(op_ids) == len(set(op_ids))
    assert doc["paths"]["/v1/jobs/{id}"]["delete"]["responses"].keys() >= {"404", "409"}
    jobs_params = {p["name"]: p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert jobs_params["limit"]["schema"]["minimum"] == 1
    assert jobs_params["state"]["schema"]["enum"] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]


# ----------------------------------------------------------------------------- the socket


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_socket_mode_group_and_removal(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    for mode, name in ((0o660, group), (0o600, str(os.getgid())), (0o666, None)):
        runner = await serve_unix(make_app(as_core(FakeCore())), sock, mode=mode, group=name)
        try:
            assert stat.S_ISSOCK(sock.lstat().st_mode)
            assert _mode(sock) == mode
            assert sock.lstat().st_gid == os.getgid()
            async with ApiClient(sock) as api:
                assert (await api.health()).status == "ok"
        finally:
            await stop_serving(runner, sock)
        assert not sock.exists()


async def test_unknown_group_refuses_to_start_and_leaves_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with pytest.raises(UsageError, match="unknown group 'no-such-group-qmpdump'"):
        await serve_unix(make_app(as_core(FakeCore())), sock, group="no-such-group-qmpdump")
    assert list(tmp_path.iterdir()) == []


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(sock))  # bound, never listening: what a killed daemon leaves
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    runner = await serve_unix(make_app(as_core(FakeCore())), sock, mode=0o660)
    try:
        assert _mode(sock) == 0o660
        async with ApiClient(sock) as api:
            assert (await api.health()).status == "ok"
    finally:
        await stop_serving(runner, sock)
    assert not sock.exists()


async def test_a_live_socket_refuses_a_second_daemon(served: Served) -> None:
    inode = served.sock.lstat().st_ino
    with pytest.raises(UsageError, match="another daemon already listens on"):
        await serve_unix(make_app(as_core(FakeCore())), served.sock, mode=0o660)
    assert served.sock.lstat().st_ino == inode  # untouched, and still serving
    async with ApiClient(served.sock) as api:
        assert len(await api.vms()) == 2


async def test_other_files_at_the_path_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")
    with pytest.raises(UsageError, match="exists and is not a socket"):
        await serve_unix(make_app(as_core(FakeCore())), path)
    assert path.read_text() == "not a socket"
    with pytest.raises(UsageError, match="cannot create the API socket"):
        await serve_unix(make_app(as_core(FakeCore())), tmp_path / "missing" / "api.sock")


# ----------------------------------------------------------------------------- the client alone


async def test_client_without_a_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "api.sock"
    async with ApiClient(missing) as api:
        with pytest.raises(Unavailable, match=f"^is the daemon running\\? no socket at {missing}$"):
            await api.vms()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(missing))
        async with ApiClient(missing) as api:
            with pytest.raises(Unavailable, match="is the daemon running\\? nothing listens on"):
                await api.health()
    missing.unlink()


async def test_client_rejects_answers_that_are_not_the_schema(tmp_path: Path) -> None:
    """A peer that is not (this version of) the daemon: 200 with the wrong document."""
    from aiohttp import web  # noqa: PLC0415

    async def wrong(request: web.Request) -> web.Response:
        return web.json_response([{"name": "web1"}])

    app = web.Application()
    app.router.add_get("/v1/vms", wrong)
    sock = tmp_path / "api.sock"
    runner = await serve_unix(app, sock)
    try:
        async with ApiClient(sock) as api:
            with pytest.raises(ServiceError, match=r"is not qmpdump\.api/1") as info:
                await api.vms()
            assert type(info.value) is ServiceError
            # an error without our error document still becomes the class of its status
            with pytest.raises(NotFound, match="answered GET /v1/jobs/x with 404 Not Found"):
                await api.job("x")
    finally:
        await stop_serving(runner, sock)
