"""Benchmark: map and dump of one libvirt domain through each path, in one run.

A private libvirtd (:mod:`qmpdump.testbed.libvirtd`) runs one TCG domain booting the test guest
(1 GiB memfd NUMA cell, virtio-mem 2 GiB max with 256 MiB plugged, the guest writes
``--pattern-mib``), with an extra QMP socket of QEMU's own (``<qemu:commandline>``) so the
direct path runs on the very same VM. Each measurement is the ``qmpdump`` command an operator
would type (a new process each time, so connection and start-up costs count), median of
``--rounds``, the paths alternated within a round:

* map: ``--qmp SOCKET`` | ``--libvirt --monitor passthrough`` | ``--libvirt`` (supported), as
  commands and in process (connect + survey, without the interpreter's start-up);
* dumps: QEMU's ``dump-guest-memory`` through the extra socket would crash libvirt 9.0's libvirtd
  (qmpdump refuses it), so the direct-socket dumps run on a plain testbed VM of the same shape
  (1 GiB memfd main RAM, virtio-mem memfd 2 GiB with 256 MiB plugged, same pattern) started
  beside the domain: backend ``--qmp`` (plain VM) | backend ``--libvirt --monitor
  passthrough``; QEMU's ELF ``--qmp --engine qemu`` (plain VM) | ``--libvirt`` (libvirt's API).
  Both VMs are paused (``stop`` / ``virsh suspend``) for the dumps; QEMU's dumps come last, as
  they allocate every hole of shmem RAM they read (``shared/FACTS.md``).

Timing on the shared machine is noisy: read the ratios within one run. Run from the repository
root as root: ``.venv/bin/python bench/libvirt_paths.py [--rounds 3]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.libvirt.connection import DomainRef
from qmpdump.libvirt.supported import map_supported
from qmpdump.qmp.passthrough import LibvirtQMPSession
from qmpdump.qmp.session import QMPSession
from qmpdump.survey import survey
from qmpdump.testbed.libvirtd import DomainSpec, Libvirtd
from qmpdump.testbed.vm import Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

QMPDUMP = str(Path(sys.executable).parent / "qmpdump")


def timed(*args: str) -> float:
    t0 = time.monotonic()
    done = subprocess.run([QMPDUMP, *args], capture_output=True, text=True, check=False)
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"qmpdump {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return took


def report(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(results.values())))
    print(title)
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:<34} median {med:6.2f} s  ({med / base:4.2f}x)  runs {times}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pattern-mib", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpdump-bench-libvirt-"))
    sock = work / "direct.qmp"
    daemon = Libvirtd()
    daemon.start()
    try:
        dom = await daemon.boot(
            DomainSpec(name="qmpdump-bench", pattern_mib=args.pattern_mib, extra_qmp=sock)
        )
        name = dom.name
        maps: dict[str, list[float]] = {"direct socket": [], "passthrough": [], "supported": []}
        for _ in range(args.rounds):
            maps["direct socket"].append(timed("map", "--qmp", str(sock)))
            maps["passthrough"].append(timed("map", "--libvirt", name, "--monitor", "passthrough"))
            maps["supported"].append(timed("map", "--libvirt", name))
        report("map (running domain), qmpdump command", maps)
        inproc: dict[str, list[float]] = {"direct socket": [], "passthrough": [], "supported": []}
        ref = DomainRef("qemu:///system", name)
        for _ in range(args.rounds + 2):
            for label, session in (
                ("direct socket", QMPSession(str(sock))),
                ("passthrough", LibvirtQMPSession(ref)),
            ):
                t0 = time.monotonic()
                async with session:
                    await survey(session)
                inproc[label].append(round(time.monotonic() - t0, 3))
            t0 = time.monotonic()
            await map_supported(ref)
            inproc["supported"].append(round(time.monotonic() - t0, 3))
        report("map (running domain), in process: connect + survey", inproc)
        daemon.virsh("suspend", name)
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
            await vm.qmp.execute("stop")
            direct = ("--qmp", str(vm.qmp_path))
            passthrough = ("--libvirt", name, "--monitor", "passthrough")
            backend: dict[str, list[float]] = {"direct socket (plain VM)": [], "passthrough": []}
            qemu: dict[str, list[float]] = {"direct socket (plain VM)": [], "libvirt API": []}
            rounds = (
                (backend, "--engine", "backend", direct, passthrough),
                (qemu, "--engine", "qemu", direct, ("--libvirt", name)),
            )
            for results, flag, engine, one, other in rounds:
                for i in range(args.rounds):
                    for label, source in zip(results, (one, other), strict=True):
                        out = work / f"d{i}.elf"
                        results[label].append(timed("dump", *source, flag, engine, "-o", str(out)))
                        out.unlink()
                        out.with_name(out.name + ".json").unlink()
            report("backend dump (paused)", backend)
            report("QEMU's ELF dump (paused)", qemu)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
