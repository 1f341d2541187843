"""Build and cache the test guest: Debian's 6.1 kernel and a busybox initramfs with virtio-mem.

Nothing is installed on the host. The kernel package (the ``-unsigned`` variant of whatever
``linux-image-amd64`` currently depends on) is fetched with ``apt-get download`` and unpacked with
``dpkg -x``; ``depmod`` indexes its modules and ``modprobe --show-depends`` gives the load order,
so a kernel update changes nothing here. The initramfs holds ``/bin/busybox`` from
busybox-static, those modules, :file:`init.sh`, and ``/bin/genstamp``: the consistency workload
(:file:`genstamp.c`, compiled here with the host's ``gcc -static -O2``), which the guest starts
when its command line asks for it (``qmpdump.writer_mib``).

The result lives under ``$XDG_CACHE_HOME/qmpdump`` (or ``~/.cache/qmpdump``), keyed by a hash of
every input, and is rebuilt only when one of them changes. A file lock makes concurrent builds
(two test workers, the demo and the tests) safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qmpdump.errors import GuestBuildError

__all__ = ["PATTERN_UNIT", "GuestImage", "build_guest", "cache_dir", "locked"]

#: The 16 bytes the guest repeats to fill its pattern file; 256 of them make one 4 KiB page.
PATTERN_UNIT = b"QMPDUMP-PATTERN\n"

#: Modules the guest needs; their dependencies are added in load order by modprobe.
WANTED_MODULES = ("virtio_mem", "virtio_pci", "qemu_fw_cfg")

BUSYBOX = Path("/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: kernel and initramfs paths and the kernel release."""

    kernel: Path
    initrd: Path
    release: str
    modules: tuple[str, ...]


def cache_dir() -> Path:
    """qmpdump's cache folder (``$XDG_CACHE_HOME/qmpdump`` or ``~/.cache/qmpdump``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qmpdump"


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise GuestBuildError(
            f"{argv[0]} is not installed; the README's set-up command installs it"
        ) from err
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed with exit code {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def _kernel_package() -> str:
    """The current Debian kernel image package, as ``linux-image-<release>-unsigned``."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = re.search(r"Depends:\s*(linux-image-[0-9][\w.+-]*)", out)
    if match is None:
        raise GuestBuildError(
            f"apt-cache names no kernel for {KERNEL_META_PACKAGE}; run 'apt-get update' first"
        )
    return f"{match.group(1)}-unsigned"


def _fetch_kernel_deb(downloads: Path) -> Path:
    """The kernel .deb in the cache, downloaded if not there yet."""
    override = os.environ.get("QMPDUMP_KERNEL_DEB")
    if override:
        return Path(override)
    downloads.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    found = sorted(downloads.glob(f"{package}_*.deb"))
    if not found:
        # apt's sandbox user cannot write to root's cache; the download is unsandboxed then.
        _run(["apt-get", "download", "-q", package], cwd=downloads)
        found = sorted(downloads.glob(f"{package}_*.deb"))
    if not found:
        raise GuestBuildError(f"apt-get download {package} left no .deb in {downloads}")
    return found[-1]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _init_template() -> str:
    return resources.files("qmpdump.testbed").joinpath("init.sh").read_text()


def _writer_source() -> str:
    return resources.files("qmpdump.testbed").joinpath("genstamp.c").read_text()


def _gcc_version() -> str:
    try:
        return _run(["gcc", "-dumpfullversion"]).strip()
    except GuestBuildError as err:
        raise GuestBuildError(f"gcc is needed to build the guest's writer: {err}") from err


def _build_writer(source: str, out: Path) -> None:
    """Compile the consistency writer, static (the guest has no libc)."""
    src = out.with_suffix(".c")
    src.write_text(source)
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src)])


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _module_order(root: Path, release: str) -> list[Path]:
    """Module files in load order, dependencies first, each once (from modprobe)."""
    _run(["depmod", "-b", str(root), release])
    ordered: list[Path] = []
    for name in WANTED_MODULES:
        out = _run(["modprobe", "-d", str(root), "-S", release, "--show-depends", name])
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in ordered:
                ordered.append(Path(parts[1]))
    if not ordered:
        raise GuestBuildError(f"no modules found for {', '.join(WANTED_MODULES)} in {release}")
    return ordered


def _write_cpio_newc(staging: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    listing = "\n".join([".", *names]) + "\n"
    done = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=staging,
        input=listing.encode(),
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise GuestBuildError(f"cpio failed: {done.stderr.decode(errors='replace').strip()}")
    with gzip.open(out, "wb", compresslevel=6) as gz:
        gz.write(done.stdout)


def build_guest(cache: Path | None = None) -> GuestImage:
    """Return the cached test guest, building it first if any input changed."""
    cache = cache or cache_dir()
    if not BUSYBOX.exists():
        raise GuestBuildError(f"{BUSYBOX} is missing; install busybox-static")
    with locked(cache / "guest.lock"):
        deb = _fetch_kernel_deb(cache / "downloads")
        template = _init_template()
        key_src = json.dumps(
            {
                "deb": deb.name,
                "deb_size": deb.stat().st_size,
                "busybox": _file_digest(BUSYBOX),
                "init": template,
                "modules": WANTED_MODULES,
                "pattern": PATTERN_UNIT.decode(),
                "writer": _writer_source(),
                "gcc": _gcc_version(),
                "format": 1,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        target = cache / f"guest-{key}"
        manifest = target / "manifest.json"
        if manifest.exists():
            meta = json.loads(manifest.read_text())
            return GuestImage(
                kernel=target / "vmlinuz",
                initrd=target / "initrd.gz",
                release=meta["release"],
                modules=tuple(meta["modules"]),
            )
        return _build_into(target, deb, template, cache)


def _build_into(target: Path, deb: Path, template: str, cache: Path) -> GuestImage:
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        work = Path(tmp)
        root = work / "kernel"
        _run(["dpkg", "-x", str(deb), str(root)])
        releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if len(releases) != 1:
            raise GuestBuildError(f"{deb.name} holds {len(releases)} module trees, expected one")
        release = releases[0]
        modules = _module_order(root, release)

        staging = work / "initramfs"
        (staging / "bin").mkdir(parents=True)
        (staging / "lib" / "modules").mkdir(parents=True)
        shutil.copy2(BUSYBOX, staging / "bin" / "busybox")
        _build_writer(_writer_source(), staging / "bin" / "genstamp")
        (staging / "bin" / "genstamp.c").unlink()
        names = []
        for module in modules:
            name = module.name.removesuffix(".ko")
            names.append(name)
            shutil.copy2(module, staging / "lib" / "modules" / module.name)
        init = template.replace("@MODULES@", " ".join(names)).replace(
            "@UNIT@", PATTERN_UNIT.decode().replace("\n", "\\n")
        )
        (staging / "init").write_text(init)
        (staging / "init").chmod(0o755)

        out = work / "out"
        out.mkdir()
        shutil.copy2(root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
        _write_cpio_newc(staging, out / "initrd.gz")
        (out / "manifest.json").write_text(
            json.dumps({"release": release, "modules": names, "deb": deb.name}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    # Other checkouts on the same machine may use other keys: only guests unused for a day go.
    for stale in cache.glob("guest-*"):
        if stale != target and stale.is_dir() and time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    return GuestImage(
        kernel=target / "vmlinuz",
        initrd=target / "initrd.gz",
        release=release,
        modules=tuple(names),
    )
