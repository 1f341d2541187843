"""The dump specification: which engine, which format, which mode, which options -- and every rule
about how they combine, here and nowhere else.

The CLI (``qmpdump dump``, ``qmpdump request``), the API's request model, the daemon's
configuration and the daemon's job submission all build a :class:`DumpSpec`, so a combination is
accepted or refused with the same words everywhere. What each engine offers is declared once,
in :data:`ENGINE_TRAITS`; ``auto`` resolves at dump time to the first engine in
:data:`AUTO_ORDER` that offers what was asked and can read the VM
(:func:`qmpdump.engines.run.choose_engine`).

Adding an engine: a member of :class:`EngineName`, its row in :data:`ENGINE_TRAITS`, and its
module in :mod:`qmpdump.engines` (registered in :mod:`qmpdump.engines.registry`). Adding an
output format: a member of :class:`DumpFormat`, listed in the formats of the engines that write
it.

Formats follow QEMU's ``DumpGuestMemoryFormat`` (``qapi/dump.json``; ``kdump-raw-*`` since QEMU
8.2); QEMU itself still decides at dump time which ones it offers
(``query-dump-guest-memory-capability``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qmpdump.elf.plan import DEFAULT_MAX_PHDRS
from qmpdump.errors import UsageError
from qmpdump.kdump.plan import ZeroPages

#: The snapshot engine's default limit on host memory growth (bytes).
DEFAULT_MAX_HOST_GROWTH = 256 << 20

__all__ = [
    "AUTO_ORDER",
    "ENGINE_TRAITS",
    "OWN_KDUMP_FORMATS",
    "DumpFormat",
    "DumpSpec",
    "EngineName",
    "EngineTraits",
    "Mode",
    "SpecProblem",
]


class EngineName(StrEnum):
    """The dump engines; ``auto`` lets qmpdump choose per dump."""

    AUTO = "auto"
    BACKEND = "backend"
    QEMU = "qemu"
    SNAPSHOT = "snapshot"


class Mode(StrEnum):
    """``consistent``: the VM is paused while its memory is read; ``live``: never paused by the
    copy (a fuzzy dump; QEMU's header probe still pauses it for milliseconds)."""

    CONSISTENT = "consistent"
    LIVE = "live"


class DumpFormat(StrEnum):
    """What the dump file holds."""

    ELF = "elf"
    KDUMP_ZLIB = "kdump-zlib"
    KDUMP_LZO = "kdump-lzo"
    KDUMP_SNAPPY = "kdump-snappy"
    KDUMP_RAW_ZLIB = "kdump-raw-zlib"
    KDUMP_RAW_LZO = "kdump-raw-lzo"
    KDUMP_RAW_SNAPPY = "kdump-raw-snappy"
    WIN_DMP = "win-dmp"
    #: qmpdump's own kdump writer only: zstd pages, or the codec every reader here opens
    KDUMP_ZSTD = "kdump-zstd"
    KDUMP = "kdump"

    @property
    def is_kdump(self) -> bool:
        """makedumpfile's compressed kdump (flattened or standard layout)."""
        return self.value.startswith("kdump")

    @property
    def extension(self) -> str:
        """The file name extension the daemon gives a dump of this format."""
        if self.is_kdump:
            return "kdump"
        return "dmp" if self is DumpFormat.WIN_DMP else self.value


#: The kdump-compressed formats qmpdump's own writer makes (:mod:`qmpdump.kdump`): always the
#: standard layout; ``kdump`` picks the codec (:func:`qmpdump.kdump.codecs.auto_codec`).
OWN_KDUMP_FORMATS: frozenset[DumpFormat] = frozenset(
    {
        DumpFormat.KDUMP,
        DumpFormat.KDUMP_ZLIB,
        DumpFormat.KDUMP_LZO,
        DumpFormat.KDUMP_SNAPPY,
        DumpFormat.KDUMP_ZSTD,
    }
)

#: The options of a :class:`DumpSpec` that only some engines honour, with their CLI spelling.
OPTIONS: Mapping[str, str] = {
    "paging": "--paging",
    "begin": "--begin",
    "length": "--length",
    "fix_elf_header": "--no-elf-fix",
    "seekable": "--seekable",
    "zero_pages": "--zero-pages",
    "max_program_headers": "--max-program-headers",
    "max_host_growth": "--max-host-growth",
    "kdump_zero_pages": "--kdump-zero-pages",
}


@dataclass(frozen=True, slots=True)
class EngineTraits:
    """What one engine offers: the single declaration every rule is checked against."""

    name: EngineName
    formats: frozenset[DumpFormat]
    modes: frozenset[Mode]
    #: the :data:`OPTIONS` it honours (any other, set away from its default, is refused)
    options: frozenset[str]
    #: whether it passes a pipe to QEMU over QMP (SCM_RIGHTS: UNIX sockets only)
    passes_fds: bool
    #: how the engine calls itself in messages
    label: str


ENGINE_TRAITS: Mapping[EngineName, EngineTraits] = {
    EngineName.BACKEND: EngineTraits(
        name=EngineName.BACKEND,
        formats=frozenset({DumpFormat.ELF}) | OWN_KDUMP_FORMATS,
        modes=frozenset(Mode),
        options=frozenset({"zero_pages", "max_program_headers", "kdump_zero_pages"}),
        passes_fds=True,  # QEMU's header probe (CPU notes, coverage)
        label="the backend engine",
    ),
    EngineName.QEMU: EngineTraits(
        name=EngineName.QEMU,
        formats=frozenset(DumpFormat) - {DumpFormat.KDUMP, DumpFormat.KDUMP_ZSTD},
        modes=frozenset({Mode.CONSISTENT}),
        options=frozenset({"paging", "begin", "length", "fix_elf_header", "seekable"}),
        passes_fds=True,
        label="QEMU's dump-guest-memory",
    ),
    # Never in AUTO_ORDER: it changes the VM's migration capabilities for the dump's duration,
    # which an operator should ask for.
    EngineName.SNAPSHOT: EngineTraits(
        name=EngineName.SNAPSHOT,
        formats=frozenset({DumpFormat.ELF}),
        modes=frozenset({Mode.CONSISTENT}),
        options=frozenset({"max_program_headers", "max_host_growth"}),
        passes_fds=True,  # the migration stream's socket, QEMU's header probe
        label="the snapshot engine",
    ),
}

#: The order in which ``auto`` tries the engines: the first that can make the dump wins.
AUTO_ORDER: tuple[EngineName, ...] = (EngineName.BACKEND, EngineName.QEMU)


class SpecProblem(ValueError):
    """Raised (inside pydantic validation) for a combination no engine can make.

    ``fields`` names the inputs involved, the one to blame first.
    """

    def __init__(self, fields: tuple[str, ...], message: str) -> None:
        self.fields = fields
        self.message = message
        super().__init__(message)


def _own_format_problem(spec: DumpSpec) -> SpecProblem | None:
    """The backend's options that need a particular format (ELF, or its own kdump)."""
    options = spec.options_set()
    if spec.format is not DumpFormat.ELF:
        for name in ("zero_pages", "max_program_headers"):
            if name in options:
                return SpecProblem((name, "format"), f"{OPTIONS[name]} is for the elf format only")
    if "kdump_zero_pages" in options and spec.format not in OWN_KDUMP_FORMATS:
        return SpecProblem(
            ("kdump_zero_pages", "format"),
            "--kdump-zero-pages is for qmpdump's own kdump formats only",
        )
    return None


def _format_problem(spec: DumpSpec) -> SpecProblem | None:
    """Options that need a particular format."""
    if (spec.begin is None) != (spec.length is None):
        return SpecProblem(("begin", "length"), "begin and length go together")
    if spec.begin is not None and spec.format is not DumpFormat.ELF:
        return SpecProblem(("begin", "format"), "begin/length are for the elf format only")
    if spec.paging and spec.format is not DumpFormat.ELF:
        return SpecProblem(("paging", "format"), "paging is for the elf format only")
    problem = _own_format_problem(spec)
    if problem is not None:
        return problem
    if spec.seekable and not spec.format.is_kdump:
        return SpecProblem(
            ("seekable", "format"),
            "seekable (the standard kdump layout) is for the kdump formats only",
        )
    return None


def engine_refusal(traits: EngineTraits, spec: DumpSpec) -> SpecProblem | None:
    """Why ``traits``' engine cannot make ``spec`` (format, mode, options), or None."""
    if spec.format not in traits.formats:
        if traits.formats == {DumpFormat.ELF}:
            why = f"{traits.label} writes ELF only, not {spec.format.value!r}"
        elif len(traits.formats) < len(DumpFormat) / 2:
            known = ", ".join(sorted(f.value for f in traits.formats))
            why = f"{traits.label} does not write {spec.format.value!r} (it writes {known})"
        else:
            why = f"{traits.label} does not write {spec.format.value!r}"
        return SpecProblem(("format", "engine"), why)
    if spec.mode not in traits.modes:
        what = "dumps one instant" if traits.name is EngineName.SNAPSHOT else "stops the VM"
        return SpecProblem(
            ("mode", "engine"),
            f"{traits.label} {what}: live mode needs engine backend or auto",
        )
    for name in spec.options_set():
        if name not in traits.options:
            return SpecProblem((name, "engine"), f"{OPTIONS[name]} is not for {traits.label}")
    return None


class DumpSpec(BaseModel):
    """One dump as asked for; valid only as a combination some engine can make."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineName = EngineName.AUTO
    format: DumpFormat = DumpFormat.ELF
    mode: Mode = Mode.CONSISTENT
    #: QEMU: guest-virtual mappings (ELF)
    paging: bool = False
    #: QEMU: first guest-physical byte and byte count (ELF)
    begin: Annotated[int, Field(ge=0)] | None = None
    length: Annotated[int, Field(gt=0)] | None = None
    #: QEMU: rewrite 7.2's ELF header so that makedumpfile reads it
    fix_elf_header: bool = True
    #: QEMU: kdump in the standard layout (QEMU's kdump-raw-* where offered, else rebuilt from
    #: the flattened stream)
    seekable: bool = False
    #: backend: leave out all-zero pages inside populated memory
    zero_pages: bool = False
    #: backend: cap on program headers (neighbours are joined to fit)
    max_program_headers: Annotated[int, Field(ge=2, le=0xFFFFFFFF)] = DEFAULT_MAX_PHDRS
    #: snapshot: refuse when QEMU would allocate more host memory than this (bytes) for the
    #: holes of shmem-backed RAM
    max_host_growth: Annotated[int, Field(ge=0)] = DEFAULT_MAX_HOST_GROWTH
    #: backend kdump: what becomes of zero pages (:class:`qmpdump.kdump.plan.ZeroPages`)
    kdump_zero_pages: ZeroPages = ZeroPages.EXCLUDE_HOLES

    def options_set(self) -> list[str]:
        """The engine-specific options set away from their defaults."""
        defaults = DumpSpec.model_fields
        return [n for n in OPTIONS if getattr(self, n) != defaults[n].default]

    def problem(self) -> SpecProblem | None:
        """What is wrong with this combination, or None."""
        problem = _format_problem(self)
        if problem is not None:
            return problem
        if self.engine is not EngineName.AUTO:
            return engine_refusal(ENGINE_TRAITS[self.engine], self)
        if not self.candidates():
            refusals = [engine_refusal(ENGINE_TRAITS[n], self) for n in AUTO_ORDER]
            why = "; ".join(r.message for r in refusals if r is not None)
            return SpecProblem(("format", "mode"), f"no engine can make this dump: {why}")
        return None

    def candidates(self) -> list[EngineTraits]:
        """The engines able to make this dump, in ``auto``'s order of preference."""
        names = AUTO_ORDER if self.engine is EngineName.AUTO else (self.engine,)
        return [ENGINE_TRAITS[n] for n in names if engine_refusal(ENGINE_TRAITS[n], self) is None]

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problem = self.problem()
        if problem is not None:
            raise problem
        return self

    @classmethod
    def checked(cls, **values: Any) -> DumpSpec:
        """A valid spec from these values (None means the default), or :class:`UsageError`."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as err:
            raise UsageError("; ".join(spec_messages(err))) from err


def spec_messages(err: ValidationError) -> list[str]:
    """One sentence per problem of a failed :class:`DumpSpec` validation."""
    out = []
    for e in err.errors(include_url=False):
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, SpecProblem):
            out.append(cause.message)
        else:
            where = ".".join(str(p) for p in e["loc"])
            out.append(f"{where}: {e['msg']}" if where else e["msg"])
    return out
