"""The daemon and the snapshot engine: migration settings a crash leaves changed are put back.

The snapshot engine turns on QEMU's ``background-snapshot`` migration capability and raises
``max-bandwidth`` for a dump, and restores both afterwards; the daemon journals the values to put
back before the engine changes anything (:meth:`qmpdump.service.store.JobStore.
journal_migration_settings`). Here a real daemon is SIGKILLed while QEMU 10.0 streams a snapshot
of a real guest, and the restarted daemon must put the capability and the bandwidth back on the
same QEMU (after cancelling the migration still running there), fail the job, leave no partial
file and the guest running; on another QEMU at the same socket it must leave the VM alone.

Skipped on QEMU before 8.1, where the snapshot engine refuses (``needs_snapshot``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines.spec import EngineName
from qmpdump.service.store import JobStore
from qmpdump.service.views import DumpRequest
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec

from .conftest import VMFactory
from .test_daemon import (
    Daemons,
    Service,
    bare_vm,
    check_failed_by_the_restart,
    daemons,  # noqa: F401  (the fixture)
    eventually,
    files_in,
    run_state,
    wait_job,
    write_config,
)
from .test_dump_snapshot import needs_snapshot

#: the capability the snapshot engine turns on, and the parameter it raises
CAPABILITY = "background-snapshot"
BANDWIDTH = "max-bandwidth"
#: ``query-migrate`` states in which no migration runs
IDLE = ("none", "completed", "failed", "cancelled")


def _guest(name: str) -> VMSpec:
    """A guest on anonymous RAM (no host growth to refuse) with enough data that QEMU streams
    the snapshot for about a second, long enough to kill the daemon in the middle."""
    return VMSpec(
        name=name,
        ram_backend=Backend.RAM,
        ram_size=512 * MiB,
        below_4g=256 * MiB,
        virtio_mem=(
            VirtioMemSpec(backend=Backend.RAM, max_size=1 * GiB, requested_size=256 * MiB),
        ),
        pattern_mib=128,
    )


async def _settings(vm: VM) -> tuple[bool, int]:
    """The VM's ``background-snapshot`` state and ``max-bandwidth``, through the testbed's own
    QMP connection (the daemon has the other one)."""
    assert vm.qmp is not None
    caps = await vm.qmp.execute("query-migrate-capabilities")
    state = next(bool(c["state"]) for c in caps if c["capability"] == CAPABILITY)
    params = await vm.qmp.execute("query-migrate-parameters")
    return state, int(params[BANDWIDTH])


async def _migration(vm: VM) -> dict[str, Any]:
    assert vm.qmp is not None
    reply: dict[str, Any] = await vm.qmp.execute("query-migrate")
    return reply


@contextmanager
def _trickle(sock: socket.socket) -> Iterator[None]:
    """Read ``sock`` at about 3 MiB/s in a thread, until the block ends or the peer closes.

    A stream nobody reads would not do: a background snapshot writes the devices' state while
    it holds QEMU's main lock, and QMP itself would stall behind an unread socket.
    """
    stop = threading.Event()

    def drain() -> None:
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                if not sock.recv(64 * 1024):
                    return
            except TimeoutError:
                continue
            except OSError:
                return
            time.sleep(0.02)

    reader = threading.Thread(target=drain, name="trickle", daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()


async def _kill_while_streaming(daemons: Daemons, svc: Service, vm: VM) -> str:  # noqa: F811
    """Ask for a snapshot dump; SIGKILL the daemon once QEMU streams it and the guest runs again
    (past the snapshot's pause: a kill inside it is the pause journal's case); the job id."""
    job = await svc.api.request("k", DumpRequest(engine=EngineName.SNAPSHOT))

    async def streaming() -> str | None:
        reply = await _migration(vm)
        streams = reply.get("status") == "active" and reply.get("ram", {}).get("transferred")
        if streams and await run_state(vm) == "running":
            return "streaming"
        state = (await svc.api.job(job.id)).state
        assert state in ("queued", "running"), f"the dump ended ({state}) before it streamed"
        return None

    await eventually(streaming, "QEMU streaming the snapshot", timeout_s=60, interval_s=0.002)
    await daemons.kill(svc)
    return str(job.id)


@pytest.mark.guest
@needs_snapshot
async def test_a_restart_puts_back_the_migration_settings_a_crash_left(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    vm = await vm_factory(_guest("snapjournal"))
    assert vm.qmp is not None
    original = await _settings(vm)
    assert original[0] is False  # QEMU's default: the engine turns it on and journals "off"
    setup = write_config(tmp_path, {"k": vm.qmp_path})
    folder = setup.vm_dir("k")
    svc = await daemons.start(setup, connected=1)
    job_id = await _kill_while_streaming(daemons, svc, vm)

    # The fault happened: the killed daemon could not restore what its engine changed.
    changed = await _settings(vm)
    assert changed[0] is True, "background-snapshot was not left on: no fault to recover from"
    assert changed[1] > original[1]
    with JobStore.in_state_dir(setup.state_dir) as store:
        [entry] = store.pending_migration_settings()
        assert (entry.vm, entry.job_id) == ("k", job_id)
        assert entry.capabilities == {CAPABILITY: False}
        assert entry.parameters == {BANDWIDTH: original[1]}
        assert entry.qemu_pid == vm.pid

    # Its snapshot ends with its socket (QEMU 8.1+ unprotects guest RAM on that path). What
    # the restarted daemon must not meet unawares is a migration still running: QEMU may not
    # have noticed the closed socket yet, or (as made here, since it always notices at once)
    # a migration was started meanwhile, which the capability left on made a background
    # snapshot. Its socket is read at a trickle, so it stays active until cancelled.
    async def ended() -> str | None:
        status = (await _migration(vm)).get("status")
        return status if status in IDLE else None

    await eventually(ended, "the killed daemon's snapshot ending")
    ours, theirs = socket.socketpair()
    try:
        with _trickle(ours):
            fdname = await vm.qmp.pass_fd(theirs.fileno())
            await vm.qmp.execute("migrate", {"uri": f"fd:{fdname}"})

            async def active() -> str | None:
                status = (await _migration(vm)).get("status")
                return status if status == "active" else None

            await eventually(active, "the stray migration running")
            # The restart: the settings are back before the VM counts as connected.
            again = await daemons.start(setup, connected=1)
            assert await _settings(vm) == original
            assert (await _migration(vm)).get("status") == "cancelled"
    finally:
        ours.close()
        theirs.close()

    async def running() -> str | None:
        return "running" if await run_state(vm) == "running" else None

    await eventually(running, "the guest running after the restart")
    await check_failed_by_the_restart(again.api, job_id)
    assert files_in(folder) == []
    assert await again.api.dumps() == []
    log = again.log_text()
    assert (
        "VM k: cancelled the orphaned background snapshot and restored the migration settings "
        f"the daemon had changed before a restart: background-snapshot=off, "
        f"max-bandwidth={original[1]}"
    ) in log, log
    with JobStore.in_state_dir(setup.state_dir) as store:
        assert store.pending_migration_settings() == []

    # A snapshot dump through the restarted daemon works, and restores the settings itself.
    done_job = await again.api.request("k", DumpRequest(engine=EngineName.SNAPSHOT))
    done = await wait_job(again.api, done_job.id, timeout_s=120)
    assert done.state == "succeeded", done
    assert await _settings(vm) == original
    assert await run_state(vm) == "running"


@pytest.mark.guest
@needs_snapshot
async def test_a_restart_leaves_another_qemus_migration_settings_alone(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The journal names the QEMU process (pid and start time): after a crash, a new QEMU on the
    same socket, whose operator chose its own settings, is left as it is."""
    first = await vm_factory(_guest("snapjournal-a"))
    link = tmp_path / "vm.qmp"
    link.symlink_to(first.qmp_path)
    setup = write_config(tmp_path, {"k": link})
    svc = await daemons.start(setup, connected=1)
    job_id = await _kill_while_streaming(daemons, svc, first)
    assert (await _settings(first))[0] is True
    await first.stop()

    second = await bare_vm(vm_factory, "snapjournal-b", 128 * MiB)
    assert second.qmp is not None
    await second.qmp.execute("migrate-set-parameters", {BANDWIDTH: 12345678})
    mine = await _settings(second)
    fresh = tmp_path / "vm.qmp.new"
    fresh.symlink_to(second.qmp_path)
    fresh.replace(link)
    again = await daemons.start(setup, connected=1)
    assert await _settings(second) == mine == (False, 12345678)
    assert "whose migration settings the daemon changed" in again.log_text()
    assert "is gone; this one is left as it is" in again.log_text()
    with JobStore.in_state_dir(setup.state_dir) as store:
        assert store.pending_migration_settings() == []
    await check_failed_by_the_restart(again.api, job_id)
    assert files_in(setup.vm_dir("k")) == []


@pytest.mark.bare
@needs_snapshot
async def test_a_job_gets_its_vms_max_host_growth(
    vm_factory: VMFactory,
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The API takes no ``max_host_growth``: a snapshot job runs with the VM's configured one.
    A bare VM on shmem-backed RAM is nearly all holes, which QEMU's snapshot would allocate
    (about 120 MiB here, under the 256 MiB default): with 1 MiB configured, the job is refused
    with that limit, before anything is changed on the VM."""
    vm = await bare_vm(vm_factory, "snapgrowth", 128 * MiB, backend=Backend.FILE)
    setup = write_config(tmp_path, {"k": vm.qmp_path})
    with setup.config.open("a") as config:
        config.write('max_host_growth = "1MiB"\n')
    before = await _settings(vm)
    svc = await daemons.start(setup, connected=1)
    job = await svc.api.request("k", DumpRequest(engine=EngineName.SNAPSHOT))
    done = await wait_job(svc.api, job.id)
    assert done.state == "failed", done
    assert done.error is not None
    assert done.error.error_class == "SnapshotRefused", done.error
    assert "(limit 1 MiB)" in done.error.message, done.error.message
    assert await _settings(vm) == before
    assert await run_state(vm) == "running"
    assert files_in(setup.vm_dir("k")) == []
