"""Tests of qmpdump.service.config: valid files, one test per kind of error line, discovery.

Pure unit tests: the configuration is a file and a glob, both of which tmp_path provides for real;
a fake glob function covers the precedence rules without touching the file system.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qmpdump.engines.spec import DEFAULT_MAX_HOST_GROWTH, EngineName
from qmpdump.errors import UsageError
from qmpdump.service.config import (
    Config,
    Retention,
    example_config,
    load_config,
    parse_config,
    parse_size,
)

# The minimal configuration.
MINIMAL = """\
[daemon]
api_socket = "/run/qmpdump/api.sock"
dump_dir = "/var/lib/qmpdump/dumps"
state_dir = "/var/lib/qmpdump"
[[vm]]
name = "vm1"
qmp = "/run/vm1.qmp"
"""

DAEMON = MINIMAL.split("[[vm]]", maxsplit=1)[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qmpdump.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The error lines loading ``text`` gives, each checked to name the file."""
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    message = str(info.value)
    assert "Traceback" not in message
    assert "pydantic.dev" not in message
    lines = message.splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    d = config.daemon
    assert d.api_socket == Path("/run/qmpdump/api.sock")
    assert d.dump_dir == Path("/var/lib/qmpdump/dumps")
    assert d.state_dir == Path("/var/lib/qmpdump")
    assert d.api_socket_mode == 0o660
    assert d.api_socket_group is None
    assert d.max_concurrent_dumps == 2
    assert (d.default_engine, d.default_format, d.default_mode) == ("auto", "elf", "consistent")
    assert d.shutdown_grace_s == 30.0
    assert d.watchdog is True
    assert config.retention == Retention(keep_count=None, keep_bytes=None)
    [vm] = config.resolve_vms(lambda _pattern: [])
    assert vm.name == "vm1"
    assert vm.qmp == "/run/vm1.qmp"
    assert vm.qmp_address == "/run/vm1.qmp"
    assert (vm.engine, vm.format, vm.mode) == ("auto", "elf", "consistent")
    assert vm.dump_dir == Path("/var/lib/qmpdump/dumps/vm1")
    assert vm.origin == "vm[0]"
    assert not vm.discovered


def test_example_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, example_config()))
    assert [v.name for v in config.vm] == ["vm1", "db"]
    assert len(config.discover) == 1
    assert config.retention == Retention(keep_count=10, keep_bytes=200 * 2**30)


def test_tcp_address(tmp_path: Path) -> None:
    text = MINIMAL.replace('"/run/vm1.qmp"', '"tcp:[::1]:4444"')
    [vm] = load_config(write(tmp_path, text)).static_vms()
    assert vm.qmp_address == ("::1", 4444)


@pytest.mark.parametrize(
    ("written", "mode"),
    [('"0660"', 0o660), ('"0o640"', 0o640), ('"600"', 0o600), ("0o660", 0o660), ("384", 0o600)],
)
def test_socket_mode_accepted(tmp_path: Path, written: str, mode: int) -> None:
    text = DAEMON + f"api_socket_mode = {written}\n" + MINIMAL.removeprefix(DAEMON)
    assert load_config(write(tmp_path, text)).daemon.api_socket_mode == mode


@pytest.mark.parametrize(
    ("written", "fragment"),
    [
        ("660", "a plain 660 is decimal"),
        ('"0668"', "not an octal mode"),
        ('"0666"', "lets every local user connect"),
        ("true", "expected an octal mode"),
    ],
)
def test_socket_mode_refused(tmp_path: Path, written: str, fragment: str) -> None:
    text = DAEMON + f"api_socket_mode = {written}\n" + MINIMAL.removeprefix(DAEMON)
    [line] = problems(tmp_path, text)
    assert line.startswith("daemon.api_socket_mode: ")
    assert fragment in line


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("10GiB", 10 * 2**30),
        ("10 gib", 10 * 2**30),
        ("10G", 10 * 2**30),
        ("1.5K", 1536),
        ("500MB", 500 * 10**6),
        ("2T", 2 * 2**40),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "10 XB", "-1G", "1e9", "1.5.2G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_retention_inherits_key_by_key(tmp_path: Path) -> None:
    text = (
        DAEMON
        + '[retention]\nkeep_count = 10\nkeep_bytes = "1GiB"\n'
        + '[[vm]]\nname = "a"\nqmp = "/run/a.qmp"\n'
        + '[[vm]]\nname = "b"\nqmp = "/run/b.qmp"\n[vm.retention]\nkeep_count = 3\n'
        + '[[vm]]\nname = "c"\nqmp = "/run/c.qmp"\n'
        + '[vm.retention]\nkeep_bytes = "unlimited"\nkeep_count = "unlimited"\n'
    )
    a, b, c = load_config(write(tmp_path, text)).static_vms()
    assert a.retention == Retention(keep_count=10, keep_bytes=2**30)
    assert b.retention == Retention(keep_count=3, keep_bytes=2**30)
    assert c.retention == Retention(keep_count=None, keep_bytes=None)


def test_per_vm_dump_defaults(tmp_path: Path) -> None:
    text = (
        DAEMON
        + 'default_engine = "backend"\ndefault_mode = "live"\n'
        + '[[vm]]\nname = "a"\nqmp = "/run/a.qmp"\n'
        + '[[vm]]\nname = "b"\nqmp = "/run/b.qmp"\nengine = "qemu"\nformat = "kdump-zlib"\n'
        + 'mode = "consistent"\n'
    )
    a, b = load_config(write(tmp_path, text)).static_vms()
    assert (a.engine, a.format, a.mode) == ("backend", "elf", "live")
    assert (b.engine, b.format, b.mode) == ("qemu", "kdump-zlib", "consistent")


def test_max_host_growth_inherits_per_entry(tmp_path: Path) -> None:
    """``default_max_host_growth`` under ``[daemon]``, overridden by a ``[[vm]]``,
    ``[[discover]]`` or ``[[libvirt]]`` entry; sizes as on the command line, or bytes."""
    assert load_config(write(tmp_path, MINIMAL)).static_vms()[0].max_host_growth == (
        DEFAULT_MAX_HOST_GROWTH
    )
    text = (
        DAEMON
        + 'default_max_host_growth = "512MiB"\n'
        + '[[vm]]\nname = "a"\nqmp = "/run/a.qmp"\n'
        + '[[vm]]\nname = "b"\nqmp = "/run/b.qmp"\nmax_host_growth = "1.5G"\n'
        + '[[vm]]\nname = "c"\nqmp = "/run/c.qmp"\nmax_host_growth = 0\n'
        + '[[discover]]\nglob = "/run/d/*.qmp"\nmax_host_growth = "2GB"\n'
        + "[[libvirt]]\nmax_host_growth = 4096\n"
        + "[[libvirt]]\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.daemon.default_max_host_growth == 512 * 2**20
    a, b, c = config.static_vms()
    assert (a.max_host_growth, b.max_host_growth, c.max_host_growth) == (
        512 * 2**20,
        3 * 2**29,
        0,
    )
    [d] = config.discover_vms(lambda _pattern: ["/run/d/d.qmp"]).vms
    assert d.max_host_growth == 2 * 10**9
    first, second = config.libvirt_vm(0, "web"), config.libvirt_vm(1, "db")
    assert first is not None
    assert second is not None
    assert (first.max_host_growth, second.max_host_growth) == (4096, 512 * 2**20)


def test_a_jobs_spec_carries_its_vms_max_host_growth(tmp_path: Path) -> None:
    """The spec a daemon job runs with (:meth:`ResolvedVM.spec`, what the job runner calls):
    the API takes no ``max_host_growth``, so the snapshot engine gets the VM's configured
    limit; the other engines do not take the option (they would refuse it), and get none."""
    text = MINIMAL + 'max_host_growth = "64MiB"\n'
    [vm] = load_config(write(tmp_path, text)).static_vms()
    snapshot = vm.spec("snapshot", "elf", "consistent")
    assert (snapshot.engine, snapshot.max_host_growth) == (EngineName.SNAPSHOT, 64 * 2**20)
    for engine, mode in (("auto", "live"), ("backend", "consistent"), ("qemu", "consistent")):
        spec = vm.spec(engine, "elf", mode)
        assert spec.engine == engine
        assert spec.max_host_growth == DEFAULT_MAX_HOST_GROWTH
        assert spec.options_set() == []
    with pytest.raises(UsageError, match="live mode needs engine backend or auto"):
        vm.spec("snapshot", "elf", "live")


# --- error messages: each names the key path and the problem, one line each ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a misspelt key, with a suggestion
        (MINIMAL.replace("dump_dir", "dump_dri"), "daemon.dump_dri: unknown key (did you mean"),
        (MINIMAL.replace("dump_dir", "dump_dri"), "daemon.dump_dir: required, but missing"),
        (MINIMAL + 'enigne = "qemu"\n', "vm[0].enigne: unknown key (did you mean 'engine'?)"),
        (MINIMAL.replace("[daemon]", "[deamon]"), "deamon: unknown key (did you mean 'daemon'?)"),
        # types are not coerced
        (
            DAEMON + 'max_concurrent_dumps = "2"\n' + MINIMAL.removeprefix(DAEMON),
            "daemon.max_concurrent_dumps: input should be a valid integer (got '2')",
        ),
        (
            DAEMON + "max_concurrent_dumps = 0\n" + MINIMAL.removeprefix(DAEMON),
            "daemon.max_concurrent_dumps: input should be greater than or equal to 1 (got 0)",
        ),
        (
            DAEMON + "qmp_timeout_s = -1\n" + MINIMAL.removeprefix(DAEMON),
            "daemon.qmp_timeout_s: input should be greater than 0 (got -1)",
        ),
        (
            DAEMON + "watchdog = 1\n" + MINIMAL.removeprefix(DAEMON),
            "daemon.watchdog: input should be a valid boolean (got 1)",
        ),
        (
            DAEMON + 'default_engine = "fast"\n' + MINIMAL.removeprefix(DAEMON),
            "daemon.default_engine: input should be 'auto', 'backend', 'qemu' or 'snapshot' "
            "(got 'fast')",
        ),
        (
            DAEMON + 'default_format = "kdmup-zlib"\n' + MINIMAL.removeprefix(DAEMON),
            "daemon.default_format: 'kdmup-zlib' is not a dump format; qmpdump knows elf, ",
        ),
        (
            MINIMAL.replace('"/var/lib/qmpdump"', '"var/lib/qmpdump"'),
            "daemon.state_dir: must be an absolute path, not 'var/lib/qmpdump'",
        ),
        (
            MINIMAL.replace('"/run/qmpdump/api.sock"', "3"),
            "daemon.api_socket: expected a path (a string), not 3",
        ),
        # VM entries
        (MINIMAL.replace('"vm1"', '"../etc"'), "vm[0].name: '../etc' is not a valid VM name"),
        (MINIMAL.replace('"vm1"', '"' + "x" * 65 + '"'), "is not a valid VM name"),
        (
            MINIMAL.replace('"/run/vm1.qmp"', '"vm1.qmp"'),
            "vm[0].qmp: 'vm1.qmp' is neither an absolute socket path nor tcp:HOST:PORT "
            "(in the [[vm]] named 'vm1')",
        ),
        (
            MINIMAL.replace('"/run/vm1.qmp"', '"tcp:host:0"'),
            "vm[0].qmp: 'tcp:host:0' is not tcp:HOST:PORT with a port from 1 to 65535",
        ),
        (MINIMAL.replace('name = "vm1"\n', ""), "vm[0].name: required, but missing"),
        (
            MINIMAL.replace("[[vm]]", "[vm]"),
            "vm: must be an array of tables: write [[vm]], not [vm]",
        ),
        (DAEMON, "no [[vm]], [[discover]] or [[libvirt]]: there would be nothing to dump"),
        # retention
        (
            MINIMAL + "[vm.retention]\nkeep_count = 0\n",
            "vm[0].retention.keep_count: must be at least 1 (the newest dump is always kept)",
        ),
        (
            MINIMAL + '[retention]\nkeep_bytes = "lots"\n',
            "retention.keep_bytes: 'lots' is not a size",
        ),
        (
            MINIMAL + '[retention]\nkeep_count = "10"\n',
            "retention.keep_count: expected an integer or \"unlimited\", not '10'",
        ),
        (MINIMAL + "[retention]\nkeep_count = 2\nkeep = 1\n", "retention.keep: unknown key"),
        # max_host_growth
        (
            DAEMON + 'default_max_host_growth = "lots"\n' + MINIMAL.removeprefix(DAEMON),
            "daemon.default_max_host_growth: 'lots' is not a size: write a number of bytes, "
            "or a number with a unit such as 500MB, 10GiB or 2T",
        ),
        (
            MINIMAL + "max_host_growth = -1\n",
            "vm[0].max_host_growth: must be 0 (no growth at all) or more, not -1 "
            "(in the [[vm]] named 'vm1')",
        ),
        (
            MINIMAL + "max_host_growth = 1.5\n",
            'vm[0].max_host_growth: expected a size such as "256MiB" or a number of bytes, not 1.5',
        ),
        (
            DAEMON + '[[discover]]\nglob = "/run/*.qmp"\nmax_host_growth = true\n',
            'discover[0].max_host_growth: expected a size such as "256MiB" or a number of '
            "bytes, not True",
        ),
        (
            DAEMON + '[[libvirt]]\nmax_host_growth = "1 parsec"\n',
            "libvirt[0].max_host_growth: '1 parsec' is not a size",
        ),
        (MINIMAL + 'max_host_grwoth = "1G"\n', "vm[0].max_host_grwoth: unknown key (did you mean"),
        # discovery
        (
            DAEMON + '[[discover]]\nglob = "run/*.qmp"\n',
            "discover[0].glob: 'run/*.qmp' must be an absolute pattern",
        ),
        (
            DAEMON + '[[discover]]\nglob = "/run/*.qmp"\nname_from = "name"\n',
            "discover[0].name_from: input should be 'stem' or 'parent' (got 'name')",
        ),
    ],
)
def test_error_lines(tmp_path: Path, text: str, expected: str) -> None:
    lines = problems(tmp_path, text)
    assert any(line.startswith(expected) or expected in line for line in lines), lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + '[[vm]]\nname = "vm1"\nqmp = "/run/other.qmp"\n',
            ["vm[1].name: 'vm1' is already vm[0]'s name"],
        ),
        (
            MINIMAL + '[[vm]]\nname = "vm2"\nqmp = "/run/vm1.qmp"\n',
            ["vm[1].qmp: '/run/vm1.qmp' is already vm[0]'s QMP address"],
        ),
        (
            MINIMAL + 'engine = "backend"\nformat = "win-dmp"\n',
            ["vm[0].format: the backend engine does not write 'win-dmp'"],
        ),
        (
            DAEMON
            + 'default_format = "kdump-zstd"\n'
            + MINIMAL.removeprefix(DAEMON)
            # the VM sets only the engine: blamed, with a word on where the format came from
            + 'engine = "qemu"\n',
            [
                "vm[0].engine: QEMU's dump-guest-memory does not write 'kdump-zstd' "
                "(with the [daemon] defaults)"
            ],
        ),
        (
            MINIMAL + 'engine = "qemu"\nmode = "live"\n',
            ["vm[0].mode: QEMU's dump-guest-memory stops the VM"],
        ),
        (
            MINIMAL + 'engine = "snapshot"\nformat = "kdump-zlib"\n',
            ["vm[0].format: the snapshot engine writes ELF only, not 'kdump-zlib'"],
        ),
        (
            MINIMAL + 'engine = "snapshot"\nmode = "live"\n',
            ["vm[0].mode: the snapshot engine dumps one instant"],
        ),
        (
            DAEMON + 'default_engine = "backend"\ndefault_format = "win-dmp"\n'
            '[[vm]]\nname = "a"\nqmp = "/a"\n',
            ["daemon.default_format: the backend engine does not write 'win-dmp'"],
        ),
        (
            DAEMON + "reconnect_min_s = 100\n" + MINIMAL.removeprefix(DAEMON),
            ["daemon.reconnect_min_s: 100 is above reconnect_max_s (60)"],
        ),
        (
            MINIMAL + '[[discover]]\nglob = "/run/*.qmp"\nengine = "backend"\nformat = "elf"\n'
            'mode = "live"\n[[discover]]\nglob = "/x/*"\nengine = "qemu"\nmode = "live"\n',
            ["discover[1].mode: QEMU's dump-guest-memory stops the VM"],
        ),
    ],
)
def test_cross_key_errors(tmp_path: Path, text: str, expected: list[str]) -> None:
    lines = problems(tmp_path, text)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line


def test_one_line_per_problem(tmp_path: Path) -> None:
    text = (
        "[daemon]\n"
        'api_socket = "api.sock"\n'
        'dump_dir = "/d"\n'
        "[[vm]]\n"
        'name = "a b"\n'
        'qmp = "/a"\n'
        "[[vm]]\n"
        'name = "c"\n'
        "qmp = 5\n"
    )
    assert problems(tmp_path, text) == [
        "daemon.api_socket: must be an absolute path, not 'api.sock'",
        "daemon.state_dir: required, but missing",
        "vm[0].name: 'a b' is not a valid VM name: 1 to 64 of A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit",
        "vm[1].qmp: input should be a valid string (got 5) (in the [[vm]] named 'c')",
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(UsageError, match=r"missing\.toml: cannot read the configuration: No such"):
        load_config(path)


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\n")
    with pytest.raises(UsageError, match=r"qmpdump\.toml: not valid TOML: .*line 1"):
        load_config(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "qmpdump.toml"
    path.write_bytes(b"# \xff\n")
    with pytest.raises(UsageError, match=r"qmpdump\.toml: not UTF-8 text \(byte 2\)"):
        load_config(path)


def test_usage_error_exit_code(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_config(write(tmp_path, DAEMON))
    assert info.value.exit_code == 2


# --- discovery ---

DISCOVERY = (
    DAEMON
    + "[retention]\nkeep_count = 10\n"
    + '[[vm]]\nname = "db"\nqmp = "/srv/db.qmp"\nengine = "qemu"\n'
    + '[[vm]]\nname = "pinned"\nqmp = "/run/qemu/web.qmp"\n'
    + '[[discover]]\nglob = "/run/qemu/*.qmp"\nmode = "live"\n'
    + "[discover.retention]\nkeep_count = 2\n"
    + '[[discover]]\nglob = "/run/other/*/qmp.sock"\nname_from = "parent"\n'
)

FAKE_GLOB = {
    "/run/qemu/*.qmp": [
        "/run/qemu/b.qmp",
        "/run/qemu/db.qmp",  # a static [[vm]] has this name
        "/run/qemu/a.qmp",
        "/run/qemu/web.qmp",  # a static [[vm]] uses this socket
        "/run/qemu/bad name.qmp",
        "/run/qemu/a.qmp",  # a glob may repeat itself
    ],
    "/run/other/*/qmp.sock": [
        "/run/other/a/qmp.sock",  # [[discover]] 0 already found an "a"
        "/run/other/c/qmp.sock",
    ],
}


def fake_glob(pattern: str) -> list[str]:
    return FAKE_GLOB.get(pattern, [])


def test_discovery_precedence() -> None:
    config = parse_config(tomllib.loads(DISCOVERY))
    found = config.discover_vms(fake_glob)
    assert [(v.name, v.qmp, v.origin) for v in found.vms] == [
        ("a", "/run/qemu/a.qmp", "discover[0]"),
        ("b", "/run/qemu/b.qmp", "discover[0]"),
        ("c", "/run/other/c/qmp.sock", "discover[1]"),
    ]
    assert [(s.path, s.reason) for s in found.skipped] == [
        ("/run/qemu/bad name.qmp", "'bad name' is not a valid VM name"),
        ("/run/qemu/db.qmp", "the [[vm]] named 'db' takes precedence"),
        ("/run/qemu/web.qmp", "a [[vm]] entry already uses this socket"),
        ("/run/other/a/qmp.sock", "/run/qemu/a.qmp already provides a VM named 'a'"),
    ]
    a, _, c = found.vms
    assert a.discovered
    assert a.mode == "live"
    assert a.retention.keep_count == 2
    assert c.mode == "consistent"
    assert c.retention.keep_count == 10
    all_vms = config.resolve_vms(fake_glob)
    assert [v.name for v in all_vms] == ["db", "pinned", "a", "b", "c"]
    assert all_vms[0].engine == "qemu"


def test_discovery_is_pure() -> None:
    config = parse_config(tomllib.loads(DISCOVERY))
    assert config.resolve_vms(fake_glob) == config.resolve_vms(fake_glob)
    assert [v.name for v in config.resolve_vms(lambda _pattern: [])] == ["db", "pinned"]


def test_discovery_real_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "nested").mkdir(parents=True)
    for name in ("vm-b.qmp", "vm-a.qmp", "vm1.qmp", "notes.txt", "nested/vm-c.qmp"):
        (run / name).touch()
    text = MINIMAL + f'[[discover]]\nglob = "{run}/*.qmp"\n'
    config = load_config(write(tmp_path, text))
    vms = config.resolve_vms()
    assert [(v.name, v.qmp) for v in vms] == [
        ("vm1", "/run/vm1.qmp"),
        ("vm-a", f"{run}/vm-a.qmp"),
        ("vm-b", f"{run}/vm-b.qmp"),
    ]
    assert vms[1].dump_dir == Path("/var/lib/qmpdump/dumps/vm-a")
    [skipped] = config.discover_vms().skipped
    assert skipped.path == f"{run}/vm1.qmp"


def test_config_is_frozen() -> None:
    config = parse_config(tomllib.loads(MINIMAL))
    assert isinstance(config, Config)
    with pytest.raises(ValueError, match="frozen"):
        config.daemon.max_concurrent_dumps = 3


def test_static_socket_path_is_normalised() -> None:
    text = DISCOVERY.replace('"/run/qemu/web.qmp"', '"/run/qemu//./web.qmp"')
    config = parse_config(tomllib.loads(text))
    assert config.vm[1].qmp == "/run/qemu/web.qmp"
    assert "/run/qemu/web.qmp" in [s.path for s in config.discover_vms(fake_glob).skipped]


# --- [[libvirt]] and connect = "on-demand" ---


def test_libvirt_entries_and_on_demand(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + 'connect = "on-demand"\n'
        + "[[libvirt]]\n"
        + '[[libvirt]]\nuri = "qemu:///session"\ndomains = ["web*", "db1"]\n'
        + 'monitor = "passthrough"\nengine = "backend"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.static_vms()[0].on_demand
    first, second = config.libvirt
    assert (first.uri, first.domains, first.monitor) == ("qemu:///system", [], "supported")
    assert (second.uri, second.domains, second.monitor) == (
        "qemu:///session",
        ["web*", "db1"],
        "passthrough",
    )
    vm = config.libvirt_vm(1, "web1")
    assert vm is not None
    assert vm.libvirt is not None
    assert (vm.name, vm.origin, vm.libvirt.domain, vm.libvirt.monitor) == (
        "web1",
        "libvirt[1]",
        "web1",
        "passthrough",
    )
    assert vm.engine.value == "backend"
    assert vm.dump_dir == Path("/var/lib/qmpdump/dumps/web1")
    assert config.libvirt_vm(0, "bad/name") is None
    # a [[libvirt]] alone is a configuration
    assert load_config(write(tmp_path, DAEMON + "[[libvirt]]\n")).libvirt[0].monitor == "supported"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            DAEMON + '[[libvirt]]\nmonitor = "exclusive"\n',
            "libvirt[0].monitor: input should be 'supported' or 'passthrough' (got 'exclusive')",
        ),
        (DAEMON + '[[libvirt]]\nuri = "system"\n', "libvirt[0].uri: 'system' is not a libvirt URI"),
        (
            DAEMON + '[[libvirt]]\ndomains = ["a", ""]\n',
            "libvirt[0].domains[1]: expected a domain name or glob, not an empty string",
        ),
        (DAEMON + '[[libvirt]]\ndomain = ["a"]\n', "libvirt[0].domain: unknown key (did you mean"),
        (
            DAEMON + '[[libvirt]]\nengine = "backend"\n',
            'libvirt[0].engine: the backend engine needs monitor = "passthrough"',
        ),
        (DAEMON + "[libvirt]\n", "libvirt: must be an array of tables: write [[libvirt]]"),
        (
            MINIMAL + 'connect = "sometimes"\n',
            "vm[0].connect: input should be 'persistent' or 'on-demand' (got 'sometimes')",
        ),
        (
            DAEMON + '[[discover]]\nglob = "/run/*.qmp"\nconnect = "lazy"\n',
            "discover[0].connect: input should be 'persistent' or 'on-demand'",
        ),
    ],
)
def test_libvirt_error_lines(tmp_path: Path, text: str, expected: str) -> None:
    lines = problems(tmp_path, text)
    assert any(line.startswith(expected) for line in lines), lines
