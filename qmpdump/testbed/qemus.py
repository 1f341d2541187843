"""Which QEMU the testbed runs: Debian 12's own 7.2, or 10.0 from bookworm-backports, cached.

:class:`QemuBuild` names a build; :func:`resolve` turns it into a :class:`QemuInstall`, the
binary plus the ``-L`` data folders to run it with. The system build is whatever
``qemu-system-x86_64`` is on ``PATH`` (Debian 12 installs 7.2). The backports build is never
installed: as ``shared/FACTS.md`` describes, a private apt configuration under the qmpdump cache
(its own ``sources.list`` with bookworm and bookworm-backports, its own ``Dir::State::Lists`` and
``Dir::Cache``, ``Dir::Etc::SourceParts=/dev/null``, so the machine's apt sources and lists are
neither read nor changed) picks the newest 10.0 version the archive offers
(``apt-cache madison``), ``apt-get download`` fetches ``qemu-system-x86``, ``qemu-system-common``
and ``qemu-system-data`` at that version, and ``dpkg -x`` unpacks them into the cache. The binary
then runs with ``-L`` at its own ``usr/share/qemu`` (option ROMs, keymaps) and at Debian's
``/usr/share/seabios`` (the BIOS, which the backports data package does not carry), and with
``QEMU_MODULE_DIR`` at its own loadable modules (10.0 fails to load 7.2's; GL and spice modules,
in other packages, are absent, and the testbed's VMs use none).

Environment: ``QMPDUMP_QEMU_BUILD`` (``7.2`` or ``10.0``) chooses the build for the tests and the
demo; ``QMPDUMP_QEMU`` still names a binary to run instead, as is (no ``-L``).
A file lock makes concurrent fetches (two test runs, the demo) safe, as for the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from qmpdump.errors import QemuFetchError, UsageError
from qmpdump.testbed.guest import cache_dir, locked

__all__ = [
    "BINARY_ENV",
    "BUILD_ENV",
    "QemuBuild",
    "QemuInstall",
    "default_build",
    "parse_madison",
    "resolve",
    "upstream_version",
]

#: Environment variable naming the build for tests and the demo.
BUILD_ENV = "QMPDUMP_QEMU_BUILD"
#: Environment variable naming a QEMU binary that overrides the build's.
BINARY_ENV = "QMPDUMP_QEMU"

SYSTEM_BINARY = "qemu-system-x86_64"
SEABIOS_DIR = Path("/usr/share/seabios")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: The three packages that make a working x86 system emulator (binary, helpers, ROMs).
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
BACKPORTS_SUITE = "bookworm-backports"
MULTIARCH = "x86_64-linux-gnu"


class QemuBuild(StrEnum):
    """A QEMU the testbed can run; the value is what ``QMPDUMP_QEMU_BUILD`` takes."""

    SYSTEM_7_2 = "7.2"  # Debian 12's qemu-system-x86, installed by the set-up
    BACKPORTS_10_0 = "10.0"  # bookworm-backports' qemu-system-x86, unpacked into the cache

    @property
    def upstream(self) -> str:
        """The upstream major.minor version the build carries."""
        return self.value


@dataclass(frozen=True, slots=True)
class QemuInstall:
    """A runnable QEMU: the binary, its data folders (``-L``), environment and Debian version."""

    build: QemuBuild | None  # None: a binary named by QMPDUMP_QEMU
    binary: str
    data_dirs: tuple[Path, ...] = ()
    version: str = ""
    #: environment to add for QEMU: its own loadable modules (``QEMU_MODULE_DIR``), so that an
    #: unpacked QEMU never looks at the installed QEMU's modules
    env: tuple[tuple[str, str], ...] = ()

    def argv_prefix(self) -> list[str]:
        """The start of a QEMU command line: the binary and its ``-L`` folders."""
        argv = [self.binary]
        for folder in self.data_dirs:
            argv += ["-L", str(folder)]
        return argv


def default_build() -> QemuBuild:
    """The build ``QMPDUMP_QEMU_BUILD`` names (default: the system's 7.2)."""
    value = os.environ.get(BUILD_ENV, QemuBuild.SYSTEM_7_2.value)
    try:
        return QemuBuild(value)
    except ValueError:
        choices = ", ".join(b.value for b in QemuBuild)
        raise UsageError(f"{BUILD_ENV}={value!r} is not a QEMU build ({choices})") from None


def resolve(build: QemuBuild, cache: Path | None = None) -> QemuInstall:
    """The binary and data folders of a build, fetching the cached one on first use.

    ``QMPDUMP_QEMU``, when set, wins over every build: that binary runs as is.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        return QemuInstall(build=None, binary=override)
    if build is QemuBuild.SYSTEM_7_2:
        return QemuInstall(build=build, binary=SYSTEM_BINARY)
    return _backports(build, cache or cache_dir())


# ---------------------------------------------------------------- the private apt


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise QemuFetchError(f"{argv[0]} is not installed (it comes with Debian)") from err
    if done.returncode != 0:
        raise QemuFetchError(
            f"{' '.join(argv[:2])} … failed with exit code {done.returncode}: "
            f"{done.stderr.strip()[-2000:]}"
        )
    return done.stdout


@dataclass(frozen=True, slots=True)
class _PrivateApt:
    """apt-get/apt-cache with their own sources, lists and archive cache under ``root``."""

    root: Path

    @property
    def lists(self) -> Path:
        return self.root / "lists"

    def prepare(self) -> None:
        sources = self.root / "sources.list"
        signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
        sources.parent.mkdir(parents=True, exist_ok=True)
        sources.write_text(
            f"deb {signed}{DEBIAN_MIRROR} bookworm main\n"
            f"deb {signed}{DEBIAN_MIRROR} {BACKPORTS_SUITE} main\n"
        )
        for folder in (self.lists / "partial", self.root / "cache" / "archives" / "partial"):
            folder.mkdir(parents=True, exist_ok=True)

    def options(self) -> list[str]:
        return [
            "-o",
            f"Dir::Etc::SourceList={self.root / 'sources.list'}",
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            f"Dir::State::Lists={self.lists}",
            "-o",
            f"Dir::Cache={self.root / 'cache'}",
            # apt's sandbox user may not write root's cache; these are root's own files anyway.
            "-o",
            "APT::Sandbox::User=root",
        ]

    def has_lists(self) -> bool:
        return any(self.lists.glob(f"*{BACKPORTS_SUITE}*Packages*"))

    def update(self) -> None:
        _run(["apt-get", "-q", *self.options(), "update"])

    def _lists_key(self) -> list[list[object]]:
        return sorted(
            [p.name, p.stat().st_mtime_ns, p.stat().st_size]
            for p in self.lists.iterdir()
            if p.is_file() and p.name != "lock"
        )

    def versions(self, package: str) -> list[tuple[str, str]]:
        """(version, suite) of every version the private lists know, newest first.

        ``apt-cache madison`` parses every list (about a second); its answer depends on the
        lists only, so it is kept beside them, keyed by their names, sizes and times.
        """
        memo = self.root / f"madison-{package}.json"
        key = self._lists_key()
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if saved["key"] == key:
                return [(str(v), str(s)) for v, s in saved["versions"]]
        found = parse_madison(_run(["apt-cache", *self.options(), "madison", package]), package)
        memo.write_text(json.dumps({"key": key, "versions": found}))
        return found

    def download(self, packages: list[str], into: Path) -> None:
        _run(["apt-get", "-q", *self.options(), "download", *packages], cwd=into)


def parse_madison(text: str, package: str) -> list[tuple[str, str]]:
    """(version, suite) pairs from ``apt-cache madison`` output, in its order (newest first).

    A line reads ``qemu-system-x86 | 1:10.0.2+ds-2+deb13u1~bpo12+1 | http://deb.debian.org/debian
    bookworm-backports/main amd64 Packages``; the suite is the first part of the third field's
    second word.
    """
    found = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 3 or fields[0] != package:
            continue
        words = fields[2].split()
        suite = words[1].split("/")[0] if len(words) > 1 else ""
        found.append((fields[1], suite))
    return found


def upstream_version(version: str) -> str:
    """``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``10.0.2``."""
    return re.sub(r"^\d+:", "", version).split("+")[0].split("-")[0]


def _pick_version(apt: _PrivateApt, build: QemuBuild) -> str | None:
    """The newest backports version of ``qemu-system-x86`` that is ``build``'s major.minor."""
    for version, suite in apt.versions(PACKAGES[0]):
        upstream = upstream_version(version)
        if suite == BACKPORTS_SUITE and (
            upstream == build.upstream or upstream.startswith(build.upstream + ".")
        ):
            return version
    return None


def _install_at(target: Path) -> QemuInstall | None:
    manifest = target / "manifest.json"
    if not manifest.exists():
        return None
    meta = json.loads(manifest.read_text())
    root = target / "root"
    return QemuInstall(
        build=QemuBuild(meta["build"]),
        binary=str(root / "usr" / "bin" / SYSTEM_BINARY),
        data_dirs=(root / "usr" / "share" / "qemu", SEABIOS_DIR),
        version=meta["version"],
        env=(("QEMU_MODULE_DIR", str(root / "usr" / "lib" / MULTIARCH / "qemu")),),
    )


def _backports(build: QemuBuild, cache: Path) -> QemuInstall:
    base = cache / f"qemu-{build.value}"
    apt = _PrivateApt(cache / "apt")
    with locked(cache / "qemu.lock"):
        apt.prepare()
        if not apt.has_lists():
            apt.update()
        for attempt in range(2):
            version = _pick_version(apt, build)
            if version is None and attempt == 0:  # lists older than the archive's new version
                apt.update()
                continue
            if version is None:
                raise QemuFetchError(
                    f"{BACKPORTS_SUITE} offers no qemu-system-x86 {build.upstream}.x "
                    f"({DEBIAN_MIRROR})"
                )
            target = base / re.sub(r"[^\w.+-]", "_", version)
            found = _install_at(target)
            if found is not None:
                return found
            if not SEABIOS_DIR.is_dir():
                raise QemuFetchError(f"{SEABIOS_DIR} is missing; install seabios (comes with QEMU)")
            try:
                return _fetch_into(apt, build, version, target)
            except QemuFetchError:
                if attempt:
                    raise
                apt.update()  # the archive may have replaced that version: refresh, pick again
        raise AssertionError("unreachable")


def _fetch_into(apt: _PrivateApt, build: QemuBuild, version: str, target: Path) -> QemuInstall:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="fetch-") as tmp:
        work = Path(tmp)
        debs = work / "debs"
        debs.mkdir()
        apt.download([f"{name}={version}" for name in PACKAGES], debs)
        out = work / "out"
        (out / "root").mkdir(parents=True)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(out / "root")])
        binary = out / "root" / "usr" / "bin" / SYSTEM_BINARY
        if not binary.exists():
            raise QemuFetchError(f"{PACKAGES[0]} {version} holds no usr/bin/{SYSTEM_BINARY}")
        (out / "manifest.json").write_text(
            json.dumps({"build": build.value, "version": version}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    found = _install_at(target)
    assert found is not None
    return found
