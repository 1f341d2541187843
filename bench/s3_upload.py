"""Benchmark: a dump stored in S3 (``dump --to``) against a plain multipart upload of a file of
the same size, to the same server, in one run.

Server: SeaweedFS ``weed mini`` on loopback (:class:`qmpdump.testbed.s3server.S3Server`), data
in a temporary folder. Source: the reference VM of ``bench/engines.py`` (``shared/FACTS.md``),
stopped. Alternating, ``--repeat`` times (medians):

1. s3 path: :func:`qmpdump.sinks.deliver.dump_to_s3` with the backend engine, from the bucket
   check to the sidecar stored and the spool removed (dump into the spool, sha256, multipart
   upload of parts read back and hashed again, metadata, sidecar);
2. plain upload: a multipart upload of a local file of the same size (a dump of the same VM,
   made once before), with the same client settings (part size, parts in flight) and nothing
   else: no dump, no hashing, no metadata, no sidecar.

The target (issue 12): the s3 path at most 1.2x the plain upload. Also printed: the split of
the s3 path into dump and upload, and the growth of this process's peak RSS over the run
(bounded: part size x parts in flight). The machine is shared: compare the ratios, not the
absolute times.

Run from the repository root: ``.venv/bin/python bench/s3_upload.py [--pattern-mib N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import REFERENCE  # the reference VM of bench/engines.py

from qmpdump.engines.run import DumpOutcome, run_dump
from qmpdump.engines.spec import DumpSpec, EngineName
from qmpdump.qmp.session import QMPSession
from qmpdump.sinks.deliver import dump_to_s3
from qmpdump.sinks.s3 import S3Location, S3Settings, open_client
from qmpdump.testbed.s3server import S3Server
from qmpdump.testbed.vm import MiB, launch


def peak_rss() -> int:
    """This process's peak RSS in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def plain_upload(client: Any, path: Path, key: str, settings: S3Settings) -> None:
    """The baseline: create, parts (same size and concurrency), complete; nothing more."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    part_size = settings.part_size_for(size)
    created = await client.create_multipart_upload(Bucket="dumps", Key=key)
    upload_id = created["UploadId"]
    slots = asyncio.Semaphore(settings.max_in_flight)
    etags: dict[int, str] = {}

    async def send(number: int, data: bytes) -> None:
        try:
            reply = await client.upload_part(
                Bucket="dumps", Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
            etags[number] = reply["ETag"]
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for number, offset in enumerate(range(0, size, part_size), 1):
                await slots.acquire()
                data = await asyncio.to_thread(os.pread, fd, part_size, offset)
                group.create_task(send(number, data))
    finally:
        os.close(fd)
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
    await client.complete_multipart_upload(
        Bucket="dumps", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


async def main(pattern_mib: int, repeat: int, part_mib: int, in_flight: int) -> int:
    spec = dataclasses.replace(REFERENCE, pattern_mib=pattern_mib)
    settings = S3Settings(part_size=part_mib * MiB, max_in_flight=in_flight)
    location = S3Location("dumps", "bench/")
    with S3Server(buckets=("dumps",)) as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(server.env())
        work = Path(tmp)
        print(f"S3: weed mini at {server.endpoint}; booting the reference VM ...", flush=True)
        async with launch(spec) as vm:
            assert vm.qmp is not None
            await vm.qmp.execute("stop")
            async with QMPSession(str(vm.qmp_path)) as session:

                async def write(target: Path) -> DumpOutcome:
                    return await run_dump(session, target, DumpSpec(engine=EngineName.BACKEND))

                reference = await write(work / "reference.elf")
                size = reference.size
                print(f"dump size {size / MiB:.0f} MiB; {repeat} rounds, alternating", flush=True)
                rss_before = peak_rss()
                s3_walls: list[float] = []
                dump_walls: list[float] = []
                upload_walls: list[float] = []
                plain_walls: list[float] = []
                async with open_client(settings) as client:
                    for i in range(repeat):
                        t0 = time.monotonic()
                        done = await dump_to_s3(
                            write,
                            location=location,
                            name=f"vm-{i}.elf",
                            settings=settings,
                            spool_root=work,
                        )
                        s3_walls.append(time.monotonic() - t0)
                        dump_walls.append(done.dump.duration_s)
                        upload_walls.append(done.upload_s)
                        await client.delete_object(Bucket="dumps", Key=done.stored.key)
                        await client.delete_object(Bucket="dumps", Key=done.stored.sidecar_key)

                        t0 = time.monotonic()
                        await plain_upload(client, reference.path, f"plain/{i}.elf", settings)
                        plain_walls.append(time.monotonic() - t0)
                        await client.delete_object(Bucket="dumps", Key=f"plain/{i}.elf")
                        print(
                            f"  round {i + 1}: s3 path {s3_walls[-1]:.2f} s "
                            f"(dump {dump_walls[-1]:.2f} + upload {upload_walls[-1]:.2f}), "
                            f"plain upload {plain_walls[-1]:.2f} s",
                            flush=True,
                        )
                rss_growth = peak_rss() - rss_before
            await vm.qmp.execute("cont")
    report(size, s3_walls, dump_walls, upload_walls, plain_walls)
    print(
        f"peak RSS growth {rss_growth / MiB:.0f} MiB ({part_mib} MiB parts, {in_flight} in flight)"
    )
    return 0


def report(
    size: int,
    s3_walls: list[float],
    dump_walls: list[float],
    upload_walls: list[float],
    plain_walls: list[float],
) -> None:
    """The table (medians) and the ratios, also per round (rounds alternate: noise cancels)."""
    median = statistics.median
    s3, plain, upload = median(s3_walls), median(plain_walls), median(upload_walls)
    mb = size / 1e6
    print()
    print(f"| way | wall s (median of {len(s3_walls)}) | MB/s |")
    print("| --- | ---: | ---: |")
    print(
        f"| plain multipart upload of the {size / MiB:.0f} MiB dump | {plain:.2f} "
        f"| {mb / plain:.0f} |"
    )
    print(f"| s3 path: dump + upload (backend, --to) | {s3:.2f} | {mb / s3:.0f} |")
    print(f"|   of which the dump into the spool | {median(dump_walls):.2f} | |")
    print(
        f"|   of which the upload (parts, metadata, sidecar) | {upload:.2f} | {mb / upload:.0f} |"
    )
    print()
    for label, ratio, mine in (
        ("s3 path / plain upload", s3 / plain, s3_walls),
        ("upload alone / plain upload", upload / plain, upload_walls),
    ):
        verdict = "ok" if ratio <= 1.2 else "MISSED"
        each = ", ".join(f"{a / b:.2f}" for a, b in zip(mine, plain_walls, strict=True))
        print(f"{label}: {ratio:.2f}x (target <= 1.2x: {verdict}; per round {each})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern-mib", type=int, default=REFERENCE.pattern_mib)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.pattern_mib, args.repeat, args.part_mib, args.in_flight)))
