"""Benchmark: a dump streamed to S3 (``dump --to``) against a plain multipart upload of a file
of the same size, and against dumping first and uploading after, to the same server, in one run.

Server: SeaweedFS ``weed mini`` on loopback (:class:`qmpdump.testbed.s3server.S3Server`), data
in a temporary folder. Source: the reference VM of ``bench/engines.py`` (``shared/FACTS.md``),
stopped. Alternating, ``--repeat`` times (medians):

1. streamed: :func:`qmpdump.sinks.deliver.dump_to_s3` with the backend engine, from the bucket
   check to the sidecar stored and the spool removed; parts go while the engine writes;
2. dump then upload: the same engine into a local file, then a plain upload of that file (what
   the s3 path did before it streamed, without its metadata and sidecar);
3. plain upload: a multipart upload of a local file of the same size (a dump of the same VM,
   made once before), with the same client settings (part size, parts in flight) and nothing
   else: no dump, no hashing, no metadata, no sidecar.

Targets: streamed at most 1.2x the plain upload (issue 12), and below dump-then-upload. Also
printed: the streamed path's tail (from the end of the dump to the sidecar stored), the parts
sent before the dump ended, and the growth of this process's peak RSS over the run (bounded:
part size x parts in flight). The machine is shared: compare the ratios, not the absolute times.

Run from the repository root: ``.venv/bin/python bench/s3_upload.py [--repeat N]``.
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

from qmpdump.engines.base import ProgressCallback
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


def lower_priority(pid: int, nice: int) -> None:
    """Renice every thread of ``pid`` (Linux nices threads, and Go's new threads inherit
    their creator's): the server then takes CPU the dump leaves, as a remote store would."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


async def main(
    pattern_mib: int, repeat: int, part_mib: int, in_flight: int, server_nice: int = 0
) -> int:
    spec = dataclasses.replace(REFERENCE, pattern_mib=pattern_mib)
    settings = S3Settings(part_size=part_mib * MiB, max_in_flight=in_flight)
    location = S3Location("dumps", "bench/")
    rounds: list[Round] = []
    with S3Server(buckets=("dumps",)) as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(server.env())
        if server_nice and server.proc is not None:
            lower_priority(server.proc.pid, server_nice)
        work = Path(tmp)
        print(f"S3: weed mini at {server.endpoint}; booting the reference VM ...", flush=True)
        async with launch(spec) as vm:
            assert vm.qmp is not None
            await vm.qmp.execute("stop")
            async with QMPSession(str(vm.qmp_path)) as session:

                async def write(target: Path, tap: ProgressCallback | None = None) -> DumpOutcome:
                    return await run_dump(
                        session, target, DumpSpec(engine=EngineName.BACKEND), progress=tap
                    )

                reference = await write(work / "reference.elf")
                size = reference.size
                print(f"dump size {size / MiB:.0f} MiB; {repeat} rounds, alternating", flush=True)
                rss_before = peak_rss()
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
                        streamed = time.monotonic() - t0
                        await client.delete_object(Bucket="dumps", Key=done.stored.key)
                        await client.delete_object(Bucket="dumps", Key=done.stored.sidecar_key)

                        t0 = time.monotonic()
                        local = await write(work / f"local-{i}.elf")
                        t1 = time.monotonic()
                        await plain_upload(client, local.path, f"after/{i}.elf", settings)
                        t2 = time.monotonic()
                        local.path.unlink()
                        local.sidecar.unlink()
                        await client.delete_object(Bucket="dumps", Key=f"after/{i}.elf")

                        t3 = time.monotonic()
                        await plain_upload(client, reference.path, f"plain/{i}.elf", settings)
                        plain = time.monotonic() - t3
                        await client.delete_object(Bucket="dumps", Key=f"plain/{i}.elf")
                        rounds.append(
                            Round(
                                streamed=streamed,
                                streamed_dump=done.dump.duration_s,
                                tail=done.upload_s,
                                early_parts=done.stored.early_parts,
                                parts=done.stored.parts,
                                dump=t1 - t0,
                                upload_after=t2 - t1,
                                plain=plain,
                            )
                        )
                        r = rounds[-1]
                        print(
                            f"  round {i + 1}: streamed {r.streamed:.2f} s (dump "
                            f"{r.streamed_dump:.2f}, tail {r.tail:.2f}, {r.early_parts} of "
                            f"{r.parts} parts before the dump ended); dump then upload "
                            f"{r.dump:.2f} + {r.upload_after:.2f} s; plain upload {r.plain:.2f} s",
                            flush=True,
                        )
                rss_growth = peak_rss() - rss_before
            await vm.qmp.execute("cont")
    report(size, rounds)
    print(
        f"peak RSS growth {rss_growth / MiB:.0f} MiB ({part_mib} MiB parts, {in_flight} in flight)"
    )
    return 0


@dataclasses.dataclass(frozen=True)
class Round:
    """One round's wall times (s): the three ways, one after the other."""

    streamed: float
    streamed_dump: float
    tail: float
    early_parts: int
    parts: int
    dump: float
    upload_after: float
    plain: float

    @property
    def dump_then_upload(self) -> float:
        return self.dump + self.upload_after


def report(size: int, rounds: list[Round]) -> None:
    """The table (medians) and the ratios, also per round (rounds alternate: noise cancels)."""
    median = statistics.median

    def med(values: list[float]) -> float:
        return median(values)

    streamed = med([r.streamed for r in rounds])
    after = med([r.dump_then_upload for r in rounds])
    plain = med([r.plain for r in rounds])
    mb = size / 1e6
    print()
    print(f"| way | wall s (median of {len(rounds)}) | MB/s |")
    print("| --- | ---: | ---: |")
    print(
        f"| plain multipart upload of the {size / MiB:.0f} MiB dump | {plain:.2f} "
        f"| {mb / plain:.0f} |"
    )
    print(f"| dump, then upload | {after:.2f} | {mb / after:.0f} |")
    print(f"|   of which the dump | {med([r.dump for r in rounds]):.2f} | |")
    print(f"| streamed (backend, --to) | {streamed:.2f} | {mb / streamed:.0f} |")
    print(f"|   of which the dump | {med([r.streamed_dump for r in rounds]):.2f} | |")
    print(f"|   after the dump ended | {med([r.tail for r in rounds]):.2f} | |")
    print()
    for label, ratio, pairs, target in (
        (
            "streamed / plain upload",
            streamed / plain,
            [(r.streamed, r.plain) for r in rounds],
            1.2,
        ),
        (
            "streamed / dump then upload",
            streamed / after,
            [(r.streamed, r.dump_then_upload) for r in rounds],
            1.0,
        ),
    ):
        verdict = "ok" if ratio <= target else "MISSED"
        each = ", ".join(f"{a / b:.2f}" for a, b in pairs)
        print(f"{label}: {ratio:.2f}x (target <= {target}x: {verdict}; per round {each})")
    early = ", ".join(f"{r.early_parts}/{r.parts}" for r in rounds)
    print(f"parts stored before the dump ended, per round: {early}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern-mib", type=int, default=REFERENCE.pattern_mib)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="renice the S3 server (19: it yields the CPU to the dump, like a remote store)",
    )
    args = parser.parse_args()
    sys.exit(
        asyncio.run(
            main(args.pattern_mib, args.repeat, args.part_mib, args.in_flight, args.server_nice)
        )
    )
