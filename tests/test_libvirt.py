"""qmpdump on libvirt-managed domains, against a real libvirtd the tests start and stop.

The ``libvirt`` tier (``-m libvirt``): one private libvirtd for the module
(:mod:`qmpdump.testbed.libvirtd`: a mount namespace with our own ``qemu.conf``, the system's
runtime paths), transient TCG domains that boot the test guest with memfd memory, a NUMA cell and
a virtio-mem device. Every domain is destroyed when its test ends and libvirtd is stopped by pid
when the module ends, pass or fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qmpdump.testbed.libvirtd import DomainSpec, Libvirtd, TestDomain, libvirt_available

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(libvirt_available() is not None, reason=str(libvirt_available())),
]


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """A libvirtd of our own for this module."""
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
async def domain(libvirtd: Libvirtd) -> AsyncIterator[TestDomain]:
    """A booted domain for tests that leave it as they found it (running)."""
    dom = await libvirtd.boot(DomainSpec(name="qmpdump-lv-shared"))
    try:
        yield dom
    finally:
        dom.destroy()


async def test_harness_boots_a_domain_that_virsh_dumps(
    libvirtd: Libvirtd, domain: TestDomain, tmp_path: Path
) -> None:
    assert domain.pid is not None
    assert Path(f"/proc/{domain.pid}").exists()
    assert domain.plugged() == 256 << 20
    out = tmp_path / "virsh.elf"
    done = libvirtd.virsh("dump", "--memory-only", domain.name, str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"
    assert domain.state() == "running"
