"""A real ``libvirtd`` for the tests and the demo, started by hand, and TCG domains on it.

No systemd and nothing changed in ``/etc``: libvirtd runs in a private mount namespace
(``unshare --mount``) in which a private folder is bind-mounted over ``/etc/libvirt``, holding
our ``libvirtd.conf`` and ``qemu.conf``. As root, libvirtd ignores ``XDG_*`` (it takes its
system paths; only ``--config`` and ``--pid-file`` move) and its QEMU driver reads
``/etc/libvirt/qemu.conf`` whatever the options, so a mount namespace is the one way to give it a
configuration of its own. Runtime state stays in the system paths (``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``), as on any libvirt host: ``qemu:///system`` reaches
it, and QEMU's pid file is ``/run/libvirt/qemu/NAME.pid``. The configuration follows
``shared/FACTS.md`` ("libvirt by hand, no systemd"): QEMU as root, no security driver, no
namespaces, no cgroup controllers, serial output straight to files.

:class:`Libvirtd` refuses to start when another libvirtd already answers on the system socket,
and :meth:`Libvirtd.stop` destroys every domain it still runs, then stops libvirtd by pid.
:func:`domain_xml` (pure) describes a transient TCG domain that boots the test guest
(:mod:`qmpdump.testbed.guest`) with memfd memory, a NUMA cell, ``<maxMemory slots>``, a
virtio-mem device and vmcoreinfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from qmpdump.errors import GuestTimeout, LaunchError, TestbedError
from qmpdump.testbed.guest import GuestImage, build_guest
from qmpdump.testbed.vm import READY_MARKER, GiB, MiB

__all__ = [
    "SYSTEM_SOCKET",
    "DomainSpec",
    "Libvirtd",
    "TestDomain",
    "domain_xml",
    "libvirt_available",
    "system_libvirtd_answers",
]

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
SYSTEM_URI = "qemu:///system"
#: Folders libvirtd expects and (without its Debian packaging) does not make itself.
STATE_DIRS = (
    Path("/var/log/libvirt/qemu"),
    Path("/run/libvirt"),
    Path("/var/lib/libvirt/qemu"),
    Path("/var/cache/libvirt"),
)

QEMU_CONF = """\
# qmpdump's test libvirtd (see qmpdump/testbed/libvirtd.py)
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
remember_owner = 0
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
"""


def libvirt_available() -> str | None:
    """Why real-libvirt tests cannot run here, or None when they can."""
    if shutil.which("libvirtd") is None:
        return "libvirtd is not installed (scripts/setup.sh installs it)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        import libvirt  # noqa: F401, PLC0415 - only to tell whether the extra is there
    except ImportError:
        return "libvirt-python is not installed (pip install 'qmpdump[libvirt]')"
    if os.geteuid() != 0:
        return "the test libvirtd runs as root"
    return None


def system_libvirtd_answers() -> bool:
    """Whether a libvirtd (the host's, or another test's) answers on the system socket."""
    return _socket_answers(SYSTEM_SOCKET)


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class Libvirtd:
    """A libvirtd of our own; use ``with Libvirtd() as daemon`` or :meth:`start`/:meth:`stop`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qmpdump-libvirtd-"))
        self.uri = SYSTEM_URI
        self.proc: subprocess.Popen[bytes] | None = None
        #: domains started through :meth:`create`, by name (destroyed by :meth:`stop`)
        self.domains: dict[str, TestDomain] = {}

    @property
    def log_path(self) -> Path:
        """libvirtd's own log (stderr)."""
        return self.root / "libvirtd.log"

    @property
    def pid(self) -> int | None:
        """libvirtd's pid while it runs."""
        return None if self.proc is None else self.proc.pid

    def log_text(self) -> str:
        """What libvirtd wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout_s: float = 30.0) -> None:
        """Start libvirtd and wait until it serves ``qemu:///system``."""
        if _socket_answers(SYSTEM_SOCKET):
            raise TestbedError(f"a libvirtd already answers on {SYSTEM_SOCKET}; not starting ours")
        etc = self.root / "etc"
        etc.mkdir(mode=0o700)
        for name in ("libvirt.conf", "libvirt-admin.conf"):
            if (Path("/etc/libvirt") / name).exists():
                shutil.copy(Path("/etc/libvirt") / name, etc / name)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        for folder in STATE_DIRS:
            folder.mkdir(parents=True, exist_ok=True)
        Path("/etc/libvirt").mkdir(exist_ok=True)
        # unshare and sh exec into libvirtd: self.proc.pid is libvirtd's pid.
        script = (
            f"mount --bind {etc} /etc/libvirt && exec libvirtd "
            f"--config /etc/libvirt/libvirtd.conf --pid-file {self.root / 'libvirtd.pid'}"
        )
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        try:
            while not _socket_answers(SYSTEM_SOCKET):
                if self.proc.poll() is not None:
                    raise LaunchError(
                        "libvirtd exited",
                        exit_code=self.proc.returncode,
                        argv=argv,
                        log=self.log_text(),
                    )
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"libvirtd did not open {SYSTEM_SOCKET} within {timeout_s:g} s",
                        exit_code=None,
                        argv=argv,
                        log=self.log_text(),
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def connect(self) -> Any:
        """A new libvirt connection (``libvirt.virConnect``) to this daemon."""
        import libvirt  # noqa: PLC0415 - optional extra

        return libvirt.open(self.uri)

    def virsh(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS`` (no check: callers look at the result)."""
        return subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )

    def create(self, spec: DomainSpec) -> TestDomain:
        """Define and start a transient domain (not waiting for its guest; see :meth:`boot`)."""
        image = build_guest() if spec.guest else None
        run_dir = Path(tempfile.mkdtemp(prefix=f"qmpdump-dom-{spec.name}-", dir=self.root))
        serial = run_dir / "serial.log"
        xml = domain_xml(spec, image, serial)
        (run_dir / "domain.xml").write_text(xml)
        done = self.virsh("create", str(run_dir / "domain.xml"))
        if done.returncode != 0:
            raise LaunchError(
                f"virsh create of {spec.name} failed: {done.stderr.strip()}",
                exit_code=done.returncode,
                argv=["virsh", "create"],
                log=xml,
            )
        domain = TestDomain(self, spec, run_dir, serial)
        self.domains[spec.name] = domain
        domain.pid = domain.read_pid()
        return domain

    async def boot(self, spec: DomainSpec) -> TestDomain:
        """Create a domain and wait until its guest is ready and its virtio-mem plugged."""
        domain = await asyncio.to_thread(self.create, spec)
        try:
            await domain.wait_ready()
        except BaseException:
            domain.destroy()
            raise
        return domain

    def stop(self, timeout_s: float = 15.0) -> None:
        """Destroy our domains, stop libvirtd by pid and remove our folder. Idempotent."""
        for domain in list(self.domains.values()):
            domain.destroy()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """A test domain, described by what matters to memory dumps."""

    name: str
    ram_size: int = 1 * GiB
    #: ``memfd``, ``file`` (libvirt's memory_backing_dir) or ``anonymous``
    memory_source: str = "memfd"
    shared: bool = True
    #: virtio-mem maximum size; 0 for no virtio-mem device
    virtio_mem_size: int = 2 * GiB
    virtio_mem_requested: int = 256 * MiB
    virtio_mem_block: int = 2 * MiB
    cpus: int = 2
    pattern_mib: int = 32
    guest: bool = True
    boot_timeout_s: float = 180.0
    #: an extra QMP socket of QEMU's own (``<qemu:commandline>``; libvirt taints the domain
    #: ``custom-argv``), to compare libvirt's paths with a direct socket on the same VM
    extra_qmp: Path | None = None


def _kib(n: int) -> str:
    return str(n // 1024)


def _emulator() -> str:
    # the system's QEMU (Debian's 7.2), as libvirt would pick it: an unpacked build needs -L
    # options that a domain XML does not give
    return shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def domain_xml(spec: DomainSpec, image: GuestImage | None, serial_log: Path) -> str:
    """A transient ``<domain type='qemu'>`` for the spec (pure: paths in, text out)."""
    total = spec.ram_size + spec.virtio_mem_size
    source = "" if spec.memory_source == "anonymous" else f"<source type='{spec.memory_source}'/>"
    access = "shared" if spec.shared else "private"
    os_boot = ""
    if image is not None:
        cmdline = (
            "console=ttyS0 memhp_default_state=online_movable quiet panic=-1 "
            f"qmpdump.pattern_mib={spec.pattern_mib}"
        )
        os_boot = (
            f"<kernel>{escape(str(image.kernel))}</kernel>"
            f"<initrd>{escape(str(image.initrd))}</initrd><cmdline>{escape(cmdline)}</cmdline>"
        )
    vmem = ""
    max_memory = ""
    if spec.virtio_mem_size:
        max_memory = f"<maxMemory slots='2' unit='KiB'>{_kib(total)}</maxMemory>"
        vmem = (
            "<memory model='virtio-mem'><target>"
            f"<size unit='KiB'>{_kib(spec.virtio_mem_size)}</size><node>0</node>"
            f"<block unit='KiB'>{_kib(spec.virtio_mem_block)}</block>"
            f"<requested unit='KiB'>{_kib(spec.virtio_mem_requested)}</requested>"
            "</target></memory>"
        )
    extra = ""
    if spec.extra_qmp is not None:
        extra = (
            "<qemu:commandline><qemu:arg value='-qmp'/>"
            f"<qemu:arg value={quoteattr(f'unix:{spec.extra_qmp},server=on,wait=off')}/>"
            "</qemu:commandline>"
        )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  {max_memory}
  <memory unit='KiB'>{_kib(total)}</memory>
  <currentMemory unit='KiB'>{_kib(spec.ram_size)}</currentMemory>
  <memoryBacking>{source}<access mode='{access}'/></memoryBacking>
  <vcpu>{spec.cpus}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{os_boot}</os>
  <features><acpi/><vmcoreinfo state='on'/></features>
  <cpu mode='maximum' migratable='off'><numa>
    <cell id='0' cpus='0-{spec.cpus - 1}' memory='{_kib(spec.ram_size)}' unit='KiB'/>
  </numa></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(_emulator())}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path={quoteattr(str(serial_log))}/><target port='0'/></serial>
    <memballoon model='none'/>
    {vmem}
  </devices>
  {extra}
</domain>
"""


class TestDomain:
    """A domain started by :class:`Libvirtd`; :meth:`destroy` is idempotent."""

    __test__ = False  # not a pytest test class

    def __init__(self, daemon: Libvirtd, spec: DomainSpec, run_dir: Path, serial: Path) -> None:
        self.daemon = daemon
        self.spec = spec
        self.name = spec.name
        self.run_dir = run_dir
        self.serial = serial
        self.pid: int | None = None
        self._destroyed = False

    def read_pid(self) -> int | None:
        """QEMU's pid from libvirt's pid file."""
        try:
            return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def serial_text(self) -> str:
        """What the guest printed on its serial console."""
        try:
            return self.serial.read_text(errors="replace")
        except OSError:
            return ""

    def state(self) -> str:
        """``virsh domstate`` (running, paused, shut off, ...)."""
        return self.daemon.virsh("domstate", self.name).stdout.strip()

    def plugged(self) -> int | None:
        """The virtio-mem device's current plugged size from the live XML (bytes)."""
        import xml.etree.ElementTree as ET  # noqa: PLC0415 - libvirt's own XML

        xml = self.daemon.virsh("dumpxml", self.name).stdout
        if not xml:
            return None
        node = ET.fromstring(xml).find("./devices/memory[@model='virtio-mem']/target/current")  # noqa: S314
        return None if node is None or node.text is None else int(node.text) * 1024

    async def wait_ready(self) -> None:
        """Wait for the guest's READY line and the virtio-mem device's requested size."""
        deadline = time.monotonic() + self.spec.boot_timeout_s
        while READY_MARKER not in self.serial_text():
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    f"domain {self.name}: guest boot",
                    self.spec.boot_timeout_s,
                    self.serial_text()[-2000:],
                )
            await asyncio.sleep(0.2)
        if self.spec.virtio_mem_size:
            while await asyncio.to_thread(self.plugged) != self.spec.virtio_mem_requested:
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"domain {self.name}: virtio-mem plug", 0)
                await asyncio.sleep(0.2)

    def destroy(self) -> None:
        """``virsh destroy``; QEMU killed by pid if it is still there. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        self.daemon.domains.pop(self.name, None)
        if self.daemon.proc is not None:
            self.daemon.virsh("destroy", self.name, timeout_s=60.0)
        if self.pid is not None and self._is_ours(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(self.pid)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _is_ours(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            f"guest={self.name},".encode() in b"".join(argv)
            or f"guest={self.name}".encode() in argv
        )

    @staticmethod
    def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
