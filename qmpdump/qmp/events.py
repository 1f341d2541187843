"""QMP events as lenient typed models, and the paused time they add up to.

An event (QMP spec, ``docs/interop/qmp-spec.rst``: ``{"event", "data", "timestamp":
{"seconds", "microseconds"}}``) reaches callers as :class:`Event`, never as the library's
``Message``. The models ignore members they do not know: QEMU adds some between versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qmpdump.qmp.models import DumpQueryResult, QMPModel

__all__ = [
    "PAUSE_BREAKERS",
    "DumpCompleted",
    "Event",
    "EventStamp",
    "changes_heard",
    "paused_seconds",
]


#: QMP events that say the VM changed while the dump held it paused, so the copy is not of one
#: instant: resumed by another client, reset (which also discards all of virtio-mem's memory,
#: and reloads ROMs into RAM), shut down, a memory device resized or removed, suspended or woken.
PAUSE_BREAKERS = (
    "RESUME",
    "RESET",
    "SHUTDOWN",
    "MEMORY_DEVICE_SIZE_CHANGE",
    "DEVICE_DELETED",
    "SUSPEND",
    "WAKEUP",
)


class EventStamp(BaseModel):
    """When QEMU emitted an event (host wall clock, as QEMU read it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seconds: int = 0
    microseconds: int = 0

    @property
    def at(self) -> float:
        """Seconds since the epoch."""
        return self.seconds + self.microseconds / 1e6


class Event(BaseModel):
    """One QMP event: its name, its QEMU timestamp and its data (as QEMU sent it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event: str
    timestamp: EventStamp = Field(default_factory=EventStamp)
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def at(self) -> float:
        """The event's QEMU timestamp, seconds since the epoch."""
        return self.timestamp.at


class DumpCompleted(QMPModel):
    """``DUMP_COMPLETED``'s data (qapi/dump.json, since 2.6): the final ``query-dump`` state and,
    when it failed, QEMU's reason."""

    result: DumpQueryResult
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        """Whether QEMU says the dump completed."""
        return self.result.status == "completed"


def paused_seconds(events: Iterable[Event]) -> float | None:
    """The seconds between each STOP and the RESUME after it, summed; None if none was heard.

    QEMU stamps both events itself, so the sum does not depend on when qmpdump read them.
    """
    paused = 0.0
    stopped_at: float | None = None
    heard = False
    for event in events:
        if event.event == "STOP" and stopped_at is None:
            stopped_at = event.at
            heard = True
        elif event.event == "RESUME" and stopped_at is not None:
            paused += max(0.0, event.at - stopped_at)
            stopped_at = None
    return paused if heard else None


def changes_heard(heard: Iterable[Event], plugged: Mapping[str, int]) -> list[str]:
    """The names (each once, in order) of the :data:`PAUSE_BREAKERS` events in ``heard``.

    QEMU reports a virtio-mem size change up to about a second late (it rate-limits
    ``MEMORY_DEVICE_SIZE_CHANGE``): one that reports the size the dump read for that device
    (``plugged``: device id to bytes) tells of a change before the dump, and does not count.
    A device without an id is reported without one: its event counts unless its size is one
    the dump read (while the VM is stopped only a reset, heard as ``RESET``, changes a size).
    """
    names: list[str] = []
    for event in heard:
        if event.event not in PAUSE_BREAKERS:
            continue
        if event.event == "MEMORY_DEVICE_SIZE_CHANGE":
            device, size = event.data.get("id"), event.data.get("size")
            if isinstance(device, str) and plugged.get(device) == size:
                continue
            if device is None and size in plugged.values():
                continue
        if event.event not in names:
            names.append(event.event)
    return names
