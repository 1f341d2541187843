"""``qmpdump demo``: the whole mission, end to end, on a built-in demo VM.

1. Boot the demo VM: a real QEMU guest from :mod:`qmpdump.testbed` (Debian's kernel, memfd main
   RAM split below and above 4 GiB, a virtio-mem device whose memory the guest's driver plugs,
   a known pattern written by the guest).
2. Show its memory map (``qmpdump map``) and write its picture (SVG).
3. Start the daemon on a private socket, with the VM in its configuration.
4. Request a dump with the CLI (a progress bar on a terminal), then QEMU's own dump of the same
   VM, and list both with their sizes and times.
5. Stop the daemon (SIGTERM) and the VM. The dumps and the picture stay in the demo folder.
6. A libvirt host (:mod:`qmpdump.cli.demo_libvirt`): a private libvirtd, a domain, the daemon
   with a ``[[libvirt]]`` section dumping it; everything stopped again (``--no-libvirt``
   skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from qmpdump.cli.map_command import render_text
from qmpdump.errors import Unavailable
from qmpdump.mapsvg import render_svg
from qmpdump.qmp.session import QMPSession
from qmpdump.service.client import ApiClient
from qmpdump.sizes import format_size
from qmpdump.survey import survey
from qmpdump.testbed.guest import cache_dir
from qmpdump.testbed.qemus import BUILD_ENV, QemuBuild, default_build
from qmpdump.testbed.vm import VM, Backend, GiB, MiB, VirtioMemSpec, VMSpec, launch

DEMO_VM = VMSpec(
    name="qmpdump-demo",
    machine="q35",
    ram_backend=Backend.MEMFD,
    ram_size=1 * GiB,
    below_4g=512 * MiB,
    virtio_mem=(
        VirtioMemSpec(id="vmem0", backend=Backend.FILE, max_size=2 * GiB, requested_size=512 * MiB),
    ),
    pattern_mib=128,
    qemu=QemuBuild.SYSTEM_7_2,  # replaced by --qemu (or $QMPDUMP_QEMU_BUILD) at run time
)


def add_parser(commands: Any) -> None:
    """Register ``demo``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="the whole job end to end on a built-in demo VM",
        description="Boot a demo VM, map its memory, run the daemon, dump the VM with the "
        "sparse reader and with QEMU, and compare.",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="demo folder (default: ~/.cache/qmpdump/demo)"
    )
    parser.add_argument(
        "--qemu",
        type=QemuBuild,
        choices=list(QemuBuild),
        default=None,
        help=f"QEMU to run the demo VM on: Debian's 7.2 or bookworm-backports' 10.0 (fetched "
        f"into the cache on first use; default: ${BUILD_ENV} or 7.2)",
    )
    parser.add_argument(
        "--no-libvirt",
        action="store_true",
        help="skip the libvirt part (a private libvirtd, a domain, the daemon dumping it)",
    )
    parser.set_defaults(run=run)


def _say(text: str) -> None:
    print(text, flush=True)


async def _cli(*args: str) -> int:
    """Run the qmpdump CLI as an operator would, sharing this terminal."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qmpdump.cli.main", *args)
    return await proc.wait()


def _config(folder: Path, vm: VM) -> Path:
    path = folder / "qmpdump.toml"
    path.write_text(
        "[daemon]\n"
        f'api_socket = "{folder / "api.sock"}"\n'
        f'dump_dir = "{folder / "dumps"}"\n'
        f'state_dir = "{folder / "state"}"\n'
        "max_concurrent_dumps = 1\n"
        "reconnect_min_s = 0.2\n"
        "[[vm]]\n"
        'name = "demo"\n'
        f'qmp = "{vm.qmp_path}"\n'
    )
    return path


async def _wait_healthy(socket: Path, daemon: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    while True:
        if daemon.returncode is not None:
            raise Unavailable(f"the daemon exited with code {daemon.returncode}")
        try:
            async with ApiClient(socket, timeout_s=5) as api:
                view = await api.vm("demo")
                if view.connection == "connected":
                    return
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            raise Unavailable("the daemon did not connect to the demo VM within 30 s")
        await asyncio.sleep(0.2)


async def _show_map(vm: VM, folder: Path) -> None:
    async with QMPSession(str(vm.qmp_path)) as qmp:
        result = await survey(qmp, exact_plug=True)
    picture = folder / "memory-map.svg"
    picture.write_text(render_svg(result.report()))
    _say(render_text(result, ascii_only=not (sys.stdout.encoding or "").lower().startswith("utf")))
    _say(f"picture of this map: {picture}\n")


async def _compare(socket: Path) -> None:
    async with ApiClient(socket) as api:
        jobs = {j.id: j for j in await api.jobs(vm="demo")}
        dumps = await api.dumps(vm="demo")
    _say(f"\n{'engine':<8} {'file':<42} {'size':>10} {'dump time':>10} {'VM paused':>10}")
    for d in dumps:
        job = jobs.get(d.job_id or "")
        if job is None or job.result is None or job.started is None or job.ended is None:
            continue
        took = _seconds(job.ended) - _seconds(job.started)
        paused = "-" if job.result.paused_s is None else f"{job.result.paused_s:.2f} s"
        _say(
            f"{job.result.engine:<8} {d.file:<42} {format_size(d.size):>10} {took:>8.1f} s "
            f"{paused:>10}"
        )


def _seconds(iso: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(iso).timestamp()


async def run(args: argparse.Namespace) -> int:
    """Boot, map, serve, dump twice, compare, stop."""
    folder: Path = args.dir or cache_dir() / "demo"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, mode=0o700)
    spec = dataclasses.replace(DEMO_VM, qemu=args.qemu or default_build())
    _say(f"1. booting the demo VM (QEMU {spec.qemu}, Debian kernel, virtio-mem) ...")
    t0 = time.monotonic()
    async with launch(spec) as vm:
        _say(
            f"   up, memory plugged, pattern written in {time.monotonic() - t0:.1f} s "
            f"(QEMU pid {vm.pid})\n"
        )
        _say("2. its memory, as `qmpdump map --exact-plug` sees it:\n")
        await _show_map(vm, folder)

        _say("3. starting the daemon (qmpdump daemon) ...")
        config = _config(folder, vm)
        log = (folder / "daemon.log").open("wb")
        daemon = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "qmpdump.cli.main",
            "daemon",
            "--config",
            str(config),
            stdout=log,
            stderr=log,
        )
        socket = folder / "api.sock"
        try:
            await _wait_healthy(socket, daemon)
            _say(f"   serving on {socket}\n")
            await _cli("vms", "--socket", str(socket))
            _say("\n4. `qmpdump request demo --wait` (the sparse reader: populated memory only)")
            code = await _cli("request", "demo", "--wait", "--socket", str(socket))
            _say("\n   and QEMU's own dump of the same VM, for comparison:")
            code = code or await _cli(
                "request", "demo", "--engine", "qemu", "--wait", "--socket", str(socket)
            )
            _say("\n   `qmpdump dumps`:")
            await _cli("dumps", "--socket", str(socket))
            await _compare(socket)
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.wait(), 60)
            except TimeoutError:
                os.kill(daemon.pid, signal.SIGKILL)
                await daemon.wait()
            log.close()
    _say(
        f"\n5. daemon stopped (exit {daemon.returncode}), VM stopped. "
        f"Dumps, sidecars, picture and log: {folder}"
    )
    code = code or daemon.returncode or 0
    if not args.no_libvirt:
        from qmpdump.cli.demo_libvirt import run_libvirt_part  # noqa: PLC0415

        code = code or await run_libvirt_part(folder / "libvirt", 6)
    return code
