"""The sidecar ``NAME.json`` written next to every dump: a versioned model qmpdump owns.

``sidecar_version`` counts incompatible changes; readers check it. Version 1 has the members
qmpdump wrote before it was versioned, unchanged, so readers of those keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from qmpdump.engines.base import EngineDetails
from qmpdump.engines.spec import DumpFormat, EngineName
from qmpdump.report import MapReport, VMSummary

__all__ = ["SIDECAR_VERSION", "Sidecar", "map_summary"]

SIDECAR_VERSION = 1


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


class Sidecar(BaseModel):
    """Who, what, when, how big, the sha256, how long the VM was paused, and the map's summary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sidecar_version: Literal[1] = 1
    qmpdump_version: str
    vm: VMSummary
    engine: EngineName
    #: why this engine: "asked for", or what ``auto`` found
    engine_reason: str
    format: DumpFormat
    #: the engine's own record of the request and what it did
    request: SerializeAsAny[EngineDetails]
    #: UTC, ISO 8601 with milliseconds
    started: str
    ended: str
    duration_s: float
    bytes: int
    sha256: str
    paused_s: float | None
    map: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return self.model_dump(mode="json")
