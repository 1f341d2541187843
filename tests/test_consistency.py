"""The consistency proof: the guest's writer (``genstamp.c``) seen through each kind of dump.

The checker (:mod:`qmpdump.testbed.cutcheck`) must pass on snapshot dumps of a guest whose
writer runs flat out, and fail on a ``--live`` backend dump of the same workload (proof that it
can fail); the backend's consistent mode (VM stopped for the copy) passes too. The pure checker
is tested first on hand-made stamps, one per way a dump can be inconsistent.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qmpdump.engines.run import run_dump
from qmpdump.engines.spec import DumpSpec, EngineName, Mode
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.cutcheck import Stamp, check_cut, stamps_in_core
from qmpdump.testbed.vm import Backend, GiB, MiB, VirtioMemSpec, VMSpec

from .conftest import VMFactory
from .test_dump_backend import (
    dumps,  # noqa: F401 - fixture
    status,
)
from .test_dump_snapshot import needs_snapshot

WRITER_MIB = 32


def _stamps(gens: list[tuple[int, int]]) -> list[Stamp]:
    return [Stamp(7, i, head, tail, i * 4096) for i, (head, tail) in enumerate(gens)]


def test_one_cut_passes() -> None:
    verdict = check_cut(_stamps([(5, 5)] * 3 + [(4, 4)] * 5), expected_pages=8)
    assert verdict.ok, verdict.reason
    assert verdict.boundaries == 1
    assert check_cut(_stamps([(5, 5)] * 4)).ok  # the cut fell between two passes


@pytest.mark.parametrize(
    ("gens", "why"),
    [
        ([(5, 5), (5, 6), (4, 4)], "torn"),
        ([(5, 5), (4, 4), (5, 5), (4, 4)], "boundaries"),
        ([(7, 7), (4, 4)], "not one step apart"),
        ([(4, 4), (5, 5)], "older generation comes first"),
        ([], "no page"),
    ],
)
def test_inconsistent_stamps_fail(gens: list[tuple[int, int]], why: str) -> None:
    verdict = check_cut(_stamps(gens))
    assert not verdict.ok
    assert why in verdict.reason


def test_missing_pages_fail() -> None:
    verdict = check_cut(_stamps([(5, 5)] * 3), expected_pages=4)
    assert not verdict.ok
    assert "3 of 4 pages" in verdict.reason


WRITER_GUEST = VMSpec(
    name="qmpdump-writer",
    ram_backend=Backend.RAM,
    ram_size=512 * MiB,
    below_4g=256 * MiB,
    virtio_mem=(VirtioMemSpec(backend=Backend.RAM, max_size=1 * GiB, requested_size=256 * MiB),),
    pattern_mib=8,
    writer_mib=WRITER_MIB,
)


@pytest.mark.guest
async def test_live_backend_dump_of_the_writer_fails_the_check(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
) -> None:
    vm = await vm_factory(WRITER_GUEST)
    assert "QMPDUMP-WRITER run=" in vm.serial_text()
    async with QMPSession(str(vm.qmp_path)) as session:
        live = await run_dump(
            session, dumps / "live.elf", DumpSpec(engine=EngineName.BACKEND, mode=Mode.LIVE)
        )
        consistent = await run_dump(
            session, dumps / "stopped.elf", DumpSpec(engine=EngineName.BACKEND)
        )
    assert await status(vm) == "running"
    fuzzy = check_cut(stamps_in_core(live.path), WRITER_MIB * 256)
    assert not fuzzy.ok, f"a live dump of a running writer looked consistent: {fuzzy}"
    clean = check_cut(stamps_in_core(consistent.path), WRITER_MIB * 256)
    assert clean.ok, clean.reason


@pytest.mark.guest
@needs_snapshot
async def test_snapshot_dumps_of_the_writer_pass_the_check(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
) -> None:
    vm = await vm_factory(WRITER_GUEST)
    async with QMPSession(str(vm.qmp_path)) as session:
        for n in range(3):
            snap = await run_dump(
                session, dumps / f"snap{n}.elf", DumpSpec(engine=EngineName.SNAPSHOT)
            )
            verdict = check_cut(stamps_in_core(snap.path), WRITER_MIB * 256)
            assert verdict.ok, f"snapshot {n}: {verdict}"
            assert snap.paused_s is not None
            snap.path.unlink()
    assert await status(vm) == "running"


@pytest.mark.guest
@needs_snapshot
async def test_a_slow_reader_slows_the_guest_but_never_blocks_it(
    vm_factory: VMFactory,
    dumps: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that stalls (here: every write of the core sleeps; a slow disk cannot be made
    on demand on this machine) makes QEMU wait on the socket. The guest's writes to pages not
    yet sent wait with it, the rest of the guest runs; the dump completes and is consistent."""
    from qmpdump.engines import snapshot as engine  # noqa: PLC0415

    original = engine._Pending.flush

    def slow_flush(self: engine._Pending) -> None:
        time.sleep(0.02)
        original(self)

    monkeypatch.setattr(engine._Pending, "flush", slow_flush)
    vm = await vm_factory(WRITER_GUEST)
    async with QMPSession(str(vm.qmp_path)) as session:
        before = vm.serial_text().count("QMPDUMP-GEN")
        snap = await run_dump(session, dumps / "slow.elf", DumpSpec(engine=EngineName.SNAPSHOT))
        assert await status(vm) == "running"
        for _ in range(150):  # the writer goes on (it prints every 0.2 s of guest time)
            if vm.serial_text().count("QMPDUMP-GEN") > before:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the writer printed nothing in 15 s after the dump")
    verdict = check_cut(stamps_in_core(snap.path), WRITER_MIB * 256)
    assert verdict.ok, verdict.reason
