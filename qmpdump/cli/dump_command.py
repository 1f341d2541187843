"""``qmpdump dump``: dump a VM's memory into a file, with progress, cancel and a sidecar.

A progress bar goes to stderr when it is a terminal (silent otherwise); Ctrl-C or SIGTERM
cancels: the partial file is removed and the VM runs as before. ``--json`` prints a summary.

Migration settings the snapshot engine changes are journalled first
(:mod:`qmpdump.cli.settings_journal`); every dump on a QMP session starts by putting back what
a killed run left changed on the same QEMU, with a warning line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from qmpdump.cli.progress import ProgressBar
from qmpdump.cli.settings_journal import (
    SettingsJournal,
    journal_address,
    journal_hooks,
    restore_orphaned,
    runtime_dir,
)
from qmpdump.cli.source import add_source_arguments, libvirt_ref, monitor_mode, open_session
from qmpdump.elf.plan import DEFAULT_MAX_PHDRS
from qmpdump.engines.base import ProgressCallback
from qmpdump.engines.run import DumpOutcome, DumpTask, run_dump
from qmpdump.engines.spec import (
    DEFAULT_MAX_HOST_GROWTH,
    DumpFormat,
    DumpSpec,
    EngineName,
    Mode,
)
from qmpdump.errors import UnsafeThroughLibvirt, UsageError
from qmpdump.kdump.plan import ZeroPages
from qmpdump.output import dump_name
from qmpdump.service.config import VM_NAME_PATTERN
from qmpdump.service.store import new_job_id
from qmpdump.sinks.deliver import SinkOutcome, dump_to_s3, then
from qmpdump.sinks.s3 import S3Location, UploadProgress
from qmpdump.sizes import format_size, parse_size

__all__ = ["add_parser", "run"]


def _size(text: str) -> int:
    """A byte count as :func:`qmpdump.sizes.parse_size` reads it (the configuration's too)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(commands: Any) -> None:
    """Register ``dump``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "dump",
        help="dump a VM's memory into a file",
        description="Dump a VM's guest memory into FILE (written as FILE.partial, renamed when "
        "complete; mode 0600) with a sidecar FILE.json.",
    )
    add_source_arguments(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", type=Path, metavar="FILE")
    where.add_argument(
        "--to",
        metavar="s3://BUCKET/PREFIX/",
        help="store the dump in an S3 bucket instead (named VM-TIMESTAMP-ID.EXT as the daemon "
        "names files, sidecar beside it as NAME.json); credentials, endpoint and region come "
        "from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and the shared "
        "credentials file), AWS_ENDPOINT_URL and AWS_REGION. The dump is spooled in a private "
        "folder under $TMPDIR first (see --spool-dir) and removed after the upload",
    )
    parser.add_argument(
        "--name",
        help="--to: the VM name in the object's name (default: the QMP socket's file name "
        "without its suffix, as [[discover]] name_from = 'stem')",
    )
    parser.add_argument(
        "--spool-dir", type=Path, metavar="DIR", help="--to: where the dump is spooled"
    )
    parser.add_argument(
        "--engine",
        choices=[e.value for e in EngineName],
        default=EngineName.AUTO.value,
        help="backend: qmpdump's sparse reader (ELF or kdump of populated memory only); qemu: "
        "QEMU's dump-guest-memory; snapshot: one instant through QEMU's background snapshot, "
        "the VM paused for milliseconds (QEMU 8.1+, ELF); auto (default): backend when it can "
        "read every RAM region and writes the format, else qemu",
    )
    parser.add_argument(
        "--max-host-growth",
        type=_size,
        default=DEFAULT_MAX_HOST_GROWTH,
        metavar="SIZE",
        help="snapshot: refuse when QEMU would allocate more host memory than this for the "
        "holes of shmem-backed RAM (default 256MiB)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="never stop the VM while copying (a fuzzy dump; QEMU's header probe still pauses "
        "it for a few milliseconds): the backend engine only; auto refuses if it cannot use it",
    )
    parser.add_argument(
        "--format",
        default="elf",
        help=f"{', '.join(f.value for f in DumpFormat)} (default elf); the backend writes "
        "elf and kdump-zlib|lzo|snappy|zstd itself (kdump: the codec every reader here opens); "
        "the qemu engine writes whatever this QEMU offers",
    )
    parser.add_argument(
        "--kdump-zero-pages",
        choices=[z.value for z in ZeroPages],
        default=ZeroPages.EXCLUDE_HOLES.value,
        help="backend kdump: exclude-holes (default): RAM the host never populated is left "
        "out (readers say 'page excluded'), all-zero pages read point at one shared zero page; "
        "exclude: every zero page left out (smallest, as makedumpfile -d 1; makedumpfile then "
        "cannot read kernel structures that span one); shared: every RAM page dumped, zero "
        "pages shared (24 bytes per RAM page)",
    )
    parser.add_argument("--paging", action="store_true", help="ELF: guest-virtual mappings")
    parser.add_argument(
        "--begin", type=_size, help="ELF: first guest-physical byte (0x1000, 1MiB, 1MB = 10^6)"
    )
    parser.add_argument("--length", type=_size, help="ELF: bytes from --begin (same units)")
    parser.add_argument(
        "--no-elf-fix",
        action="store_true",
        help="keep QEMU 7.2's ELF header layout (makedumpfile cannot read it)",
    )
    parser.add_argument(
        "--seekable",
        action="store_true",
        help="kdump: write the standard layout that crash and makedumpfile read directly: "
        "QEMU's own kdump-raw-* where it offers it (10.0), else rebuilt from QEMU's flattened "
        "stream as makedumpfile -R does (7.2); hashed at the end",
    )
    parser.add_argument(
        "--zero-pages",
        action="store_true",
        help="backend: also leave out all-zero pages inside populated memory (described as "
        "zero-fill; costs one more read of the data)",
    )
    parser.add_argument(
        "--max-program-headers",
        type=int,
        default=DEFAULT_MAX_PHDRS,
        metavar="N",
        help=f"backend: cap on ELF program headers (default {DEFAULT_MAX_PHDRS}, which readers "
        "without PN_XNUM such as volatility3 need; neighbours are joined to fit). Above 65534 "
        "the core uses PN_XNUM",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="QMP timeout")
    parser.set_defaults(run=run)


def _summary(outcome: DumpOutcome) -> dict[str, Any]:
    return {
        "path": str(outcome.path),
        "sidecar": str(outcome.sidecar),
        "engine": outcome.engine.value,
        "engine_reason": outcome.record.engine_reason,
        "format": outcome.format.value,
        "bytes": outcome.size,
        "sha256": outcome.sha256,
        "duration_s": round(outcome.duration_s, 3),
        "paused_s": None if outcome.paused_s is None else round(outcome.paused_s, 3),
    }


def spec_of(args: argparse.Namespace) -> DumpSpec:
    """The dump specification the options describe (UsageError if no engine can make it)."""
    if not 2 <= args.max_program_headers <= 0xFFFFFFFF:
        raise UsageError("--max-program-headers must be between 2 and 4294967295")
    return DumpSpec.checked(
        engine=args.engine,
        format=args.format,
        mode=Mode.LIVE if args.live else Mode.CONSISTENT,
        paging=args.paging,
        begin=args.begin,
        length=args.length,
        fix_elf_header=not args.no_elf_fix,
        seekable=args.seekable,
        zero_pages=args.zero_pages,
        max_program_headers=args.max_program_headers,
        max_host_growth=args.max_host_growth,
        kdump_zero_pages=ZeroPages(args.kdump_zero_pages),
    )


def _through_libvirts_api(mode: str | None, spec: DumpSpec) -> bool:
    """Whether QEMU's own dump of a libvirt domain is asked for: it goes through libvirt's API
    in either mode (qmpdump.qmp.passthrough: libvirt 9.0 crashes on a passed-through dump)."""
    return mode == "supported" or (
        mode == "passthrough"
        and (spec.engine is EngineName.QEMU or spec.format is not DumpFormat.ELF)
    )


async def _dump_at(
    args: argparse.Namespace,
    spec: DumpSpec,
    target: Path,
    bar: ProgressBar,
    *,
    overwrite: bool,
    tap: ProgressCallback | None = None,
) -> DumpOutcome:
    """One dump into ``target`` from ``--qmp`` or ``--libvirt`` (either monitor mode);
    ``tap`` also gets the engine's progress (a sink streaming the dump)."""
    mode = monitor_mode(args)
    if _through_libvirts_api(mode, spec):
        assert mode is not None
        return await _dump_supported(args, spec, mode, target, bar, overwrite=overwrite)
    try:
        async with open_session(args) as session:
            journal = SettingsJournal(runtime_dir(), journal_address(session))
            await restore_orphaned(journal, session, sys.stderr)
            return await run_dump(
                session,
                target,
                spec,
                overwrite=overwrite,
                progress=then(lambda p: bar.show(p.completed, p.total), tap),
                hooks=journal_hooks(journal, session),
            )
    except UnsafeThroughLibvirt:
        if mode != "passthrough":
            raise
        # auto chose QEMU's engine (the backend can't read this VM): libvirt's API dumps it
        return await _dump_supported(args, spec, mode, target, bar, overwrite=overwrite)


async def _dump(args: argparse.Namespace, spec: DumpSpec) -> DumpOutcome:
    with ProgressBar("dump") as bar:
        return await _dump_at(args, spec, args.output, bar, overwrite=args.overwrite)


async def _dump_supported(
    args: argparse.Namespace,
    spec: DumpSpec,
    mode: str,
    target: Path,
    bar: ProgressBar,
    *,
    overwrite: bool,
) -> DumpOutcome:
    """QEMU's dump of a libvirt domain through libvirt's API."""
    from qmpdump.libvirt.supported import dump_supported  # noqa: PLC0415 - optional extra

    unsupported = [
        flag
        for flag, given in (
            ("--engine backend", spec.engine is EngineName.BACKEND),
            ("--live", spec.mode is Mode.LIVE),
            ("--paging", spec.paging),
            ("--begin/--length", spec.begin is not None or spec.length is not None),
            ("--seekable", spec.seekable),
            ("--zero-pages", spec.zero_pages),
        )
        if given
    ]
    if unsupported:
        raise UsageError(
            f"{', '.join(unsupported)}: not available through libvirt's dump API; use "
            "--monitor passthrough with the backend engine"
        )
    return await dump_supported(
        libvirt_ref(args),
        target,
        fmt=spec.format.value,
        fix_elf_header=spec.fix_elf_header,
        overwrite=overwrite,
        progress=lambda p: bar.show(p.completed, p.total),
        monitor=mode,
    )


def _vm_name(args: argparse.Namespace) -> str:
    """The VM name for an object's name: ``--name``, else the domain's name or the socket's
    stem; validated."""
    name = args.name
    if name is None and args.libvirt is not None:
        name = args.libvirt
    elif name is None:
        name = "vm" if args.qmp.startswith("tcp:") else Path(args.qmp).stem
    if not re.fullmatch(VM_NAME_PATTERN, name):
        raise UsageError(
            f"{name!r} is not a valid VM name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit): give one with --name"
        )
    return str(name)


async def _dump_to_bucket(
    args: argparse.Namespace,
    spec: DumpSpec,
    location: S3Location,
    name: str,
    stored: list[SinkOutcome],
) -> DumpOutcome:
    """Dump into a spool and upload (``stored`` receives where it went)."""
    with ProgressBar("dump") as bar:

        async def write(target: Path, tap: ProgressCallback) -> DumpOutcome:
            return await _dump_at(args, spec, target, bar, overwrite=False, tap=tap)

        def uploaded(u: UploadProgress) -> None:
            if u.total is not None:  # parts sent while the dump runs: its bar stays
                bar.show(u.uploaded, u.total, "upload")

        done = await dump_to_s3(
            write,
            location=location,
            name=name,
            spool_root=args.spool_dir,
            progress=uploaded,
        )
    stored.append(done)
    return done.dump


def _stored_summary(done: SinkOutcome) -> dict[str, Any]:
    summary = _summary(done.dump)
    summary.pop("path")
    summary.pop("sidecar")
    return {
        "url": done.stored.url,
        "sidecar_url": f"s3://{done.stored.bucket}/{done.stored.sidecar_key}",
        **summary,
        "upload_s": round(done.upload_s, 3),
        "parts": done.stored.parts,
    }


def _report_stored(done: SinkOutcome, as_json: bool, out: TextIO) -> int:
    if as_json:
        out.write(json.dumps(_stored_summary(done), indent=2) + "\n")
        return 0
    d = done.dump
    paused = "" if d.paused_s is None else f", VM paused {d.paused_s:.2f} s"
    out.write(
        f"{done.stored.url}: {format_size(d.size)} ({d.format}, engine {d.engine}) dumped in "
        f"{d.duration_s:.2f} s{paused}, uploaded in {done.upload_s:.2f} s "
        f"({done.stored.parts} parts)\n"
        f"engine: {d.engine} ({d.record.engine_reason})\n"
        f"sha256 {d.sha256}\nsidecar s3://{done.stored.bucket}/{done.stored.sidecar_key}\n"
    )
    return 0


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Dump, reporting progress; SIGINT/SIGTERM cancel it."""
    location = S3Location.parse(args.to) if args.to else None
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    spec = spec_of(args)
    stored: list[SinkOutcome] = []
    if location is None:
        dump = DumpTask(_dump(args, spec))
    else:
        now = time.time()
        name = dump_name(_vm_name(args), new_job_id(now), spec.format.extension, now)
        dump = DumpTask(_dump_to_bucket(args, spec, location, name, stored))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, dump.cancel)
    try:
        outcome = await dump.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if stored:
        return _report_stored(stored[0], args.json, out)
    if args.json:
        out.write(json.dumps(_summary(outcome), indent=2) + "\n")
    else:
        paused = "" if outcome.paused_s is None else f", VM paused {outcome.paused_s:.2f} s"
        out.write(
            f"{outcome.path}: {format_size(outcome.size)} ({outcome.format}, engine "
            f"{outcome.engine}) in {outcome.duration_s:.2f} s{paused}\n"
            f"engine: {outcome.engine} ({outcome.record.engine_reason})\n"
            f"sha256 {outcome.sha256}\nsidecar {outcome.sidecar}\n"
        )
    return 0
