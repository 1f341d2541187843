"""``qmpdump map``: what a VM's memory looks like, without reading any of it.

Human view: the VM, a table of guest-physical RAM pieces, one bar per RAM region (and per
virtio-mem device) showing populated, plugged and unplugged memory, and totals. ``--json``
prints the ``qmpdump.map/1`` document (:mod:`qmpdump.report`); ``--svg FILE`` writes a picture.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from qmpdump.cli.source import add_source_arguments, libvirt_ref, monitor_mode, open_session
from qmpdump.errors import UsageError
from qmpdump.memmap.populated import Population
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.sizes import format_size
from qmpdump.survey import Survey, survey

__all__ = ["add_parser", "render_text", "run"]

BAR_WIDTH = 64

#: glyphs: mostly data, some data, plugged without data, RAM without data / unplugged
UNICODE_GLYPHS = ("█", "▓", "▒", "·")
ASCII_GLYPHS = ("#", "+", "=", ".")


def add_parser(commands: Any) -> None:
    """Register ``map``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "map",
        help="show a VM's guest-physical memory: layout, virtio-mem, populated blocks",
        description="Show a VM's guest-physical layout, its virtio-mem devices and which "
        "memory really holds data on the host. Reads no guest memory and does not pause the "
        "VM, unless --exact-plug is given.",
    )
    add_source_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the qmpdump.map/1 JSON")
    parser.add_argument("--svg", metavar="FILE", type=Path, help="also write a picture")
    parser.add_argument(
        "--exact-plug",
        action="store_true",
        help="read the exact plugged virtio-mem ranges from QEMU's dump headers "
        "(pauses the VM for a few milliseconds)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per-command QMP timeout"
    )
    parser.add_argument("--ascii", action="store_true", help="bars in ASCII")
    parser.set_defaults(run=run)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _bar(
    window: Range, populated: RangeSet, plugged: RangeSet | None, glyphs: tuple[str, ...]
) -> str:
    """One character per 1/BAR_WIDTH of ``window``: how much data and plug it holds."""
    out = []
    step = window.size / BAR_WIDTH
    for i in range(BAR_WIDTH):
        lo = window.start + int(i * step)
        hi = window.start + int((i + 1) * step)
        if hi <= lo:
            hi = lo + 1
        cell = Range(lo, hi - lo)
        data = populated.clip(cell).total / cell.size
        if data >= 0.5:
            out.append(glyphs[0])
        elif data > 0:
            out.append(glyphs[1])
        elif plugged is not None and plugged.clip(cell):
            out.append(glyphs[2])
        else:
            out.append(glyphs[3])
    return "".join(out)


def render_text(result: Survey, *, ascii_only: bool = False) -> str:
    """The human view of a survey."""
    glyphs = ASCII_GLYPHS if ascii_only else UNICODE_GLYPHS
    pop: Population = result.population
    layout = pop.layout
    f = result.facts
    lines = [
        f"VM {f.name or '(unnamed)'}: QEMU {f.qemu_version}, pid {f.pid if f.pid else 'unknown'}, "
        f"{f.run_state}, QMP {f.address}",
        "",
        f"{'guest-physical range':<37} {'size':>9}  {'region':<14} {'backend':<18} "
        f"{'file offset':>12}  {'populated':>9}",
    ]
    for p in layout.pieces:
        region = pop.regions.get(p.region)
        known = region is not None and region.known
        data = format_size(pop.populated.clip(p.gpa).total) if known else "unknown"
        backend = f"{p.backend.id or '-'} ({p.backend.type})"
        offset = f"{p.region_offset:#x}" if p.backend.type.has_fd else "-"
        lines.append(
            f"{p.gpa.start:#018x}-{p.gpa.end - 1:#018x} {format_size(p.gpa.size):>9}  "
            f"{p.region:<14} {backend:<18} {offset:>12}  {data:>9}" + ("  ro" if p.readonly else "")
        )
    lines += ["", "RAM regions (one bar each, whole region, in region offset order):"]
    for b in layout.backends:
        region = pop.regions.get(b.region)
        if region is None or not region.known:
            note = region.note if region else "not inspected"
            lines.append(f"  {b.region:<14} {format_size(b.size):>9}  population unknown: {note}")
            continue
        if layout.device_for(b.region):
            continue  # drawn with its device below
        bar = _bar(Range(0, b.size), region.offsets, None, glyphs)
        lines.append(
            f"  {b.region:<14} {format_size(b.size):>9}  [{bar}] "
            f"{format_size(region.offsets.total)} ({_percent(region.offsets.total, b.size)}) "
            f"{region.source}"
        )
    for d in pop.devices:
        dev = d.device
        kind = "exact" if d.plugged_exact else "inferred from data"
        lines += [
            "",
            f"virtio-mem {dev.id} at {dev.memaddr:#x}: max {format_size(dev.max_size)}, "
            f"block {format_size(dev.block_size)}, plugged {format_size(dev.size)} "
            f"(requested {format_size(dev.requested_size)}), backend {dev.memdev}",
            f"  [{_bar(dev.region, d.populated, d.plugged, glyphs)}]",
            f"  populated {format_size(d.populated.total)} in {len(d.blocks_with_data)} "
            f"run(s) of blocks; plugged ranges {kind}: "
            + (
                ", ".join(f"{r.start:#x}+{format_size(r.size)}" for r in list(d.plugged)[:4])
                or "none"
            )
            + (" ..." if len(d.plugged) > 4 else ""),
        ]
    ram = layout.ram.total
    lines += [
        "",
        f"legend: {glyphs[0]} mostly data  {glyphs[1]} some data  {glyphs[2]} plugged, no data  "
        f"{glyphs[3]} no data / unplugged",
        f"total: RAM {format_size(ram)}, populated {format_size(pop.populated.total)} "
        f"({_percent(pop.populated.total, ram)}) in {len(pop.populated)} extents"
        + (f", unknown {format_size(pop.unknown.total)}" if pop.unknown else ""),
    ]
    return "\n".join(lines) + "\n"


def _write_svg(path: Path, result: Survey) -> None:
    from qmpdump.mapsvg import render_svg  # noqa: PLC0415 - only when asked for

    text = render_svg(result.report())
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Survey and print."""
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.svg is not None and not args.svg.parent.is_dir():
        raise UsageError(f"--svg: no folder {args.svg.parent}")
    if monitor_mode(args) == "supported":
        return await _run_supported(args, out)
    async with open_session(args) as session:
        result = await survey(session, exact_plug=args.exact_plug)
    if args.svg is not None:
        _write_svg(args.svg, result)
    if args.json:
        out.write(result.report().to_json() + "\n")
    else:
        out.write(render_text(result, ascii_only=args.ascii))
        if args.svg is not None:
            out.write(f"picture: {args.svg}\n")
    return 0


async def _run_supported(args: argparse.Namespace, out: TextIO) -> int:
    """``--libvirt`` without passthrough: the domain XML plus host facts."""
    from qmpdump.libvirt.supported import map_supported, render_supported  # noqa: PLC0415

    if args.exact_plug or args.svg is not None:
        raise UsageError(
            "--exact-plug and --svg need the guest-physical layout: add --monitor passthrough"
        )
    result = await map_supported(libvirt_ref(args))
    out.write(result.to_json() + "\n" if args.json else render_supported(result))
    return 0
