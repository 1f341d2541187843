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
from qmpdump.engines.qemu import Progress, QemuDumpRequest, dump_with_qemu
from qmpdump.output import DumpFile, sidecar_path
from qmpdump.qmp.session import QMPSession
from qmpdump.report import MapReport
from qmpdump.survey import survey

__all__ = ["DumpOutcome", "run_qemu_dump"]


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
    before = await survey(session)
    report = before.report()
    with DumpFile.create(target, overwrite=overwrite) as output:
        started = time.time()
        t0 = time.monotonic()
        result = await dump_with_qemu(
            session, output, request, progress=progress, cancel=cancel, timeout_s=timeout_s
        )
        duration = time.monotonic() - t0
        record: dict[str, Any] = {
            "qmpdump_version": __version__,
            "vm": report.vm.model_dump(),
            "engine": "qemu",
            "format": request.format,
            "request": {
                "paging": request.paging,
                "begin": request.begin,
                "length": request.length,
                "elf_header_fixed": request.fix_elf_header and request.format == "elf",
                "kdump_layout": "standard" if request.seekable else "flattened",
            },
            "started": _iso(started),
            "ended": _iso(started + duration),
            "duration_s": round(duration, 6),
            "bytes": result.size,
            "sha256": result.sha256,
            "qemu_total": result.total,
            "paused_s": None if result.paused_s is None else round(result.paused_s, 6),
            "map": map_summary(report),
        }
        path = output.commit(record)
    return DumpOutcome(
        path=path,
        sidecar=sidecar_path(path),
        size=result.size,
        sha256=result.sha256,
        engine="qemu",
        format=request.format,
        duration_s=duration,
        paused_s=result.paused_s,
        record=record,
    )
