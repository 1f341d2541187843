"""qmpdump on libvirt-managed domains, against a real libvirtd the tests start and stop.

The ``libvirt`` tier (``-m libvirt``): one private libvirtd for the module
(:mod:`qmpdump.testbed.libvirtd`: a mount namespace with our own ``qemu.conf``, the system's
runtime paths), transient TCG domains that boot the test guest with memfd memory, a NUMA cell and
a virtio-mem device. Every domain is destroyed when its test ends and libvirtd is stopped by pid
when the module ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpdump.libvirt.watch import DomainWatch
from qmpdump.testbed.libvirtd import DomainSpec, Libvirtd, TestDomain, libvirt_available
from qmpdump.testbed.vm import MiB
from tests.clirun import QMPDUMP, run_cli
from tests.test_dump_backend import check_our_layout, compare_cores, read_core

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


@pytest.fixture(scope="module")
async def domain(libvirtd: Libvirtd) -> AsyncIterator[TestDomain]:
    """A booted domain for tests that leave it as they found it (running)."""
    # with a QMP socket of QEMU's own beside libvirt's monitor, as the README used to suggest
    spec = DomainSpec(name="qmpdump-lv-shared", extra_qmp=libvirtd.root / "shared.qmp")
    dom = await libvirtd.boot(spec)
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


def run_json(out: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(out)
    return doc


async def test_map_in_both_monitor_modes(libvirtd: Libvirtd, domain: TestDomain) -> None:
    rc, out, err = await run_cli("map", "--libvirt", domain.name, "--json")
    assert rc == 0, err
    supported = run_json(out)
    assert supported["monitor"] == "supported"
    assert supported["vm"]["pid"] == domain.pid
    assert "(monitor supported)" in supported["vm"]["address"]
    regions = {r["backend"]: r for r in supported["regions"]}
    assert set(regions) == {"ram-node0", "memvirtiomem0"}
    assert all(r["populated"] and r["source"] == "seek_data" for r in regions.values())
    (vmem,) = supported["memory"]["devices"]
    assert vmem["current_size"] == vmem["requested_size"] == 256 * MiB

    rc, out, err = await run_cli(
        "map", "--libvirt", domain.name, "--monitor", "passthrough", "--exact-plug", "--json"
    )
    assert rc == 0, err
    full = run_json(out)
    assert full["vm"]["pid"] == domain.pid  # from libvirt, not a socket's peer
    assert "(monitor passthrough)" in full["vm"]["address"]
    assert all(r["population_source"] != "unknown" for r in full["regions"])
    (dev,) = full["virtio_mem"]
    assert dev["plugged_exact"] is True
    assert sum(r["size"] for r in dev["plugged"]) == 256 * MiB
    # the same host facts, seen both ways
    by_region = {r["region"]: r for r in full["regions"]}
    assert by_region["memvirtiomem0"]["populated_size"] == regions["memvirtiomem0"]["populated"]
    assert domain.state() == "running"
    assert libvirtd.proc is not None
    assert libvirtd.proc.poll() is None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_dumps_equal_virsh_dump_of_the_paused_domain(
    libvirtd: Libvirtd, domain: TestDomain, tmp_path: Path
) -> None:
    assert libvirtd.virsh("suspend", domain.name).returncode == 0
    try:
        reference = tmp_path / "virsh.elf"
        done = libvirtd.virsh("dump", "--memory-only", domain.name, str(reference))
        assert done.returncode == 0, done.stderr
        want = sha256_of(reference)
        base = ("dump", "--libvirt", domain.name, "--json")
        for name, extra in {
            "supported": ("--no-elf-fix",),
            "passthrough-qemu": ("--monitor", "passthrough", "--engine", "qemu", "--no-elf-fix"),
        }.items():
            rc, out, err = await run_cli(*base, *extra, "-o", str(tmp_path / f"{name}.elf"))
            assert rc == 0, f"{name}: {err}"
            summary = run_json(out)
            assert summary["engine"] == "qemu"
            assert summary["sha256"] == want, f"{name} differs from virsh dump --memory-only"
            sidecar = run_json((tmp_path / f"{name}.elf.json").read_text())
            assert sidecar["request"]["dump_path"] == "libvirt-api"
            assert sidecar["request"]["monitor"] == name.split("-")[0]
            assert domain.state() == "paused"
        # QEMU's ELF header fixed for makedumpfile: only the headers differ
        rc, out, err = await run_cli(*base, "-o", str(tmp_path / "fixed.elf"))
        assert rc == 0, err
        fixed, theirs = read_core(tmp_path / "fixed.elf"), read_core(reference)
        assert fixed.loads == theirs.loads
        assert fixed.notes == theirs.notes
        # the sparse reader through passthrough: every byte at its gpa equals virsh's dump
        backend = tmp_path / "backend.elf"
        rc, out, err = await run_cli(
            *base, "--monitor", "passthrough", "--engine", "backend", "-o", str(backend)
        )
        assert rc == 0, err
        assert run_json(out)["engine"] == "backend"
        ours = read_core(backend)
        check_our_layout(ours)
        found = compare_cores(ours, theirs)
        assert found.pattern_pages >= 32 * MiB // PAGE_SIZE
        assert ours.coverage == theirs.coverage  # unplugged virtio-mem left out alike
        sidecar = run_json(backend.with_name("backend.elf.json").read_text())
        assert "(monitor passthrough)" in sidecar["vm"]["address"]
        assert domain.state() == "paused"  # nothing of ours resumed it
    finally:
        libvirtd.virsh("resume", domain.name)
    assert domain.state() == "running"


async def test_bad_input_is_a_clear_error(domain: TestDomain, tmp_path: Path) -> None:
    target = tmp_path / "x.elf"
    cases = [
        (("--libvirt", "no-such-domain"), 63, "no such domain"),
        (
            ("--libvirt", domain.name, "--connect", "qemu:///system?socket=/nonexistent/sock"),
            61,
            "libvirtd cannot be reached",
        ),
        (("--libvirt", domain.name, "--engine", "backend"), 2, "--monitor passthrough"),
        (("--qmp", "/x", "--monitor", "supported"), 2, "go with --libvirt"),
    ]
    for args, code, text in cases:
        for mode in ("supported", "passthrough"):
            extra = () if "--monitor" in args or args[0] == "--qmp" else ("--monitor", mode)
            if code == 2 and mode == "passthrough":
                continue
            rc, _out, err = await run_cli("dump", *args, *extra, "-o", str(target))
            assert rc == code, f"{args} {mode}: {rc} {err}"
            assert text in err
            assert "Traceback" not in err
            assert not list(tmp_path.iterdir())
    rc, _, err = await run_cli("map", "--libvirt", "no-such-domain")
    assert rc == 63
    assert "Traceback" not in err
    assert domain.state() == "running"


async def test_domain_without_virtio_mem(libvirtd: Libvirtd, tmp_path: Path) -> None:
    dom = await libvirtd.boot(DomainSpec(name="qmpdump-lv-novmem", virtio_mem_size=0))
    try:
        rc, out, err = await run_cli("map", "--libvirt", dom.name)
        assert rc == 0, err
        assert "no virtio-mem device" in out
        rc, out, err = await run_cli(
            "map", "--libvirt", dom.name, "--monitor", "passthrough", "--exact-plug", "--json"
        )
        assert rc == 0, err
        assert run_json(out)["virtio_mem"] == []
        for mode in ("supported", "passthrough"):
            target = tmp_path / f"{mode}.elf"
            rc, out, err = await run_cli(
                "dump", "--libvirt", dom.name, "--monitor", mode, "-o", str(target)
            )
            assert rc == 0, f"{mode}: {err}"
            assert target.read_bytes()[:4] == b"\x7fELF"
        assert dom.state() == "running"
    finally:
        dom.destroy()


async def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not path.exists() or path.stat().st_size < 16 * MiB:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.05)


async def test_shut_off_mid_dump_and_cancel(libvirtd: Libvirtd, tmp_path: Path) -> None:
    dom = await libvirtd.boot(DomainSpec(name="qmpdump-lv-victim", pattern_mib=8))
    try:
        # cancel (SIGINT) mid-dump: exit 41, nothing left, the domain runs again
        target = tmp_path / "cancelled.elf"
        proc = await asyncio.create_subprocess_exec(
            QMPDUMP,
            "dump",
            "--libvirt",
            dom.name,
            "-o",
            str(target),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for(target.with_name("cancelled.elf.partial"))
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 41, err
        assert not list(tmp_path.iterdir())
        await wait_state(dom, "running")

        # the domain destroyed mid-dump: exit 42, nothing left
        target = tmp_path / "lost.elf"
        proc = await asyncio.create_subprocess_exec(
            QMPDUMP,
            "dump",
            "--libvirt",
            dom.name,
            "-o",
            str(target),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for(target.with_name("lost.elf.partial"))
        assert libvirtd.virsh("destroy", dom.name).returncode == 0
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 42, err.decode()
        assert b"stopped during the dump" in err
        assert b"Traceback" not in err
        assert not list(tmp_path.iterdir())
        # a transient domain is gone once destroyed
        rc, _, text = await run_cli("dump", "--libvirt", dom.name, "-o", str(target))
        assert rc == 63
        assert "no such domain" in text
    finally:
        dom.destroy()
    assert libvirtd.proc is not None
    assert libvirtd.proc.poll() is None


async def wait_state(dom: TestDomain, want: str, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while dom.state() != want:  # noqa: ASYNC110 - libvirt's state, polled with virsh
            await asyncio.sleep(0.1)


async def test_no_qemu_dump_through_a_socket_beside_libvirts_monitor(
    libvirtd: Libvirtd, domain: TestDomain, tmp_path: Path
) -> None:
    """libvirt 9.0's libvirtd segfaults on the DUMP_COMPLETED of a dump it did not start, even
    one made through another QMP socket: qmpdump refuses and names the libvirt way."""
    assert domain.spec.extra_qmp is not None
    sock = str(domain.spec.extra_qmp)
    rc, out, err = await run_cli("map", "--qmp", sock, "--json")
    assert rc == 0, err  # reading is fine
    assert run_json(out)["vm"]["pid"] == domain.pid
    for args in (
        ("dump", "--qmp", sock, "--engine", "qemu", "-o", str(tmp_path / "q.elf")),
        ("dump", "--qmp", sock, "--engine", "backend", "-o", str(tmp_path / "b.elf")),
        ("map", "--qmp", sock, "--exact-plug"),
    ):
        rc, _, err = await run_cli(*args)
        assert rc == 65, f"{args}: {rc} {err}"
        assert f"--libvirt {domain.name}" in err
    assert not list(tmp_path.iterdir())
    assert libvirtd.proc is not None
    assert libvirtd.proc.poll() is None
    assert domain.state() == "running"


async def test_private_memory_libvirts_default(libvirtd: Libvirtd, tmp_path: Path) -> None:
    """Without ``<access mode='shared'/>`` libvirt maps memory private: the backing file does
    not hold the guest's writes. The supported map says so instead of counting the file; QEMU's
    dump through libvirt reads QEMU's own mapping and equals virsh's."""
    dom = await libvirtd.boot(DomainSpec(name="qmpdump-lv-private", shared=False))
    try:
        rc, out, err = await run_cli("map", "--libvirt", dom.name, "--json")
        assert rc == 0, err
        doc = run_json(out)
        assert doc["memory"]["access"] == "private"
        for region in doc["regions"]:
            assert region["populated"] is None
            assert "private mapping" in region["note"]
        assert libvirtd.virsh("suspend", dom.name).returncode == 0
        reference = tmp_path / "virsh.elf"
        done = libvirtd.virsh("dump", "--memory-only", dom.name, str(reference))
        assert done.returncode == 0, done.stderr
        ours = tmp_path / "ours.elf"
        rc, out, err = await run_cli(
            "dump", "--libvirt", dom.name, "--no-elf-fix", "--json", "-o", str(ours)
        )
        assert rc == 0, err
        assert run_json(out)["sha256"] == sha256_of(reference)
        assert dom.state() == "paused"
    finally:
        dom.destroy()


async def test_watch_follows_domains_that_start_and_stop(
    libvirtd: Libvirtd, domain: TestDomain
) -> None:
    """What a daemon's ``[[libvirt]]`` source needs: the running domains, then lifecycle."""
    async with DomainWatch(libvirtd.uri, [domain.name, "qmpdump-lv-w*"]) as watch:
        assert set(watch.running) == {domain.name}
        # no guest kernel: the domain runs (firmware only), which is all the watch looks at
        spec = DomainSpec(name="qmpdump-lv-w1", guest=False, virtio_mem_size=0)
        other = await asyncio.to_thread(libvirtd.create, spec)
        try:
            change = await asyncio.wait_for(watch.next(), 60)
            assert (change.name, change.running, change.reason) == (other.name, True, "started")
            assert set(watch.running) == {domain.name, other.name}
            assert libvirtd.virsh("destroy", other.name).returncode == 0
            change = await asyncio.wait_for(watch.next(), 60)
            assert (change.name, change.running, change.reason) == (other.name, False, "stopped")
            assert set(watch.running) == {domain.name}
        finally:
            other.destroy()
