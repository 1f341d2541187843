"""Run one dump end to end: survey, engine, output file, sidecar.

The output handling is the same for every engine (:class:`qmpdump.output.DumpFile`): the dump is
written as ``NAME.partial`` (0600), fsynced and renamed when the engine succeeded, removed
otherwise. The sidecar ``NAME.json`` records who, what, when, how big, the sha256, how long the
VM was paused, and the memory map's summary at the start of the dump.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmpdump import __version__
from qmpdump.engines.backend import BackendDumpRequest, dump_with_backend, readable
from qmpdump.engines.qemu import Progress, QemuDumpRequest, dump_with_qemu
from qmpdump.engines.snapshot import (
    SnapshotDumpRequest,
    dump_with_snapshot,
    snapshot_supported,
)
from qmpdump.errors import SnapshotRefused, UsageError
from qmpdump.output import DumpFile, sidecar_path
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.survey import Survey, survey

__all__ = ["DumpOutcome", "choose_engine", "run_dump", "run_qemu_dump"]


@dataclass(frozen=True, slots=True)
class DumpOutcome:
    """A dump on disk."""

    path: Path
    sidecar: Path
    size: int
    sha256: str
    engine: str
    format: str
    duration_s: float
    paused_s: float | None
    record: dict[str, Any]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def map_summary(report: MapReport) -> dict[str, Any]:
    """What a sidecar keeps of the memory map: totals and virtio-mem, without range lists."""
    return {
        "totals": report.totals.model_dump(),
        "virtio_mem": [
            {k: v for k, v in d.model_dump().items() if k not in ("plugged", "blocks_with_data")}
            for d in report.virtio_mem
        ],
        "regions": [r.model_dump(mode="json") for r in report.regions],
    }


def choose_engine(engine: str, before: Survey, fmt: str) -> tuple[str, str]:
    """Resolve ``auto``: the sparse reader when it can produce what is asked, else QEMU's.

    ``auto`` never picks the snapshot engine: it changes the VM's migration capabilities for
    the dump's duration, which an operator should ask for.
    """
    if engine == "qemu":
        return "qemu", "asked for"
    if engine == "snapshot":
        if fmt != "elf":
            raise UsageError(f"the snapshot engine writes ELF only, not {fmt!r}")
        ok, why = snapshot_supported(before.facts.qemu_version)
        if not ok:
            raise SnapshotRefused(f"the snapshot engine will not run here: {why}")
        return "snapshot", "asked for"
    if engine == "backend":
        if fmt != "elf":
            raise UsageError(f"the backend engine writes ELF only, not {fmt!r}")
        return "backend", "asked for"
    if engine != "auto":
        raise UsageError(f"unknown engine {engine!r} (qemu, backend, snapshot or auto)")
    if fmt != "elf":
        return "qemu", f"the backend engine writes ELF only, and {fmt} was asked for"
    ok, why = readable(before)
    return ("backend", why) if ok else ("qemu", why)


async def run_dump(
    session: QMPSession,
    target: Path,
    *,
    engine: str = "auto",
    qemu: QemuDumpRequest | None = None,
    backend: BackendDumpRequest | None = None,
    snapshot: SnapshotDumpRequest | None = None,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    timeout_s: float = 3600.0,
) -> DumpOutcome:
    """Dump the VM into ``target`` with the chosen engine; commit it with its sidecar."""
    qemu = qemu or QemuDumpRequest()
    backend = backend or BackendDumpRequest()
    snapshot = snapshot or SnapshotDumpRequest()
    before = await survey(session)
    chosen, reason = choose_engine(engine, before, qemu.format)
    report = before.report()
    with DumpFile.create(target, overwrite=overwrite) as output:
        started = time.time()
        t0 = time.monotonic()
        details: dict[str, Any]
        if chosen == "qemu":
            q = await dump_with_qemu(
                session, output, qemu, progress=progress, cancel=cancel, timeout_s=timeout_s
            )
            size, digest, paused = q.size, q.sha256, q.paused_s
            details = {
                "format": qemu.format,
                "paging": qemu.paging,
                "begin": qemu.begin,
                "length": qemu.length,
                "elf_header_fixed": qemu.fix_elf_header and qemu.format == "elf",
                "kdump_layout": "standard" if qemu.seekable else "flattened",
                "qemu_total": q.total,
            }
            fmt = qemu.format
        elif chosen == "snapshot":
            s = await dump_with_snapshot(
                session,
                output,
                snapshot,
                progress=progress,
                cancel=cancel,
                before=before,
                timeout_s=timeout_s,
            )
            size, digest, paused = s.size, s.sha256, s.paused_s
            report = s.survey.report()
            details = {
                "format": "elf",
                "mode": "snapshot",
                "program_headers": s.plan.phnum,
                "pn_xnum": s.plan.uses_pn_xnum,
                "data_bytes": s.plan.data.total,
                "zero_fill_bytes": s.plan.zero_fill.total,
                "copied_bytes": s.copied,
                "stream_bytes": s.stream_bytes,
                "data_pages": s.data_pages,
                "zero_pages": s.zero_pages,
                "qemu_downtime_ms": s.qemu_downtime_ms,
                "host_growth": {
                    "predicted_bytes": s.predicted_growth,
                    "measured_bytes": s.measured_growth,
                    "limit_bytes": snapshot.max_host_growth,
                },
                "timings_s": {k: round(v, 6) for k, v in s.timings.items()},
            }
            fmt = "elf"
        else:
            b = await dump_with_backend(
                session, output, backend, progress=progress, cancel=cancel, before=before
            )
            size, digest, paused = b.size, b.sha256, b.paused_s
            report = b.survey.report()
            details = {
                "format": "elf",
                "mode": "live" if backend.live else "consistent",
                "zero_pages_left_out": backend.zero_pages,
                "program_headers": b.plan.phnum,
                "pn_xnum": b.plan.uses_pn_xnum,
                "data_bytes": b.plan.data.total,
                "zero_fill_bytes": b.plan.zero_fill.total,
                "copied_bytes": b.copied,
            }
            fmt = "elf"
        duration = time.monotonic() - t0
        record: dict[str, Any] = {
            "qmpdump_version": __version__,
            "vm": report.vm.model_dump(),
            "engine": chosen,
            "engine_reason": reason,
            "format": fmt,
            "request": details,
            "started": _iso(started),
            "ended": _iso(started + duration),
            "duration_s": round(duration, 6),
            "bytes": size,
            "sha256": digest,
            "paused_s": None if paused is None else round(paused, 6),
            "map": map_summary(report),
        }
        # fsync of a large dump can take a while: not on the event loop (the daemon's API,
        # its watchdog and the other VMs' jobs run there).
        path = await asyncio.to_thread(output.commit, record)
    return DumpOutcome(
        path=path,
        sidecar=sidecar_path(path),
        size=size,
        sha256=digest,
        engine=chosen,
        format=fmt,
        duration_s=duration,
        paused_s=paused,
        record=record,
    )


async def run_qemu_dump(
    session: QMPSession,
    target: Path,
    request: QemuDumpRequest,
    *,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: asyncio.Event | None = None,
    timeout_s: float = 3600.0,
) -> DumpOutcome:
    """Dump the VM with QEMU's ``dump-guest-memory`` into ``target``."""
    return await run_dump(
        session,
        target,
        engine="qemu",
        qemu=request,
        overwrite=overwrite,
        progress=progress,
        cancel=cancel,
        timeout_s=timeout_s,
    )
