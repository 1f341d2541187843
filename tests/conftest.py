"""Fixtures on the testbed: real QEMU in two tiers, and a check that nothing is left behind.

* ``bare``: QEMU stopped at reset, no kernel; the host writes known bytes (seconds).
* ``guest``: a booted Debian guest whose virtio-mem driver plugged memory (tens of seconds).

Select a tier with ``-m bare`` or ``-m guest``. The shared guest (:func:`shared_guest`) is for
tests that leave it as they found it; a test that changes a VM launches its own with
:func:`vm_factory`, which stops it by pid whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from qmpdump.testbed.s3server import leftover_servers
from qmpdump.testbed.vm import (
    HUNG_BOOTS,
    VM,
    Backend,
    GiB,
    MiB,
    VirtioMemSpec,
    VMSpec,
    leftover_dirs,
    live_vms,
    start,
)

#: Guest boot-to-plugged times measured in this run, reported at the end.
BOOT_TIMES: list[tuple[str, float]] = []
#: Lines tests add for the end of the run (e.g. the fidelity matrix), printed in the summary.
SUMMARY: list[str] = []

SHARED_GUEST = VMSpec(
    name="qmpdump-shared-guest",
    ram_backend=Backend.FILE,
    ram_size=1 * GiB,
    below_4g=512 * MiB,
    virtio_mem=(VirtioMemSpec(id="vmem0", backend=Backend.FILE, requested_size=256 * MiB),),
    pattern_mib=64,
)

VMFactory = Callable[[VMSpec], Awaitable[VM]]


async def _timed_start(spec: VMSpec) -> VM:
    t0 = time.monotonic()
    vm = await start(spec)
    if spec.guest:
        BOOT_TIMES.append((spec.name, time.monotonic() - t0))
    return vm


@pytest.fixture(scope="session")
async def shared_guest() -> AsyncIterator[VM]:
    """One booted guest for the whole session; tests must leave it unchanged."""
    vm = await _timed_start(SHARED_GUEST)
    try:
        yield vm
    finally:
        await vm.stop()


@pytest.fixture
async def vm_factory() -> AsyncIterator[VMFactory]:
    """Launch VMs owned by one test; all are stopped when the test ends, pass or fail."""
    vms: list[VM] = []

    async def make(spec: VMSpec) -> VM:
        vm = await _timed_start(spec)
        vms.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in reversed(vms):
            await vm.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any QEMU the suite started, or any of its files, is left behind."""
    problems: list[str] = []
    for pid, run_dir in live_vms().items():
        problems.append(f"QEMU pid {pid} ({run_dir}) was never stopped; killed now")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Only what this run made: another run on the same machine may have VMs of its own.
    problems.extend(f"left behind: {path}" for path in leftover_dirs())
    problems.extend(leftover_servers())  # S3 servers (tests/test_sink_s3.py)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "leftover check FAILED:\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, seconds in BOOT_TIMES:
        terminalreporter.write_line(f"testbed: {name} booted and plugged in {seconds:.1f} s")
    for name, why in HUNG_BOOTS:
        terminalreporter.write_line(f"testbed: {name} hung at boot, started again: {why}")
    for line in SUMMARY:
        terminalreporter.write_line(line)
