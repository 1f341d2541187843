"""QEMU 10.0's ``info mtree -f`` and ``query-memory-devices``: the same RAM map as 7.2's.

The captures in ``tests/data/mtree-10.0`` (README there) come from the same testbed command lines
as 7.2's captures of the same name in ``tests/data/mtree``. 10.0 prints more FlatViews
(``device-memory``, ``virtio-pci-cfg-mem-as``) in another order, but the system view's RAM ranges
must parse to exactly the entries hand-checked for 7.2, and the virtio-mem devices to the same
models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qmpdump.qmp.models import parse_memory_devices
from qmpdump.qmp.mtree import parse_system_flatview

from .test_mtree import DATA as DATA_7_2
from .test_mtree import EXPECTED, parse

DATA = Path(__file__).parent / "data" / "mtree-10.0"
CAPTURES = sorted(p.stem for p in DATA.glob("*.txt"))
#: Position of the system FlatView in each 10.0 capture (it moves between runs, as on 7.2).
SYSTEM_VIEW_POSITION = {
    "pc-default": 2,
    "pc-file-vmem2": 2,
    "q35-default": 2,
    "q35-memfd-split-vmem": 0,
}


def read_capture(name: str) -> str:
    return (DATA / f"{name}.txt").read_bytes().decode()  # bytes: QEMU's CRLF line ends kept


def devices(folder: Path, name: str) -> Any:
    return json.loads((folder / f"{name}.devices.json").read_text())


def test_every_capture_has_a_7_2_twin() -> None:
    assert sorted(SYSTEM_VIEW_POSITION) == CAPTURES
    assert set(CAPTURES) <= set(EXPECTED)


@pytest.mark.parametrize("name", CAPTURES)
def test_system_view_parses_to_the_7_2_entries(name: str) -> None:
    text = read_capture(name)
    assert "\r\n" in text
    assert parse(text) == EXPECTED[name]


@pytest.mark.parametrize("name", CAPTURES)
def test_system_view_found_among_10_0s_views(name: str) -> None:
    text = read_capture(name)
    header = None
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            header = line
        if line.strip() == 'AS "memory", root: system':
            break
    assert header == f"FlatView #{SYSTEM_VIEW_POSITION[name]}"
    if "mem-vmem0" in text:
        # With virtio-mem, 10.0 adds views 7.2 does not print; one is the device-memory
        # container, which shows the device's region at offset 0 of that container, not at its
        # guest-physical address: only the system view counts.
        views = text.count("FlatView #")
        assert views > (DATA_7_2 / f"{name}.txt").read_bytes().decode().count("FlatView #")
        assert 'AS "device-memory", root: device-memory' in text
        entries = parse_system_flatview(text)
        assert all(e.gpa >= 1 << 32 for e in entries if e.region == "mem-vmem0")


@pytest.mark.parametrize("name", [n for n in CAPTURES if (DATA_7_2 / f"{n}.devices.json").exists()])
def test_memory_devices_parse_as_on_7_2(name: str) -> None:
    ours = parse_memory_devices(devices(DATA, name))
    theirs = parse_memory_devices(devices(DATA_7_2, name))
    assert ours
    # Plugged sizes differ between runs of a bare VM (none plugs); the rest is the command line.
    strip = [(d.id, d.memaddr, d.max_size, d.block_size, d.requested_size, d.memdev) for d in ours]
    assert strip == [
        (d.id, d.memaddr, d.max_size, d.block_size, d.requested_size, d.memdev) for d in theirs
    ]
