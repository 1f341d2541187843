"""Benchmark: the daemon's API latency while QEMU's engine dumps (issue 11, item 12).

A bare 2 GiB VM (memfd RAM; QEMU's engine reads all of it), a real ``qmpdump daemon`` and
``GET /healthz`` at a fixed rate over the UNIX socket: latency percentiles while idle, then while
a QEMU-engine dump runs, in the same run (the machine is shared: compare the two, not absolute
numbers). With ``PYTHONASYNCIODEBUG=1`` in the daemon, asyncio logs any callback that holds the
loop for more than 100 ms: those lines are printed too (none means nothing blocks the loop).

Run from the repository root: ``.venv/bin/python bench/loop_latency.py [--rate 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qmpdump.engines.spec import EngineName
from qmpdump.errors import Unavailable
from qmpdump.service.client import ApiClient
from qmpdump.service.views import DumpRequest
from qmpdump.testbed.vm import Backend, GiB, VMSpec, launch

QMPDUMP = str(Path(sys.executable).parent / "qmpdump")


def percentiles(samples: list[float]) -> str:
    xs = sorted(samples)
    if not xs:
        return "no samples"

    def at(q: float) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000

    return f"p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, max {xs[-1] * 1000:.1f} ms (n={len(xs)})"


async def poll(api: ApiClient, rate: float, out: list[float], stop: asyncio.Event) -> None:
    period = 1.0 / rate
    while not stop.is_set():
        t0 = time.monotonic()
        await api.health()
        out.append(time.monotonic() - t0)
        await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))


async def wait_connected(api: ApiClient) -> None:
    """Until the daemon answers and has its VM connected."""
    for _ in range(600):
        with contextlib.suppress(Unavailable):
            if (await api.health()).connected:
                return
        await asyncio.sleep(0.1)
    raise SystemExit("the daemon did not connect its VM within 60 s")


async def wait_finished(api: ApiClient, job_id: str) -> None:
    """Until the job has ended."""
    while True:
        if (await api.job(job_id)).state not in ("queued", "running"):
            return
        await asyncio.sleep(0.2)


async def main(rate: float) -> None:
    spec = VMSpec(name="latency", guest=False, ram_size=2 * GiB, ram_backend=Backend.MEMFD)
    with tempfile.TemporaryDirectory(prefix="qmpdump-bench-") as tmp:
        root = Path(tmp)
        async with launch(spec) as vm:
            config = root / "qmpdump.toml"
            config.write_text(
                "[daemon]\n"
                f'api_socket = "{root / "api.sock"}"\n'
                f'dump_dir = "{root / "dumps"}"\n'
                f'state_dir = "{root / "state"}"\n'
                "watchdog = false\n\n"
                f'[[vm]]\nname = "l"\nqmp = "{vm.qmp_path}"\n'
            )
            log = (root / "daemon.log").open("w")
            proc = await asyncio.create_subprocess_exec(
                QMPDUMP,
                "daemon",
                "--config",
                str(config),
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONASYNCIODEBUG": "1"},
            )
            api = ApiClient(root / "api.sock", timeout_s=30)
            try:
                await wait_connected(api)
                for phase in ("idle", "dump"):
                    samples: list[float] = []
                    stop = asyncio.Event()
                    poller = asyncio.create_task(poll(api, rate, samples, stop))
                    if phase == "idle":
                        await asyncio.sleep(3)
                    else:
                        job = await api.request("l", DumpRequest(engine=EngineName.QEMU))
                        await wait_finished(api, job.id)
                    stop.set()
                    await poller
                    print(f"{phase:5s} at {rate:g} req/s: {percentiles(samples)}")
            finally:
                await api.close()
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
                log.close()
            slow = [
                line
                for line in (root / "daemon.log").read_text().splitlines()
                if "took" in line and "Executing" in line
            ]
            print(f"callbacks holding the loop > 100 ms: {len(slow)}")
            for line in slow:
                print("  " + line[:300])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    asyncio.run(main(parser.parse_args().rate))
