"""Benchmark: map and dump through the daemon, a libvirt domain against a direct-socket VM.

One run, on one machine state: a private libvirtd (:mod:`qmpdump.testbed.libvirtd`) with one
TCG domain booting the test guest (1 GiB memfd NUMA cell, virtio-mem 2 GiB max with 256 MiB
plugged, ``--pattern-mib`` written by the guest), and a plain testbed VM of the same shape whose
QMP socket is the daemon's own (``[[vm]]``). A ``qmpdump daemon`` subprocess serves both, first
with ``[[libvirt]] monitor = "supported"``, then with ``monitor = "passthrough"``; each
measurement is an API request as a client makes it: ``GET /v1/vms/{vm}/map``, and a dump job
from ``POST`` to its final state (polled every 50 ms), median of ``--rounds``, the two VMs
alternated within a round. Both VMs are paused for the dumps (``stop`` / ``virsh suspend``).

Timing on the shared machine is noisy: read the ratios within one run. From the repository root
as root: ``.venv/bin/python bench/daemon_libvirt.py [--rounds 3]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.engines.spec import EngineName
from qmpdump.errors import Unavailable
from qmpdump.service.client import ApiClient
from qmpdump.service.views import DumpRequest
from qmpdump.testbed.libvirtd import DomainSpec, Libvirtd
from qmpdump.testbed.vm import Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

QMPDUMP = str(Path(sys.executable).parent / "qmpdump")
DOMAIN = "qmpdump-bench-d"


def report(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(results.values())))
    print(title, flush=True)
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:<40} median {med:6.3f} s  ({med / base:4.2f}x)  runs {times}")


def config(work: Path, qmp: Path, monitor: str) -> Path:
    path = work / f"{monitor}.toml"
    path.write_text(
        "[daemon]\n"
        f'api_socket = "{work / "api.sock"}"\n'
        f'dump_dir = "{work / "dumps"}"\n'
        f'state_dir = "{work / "state"}"\n'
        "reconnect_min_s = 0.2\n"
        "max_concurrent_dumps = 1\n"
        "[retention]\nkeep_count = 1\n"
        f'[[vm]]\nname = "direct"\nqmp = "{qmp}"\n'
        f'[[libvirt]]\ndomains = ["{DOMAIN}"]\nmonitor = "{monitor}"\n'
    )
    return path


@contextlib.asynccontextmanager
async def daemon(work: Path, path: Path) -> AsyncIterator[ApiClient]:
    log = (work / f"{path.stem}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        QMPDUMP, "daemon", "--config", str(path), stdout=log, stderr=log
    )
    try:
        async with ApiClient(work / "api.sock", timeout_s=120) as api:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(Unavailable):
                    views = {v.name: v for v in await api.vms()}
                    if all(
                        n in views and views[n].connection == "connected"
                        for n in ("direct", DOMAIN)
                    ):
                        break
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise SystemExit(f"the daemon did not serve both VMs: see {log.name}")
                await asyncio.sleep(0.1)
            yield api
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.close()


async def timed_map(api: ApiClient, vm: str) -> float:
    t0 = time.monotonic()
    await api.map(vm)
    return round(time.monotonic() - t0, 3)


async def timed_dump(api: ApiClient, vm: str, engine: EngineName) -> float:
    t0 = time.monotonic()
    job = await api.request(vm, DumpRequest(engine=engine))
    while job.state in ("queued", "running"):
        await asyncio.sleep(0.05)
        job = await api.job(job.id)
    if job.state != "succeeded":
        raise SystemExit(f"{vm}: {job}")
    return round(time.monotonic() - t0, 3)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pattern-mib", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpdump-bench-dlv-"))
    libvirtd = Libvirtd()
    libvirtd.start()
    try:
        await libvirtd.boot(DomainSpec(name=DOMAIN, pattern_mib=args.pattern_mib))
        plain = VMSpec(
            name="qmpdump-bench-plain",
            ram_backend=Backend.MEMFD,
            ram_size=1 * GiB,
            virtio_mem=(
                VirtioMemSpec(id="vmem0", backend=Backend.MEMFD, requested_size=256 * MiB),
            ),
            pattern_mib=args.pattern_mib,
        )
        async with launch(plain) as vm:
            assert vm.qmp is not None
            for monitor in ("supported", "passthrough"):
                await vm.qmp.execute("cont")
                libvirtd.virsh("resume", DOMAIN)
                async with daemon(work, config(work, vm.qmp_path, monitor)) as api:
                    maps: dict[str, list[float]] = {"direct socket": [], f"libvirt {monitor}": []}
                    for _ in range(args.rounds):
                        maps["direct socket"].append(await timed_map(api, "direct"))
                        maps[f"libvirt {monitor}"].append(await timed_map(api, DOMAIN))
                    report(f"daemon map (running VMs), monitor {monitor}", maps)
                    await vm.qmp.execute("stop")
                    libvirtd.virsh("suspend", DOMAIN)
                    engines = [EngineName.QEMU] if monitor == "supported" else [EngineName.BACKEND]
                    for engine in engines:
                        dumps: dict[str, list[float]] = {
                            "direct socket (plain VM)": [],
                            f"libvirt {monitor}": [],
                        }
                        for _ in range(args.rounds):
                            dumps["direct socket (plain VM)"].append(
                                await timed_dump(api, "direct", engine)
                            )
                            dumps[f"libvirt {monitor}"].append(
                                await timed_dump(api, DOMAIN, engine)
                            )
                        report(f"daemon {engine.value} dump (paused), monitor {monitor}", dumps)
    finally:
        libvirtd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
