"""``qmpdump vms|request|jobs|job|cancel|dumps``: operator commands, clients of the daemon.

Each talks to the daemon's API (:mod:`qmpdump.service.api`) over its UNIX socket: ``--socket
PATH``, by default ``$QMPDUMP_SOCKET`` or ``/run/qmpdump/api.sock``. Human output is a table
(times in UTC); ``--json`` prints the API's own documents (schema ``qmpdump.api/1``).

``request VM --wait`` (and ``job ID --wait``) follows the job every 0.5 s, with a progress bar
on stderr when it is a terminal, and exits with the job's outcome. Ctrl-C while waiting stops
waiting only: the job goes on in the daemon (``qmpdump cancel ID`` cancels it).

Exit codes: 0 done; 2 bad arguments (argparse's, or the daemon's 400); 50 the daemon failed;
51 no such VM or job; 52 conflict (a busy VM, a finished job); 53 the daemon is not reachable
or the VM not connected. After ``--wait``: 0 succeeded; failed: the job's error exit code (44
if it has none: :class:`~qmpdump.errors.DumpFailed`); 41 cancelled; 130 stopped waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO, get_args

from pydantic import BaseModel

from qmpdump.cli.progress import ProgressBar
from qmpdump.engines.spec import DumpFormat, EngineName
from qmpdump.errors import DumpCancelled, DumpFailed
from qmpdump.service.client import ApiClient
from qmpdump.service.views import (
    DumpRequest,
    JobStateName,
    JobView,
    ProgressView,
)
from qmpdump.sizes import format_size

__all__ = [
    "DEFAULT_SOCKET",
    "EXIT_INTERRUPTED",
    "POLL_INTERVAL_S",
    "SOCKET_ENV",
    "add_parsers",
    "job_exit_code",
]

DEFAULT_SOCKET: Final = Path("/run/qmpdump/api.sock")
SOCKET_ENV: Final = "QMPDUMP_SOCKET"
POLL_INTERVAL_S: Final = 0.5
EXIT_INTERRUPTED: Final = 130
_FINISHED: Final = ("succeeded", "failed", "cancelled")


# ----------------------------------------------------------------------------- parsers


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_parsers(commands: Any) -> None:
    """Register ``vms``, ``request``, ``jobs``, ``job``, ``cancel`` and ``dumps``."""
    common = argparse.ArgumentParser(add_help=False)
    default_socket = Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    common.add_argument(
        "--socket",
        type=Path,
        default=default_socket,
        metavar="PATH",
        help=f"the daemon's API socket (default: ${SOCKET_ENV} or {DEFAULT_SOCKET}; "
        f"now {default_socket})",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=help_text, description=description
        )
        return parser

    p = add("vms", "list the VMs the daemon looks after", "List the daemon's VMs.")
    p.set_defaults(run=_run_vms)

    p = add(
        "request",
        "ask the daemon for a dump of a VM",
        "Queue a dump of VM's memory in the daemon. The daemon names the file (in the VM's "
        "dump folder); the VM's defaults fill whatever is not given.",
    )
    p.add_argument("vm", metavar="VM")
    p.add_argument("--engine", choices=[e.value for e in EngineName], help="default: the VM's")
    p.add_argument("--format", choices=[f.value for f in DumpFormat], help="default: the VM's")
    p.add_argument(
        "--sink",
        help="a [[sink]] of the daemon's configuration (an S3 bucket), or 'local' for the dump "
        "folder; default: the VM's",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--live", dest="mode", action="store_const", const="live", help="do not stop the VM"
    )
    mode.add_argument(
        "--consistent",
        dest="mode",
        action="store_const",
        const="consistent",
        help="stop the VM while copying",
    )
    p.add_argument("--wait", action="store_true", help="follow the job and exit with its outcome")
    p.set_defaults(run=_run_request, mode=None)

    p = add("jobs", "list dump jobs, newest first", "List the daemon's dump jobs.")
    p.add_argument("--vm", help="only this VM's")
    p.add_argument("--state", choices=get_args(JobStateName), help="only jobs in this state")
    p.add_argument("--limit", type=_positive, help="at most this many (the daemon's default: 100)")
    p.set_defaults(run=_run_jobs)

    p = add("job", "show one dump job", "Show one job: state, progress, result or error.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--wait", action="store_true", help="follow the job and exit with its outcome")
    p.set_defaults(run=_run_job)

    p = add("cancel", "cancel a queued or running dump job", "Cancel a job.")
    p.add_argument("id", metavar="ID")
    p.set_defaults(run=_run_cancel)

    p = add("dumps", "list the dumps on disk", "List the dumps the daemon keeps, oldest first.")
    p.add_argument("--vm", help="only this VM's")
    p.set_defaults(run=_run_dumps)


# ----------------------------------------------------------------------------- rendering


def _print_json(out: TextIO, data: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(data, BaseModel):
        doc: Any = data.model_dump(mode="json", by_alias=True)
    else:
        doc = [item.model_dump(mode="json", by_alias=True) for item in data]
    out.write(json.dumps(doc, indent=2) + "\n")


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right``: right-aligned columns."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)]) + "\n"


def _when(iso: str | None, *, utc: bool = False) -> str:
    """A wire time (UTC ISO 8601) as ``YYYY-MM-DD HH:MM:SS`` in UTC (``utc``: say so); ``-``
    when unset."""
    if iso is None:
        return "-"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if utc else "")


def _progress(p: ProgressView) -> str:
    if p.uploaded is not None and p.written:
        done = f"{format_size(p.uploaded)} of {format_size(p.written)}"
        return f"{done} uploaded ({100 * p.uploaded / p.written:.0f}%)"
    if p.total:
        done = f"{format_size(p.completed)} of {format_size(p.total)}"
        return f"{done} ({100 * p.completed / p.total:.0f}%), {format_size(p.written)} written"
    return f"{format_size(p.written)} written"


def _job_detail(job: JobView) -> str:
    """What the jobs table says about a job in one cell."""
    if job.state == "succeeded" and job.result is not None:
        return job.result.url or job.result.file
    if job.state == "running":
        return _progress(job.progress)
    if job.error is not None:
        return job.error.message
    return ""


def _job_text(job: JobView) -> str:
    lines = [
        ("job", job.id),
        ("vm", job.vm),
        ("state", job.state),
        ("engine", job.engine),
        ("format", job.format),
        ("mode", job.mode),
        ("sink", job.sink or "local"),
        ("created", _when(job.created, utc=True)),
        ("started", _when(job.started, utc=True)),
        ("ended", _when(job.ended, utc=True)),
        ("progress", _progress(job.progress)),
    ]
    if job.result is not None:
        r = job.result
        lines += [
            ("file", r.file),
            *([("object", r.url)] if r.url else []),
            ("size", f"{format_size(r.size)} ({r.size} bytes)"),
            ("sha256", r.sha256),
            ("engine used", r.engine),
            ("VM paused", "-" if r.paused_s is None else f"{r.paused_s:.3f} s"),
        ]
    if job.error is not None:
        e = job.error
        kind = ", ".join(
            part
            for part in (
                e.error_class,
                None if e.exit_code is None else f"exit code {e.exit_code}",
            )
            if part
        )
        lines.append(("error", e.message + (f" ({kind})" if kind else "")))
    width = max(len(k) for k, _ in lines)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in lines)


# ----------------------------------------------------------------------------- waiting


def job_exit_code(job: JobView) -> int:
    """The exit code of a finished job: 0, the failure's own code (else 44), or 41."""
    if job.state == "succeeded":
        return 0
    if job.state == "cancelled":
        return DumpCancelled.exit_code
    code = job.error.exit_code if job.error is not None else None
    return code if code is not None and 0 < code < 256 else DumpFailed.exit_code


async def _wait(api: ApiClient, job: JobView) -> JobView | None:
    """Poll the job until it finishes; None when Ctrl-C stopped the waiting (not the job)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        with ProgressBar("dump") as bar:
            while job.state not in _FINISHED:
                bar.show(job.progress.completed, job.progress.total, f"{job.vm} {job.state}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
                if stop.is_set():
                    return None
                job = await api.job(job.id)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return job


async def _follow(api: ApiClient, job: JobView, args: argparse.Namespace, out: TextIO) -> int:
    """``--wait``: follow ``job`` and report its outcome as the exit code."""
    final = await _wait(api, job)
    if final is None:
        print(
            f"qmpdump: stopped waiting; job {job.id} goes on in the daemon "
            f"(follow it: qmpdump job {job.id} --wait; cancel it: qmpdump cancel {job.id})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.json:
        _print_json(out, final)
    elif final.state == "succeeded":
        out.write(_job_text(final))
    code = job_exit_code(final)
    if final.state != "succeeded":
        why = final.error.message if final.error is not None else "no reason given"
        print(f"qmpdump: error: job {final.id} {final.state}: {why}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- commands


async def _run_vms(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async with ApiClient(args.socket) as api:
        vms = await api.vms()
    if args.json:
        _print_json(out, vms)
        return 0
    if not vms:
        out.write("no VMs\n")
        return 0
    rows = []
    for v in vms:
        if v.running_job:
            jobs = f"running{f', {v.queued_jobs} queued' if v.queued_jobs else ''}"
        else:
            jobs = f"{v.queued_jobs} queued" if v.queued_jobs else "-"
        rows.append(
            [
                v.name,
                v.connection.value,
                v.run_state or "-",
                v.qemu_version or "-",
                str(v.pid) if v.pid is not None else "-",
                jobs,
                f"{v.default_engine}/{v.default_format}/{v.default_mode}",
                v.reason or "",
            ]
        )
    out.write(
        _table(
            ["NAME", "QMP", "RUN STATE", "QEMU", "PID", "JOBS", "DEFAULTS", "REASON"],
            rows,
            right={4},
        )
    )
    return 0


async def _run_request(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    request = DumpRequest.model_validate(
        {"engine": args.engine, "format": args.format, "mode": args.mode, "sink": args.sink}
    )
    async with ApiClient(args.socket) as api:
        job = await api.request(args.vm, request)
        if args.wait:
            return await _follow(api, job, args, out)
    if args.json:
        _print_json(out, job)
    else:
        out.write(
            f"job {job.id} {job.state}: VM {job.vm}, engine {job.engine}, format {job.format}, "
            f"mode {job.mode}\nfollow it: qmpdump job {job.id} --wait\n"
        )
    return 0


async def _run_jobs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async with ApiClient(args.socket) as api:
        jobs = await api.jobs(vm=args.vm, state=args.state, limit=args.limit)
    if args.json:
        _print_json(out, jobs)
        return 0
    if not jobs:
        out.write("no jobs\n")
        return 0
    rows = [
        [
            j.id,
            j.vm,
            j.state,
            _when(j.created),
            j.engine,
            j.format,
            j.mode,
            format_size(j.result.size) if j.result is not None else "-",
            _job_detail(j),
        ]
        for j in jobs
    ]
    headers = ["ID", "VM", "STATE", "CREATED (UTC)", "ENGINE", "FORMAT", "MODE", "SIZE", "DETAIL"]
    out.write(_table(headers, rows, right={7}))
    return 0


async def _run_job(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async with ApiClient(args.socket) as api:
        job = await api.job(args.id)
        if args.wait:
            return await _follow(api, job, args, out)
    if args.json:
        _print_json(out, job)
    else:
        out.write(_job_text(job))
    return 0


async def _run_cancel(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async with ApiClient(args.socket) as api:
        job = await api.cancel(args.id)
    if args.json:
        _print_json(out, job)
    elif job.state == "cancelled":
        out.write(f"job {job.id} cancelled\n")
    else:
        out.write(f"job {job.id}: cancel requested; it is {job.state}\n")
    return 0


async def _run_dumps(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    async with ApiClient(args.socket) as api:
        dumps = await api.dumps(vm=args.vm)
    if args.json:
        _print_json(out, dumps)
        return 0
    if not dumps:
        out.write("no dumps\n")
        return 0
    rows = [[d.vm, d.file, format_size(d.size), _when(d.created), d.job_id or "-"] for d in dumps]
    out.write(_table(["VM", "FILE", "SIZE", "CREATED (UTC)", "JOB"], rows, right={2}))
    return 0
