"""``connect = "on-demand"``: a QMP socket the daemon shares with another tool.

Real QEMU (a bare testbed VM), a real ``qmpdump daemon`` subprocess (the harness of
``tests/test_daemon.py``), and a real second QMP client: qmpdump's own session on the same
socket, standing in for the other tool. QEMU serves one client per socket, so the other tool
can only hold it while the daemon does not.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qmpdump.engines.spec import EngineName
from qmpdump.errors import Unavailable
from qmpdump.qmp.session import QMPSession, parse_address
from qmpdump.report import MapReport
from qmpdump.service.views import ConnectionState, DumpRequest
from qmpdump.testbed.vm import MiB
from tests.conftest import VMFactory
from tests.test_daemon import (
    Daemons,
    bare_vm,
    daemons,
    eventually,
    run_state,
    sidecar,
    wait_job,
    write_config,
)

__all__ = ["daemons"]  # the fixture, imported for this module's tests


async def other_tool(path: Path, timeout_s: float = 3.0) -> QMPSession:
    """Connect as the other tool would; QMPTimeout while the daemon holds the socket."""
    session = QMPSession(parse_address(str(path)), timeout_s=timeout_s, name="other-tool")
    await session.connect()
    return session


@pytest.mark.bare
async def test_on_demand_vm_shares_its_socket(
    vm_factory: VMFactory, daemons: Daemons, tmp_path: Path
) -> None:
    vm = await bare_vm(vm_factory, "ondemand", 256 * MiB)
    setup = write_config(tmp_path, {}, on_demand_wait_s=4.0, reconnect_min_s=0.2)
    setup.config.write_text(
        setup.config.read_text()
        + f'\n[[vm]]\nname = "od"\nqmp = "{vm.qmp_path}"\nconnect = "on-demand"\n'
    )
    svc = await daemons.start(setup)
    api = svc.api
    view = await api.vm("od")
    assert view.connection is ConnectionState.DISCONNECTED
    assert view.reason is not None
    assert "on demand" in view.reason

    # Between requests the socket is free: the other tool connects, works, and leaves.
    tool = await other_tool(vm.qmp_path)
    assert (await tool.execute("query-status"))["status"] == "running"
    await tool.execute("stop")  # state the daemon can't follow while disconnected
    # While the other tool holds the socket, a map request waits and retries; it gets the map
    # once the tool lets go.
    map_task = asyncio.create_task(api.map("od"))

    async def busy_reason() -> str | None:
        reason = (await api.vm("od")).reason
        return reason if reason and "busy with another client" in reason else None

    await eventually(busy_reason, "the VM reported busy", timeout_s=10.0)
    assert not map_task.done()
    await tool.disconnect()
    found = await map_task
    assert isinstance(found, MapReport)
    assert found.vm.pid == vm.pid
    assert found.vm.run_state == "paused"  # read on connect, not remembered
    after = await api.vm("od")
    assert after.connection is ConnectionState.DISCONNECTED  # disconnected when done

    # Held for longer than on_demand_wait_s: a clear 503, the daemon unharmed.
    tool = await other_tool(vm.qmp_path)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="busy with another client"):
        await api.map("od")
    assert time.monotonic() - t0 >= 4.0
    # A job queued while the tool holds the socket waits for it, then runs.
    job = await api.request("od", DumpRequest(engine=EngineName.BACKEND))
    await asyncio.sleep(1.0)
    await tool.execute("cont")
    await tool.disconnect()
    done = await wait_job(api, job.id, timeout_s=120.0)
    assert done.state == "succeeded", done
    assert done.result is not None
    assert sidecar(setup.vm_dir("od") / done.result.file)["vm"]["pid"] == vm.pid
    assert (await api.vm("od")).connection is ConnectionState.DISCONNECTED

    # and the socket is the other tool's again
    tool = await other_tool(vm.qmp_path)
    try:
        assert (await tool.execute("query-status"))["status"] == "running"
    finally:
        await tool.disconnect()
    assert await run_state(vm) == "running"
    assert (await api.health()).status == "ok"
