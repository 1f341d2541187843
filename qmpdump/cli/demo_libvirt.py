"""The demo's libvirt part: the daemon serving a libvirt domain it finds by itself.

1. Start a private libvirtd as the tests do (:class:`~qmpdump.testbed.libvirtd.Libvirtd`: a
   mount namespace with its own ``qemu.conf``; nothing installed or changed in ``/etc``) and boot
   a TCG domain with memfd memory and a virtio-mem device.
2. Start the daemon with one ``[[libvirt]]`` section (supported monitor mode: no taint); the
   domain appears as a VM named after it.
3. Map it and dump it through the daemon (QEMU's engine through libvirt's dump API).
4. Stop the daemon, destroy the domain and stop libvirtd, by pid, whatever happened.

Skipped, with the reason, where the libvirt tier can't run (libvirt not installed, not root, a
libvirtd of the host already running).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from qmpdump.errors import QmpdumpError, Unavailable
from qmpdump.service.client import ApiClient
from qmpdump.testbed.libvirtd import (
    SYSTEM_SOCKET,
    DomainSpec,
    Libvirtd,
    libvirt_available,
    system_libvirtd_answers,
)
from qmpdump.testbed.vm import GiB, MiB

__all__ = ["DOMAIN", "run_libvirt_part"]

DOMAIN = "qmpdump-demo-lv"


def _say(text: str) -> None:
    print(text, flush=True)


async def _cli(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qmpdump.cli.main", *args)
    return await proc.wait()


def _config(folder: Path) -> Path:
    path = folder / "qmpdump.toml"
    path.write_text(
        "[daemon]\n"
        f'api_socket = "{folder / "api.sock"}"\n'
        f'dump_dir = "{folder / "dumps"}"\n'
        f'state_dir = "{folder / "state"}"\n'
        "reconnect_min_s = 0.2\n"
        "[[libvirt]]\n"
        'uri = "qemu:///system"\n'
        f'domains = ["{DOMAIN}"]\n'
        'monitor = "supported"\n'
    )
    return path


async def _wait_vm(socket: Path, daemon: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    while True:
        if daemon.returncode is not None:
            raise Unavailable(f"the daemon exited with code {daemon.returncode}")
        try:
            async with ApiClient(socket, timeout_s=5) as api:
                views = {v.name: v for v in await api.vms()}
                if DOMAIN in views and views[DOMAIN].connection == "connected":
                    return
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            raise Unavailable(f"the daemon did not list domain {DOMAIN} within 60 s")
        await asyncio.sleep(0.2)


def _why_not() -> str | None:
    reason = libvirt_available()
    if reason is None and system_libvirtd_answers():
        reason = f"a libvirtd already answers on {SYSTEM_SOCKET} (the demo starts its own)"
    return reason


async def run_libvirt_part(folder: Path, step: int) -> int:
    """Run the libvirt part in ``folder``; its exit code (0 when skipped)."""
    reason = _why_not()
    if reason is not None:
        _say(f"\n{step}. libvirt part skipped: {reason}")
        return 0
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _say(f"\n{step}. a libvirt host: a private libvirtd and a TCG domain ({DOMAIN}) ...")
    t0 = time.monotonic()
    libvirtd = Libvirtd()
    try:
        await asyncio.to_thread(libvirtd.start)
        # sizes that tell the backends apart in QEMU's mappings (the supported map finds them
        # by size)
        spec = DomainSpec(
            name=DOMAIN, ram_size=1 * GiB, virtio_mem_size=2 * GiB, virtio_mem_requested=256 * MiB
        )
        domain = await libvirtd.boot(spec)
        _say(
            f"   libvirtd pid {libvirtd.pid}, domain up in {time.monotonic() - t0:.1f} s "
            f"(QEMU pid {domain.pid}, started by libvirt; no QMP socket of ours)\n"
        )
        return await _serve(folder)
    except QmpdumpError as err:
        _say(f"   the libvirt part failed: {err}")
        return err.exit_code
    finally:
        await asyncio.to_thread(libvirtd.stop)  # destroys the domain, stops libvirtd by pid
        _say("   domain destroyed, libvirtd stopped.")


async def _serve(folder: Path) -> int:
    config = _config(folder)
    socket = folder / "api.sock"
    _say(f"   the daemon with a [[libvirt]] section (monitor supported: no taint): {config}")
    with (folder / "daemon.log").open("wb") as log:
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
        try:
            await _wait_vm(socket, daemon)
            await _cli("vms", "--socket", str(socket))
            _say(f"\n   `qmpdump map --libvirt {DOMAIN}` (the domain XML plus host facts):")
            code = await _cli("map", "--libvirt", DOMAIN)
            _say(f"   `qmpdump request {DOMAIN} --wait` (QEMU's dump through libvirt's API):")
            code = code or await _cli("request", DOMAIN, "--wait", "--socket", str(socket))
            await _cli("dumps", "--vm", DOMAIN, "--socket", str(socket))
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.wait(), 60)
            except TimeoutError:
                os.kill(daemon.pid, signal.SIGKILL)
                await daemon.wait()
    _say(f"   daemon stopped (exit {daemon.returncode}); its dump and log: {folder}")
    return code or daemon.returncode or 0
