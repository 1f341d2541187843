"""Which QMP events say a VM changed while a dump held it stopped (pure: no QEMU)."""

from __future__ import annotations

from typing import Any

import pytest

from qmpdump.qmp.events import PAUSE_BREAKERS, Event, changes_heard

MiB = 1 << 20


def event(name: str, **data: Any) -> Event:
    return Event(event=name, data=data)


def test_no_events_no_change() -> None:
    assert changes_heard([], {"vmem0": 256 * MiB}) == []


def test_events_that_do_not_change_memory_are_not_changes() -> None:
    heard = [event("STOP"), event("DUMP_COMPLETED"), event("MIGRATION", status="active")]
    assert changes_heard(heard, {}) == []


@pytest.mark.parametrize("name", [n for n in PAUSE_BREAKERS if n != "MEMORY_DEVICE_SIZE_CHANGE"])
def test_each_breaker_is_a_change(name: str) -> None:
    assert changes_heard([event(name)], {}) == [name]


def test_names_come_once_in_the_order_heard() -> None:
    heard = [event("RESET"), event("RESUME"), event("RESET")]
    assert changes_heard(heard, {}) == ["RESET", "RESUME"]


def test_a_late_size_report_of_the_size_read_is_not_a_change() -> None:
    # QEMU rate-limits MEMORY_DEVICE_SIZE_CHANGE: a plug finished before the stop may be
    # reported inside the pause, with the size the dump read.
    late = event("MEMORY_DEVICE_SIZE_CHANGE", id="vmem0", size=256 * MiB, **{"qom-path": "/x"})
    assert changes_heard([late], {"vmem0": 256 * MiB}) == []


def test_a_late_report_of_a_device_without_an_id_is_matched_by_its_size() -> None:
    late = event("MEMORY_DEVICE_SIZE_CHANGE", size=256 * MiB, **{"qom-path": "/anon"})
    assert changes_heard([late], {"virtio-mem@0x140000000": 256 * MiB}) == []


@pytest.mark.parametrize(
    "data",
    [
        {"id": "vmem0", "size": 0},  # unplugged meanwhile (a reset)
        {"id": "vmem1", "size": 256 * MiB},  # a device the dump did not read
        {"size": 128 * MiB},  # no id, and no size the dump read
    ],
)
def test_another_size_is_a_change(data: dict[str, Any]) -> None:
    heard = [event("MEMORY_DEVICE_SIZE_CHANGE", **data)]
    assert changes_heard(heard, {"vmem0": 256 * MiB}) == ["MEMORY_DEVICE_SIZE_CHANGE"]
