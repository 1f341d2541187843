"""The daemon's configuration: one TOML file, validated with pydantic, errors that name the key.

The file (see :func:`example_config` for a commented one) has four parts:

* ``[daemon]`` -- where the API socket, the dumps and the state live; limits and timeouts; the
  default engine, format and mode of a dump request, and ``default_max_host_growth``: how much
  host memory a snapshot dump may make QEMU allocate (the dump specification's
  ``max_host_growth``, the CLI's ``--max-host-growth``; a size or a number of bytes).
* ``[retention]`` -- how many dumps (``keep_count``) and how many bytes (``keep_bytes``) to keep
  per VM by default; unset means no limit.
* ``[[vm]]`` -- the VMs named in the file: a name and a QMP address, with optional per-VM
  ``engine``/``format``/``mode``/``max_host_growth`` defaults and a ``[vm.retention]`` override.
* ``[[sink]]`` -- named S3 buckets (``name``, ``bucket``, ``prefix``, optional ``endpoint``,
  ``region``, ``part_size``, ``max_in_flight``) dumps may go to instead of ``dump_dir``: a VM
  picks one with ``sink = "NAME"`` (``[daemon] default_sink`` for all), a request with its
  ``sink`` field; ``"local"`` means the dump folder. Credentials never appear here: the
  standard AWS chain (environment, shared credentials file) provides them.
* ``[[discover]]`` -- QMP sockets found by a glob at run time; each match becomes a VM named
  after the file (``name_from = "stem"``) or its directory (``"parent"``), with the same optional
  defaults and retention override as a ``[[vm]]``.
* ``[[libvirt]]`` -- the running domains of a libvirt (``uri``, default ``qemu:///system``)
  whose names match ``domains`` (globs; default all): each is a VM named after the domain, for
  as long as it runs (the daemon follows libvirt's lifecycle events). ``monitor`` is
  ``"supported"`` (default: libvirt's public API only, no taint) or ``"passthrough"`` (QMP
  through libvirt's monitor passthrough; libvirt marks the domain tainted).

A ``[[vm]]`` or ``[[discover]]`` may say ``connect = "on-demand"``: the daemon then holds no QMP
connection to it, and connects only for a job or a map request (a socket other tools share).

Rules worth knowing:

* The models are strict (``extra="forbid"``, no coercion): a misspelt key is an error naming the
  key (with a suggestion), and ``max_concurrent_dumps = "2"`` is not silently an int.
* A VM name names folders and URLs, so it must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.
* Per-key inheritance: a VM's ``engine``, ``format``, ``mode``, ``max_host_growth`` and each
  retention key override the ``[daemon]`` defaults and ``[retention]`` one by one;
  ``"unlimited"`` lifts a global retention limit. ``max_host_growth`` binds the snapshot engine
  only (the other engines make QEMU allocate nothing); the API takes no such field, so a job
  always gets its VM's value.
* A domain never replaces a ``[[vm]]`` or a discovered VM of its name (checked as domains come
  and go); between two ``[[libvirt]]`` entries, the earlier one wins.
* A discovered VM never replaces a ``[[vm]]``: a discovered name equal to a static VM's name, or a
  discovered socket that a static VM already uses, is skipped (and reported in
  :attr:`Discovery.skipped`), so a static entry can pin a discovered VM's settings. Between two
  discovered sockets with one name, the earlier ``[[discover]]`` entry wins, then the path that
  sorts first.
* Engines, formats, modes and which combine are the dump specification's
  (:mod:`qmpdump.engines.spec`); QEMU itself still decides at dump time whether it offers a
  format (kdump-raw-* need QEMU 8.2).
* Sizes read as :func:`qmpdump.sizes.parse_size` says: ``10GiB``/``10G`` binary, ``10GB``
  decimal, the same as on the command line.

:func:`load_config` turns every problem into one line ``FILE: KEY.PATH: problem`` of a single
:class:`~qmpdump.errors.UsageError` (list indexes are 0-based, in file order).
"""

from __future__ import annotations

import difflib
import glob
import os
import posixpath
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from qmpdump.engines.spec import (
    DEFAULT_MAX_HOST_GROWTH,
    ENGINE_TRAITS,
    DumpFormat,
    DumpSpec,
    EngineName,
    SpecProblem,
)
from qmpdump.engines.spec import Mode as SpecMode
from qmpdump.errors import UsageError
from qmpdump.qmp.session import QMPAddress, parse_address
from qmpdump.sinks.s3 import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PART_SIZE,
    DEFAULT_STREAM_IN_FLIGHT,
    MIN_PART_SIZE,
    S3Location,
    S3Settings,
)
from qmpdump.sizes import parse_size

__all__ = [
    "LOCAL_SINK",
    "QEMU_FORMATS",
    "VM_NAME_PATTERN",
    "Config",
    "DaemonConfig",
    "DiscoverConfig",
    "Discovery",
    "Engine",
    "LibvirtConfig",
    "LibvirtDomain",
    "Mode",
    "ResolvedVM",
    "Retention",
    "SinkConfig",
    "SkippedSocket",
    "VMConfig",
    "example_config",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_size",
]

#: The sink name that means the local dump folder.
LOCAL_SINK = "local"

#: What a VM name must match: it becomes a folder under ``dump_dir`` and a segment of API URLs.
VM_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_VM_NAME_RE = re.compile(VM_NAME_PATTERN)

#: Every dump format's name (the dump specification's :class:`DumpFormat`).
QEMU_FORMATS = tuple(f.value for f in DumpFormat)


def _member(cls: type[StrEnum]) -> Callable[[Any], Any]:
    """A before-validator taking an enum member by its value (the models are strict)."""

    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = [repr(m.value) for m in cls]
            listed = f"{', '.join(names[:-1])} or {names[-1]}"
            raise ValueError(f"input should be {listed} (got {_short(value)})") from None

    return convert


#: Engine and mode as the file spells them (strings, checked against the spec's enums).
Engine = Annotated[EngineName, BeforeValidator(_member(EngineName))]
Mode = Annotated[SpecMode, BeforeValidator(_member(SpecMode))]

# --- field validators: they raise ValueError, whose text becomes the problem's line as is ---


def _limit(value: Any, *, sizes: bool) -> int | None:
    if value is None or value == "unlimited":  # None: from Python; TOML has no null
        return None
    if isinstance(value, str) and sizes:
        number = parse_size(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        kind = 'an integer, a size such as "10GiB"' if sizes else "an integer"
        raise ValueError(f'expected {kind} or "unlimited", not {value!r}')
    if number < 1:
        why = "" if sizes else " (the newest dump is always kept)"
        raise ValueError(f"must be at least 1{why}, not {value!r}")
    return number


def _keep_count(value: Any) -> int | None:
    return _limit(value, sizes=False)


def _keep_bytes(value: Any) -> int | None:
    return _limit(value, sizes=True)


def _host_growth(value: Any) -> int:
    if isinstance(value, str):
        number = parse_size(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(
            f'expected a size such as "256MiB" or a number of bytes, not {_short(value)}'
        )
    if number < 0:
        raise ValueError(f"must be 0 (no growth at all) or more, not {value!r}")
    return number


def _optional_host_growth(value: Any) -> int | None:
    return None if value is None else _host_growth(value)


def _path(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            raise ValueError("expected a path, not an empty string")
        return Path(value)
    if isinstance(value, Path):
        return value
    raise ValueError(f"expected a path (a string), not {value!r}")


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(value)!r}")
    return value


def _socket_mode(value: Any) -> int:
    if isinstance(value, str):
        digits = value.removeprefix("0o")
        if not digits or any(c not in "01234567" for c in digits):
            raise ValueError(f'{value!r} is not an octal mode such as "0660"')
        mode = int(digits, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(f'expected an octal mode (0o660 or "0660"), not {value!r}')
    if not 0 <= mode <= 0o777:
        raise ValueError(
            f"{value!r} is not a permission mode from 0 to 0o777 "
            '(in TOML write 0o660 or "0660"; a plain 660 is decimal)'
        )
    if mode & 0o002:
        raise ValueError(
            f"mode {mode:#o} lets every local user connect, and so read every VM's memory; "
            "grant access through api_socket_group instead"
        )
    return mode


def _vm_name(value: str) -> str:
    if not _VM_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid VM name: 1 to 64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def _qmp(value: str) -> str:
    if value.startswith("tcp:"):
        host, sep, port = value[4:].rpartition(":")
        if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{value!r} is not tcp:HOST:PORT with a port from 1 to 65535")
        return value
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is neither an absolute socket path nor tcp:HOST:PORT")
    # normalised, so that a discovered socket is recognised as the one a [[vm]] names
    return posixpath.normpath(value)


def _format(value: Any) -> Any:
    if isinstance(value, str) and value not in QEMU_FORMATS:
        raise ValueError(f"{value!r} is not a dump format; qmpdump knows {', '.join(QEMU_FORMATS)}")
    return value


def _glob_pattern(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f'{value!r} must be an absolute pattern, such as "/run/qemu/*.qmp"')
    return value


def _domain_glob(value: str) -> str:
    if not value:
        raise ValueError("expected a domain name or glob, not an empty string")
    return value


def _libvirt_uri(value: str) -> str:
    scheme, sep, _rest = value.partition(":")
    if not sep or not scheme:
        raise ValueError(f'{value!r} is not a libvirt URI such as "qemu:///system"')
    return value


def _sink_name(value: str) -> str:
    if not _VM_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid sink name: 1 to 64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if value == LOCAL_SINK:
        raise ValueError(f"{LOCAL_SINK!r} is reserved: it means the dump folder")
    return value


def _endpoint(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


def _part_size(value: Any) -> int:
    if isinstance(value, str):
        number = parse_size(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(f'expected a size such as "16MiB", not {value!r}')
    if not MIN_PART_SIZE <= number <= 5 << 30:
        raise ValueError(f"must be from 5MiB to 5GiB (S3's limits on a part), not {value!r}")
    return number


AbsPath = Annotated[Path, BeforeValidator(_path), AfterValidator(_absolute)]
Format = Annotated[DumpFormat, BeforeValidator(_member(DumpFormat)), BeforeValidator(_format)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _combination(
    engine: EngineName, fmt: DumpFormat, mode: SpecMode, *, keys: tuple[str, str, str]
) -> tuple[str, str] | None:
    """What is wrong with an engine/format/mode combination: (the key to blame, why), or None.

    The rule is the dump specification's (:class:`DumpSpec`). ``keys`` names the engine, format
    and mode keys as the entry spells them; a key the entry did not set (its value is
    inherited) is given as "" and is not blamed if another can be.
    """
    try:
        DumpSpec(engine=engine, format=fmt, mode=mode)
    except ValidationError as err:
        cause = err.errors()[0].get("ctx", {}).get("error")
        if not isinstance(cause, SpecProblem):
            raise
        problem = cause
    else:
        return None
    key_of = dict(zip(("engine", "format", "mode"), keys, strict=True))
    involved = [key_of.get(f, "") for f in problem.fields if f in key_of]
    blame = next((k for k in involved if k), "")
    why = problem.message
    if not all(involved):
        why += " (with the [daemon] defaults)"
    return blame, why


# --- the models ---


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Retention(_Strict):
    """How many dumps of one VM to keep; None is no limit. The newest dump is always kept."""

    keep_count: Annotated[int | None, BeforeValidator(_keep_count)] = None
    keep_bytes: Annotated[int | None, BeforeValidator(_keep_bytes)] = None

    def over(self, base: Retention) -> Retention:
        """This retention's keys that were set in the file, the others from ``base``."""
        return base.model_copy(update={k: getattr(self, k) for k in self.model_fields_set})


class _DumpDefaults(_Strict):
    """What a VM (or a discovered group of VMs) may set over the daemon's defaults."""

    engine: Engine | None = None
    format: Format | None = None
    mode: Mode | None = None
    #: a ``[[sink]]`` name, or ``"local"`` for the dump folder
    sink: str | None = None
    #: bytes of host memory a snapshot dump may make QEMU allocate (over
    #: ``default_max_host_growth``)
    max_host_growth: Annotated[int | None, BeforeValidator(_optional_host_growth)] = None
    retention: Retention = Field(default_factory=Retention)


#: ``persistent``: one QMP connection kept up; ``on-demand``: connected for a job or a map only
Connect = Literal["persistent", "on-demand"]


class VMConfig(_DumpDefaults):
    """A ``[[vm]]`` entry: a VM named in the file."""

    name: Annotated[str, AfterValidator(_vm_name)]
    #: an absolute UNIX socket path, or ``tcp:HOST:PORT``
    qmp: Annotated[str, AfterValidator(_qmp)]
    connect: Connect = "persistent"


class DiscoverConfig(_DumpDefaults):
    """A ``[[discover]]`` entry: every path the glob matches is a VM's QMP socket."""

    glob: Annotated[str, AfterValidator(_glob_pattern)]
    connect: Connect = "persistent"
    #: ``stem``: the file name without its suffix; ``parent``: the directory's name
    name_from: Literal["stem", "parent"] = "stem"

    def name_of(self, path: str) -> str:
        """The VM name this entry gives to a matched path (not validated)."""
        p = PurePosixPath(path)
        return p.stem if self.name_from == "stem" else p.parent.name


class LibvirtConfig(_DumpDefaults):
    """A ``[[libvirt]]`` entry: the running domains of one libvirt, each a VM of its name."""

    uri: Annotated[str, AfterValidator(_libvirt_uri)] = "qemu:///system"
    #: fnmatch globs on domain names; empty: every domain
    domains: list[Annotated[str, AfterValidator(_domain_glob)]] = Field(default_factory=list)
    #: ``supported``: libvirt's public API only (no taint); ``passthrough``: QMP through
    #: libvirt's monitor passthrough (every engine, the full map; the domain is tainted)
    monitor: Literal["supported", "passthrough"] = "supported"


@dataclass(frozen=True, slots=True)
class LibvirtDomain:
    """Where a VM that is a libvirt domain is: libvirt's URI, the domain, the monitor mode."""

    uri: str
    domain: str
    monitor: str


class SinkConfig(_Strict):
    """A ``[[sink]]`` entry: an S3 bucket (and key prefix) that dumps may go to.

    Credentials are never part of it: they come from the standard AWS chain (environment,
    ``AWS_PROFILE`` and the shared credentials file). ``endpoint`` and ``region``, when left
    out, come from ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` (or the AWS config file) too.
    """

    name: Annotated[str, AfterValidator(_sink_name)]
    bucket: str
    prefix: str = ""
    endpoint: Annotated[str | None, AfterValidator(_endpoint)] = None
    region: str | None = None
    part_size: Annotated[int, BeforeValidator(_part_size)] = DEFAULT_PART_SIZE
    max_in_flight: Annotated[int, Field(ge=1, le=64)] = DEFAULT_MAX_IN_FLIGHT
    stream_in_flight: Annotated[int, Field(ge=0, le=64)] = DEFAULT_STREAM_IN_FLIGHT

    @model_validator(mode="after")
    def _where(self) -> SinkConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.stream_in_flight > self.max_in_flight:
            problems.append((("stream_in_flight",), "may not exceed max_in_flight"))
        try:
            S3Location.of(self.bucket)
        except UsageError as err:
            problems.append((("bucket",), str(err)))
        try:
            S3Location.of("bucket", self.prefix)
        except UsageError as err:
            problems.append((("prefix",), str(err)))
        if problems:
            raise _Problems(problems)
        return self

    def location(self) -> S3Location:
        """The bucket and prefix."""
        return S3Location.of(self.bucket, self.prefix)

    def settings(self) -> S3Settings:
        """The client settings."""
        return S3Settings(
            endpoint_url=self.endpoint,
            region=self.region,
            part_size=self.part_size,
            max_in_flight=self.max_in_flight,
            stream_in_flight=self.stream_in_flight,
        )


class DaemonConfig(_Strict):
    """The ``[daemon]`` table."""

    api_socket: AbsPath
    #: permission bits of the API socket; whoever may connect may dump every VM
    api_socket_mode: Annotated[int, BeforeValidator(_socket_mode)] = 0o660
    #: group owning the API socket (a name or a numeric gid); None leaves the daemon's group
    api_socket_group: str | None = None
    dump_dir: AbsPath
    state_dir: AbsPath
    max_concurrent_dumps: Annotated[int, Field(ge=1)] = 2
    default_engine: Engine = EngineName.AUTO
    default_format: Format = DumpFormat.ELF
    default_mode: Mode = SpecMode.CONSISTENT
    #: the snapshot engine refuses a dump that would make QEMU allocate more host memory than
    #: this (the holes of shmem-backed RAM it touches); a size or a number of bytes
    default_max_host_growth: Annotated[int, BeforeValidator(_host_growth)] = DEFAULT_MAX_HOST_GROWTH
    #: where dumps go unless a VM or a request says otherwise: a ``[[sink]]`` name or "local"
    default_sink: str = LOCAL_SINK
    #: QMP reconnection backoff: first delay, doubled up to the maximum
    reconnect_min_s: Seconds = 1.0
    reconnect_max_s: Seconds = 60.0
    qmp_timeout_s: Seconds = 10.0
    #: ``connect = "on-demand"`` VMs: how long a job or a map request retries a QMP socket
    #: that another client holds
    on_demand_wait_s: Seconds = 60.0
    #: how long one dump may take before it is cancelled
    dump_timeout_s: Seconds = 3600.0
    #: on SIGTERM: how long running dumps may finish before they are cancelled
    shutdown_grace_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 30.0
    #: ping systemd's watchdog (sd_notify WATCHDOG=1) when the unit sets WatchdogSec=
    watchdog: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> DaemonConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.reconnect_min_s > self.reconnect_max_s:
            problems.append(
                (
                    ("reconnect_min_s",),
                    f"{self.reconnect_min_s:g} is above reconnect_max_s ({self.reconnect_max_s:g})",
                )
            )
        keys = ("default_engine", "default_format", "default_mode")
        problem = _combination(
            self.default_engine, self.default_format, self.default_mode, keys=keys
        )
        if problem:
            problems.append(((problem[0],), problem[1]))
        if problems:
            raise _Problems(problems)
        return self


@dataclass(frozen=True, slots=True)
class ResolvedVM:
    """A VM the daemon serves, with every default resolved."""

    name: str
    #: an absolute socket path, or ``tcp:HOST:PORT``
    qmp: str
    engine: EngineName
    format: DumpFormat
    mode: SpecMode
    retention: Retention
    #: where its dumps go: ``dump_dir/NAME``
    dump_dir: Path
    #: where it came from: ``vm[0]``, or ``discover[1]`` for a discovered socket
    origin: str
    #: the ``[[sink]]`` its dumps go to by default; None: ``dump_dir``
    sink: str | None = None
    #: ``persistent`` or ``on-demand`` (see :class:`VMConfig`)
    connect: str = "persistent"
    #: the libvirt domain it is (a ``[[libvirt]]`` entry found it); None: a QMP socket
    libvirt: LibvirtDomain | None = None
    #: bytes of host memory a snapshot dump may make QEMU allocate
    #: (:attr:`DumpSpec.max_host_growth <qmpdump.engines.spec.DumpSpec.max_host_growth>`)
    max_host_growth: int = DEFAULT_MAX_HOST_GROWTH

    def spec(self, engine: str, fmt: str, mode: str) -> DumpSpec:
        """The dump specification of a job on this VM (engine, format and mode as the job
        store keeps them), with the VM's ``max_host_growth`` for an engine that honours it
        (the snapshot engine; any other would refuse it as an option not its own).

        Raises :class:`UsageError` for a combination no engine can make.
        """
        spec = DumpSpec.checked(engine=engine, format=fmt, mode=mode)
        traits = ENGINE_TRAITS.get(spec.engine)
        if traits is None or "max_host_growth" not in traits.options:
            return spec
        return DumpSpec.checked(
            engine=spec.engine,
            format=spec.format,
            mode=spec.mode,
            max_host_growth=self.max_host_growth,
        )

    @property
    def on_demand(self) -> bool:
        """Whether the daemon connects only for a job or a map request."""
        return self.connect == "on-demand"

    @property
    def discovered(self) -> bool:
        """Whether a ``[[discover]]`` glob found it."""
        return self.origin.startswith("discover")

    @property
    def qmp_address(self) -> QMPAddress:
        """The address in the form :class:`qmpdump.qmp.session.QMPSession` takes."""
        return parse_address(self.qmp)


@dataclass(frozen=True, slots=True)
class SkippedSocket:
    """A path a discovery glob matched that did not become a VM, and why."""

    path: str
    origin: str
    reason: str


@dataclass(frozen=True, slots=True)
class Discovery:
    """What the discovery globs found: VMs, and matches that were skipped."""

    vms: list[ResolvedVM]
    skipped: list[SkippedSocket]


class _Problems(ValueError):
    """Cross-key problems found after the keys themselves validated: (key path, problem)."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(problem for _, problem in problems))


class Config(_Strict):
    """The whole file."""

    daemon: DaemonConfig
    retention: Retention = Field(default_factory=Retention)
    vm: list[VMConfig] = Field(default_factory=list)
    discover: list[DiscoverConfig] = Field(default_factory=list)
    libvirt: list[LibvirtConfig] = Field(default_factory=list)
    sink: list[SinkConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if not self.vm and not self.discover and not self.libvirt:
            problems.append(
                ((), "no [[vm]], [[discover]] or [[libvirt]]: there would be nothing to dump")
            )
        by_name: dict[str, int] = {}
        by_qmp: dict[str, int] = {}
        for i, vm in enumerate(self.vm):
            if vm.name in by_name:
                problems.append(
                    (("vm", i, "name"), f"{vm.name!r} is already vm[{by_name[vm.name]}]'s name")
                )
            by_name.setdefault(vm.name, i)
            if vm.qmp in by_qmp:
                problems.append(
                    (
                        ("vm", i, "qmp"),
                        f"{vm.qmp!r} is already vm[{by_qmp[vm.qmp]}]'s QMP address "
                        "(two dumps of one VM at a time)",
                    )
                )
            by_qmp.setdefault(vm.qmp, i)
        problems.extend(self._sink_problems())
        entries: list[tuple[str, int, _DumpDefaults]] = [
            *(("vm", i, v) for i, v in enumerate(self.vm)),
            *(("discover", i, d) for i, d in enumerate(self.discover)),
            *(("libvirt", i, d) for i, d in enumerate(self.libvirt)),
        ]
        for section, index, entry in entries:
            engine, fmt, mode = self._defaults(entry)
            given = entry.model_fields_set
            keys = ("engine", "format", "mode")
            e_key, f_key, m_key = (k if k in given else "" for k in keys)
            problem = _combination(engine, fmt, mode, keys=(e_key, f_key, m_key))
            if problem:
                loc = (section, index, problem[0]) if problem[0] else (section, index)
                problems.append((loc, problem[1]))
        for i, lv in enumerate(self.libvirt):
            engine, _fmt, mode = self._defaults(lv)
            if lv.monitor != "supported":
                continue
            if engine is EngineName.BACKEND or mode is SpecMode.LIVE:
                key = "engine" if engine is EngineName.BACKEND else "mode"
                set_here = key in lv.model_fields_set
                what = "the backend engine" if key == "engine" else "the live mode"
                problems.append(
                    (
                        ("libvirt", i, key) if set_here else ("libvirt", i),
                        f'{what} needs monitor = "passthrough" (the supported path is QEMU\'s '
                        "dump through libvirt's API)"
                        + ("" if set_here else " (with the [daemon] defaults)"),
                    )
                )
        if problems:
            raise _Problems(problems)
        return self

    def _sink_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        names: dict[str, int] = {}
        for i, sink in enumerate(self.sink):
            if sink.name in names:
                problems.append(
                    (
                        ("sink", i, "name"),
                        f"{sink.name!r} is already sink[{names[sink.name]}]'s name",
                    )
                )
            names.setdefault(sink.name, i)
        known = ", ".join([LOCAL_SINK, *names])
        chosen: list[tuple[tuple[str | int, ...], str | None]] = [
            (("daemon", "default_sink"), self.daemon.default_sink),
            *((("vm", i, "sink"), v.sink) for i, v in enumerate(self.vm)),
            *((("discover", i, "sink"), d.sink) for i, d in enumerate(self.discover)),
            *((("libvirt", i, "sink"), d.sink) for i, d in enumerate(self.libvirt)),
        ]
        for loc, name in chosen:
            if name is not None and name != LOCAL_SINK and name not in names:
                problems.append((loc, f"no [[sink]] named {name!r} (known: {known})"))
        return problems

    def sink_named(self, name: str | None) -> SinkConfig | None:
        """The ``[[sink]]`` called ``name``; None for None or ``"local"``.

        Raises :class:`UsageError` for a name that is not configured.
        """
        if name is None or name == LOCAL_SINK:
            return None
        for sink in self.sink:
            if sink.name == name:
                return sink
        known = ", ".join([LOCAL_SINK, *(s.name for s in self.sink)])
        raise UsageError(f"no sink named {name!r} (known: {known})")

    def _defaults(self, entry: _DumpDefaults) -> tuple[EngineName, DumpFormat, SpecMode]:
        d = self.daemon
        return (
            entry.engine or d.default_engine,
            entry.format or d.default_format,
            entry.mode or d.default_mode,
        )

    def _resolve(
        self,
        entry: _DumpDefaults,
        name: str,
        qmp: str,
        origin: str,
        *,
        connect: str = "persistent",
        libvirt: LibvirtDomain | None = None,
    ) -> ResolvedVM:
        engine, fmt, mode = self._defaults(entry)
        sink = entry.sink or self.daemon.default_sink
        growth = entry.max_host_growth
        return ResolvedVM(
            connect=connect,
            libvirt=libvirt,
            name=name,
            qmp=qmp,
            engine=engine,
            format=fmt,
            mode=mode,
            retention=entry.retention.over(self.retention),
            dump_dir=self.daemon.dump_dir / name,
            origin=origin,
            sink=None if sink == LOCAL_SINK else sink,
            max_host_growth=self.daemon.default_max_host_growth if growth is None else growth,
        )

    def static_vms(self) -> list[ResolvedVM]:
        """The ``[[vm]]`` entries, resolved, in file order."""
        return [
            self._resolve(v, v.name, v.qmp, f"vm[{i}]", connect=v.connect)
            for i, v in enumerate(self.vm)
        ]

    def libvirt_vm(self, index: int, domain: str) -> ResolvedVM | None:
        """The VM that a running domain of ``[[libvirt]]`` entry ``index`` is; None when its
        name is not a valid VM name (a domain name may hold characters a VM name may not)."""
        if not _VM_NAME_RE.fullmatch(domain):
            return None
        entry = self.libvirt[index]
        where = LibvirtDomain(uri=entry.uri, domain=domain, monitor=entry.monitor)
        qmp = f"libvirt {entry.uri} domain {domain} (monitor {entry.monitor})"
        return self._resolve(entry, domain, qmp, f"libvirt[{index}]", libvirt=where)

    def discover_vms(self, glob_fn: Callable[[str], Iterable[str]] = glob.glob) -> Discovery:
        """Expand the ``[[discover]]`` globs; pure given ``glob_fn`` (the only I/O).

        Matches are taken entry by entry, each entry's paths sorted. A match is skipped when its
        name is not a valid VM name, when a static VM has that name or that socket, or when an
        earlier match already took the name or the socket.
        """
        static_names = {v.name for v in self.vm}
        static_qmp = {v.qmp for v in self.vm}
        taken: dict[str, str] = {}
        paths_seen: set[str] = set()
        vms: list[ResolvedVM] = []
        skipped: list[SkippedSocket] = []
        for i, entry in enumerate(self.discover):
            origin = f"discover[{i}]"
            for path in sorted(set(glob_fn(entry.glob))):
                name = entry.name_of(path)
                reason = None
                if path in static_qmp:
                    reason = "a [[vm]] entry already uses this socket"
                elif path in paths_seen:
                    reason = "an earlier [[discover]] entry already matched this socket"
                elif not _VM_NAME_RE.fullmatch(name):
                    reason = f"{name!r} is not a valid VM name"
                elif name in static_names:
                    reason = f"the [[vm]] named {name!r} takes precedence"
                elif name in taken:
                    reason = f"{taken[name]} already provides a VM named {name!r}"
                if reason:
                    skipped.append(SkippedSocket(path=path, origin=origin, reason=reason))
                    continue
                taken[name] = path
                paths_seen.add(path)
                vms.append(self._resolve(entry, name, path, origin, connect=entry.connect))
        return Discovery(vms=vms, skipped=skipped)

    def resolve_vms(self, glob_fn: Callable[[str], Iterable[str]] = glob.glob) -> list[ResolvedVM]:
        """Every VM to serve: the static ones in file order, then the discovered ones."""
        return [*self.static_vms(), *self.discover_vms(glob_fn).vms]


# --- loading and error messages ---


def _key_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``list[X]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, UnionType, Annotated):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``loc`` (the table holding the unknown key) accepts."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _vm_label(data: Any, loc: tuple[str | int, ...]) -> str:
    """`` (the [[vm]] named 'x')`` for a problem under ``vm[i]``, if that entry has a name."""
    if len(loc) >= 3 and loc[0] == "vm" and isinstance(loc[1], int) and isinstance(data, dict):
        vms = data.get("vm")
        if isinstance(vms, list) and loc[1] < len(vms) and isinstance(vms[loc[1]], dict):
            name = vms[loc[1]].get("name")
            if isinstance(name, str) and loc[2] != "name":
                return f" (in the [[vm]] named {name!r})"
    return ""


def format_validation_error(err: ValidationError, data: Any = None) -> list[str]:
    """One ``KEY.PATH: problem`` line per problem pydantic found (``data``: the raw input)."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            for sub_loc, problem in cause.problems:
                where = _key_path(loc + sub_loc)
                lines.append(f"{where}: {problem}" if where else problem)
            continue
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problem = f"unknown key{hint}"
        elif kind == "missing":
            problem = "required, but missing"
        elif kind in ("value_error", "assertion_error"):
            problem = str(cause) if cause is not None else e["msg"]
        elif kind == "list_type" and loc in (("vm",), ("discover",), ("libvirt",), ("sink",)):
            problem = f"must be an array of tables: write [[{loc[0]}]], not [{loc[0]}]"
        else:
            msg = e["msg"]
            problem = f"{msg[:1].lower()}{msg[1:]} (got {_short(e['input'])})"
        where = _key_path(loc)
        lines.append(f"{where}: {problem}{_vm_label(data, loc)}" if where else problem)
    return lines


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate already-parsed TOML; raise :class:`UsageError` with one line per problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: {line}" for line in format_validation_error(err, data)]
        raise UsageError("\n".join(lines)) from err


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises :class:`UsageError` when the file cannot be read, is not TOML, or does not validate;
    the message names the file and, per problem, the key path and what is wrong.
    """
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as err:
        raise UsageError(f"{source}: cannot read the configuration: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UsageError(f"{source}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{source}: not valid TOML: {err}") from err
    return parse_config(data, source)


_EXAMPLE = """\
# qmpdump daemon configuration (TOML). Keys not listed here are errors.
# Install as /etc/qmpdump/qmpdump.toml.

[daemon]
# The HTTP API listens on this UNIX socket. Whoever may connect may dump every VM's memory:
# grant access through the group, never to all users (a mode with o+w is refused).
api_socket = "/run/qmpdump/api.sock"
api_socket_mode = "0660"            # octal, as a string or a TOML 0o660
# api_socket_group = "qmpdump"      # default: the daemon's own group

# Dumps go to dump_dir/VM/; the job store (SQLite) lives in state_dir. Absolute paths.
dump_dir = "/var/lib/qmpdump/dumps"
state_dir = "/var/lib/qmpdump"

max_concurrent_dumps = 2            # over all VMs; one dump at a time per VM in any case

# What a dump request gets unless it says otherwise (a [[vm]] may override them):
default_engine = "auto"             # auto | backend | qemu
default_format = "elf"              # elf, kdump-zlib, kdump-lzo, kdump-snappy, win-dmp, ...
default_mode = "consistent"         # consistent (VM paused while copying) | live (backend only)
# The snapshot engine refuses a dump that would make QEMU allocate more host memory than this
# (it touches every hole of shmem-backed RAM; anonymous RAM costs nothing). A [[vm]],
# [[discover]] or [[libvirt]] entry may set its own max_host_growth.
default_max_host_growth = "256MiB"

reconnect_min_s = 1.0               # QMP reconnection backoff: first delay ...
reconnect_max_s = 60.0              # ... doubled up to this
qmp_timeout_s = 10.0                # every QMP command
on_demand_wait_s = 60.0             # connect = "on-demand": retry a socket another client holds
dump_timeout_s = 3600.0             # one whole dump
shutdown_grace_s = 30.0             # on stop: time for running dumps to finish
watchdog = true                     # ping systemd's watchdog when the unit sets WatchdogSec=

# Per VM, keep at most this many dumps and this many bytes; the oldest go first, the newest
# always stays. Sizes: bytes, or 500MB (decimal), 10GiB / 10G (binary). Leave out = no limit.
[retention]
keep_count = 10
keep_bytes = "200GiB"

[[vm]]
name = "vm1"                        # A-Z a-z 0-9 . _ -, up to 64; names folders and URLs
qmp = "/run/vm1.qmp"                # a UNIX socket path, or "tcp:HOST:PORT"
max_host_growth = "1GiB"            # snapshot dumps of this VM may cost the host up to 1 GiB

[[vm]]
name = "db"
qmp = "tcp:127.0.0.1:4444"
engine = "qemu"                     # per-VM overrides of the [daemon] defaults
format = "kdump-zlib"
[vm.retention]                      # per-VM overrides of [retention], key by key
keep_count = 3
keep_bytes = "unlimited"

# Dumps may go to an S3 bucket instead of dump_dir: a VM says sink = "NAME" (or set
# default_sink under [daemon]); a request may name a sink too, or "local". Credentials come
# only from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the unit's
# environment, /etc/qmpdump/aws.env, or AWS_PROFILE and the shared credentials file), never
# from this file; endpoint and region default to AWS_ENDPOINT_URL and AWS_REGION.
# [[sink]]
# name = "evidence"
# bucket = "incident-dumps"
# prefix = "hv01/"                  # objects are PREFIX/VM-TIMESTAMP-JOB.EXT (+ .json)
# endpoint = "https://s3.example.net"
# region = "eu-west-1"
# part_size = "16MiB"               # memory: about 3 x part_size x max_in_flight
# max_in_flight = 4
# stream_in_flight = 1              # parts sent while the dump runs (0: upload after it)

# Every socket matching the glob is a VM; its name is the file name without its suffix
# ("stem") or the name of its directory ("parent"). A [[vm]] with the same name or the same
# socket wins over a discovered one.
[[discover]]
glob = "/run/qemu/*.qmp"
name_from = "stem"
# connect = "on-demand"             # hold no QMP connection: connect for a job or a map only
                                    # (a socket other tools use between our requests)
[discover.retention]
keep_count = 5

# The running domains of a libvirt host, each a VM named after its domain, followed as they
# start and stop (a [[vm]] or discovered VM of the same name wins). monitor = "supported"
# (default) uses libvirt's public API only: QEMU's engine through libvirt's dump API, a map
# from the domain XML; "passthrough" sends QMP through libvirt (every engine, the full map),
# and libvirt marks the domain tainted. The daemon needs access to libvirt's socket.
# [[libvirt]]
# uri = "qemu:///system"
# domains = ["web*", "db1"]         # globs; default: every domain
# monitor = "supported"
"""


def example_config() -> str:
    """A commented example configuration that loads cleanly (shipped as qmpdump.toml.example)."""
    return _EXAMPLE
