"""``qmpdump demo``: boot the built-in demo VM and show what qmpdump sees of its memory.

The demo VM is a real QEMU guest from :mod:`qmpdump.testbed` (Debian's kernel, virtio-mem,
a known pattern written by the guest). qmpdump talks to it over its own QMP socket, exactly as
it would to a production VM.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from qmpdump.qmp.session import QMPSession
from qmpdump.testbed.vm import Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

DEMO_VM = VMSpec(
    name="qmpdump-demo",
    machine="q35",
    ram_backend=Backend.MEMFD,
    ram_size=1 * GiB,
    below_4g=512 * MiB,
    virtio_mem=(
        VirtioMemSpec(id="vmem0", backend=Backend.FILE, max_size=2 * GiB, requested_size=256 * MiB),
    ),
    pattern_mib=64,
)


def add_parser(commands: Any) -> None:
    """Register ``demo``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo", help="boot the built-in demo VM and show its memory devices"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the VM running until interrupted (Ctrl-C)"
    )
    parser.set_defaults(run=run)


def _size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB and n % (GiB // 4) == 0 else f"{n / MiB:g} MiB"


async def run(args: argparse.Namespace) -> int:
    """Boot, show, stop."""
    print("qmpdump demo: booting the demo VM (QEMU, Debian kernel, virtio-mem) ...", flush=True)
    t0 = time.monotonic()
    async with launch(DEMO_VM) as vm:
        print(f"  up and plugged in {time.monotonic() - t0:.1f} s: QEMU pid {vm.pid}")
        async with QMPSession(str(vm.qmp_path)) as qmp:
            version = await qmp.execute("query-version")
            status = await qmp.execute("query-status")
            devices = await qmp.execute("query-memory-devices")
            memdevs = await qmp.execute("query-memdev")
        q = version["qemu"]
        print(
            f"  QMP socket {vm.qmp_path}  (QEMU {q['major']}.{q['minor']}.{q['micro']}, "
            f"peer pid {qmp.pid}, run state {status['status']})"
        )
        print("\nmemory backends:")
        for m in memdevs:
            print(f"  {m.get('id', '?'):<12} {_size(m['size']):>9}  share={m.get('share')}")
        print("\nvirtio-mem devices:")
        print(
            f"  {'id':<8} {'memaddr':>14} {'block':>7} {'plugged':>9} {'requested':>9} "
            f"{'max':>9}  memdev"
        )
        for d in devices:
            if d.get("type") != "virtio-mem":
                continue
            v = d["data"]
            print(
                f"  {v['id']:<8} {v['memaddr']:>#14x} {_size(v['block-size']):>7} "
                f"{_size(v['size']):>9} {_size(v['requested-size']):>9} "
                f"{_size(v['max-size']):>9}  {v['memdev']}"
            )
        if args.keep:
            print(f"\nthe VM keeps running; QMP for qmpdump: {vm.qmp_path}. Ctrl-C stops it.")
            await vm.proc.wait()
    print("\ndemo VM stopped and its files removed.")
    return 0
