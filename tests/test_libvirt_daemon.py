"""The daemon on a libvirt host: ``[[libvirt]]`` sections against a real libvirtd.

The ``libvirt`` tier: one private libvirtd for the module (:mod:`qmpdump.testbed.libvirtd`), a
real ``qmpdump daemon`` subprocess (the harness of ``tests/test_daemon.py``, which stops it by
pid), TCG domains that boot the test guest. Every domain is destroyed when its test ends, and
libvirtd is stopped by pid when the module ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpdump.engines.spec import EngineName
from qmpdump.report import MapReport
from qmpdump.service.client import ApiClient
from qmpdump.service.views import ConnectionState, DumpRequest, LibvirtMapView, VMView
from qmpdump.testbed.libvirtd import DomainSpec, Libvirtd, TestDomain, libvirt_available
from qmpdump.testbed.vm import GiB, MiB
from tests.test_daemon import (
    Daemons,
    Setup,
    daemons,
    eventually,
    wait_job,
    wait_written,
    write_config,
)
from tests.test_dump_backend import check_our_layout, compare_cores, read_core

__all__ = ["daemons"]  # the fixture, imported for this module's tests

PAGE_SIZE = 4096

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(libvirt_available() is not None, reason=str(libvirt_available())),
]


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """A libvirtd of our own for this module."""
    with Libvirtd() as daemon:
        yield daemon


def libvirt_config(tmp_path: Path, extra: str) -> Setup:
    """A daemon configuration (test_daemon's paths and timeouts) with ``extra`` TOML appended:
    ``[[libvirt]]`` and ``[[vm]]`` entries."""
    setup = write_config(tmp_path, {}, max_concurrent_dumps=2)
    setup.config.write_text(setup.config.read_text() + extra)
    return setup


async def vms_by_name(api: ApiClient) -> dict[str, VMView]:
    return {v.name: v for v in await api.vms()}


async def wait_vm(
    api: ApiClient, name: str, *, present: bool = True, timeout_s: float = 60.0
) -> VMView | None:
    """The VM's view once it is listed and connected (or once it is gone)."""

    async def check() -> VMView | bool | None:
        found = (await vms_by_name(api)).get(name)
        if not present:
            return True if found is None else None
        return (
            found if found is not None and found.connection == ConnectionState.CONNECTED else None
        )

    found = await eventually(check, f"VM {name} {'up' if present else 'gone'}", timeout_s=timeout_s)
    return found if isinstance(found, VMView) else None


def sidecar_of(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.with_name(path.name + ".json").read_text())
    return doc


async def test_daemon_serves_libvirt_domains_in_both_monitor_modes(
    libvirtd: Libvirtd, daemons: Daemons, tmp_path: Path
) -> None:
    """Discovery, a [[vm]] that wins, map and jobs in both modes (dumps equal virsh's of the
    paused domain), virsh working beside the daemon, a plug resize seen by the map, and
    domains started and destroyed while the daemon runs."""
    doms: list[TestDomain] = []
    try:
        sup, pas = await asyncio.gather(
            libvirtd.boot(DomainSpec(name="qmpdump-lvd-s1")),
            libvirtd.boot(DomainSpec(name="qmpdump-lvd-p1")),
        )
        doms += [sup, pas]
        # a domain a [[vm]] of the same name pins (through a QMP socket of QEMU's own)
        pinned_sock = libvirtd.root / "pinned.qmp"
        pinned = await asyncio.to_thread(
            libvirtd.create,
            DomainSpec(
                name="qmpdump-lvd-s9", guest=False, virtio_mem_size=0, extra_qmp=pinned_sock
            ),
        )
        doms.append(pinned)
        setup = libvirt_config(
            tmp_path,
            '\n[[libvirt]]\ndomains = ["qmpdump-lvd-s*"]\n'
            '\n[[libvirt]]\nuri = "qemu:///system"\ndomains = ["qmpdump-lvd-p*"]\n'
            'monitor = "passthrough"\n'
            f'\n[[vm]]\nname = "qmpdump-lvd-s9"\nqmp = "{pinned_sock}"\n',
        )
        svc = await daemons.start(setup)
        api = svc.api

        s_view = await wait_vm(api, sup.name)
        p_view = await wait_vm(api, pas.name)
        assert s_view is not None
        assert p_view is not None
        assert (s_view.origin, p_view.origin) == ("libvirt[0]", "libvirt[1]")
        assert (s_view.pid, p_view.pid) == (sup.pid, pas.pid)  # from libvirt
        assert "(monitor supported)" in s_view.qmp
        assert "(monitor passthrough)" in p_view.qmp
        assert (await vms_by_name(api))[pinned.name].origin == "vm[0]"  # the [[vm]] wins

        # the map: supported from the XML and host facts, passthrough the full map
        s_map = await api.map(sup.name)
        assert isinstance(s_map, LibvirtMapView)
        assert s_map.root["schema"] == "qmpdump.libvirt-map/1"
        assert s_map.root["vm"]["pid"] == sup.pid
        p_map = await api.map(pas.name)
        assert isinstance(p_map, MapReport)
        assert p_map.vm.pid == pas.pid
        (dev,) = p_map.virtio_mem
        assert dev.size == 256 * MiB

        # virsh works on a domain the daemon serves (passthrough holds no socket of QEMU's)
        for dom in (sup, pas):
            assert libvirtd.virsh("dominfo", dom.name).returncode == 0
        assert libvirtd.virsh("suspend", pas.name).returncode == 0

        async def paused() -> bool | None:
            return True if (await api.vm(pas.name)).run_state == "paused" else None

        await eventually(paused, "the daemon follows virsh suspend (QMP events via libvirt)")
        assert libvirtd.virsh("resume", pas.name).returncode == 0

        # a plug resize with virsh update-memory-device, seen by the daemon's maps
        for dom in (sup, pas):
            done = libvirtd.virsh(
                "update-memory-device", dom.name, "--requested-size", f"{512 * 1024}"
            )
            assert done.returncode == 0, done.stderr

        async def resized() -> bool | None:
            p = await api.map(pas.name)
            s = await api.map(sup.name)
            assert isinstance(p, MapReport)
            assert isinstance(s, LibvirtMapView)
            (s_dev,) = s.root["memory"]["devices"]
            grown = p.virtio_mem[0].size == 512 * MiB and s_dev["current_size"] == 512 * MiB
            return True if grown else None

        await eventually(resized, "the guests plugged 512 MiB", timeout_s=120.0, interval_s=1.0)

        # jobs in both modes, on the paused domains, against virsh's dump of each
        for dom in (sup, pas):
            assert libvirtd.virsh("suspend", dom.name).returncode == 0
        references = {}
        for dom in (sup, pas):
            ref = tmp_path / f"{dom.name}.virsh.elf"
            done = libvirtd.virsh("dump", "--memory-only", dom.name, str(ref))
            assert done.returncode == 0, done.stderr
            references[dom.name] = read_core(ref)
        s_job = await api.request(sup.name)
        p_job = await api.request(pas.name, DumpRequest(engine=EngineName.BACKEND))
        p_qemu = await api.request(pas.name, DumpRequest(engine=EngineName.QEMU))
        for job in (s_job, p_job, p_qemu):
            finished = await wait_job(api, job.id, timeout_s=300.0)
            assert finished.state == "succeeded", finished
            assert finished.result is not None
            path = setup.vm_dir(finished.vm) / finished.result.file
            record = sidecar_of(path)
            theirs = references[finished.vm]
            ours = read_core(path)
            if finished.result.engine == "qemu":
                assert record["request"]["dump_path"] == "libvirt-api"
                assert ours.loads == theirs.loads
                assert ours.notes == theirs.notes
            else:
                assert finished.vm == pas.name
                assert "(monitor passthrough)" in record["vm"]["address"]
                check_our_layout(ours)
                found = compare_cores(ours, theirs)
                assert found.pattern_pages >= 32 * MiB // PAGE_SIZE
                assert ours.coverage == theirs.coverage
        assert (s_job.vm, p_qemu.vm) == (sup.name, pas.name)
        assert sup.state() == pas.state() == "paused"  # nothing of ours resumed them
        for dom in (sup, pas):
            assert libvirtd.virsh("resume", dom.name).returncode == 0

        # a domain started while the daemon runs appears; destroyed, it disappears
        spec = DomainSpec(name="qmpdump-lvd-s2", guest=False, ram_size=2 * GiB, virtio_mem_size=0)
        late = await asyncio.to_thread(libvirtd.create, spec)
        doms.append(late)
        late_view = await wait_vm(api, late.name)
        assert late_view is not None
        assert late_view.origin == "libvirt[0]"
        assert late_view.pid == late.pid
        # destroyed mid-dump: the job fails saying so, no partial file stays, the VM goes
        job = await api.request(late.name)
        await wait_written(api, job.id)
        assert libvirtd.virsh("destroy", late.name).returncode == 0
        failed = await wait_job(api, job.id, timeout_s=120.0)
        assert failed.state == "failed", failed
        assert failed.error is not None
        assert "stopped during the dump" in failed.error.message
        assert list(setup.vm_dir(late.name).iterdir()) == []
        await wait_vm(api, late.name, present=False)
        assert libvirtd.proc is not None
        assert libvirtd.proc.poll() is None  # libvirtd survived all of it
        assert "Traceback" not in svc.log_text()
    finally:
        for dom in doms:
            await asyncio.to_thread(dom.destroy)
