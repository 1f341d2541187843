"""The testbed's QEMU selector: which build runs, and that the one selected is the one running."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from qmpdump.errors import UsageError
from qmpdump.qmp.session import QMPSession
from qmpdump.testbed import qemus
from qmpdump.testbed.qemus import (
    BINARY_ENV,
    BUILD_ENV,
    QemuBuild,
    QemuInstall,
    default_build,
    parse_madison,
    resolve,
    upstream_version,
)
from qmpdump.testbed.vm import VMSpec

from .conftest import VMFactory

# Captured from this machine's private apt (bookworm + bookworm-backports), 2026-12-01.
MADISON = """\
qemu-system-x86 | 1:10.0.2+ds-2+deb13u1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages
qemu-system-x86 | 1:7.2+dfsg-7+deb12u18+b3 | http://deb.debian.org/debian bookworm/main amd64 Packages
"""  # noqa: E501


def test_madison_lines_give_version_and_suite_in_order() -> None:
    assert parse_madison(MADISON, "qemu-system-x86") == [
        ("1:10.0.2+ds-2+deb13u1~bpo12+1", "bookworm-backports"),
        ("1:7.2+dfsg-7+deb12u18+b3", "bookworm"),
    ]
    assert parse_madison(MADISON, "qemu-system-common") == []
    assert parse_madison("N: Unable to locate package x\n", "x") == []


@pytest.mark.parametrize(
    ("debian", "upstream"),
    [
        ("1:10.0.2+ds-2+deb13u1~bpo12+1", "10.0.2"),
        ("1:7.2+dfsg-7+deb12u18+b3", "7.2"),
        ("10.1.0-1", "10.1.0"),
    ],
)
def test_upstream_version_drops_epoch_and_debian_suffixes(debian: str, upstream: str) -> None:
    assert upstream_version(debian) == upstream


def test_build_comes_from_the_environment_and_a_bad_value_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BUILD_ENV, raising=False)
    assert default_build() is QemuBuild.SYSTEM_7_2
    monkeypatch.setenv(BUILD_ENV, "10.0")
    assert default_build() is QemuBuild.BACKPORTS_10_0
    assert VMSpec().qemu is QemuBuild.BACKPORTS_10_0
    monkeypatch.setenv(BUILD_ENV, "9.9")
    with pytest.raises(UsageError, match=re.escape("QMPDUMP_QEMU_BUILD='9.9'")):
        default_build()


def test_qemu_binary_override_wins_and_runs_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BINARY_ENV, "/opt/qemu/bin/qemu-system-x86_64")
    for build in QemuBuild:
        assert resolve(build) == QemuInstall(build=None, binary="/opt/qemu/bin/qemu-system-x86_64")
    monkeypatch.delenv(BINARY_ENV)
    assert resolve(QemuBuild.SYSTEM_7_2).argv_prefix() == ["qemu-system-x86_64"]


@pytest.mark.bare
@pytest.mark.parametrize("build", list(QemuBuild))
async def test_selected_build_is_the_qemu_that_runs(
    vm_factory: VMFactory, build: QemuBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both builds on every run, whatever QMPDUMP_QEMU_BUILD says: the selector itself is tested.
    monkeypatch.delenv(BINARY_ENV, raising=False)
    install = resolve(build)

    def no_apt(argv: list[str], **_: object) -> str:
        raise AssertionError(f"ran {argv} although the cache holds the answer")

    # The next launch asks no apt: the version comes from the memo beside the lists.
    monkeypatch.setattr(qemus, "_run", no_apt)
    assert resolve(build) == install
    monkeypatch.undo()
    monkeypatch.delenv(BINARY_ENV, raising=False)
    if build is QemuBuild.BACKPORTS_10_0:
        binary = Path(install.binary)
        assert binary.is_file()
        assert os.access(binary, os.X_OK)
        assert install.data_dirs[0].joinpath("kvmvapic.bin").is_file()  # its own ROMs
        assert install.version.startswith("1:10.0.")
    vm = await vm_factory(VMSpec(name=f"bare-build-{build}", guest=False, qemu=build))
    assert vm.argv[: len(install.argv_prefix())] == install.argv_prefix()
    environ = Path(f"/proc/{vm.pid}/environ").read_bytes().split(b"\0")
    module_dirs = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"QEMU_MODULE_DIR=")]
    if build is QemuBuild.BACKPORTS_10_0:
        # Its own modules, never the installed 7.2's (which 10.0 fails to load).
        (module_dir,) = module_dirs
        assert Path(module_dir.decode()).joinpath("hw-usb-host.so").is_file()
    else:
        assert module_dirs == [e.encode() for k, e in install.env if k == "QEMU_MODULE_DIR"]
    async with QMPSession(str(vm.qmp_path)) as qmp:
        version = await qmp.execute("query-version")
    assert f"{version['qemu']['major']}.{version['qemu']['minor']}" == build.upstream
