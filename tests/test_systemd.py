"""The systemd files in ``systemd/``: the unit verifies, its sandbox is tight, the tmpfiles entry
creates what it says, and the example configuration loads.

systemd's own tools are the judges (``systemd-analyze verify``, ``systemd-analyze security
--offline=true``, ``systemd-tmpfiles``); a check is skipped only when its tool is not installed.
The unit is verified as installed, with ``/usr/local/bin/qmpdump`` replaced by the venv's
``qmpdump`` (verify checks that the binary exists) and without its ``ConditionPathExists=``.
``systemd-tmpfiles --dry-run`` needs systemd 256; ``--create --root=DIR`` (every version) creates
the entries under a scratch root instead, which checks both the syntax and the result.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpdump.service.config import example_config

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "qmpdump.service"
TMPFILES = SYSTEMD / "qmpdump.tmpfiles.conf"
EXAMPLE = SYSTEMD / "qmpdump.toml.example"
QMPDUMP = Path(sys.executable).parent / "qmpdump"
INSTALLED = "/usr/local/bin/qmpdump"
#: the highest ``systemd-analyze security`` exposure the unit may have (0 = locked down, 10 = none)
MAX_EXPOSURE = 4.0


def tool(name: str) -> str:
    """The path of a systemd tool, or skip the test saying which one is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def unit_for_here(tmp_path: Path) -> Path:
    """The unit as installed, with the venv's qmpdump and without ConditionPathExists=."""
    lines = []
    rewritten = 0
    for line in UNIT.read_text().splitlines():
        if line.startswith("ConditionPathExists="):
            continue
        if line.startswith(("ExecStart=", "ExecStartPre=")):
            assert line.split("=", 1)[1].startswith(f"{INSTALLED} "), line
            rewritten += 1
            lines.append(line.replace(INSTALLED, str(QMPDUMP), 1))
        else:
            lines.append(line)
    assert rewritten == 2, "expected ExecStartPre= and ExecStart= running qmpdump"
    path = tmp_path / UNIT.name  # verify takes the unit name from the file name
    path.write_text("\n".join(lines) + "\n")
    return path


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = unit_for_here(tmp_path)
    done = run(analyze, "verify", str(unit))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""  # not even a warning


def test_the_unit_runs_the_daemon_as_notify_with_a_check_first() -> None:
    settings = unit_settings()
    config = "/etc/qmpdump/qmpdump.toml"
    assert settings["Type"] == ["notify"]
    assert settings["ExecStartPre"] == [f"{INSTALLED} daemon --config {config} --check"]
    assert settings["ExecStart"] == [f"{INSTALLED} daemon --config {config}"]
    assert settings["ConditionPathExists"] == [config]
    # The daemon's state and API socket folders are the unit's own.
    assert settings["StateDirectory"] == ["qmpdump"]
    assert settings["RuntimeDirectory"] == ["qmpdump"]
    assert settings["UMask"] == ["0077"]


def test_the_unit_sandbox_exposure(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    analyze = tool("systemd-analyze")
    unit = unit_for_here(tmp_path)
    done = run(analyze, "security", "--offline=true", "--no-pager", str(unit))
    assert done.returncode == 0, done.stderr
    found = re.search(r"Overall exposure level for qmpdump\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout[-2000:]
    exposure = float(found.group(1))
    record_property("systemd_security_exposure", exposure)
    print(f"systemd-analyze security --offline=true: exposure {exposure}")
    assert exposure < MAX_EXPOSURE, done.stdout


def test_the_tmpfiles_entry_creates_the_folders(tmp_path: Path) -> None:
    tmpfiles = tool("systemd-tmpfiles")
    root = tmp_path / "root"
    root.mkdir()
    done = run(tmpfiles, "--create", f"--root={root}", str(TMPFILES))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    want = {"var/lib/qmpdump": 0o700, "var/lib/qmpdump/dumps": 0o700, "run/qmpdump": 0o750}
    for relative, mode in want.items():
        info = (root / relative).lstat()
        assert stat.S_ISDIR(info.st_mode), relative
        assert stat.S_IMODE(info.st_mode) == mode, (relative, oct(info.st_mode))
        assert (info.st_uid, info.st_gid) == (0, 0), relative

    # The same entries, read by hand: directories, absolute paths, octal modes, root-owned.
    entries = [
        line.split()
        for line in TMPFILES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {(e[0], e[1], e[2], e[3], e[4], e[5]) for e in entries} == {
        ("d", f"/{relative}", f"{mode:04o}", "root", "root", "-") for relative, mode in want.items()
    }

    # And the tool does reject a broken entry: the check above means something.
    broken = tmp_path / "broken.conf"
    broken.write_text("d /var/lib/qmpdump 07999 root root -\n")
    other = tmp_path / "other-root"
    other.mkdir()
    assert run(tmpfiles, "--create", f"--root={other}", str(broken)).returncode != 0


def test_the_example_configuration_checks_out(tmp_path: Path) -> None:
    # The shipped file is what `qmpdump daemon --example-config` prints.
    text = EXAMPLE.read_text()
    assert text == example_config()
    printed = run(str(QMPDUMP), "daemon", "--example-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == text

    # Its folders are the ones the unit and the tmpfiles entry make.
    daemon = tomllib.loads(text)["daemon"]
    assert daemon["api_socket"] == "/run/qmpdump/api.sock"
    assert daemon["state_dir"] == "/var/lib/qmpdump"
    assert daemon["dump_dir"] == "/var/lib/qmpdump/dumps"
    assert unit_settings()["ReadWritePaths"] == [daemon["state_dir"]]

    # It loads, with its paths moved under tmp_path (nothing of the host's /run is globbed).
    moved = text.replace('"/run/', f'"{tmp_path}/run/').replace('"/var/', f'"{tmp_path}/var/')
    assert "/run/" not in moved.replace(f"{tmp_path}/run/", "")
    config = tmp_path / "qmpdump.toml"
    config.write_text(moved)
    done = run(str(QMPDUMP), "daemon", "--config", str(config), "--check")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{config}: valid; 2 VM(s): vm1, db\n"
    assert done.stderr == ""
    assert not (tmp_path / "run").exists()  # --check creates nothing
    assert not (tmp_path / "var").exists()
