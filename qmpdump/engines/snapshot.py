"""Engine 3: a point-in-time dump through QEMU's background snapshot, the guest paused briefly.

QEMU's ``background-snapshot`` migration capability write-protects guest RAM with userfaultfd
at the snapshot point and resumes the guest at once; a page the guest is about to write is sent
before the write lands, the rest in order. The stream goes into a UNIX socket qmpdump passed over
QMP (``getfd``, ``migrate fd:NAME``; a socket rather than a pipe so that ``shutdown`` unblocks
both ends on abort); a worker thread parses it (:mod:`qmpdump.migstream`) and writes each page
into an ELF core planned with :mod:`qmpdump.elf.plan` (the backend engine's layout).

The instant, and notes of that instant (``instant="qemu"``, the default):

1. Before: the layout (:func:`qmpdump.survey.survey`), the socket handed to QEMU, the migration
   capabilities and ``max-bandwidth`` saved (the daemon journals them through
   :class:`~qmpdump.engines.base.PauseHooks`) and set, and QEMU's dump headers read
   (:func:`qmpdump.qmp.plugged.read_dump_prefix`; QEMU pauses the VM for about a millisecond on
   its own): its PT_LOAD coverage, and notes of the size the core must plan for.
2. ``migrate``. QEMU sets up (pre-touching guest RAM, with the guest running), then stops the
   VM, stashes the device state (the vCPUs' registers among it), write-protects RAM and
   resumes the VM: the snapshot point is QEMU's own pause, and qmpdump never sends ``stop``.
3. Once the first page arrived (after the instant): the populated set from the host (on
   anonymous RAM it can only have grown since: a superset is a correct plan, pages that arrive
   as zero stay holes; shmem holes were faulted in by QEMU's setup) and the plan, notes last,
   so that the output is hashed while the pages arrive.
4. After the last page: the stashed device state, walked with the stream's own JSON
   description (:mod:`qmpdump.vmstate`), gives every vCPU's registers; the guest's VMCOREINFO
   note is read from the snapshot's own pages where the ``vmcoreinfo`` device points; the
   notes are built as QEMU builds them (:mod:`qmpdump.elf.x86_notes`) and must have the size
   the probe's had. The stream's early virtio-mem sections (the plug state at the instant) must
   match the probe's coverage.

Where QEMU's core would not be an x86-64 one (another architecture, or vCPU 0 outside long
mode), qmpdump makes the instant itself (``instant="stop"``): ``stop``, QEMU's dump headers of
the stopped VM, ``migrate``, ``cont`` once the first page arrived (QEMU's own resume is scheduled
before it; the run state is checked and ``cont`` repeated if QEMU's resume marked the running
VM paused).

QEMU before 8.1 is refused: there, a background snapshot that fails or is cancelled after
write-protection started leaves the guest blocked on its next write (as the issue and
``shared/FACTS.md`` report; this engine never runs it on 7.2).

Never a wrong dump: every page of QEMU's coverage must arrive exactly once; a page that holds
data where the host said the memory was unpopulated, a stream that stops early, or a
migration that does not end ``completed`` fails the dump.

Host memory: QEMU reads every page before write-protecting it (``ram_write_tracking_prepare``),
which on anonymous memory maps the shared zero page (no growth) but allocates every hole of
shmem-backed RAM (memfd, files in tmpfs). The growth is predicted before starting (the holes of
plugged fd-backed RAM), refused above ``max_host_growth``, and measured afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeVar

from qmpdump.elf.format import parse_header
from qmpdump.elf.plan import (
    DEFAULT_MAX_PHDRS,
    EM_X86_64,
    CorePlan,
    Segment,
    notes_payload,
    plan_core,
    segment_for,
)
from qmpdump.elf.x86_notes import cpus_from_state, guest_note, guest_note_ref, x86_64_notes
from qmpdump.engines.base import (
    EngineDetails,
    EngineJob,
    EngineResult,
    MigrationSettings,
    PauseHooks,
    Progress,
    ProgressCallback,
)
from qmpdump.engines.copier import CopyState, hash_output
from qmpdump.engines.spec import (
    DEFAULT_MAX_HOST_GROWTH,
    ENGINE_TRAITS,
    EngineName,
    EngineTraits,
)
from qmpdump.engines.threads import uncancellable
from qmpdump.errors import (
    DumpBusy,
    DumpCancelled,
    DumpError,
    DumpFailed,
    MigrationStreamError,
    QEMUGone,
    QMPCommandError,
    QMPDisconnected,
    QmpdumpError,
    QMPTimeout,
    SnapshotRefused,
)
from qmpdump.host.procmem import read_process_memory
from qmpdump.memmap.layout import Layout
from qmpdump.memmap.populated import compute_population
from qmpdump.memmap.ranges import Range, RangeSet
from qmpdump.migstream import (
    PAGE_SIZE,
    SECTION_FULL,
    EarlyVirtioMem,
    MigrationStream,
    RamBlocks,
    RamDone,
)
from qmpdump.output import DumpTarget, write_error
from qmpdump.qmp.events import PAUSE_BREAKERS, Event, changes_heard, paused_seconds
from qmpdump.qmp.plugged import dump_loads, read_dump_prefix
from qmpdump.qmp.probe import query_status
from qmpdump.qmp.session import EventQueue, QMPSession
from qmpdump.survey import Survey, probe_prefix_without_growth, region_population, survey
from qmpdump.vmstate import parse_device_state

log = logging.getLogger(__name__)

__all__ = [
    "ENGINE",
    "MIN_QEMU",
    "SnapshotDetails",
    "SnapshotDumpRequest",
    "SnapshotDumpResult",
    "SnapshotEngine",
    "dump_with_snapshot",
    "predict_growth",
    "run_state_refusal",
    "snapshot_supported",
]

#: The first QEMU whose failed or cancelled background snapshot releases the guest.
MIN_QEMU: Final = (8, 1)
#: Capabilities that change the stream's layout, or that background-snapshot excludes.
_FORMAT_CAPS: Final = frozenset(
    {
        "xbzrle",
        "compress",
        "multifd",
        "postcopy-ram",
        "x-ignore-shared",
        "mapped-ram",
        "rdma-pin-all",
        "postcopy-preempt",
        "zero-copy-send",
        "dirty-bitmaps",
        "return-path",
        "x-colo",
    }
)
_ACTIVE: Final = frozenset(
    {
        "setup",
        "active",
        "cancelling",
        "pre-switchover",
        "device",
        "wait-unplug",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
        "colo",
    }
)
_FINAL: Final = frozenset({"completed", "failed", "cancelled"})
_T = TypeVar("_T")
_SOCKET_BUFFER: Final = 4 << 20
_TOUCH_CHUNK: Final = 8 << 20
#: data pages held in memory while the plan is being made (then the reader waits for it)
_EARLY_LIMIT: Final = 512 << 20
#: max-bandwidth while the snapshot streams (bytes/s; QEMU's default is 128 MiB/s)
_BANDWIDTH: Final = 16 << 30
_READ_BUFFER: Final = 4 << 20
#: the device state after the pages (a few hundred KiB for the test VM)
_MAX_DEVICE_STATE: Final = 256 << 20
_FLUSH: Final = 1 << 20
#: pages received between two moves of the hasher's frontier (16 MiB)
_HASH_STEP: Final = 4096
POLL_S: Final = 0.05
#: QEMU's refusal of ``migrate`` while its dump's migration blocker is still up, and how long
#: it is asked again after the probe dump finished
_DUMP_BLOCKED: Final = "dump-guest-memory in progress"
_DUMP_BLOCKER_S: Final = 5.0
#: the first page's wait, plus QEMU's pre-touch of the predicted growth at a slow rate
_FIRST_PAGE_S: Final = 30.0
_PRETOUCH_RATE: Final = 50 << 20
#: how long unwinding waits for the reader and hasher threads
_THREAD_GRACE_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class SnapshotDumpRequest:
    """How to run the snapshot engine."""

    max_phdrs: int = DEFAULT_MAX_PHDRS
    #: refuse when QEMU's pre-touch would allocate more host memory than this (bytes)
    max_host_growth: int = DEFAULT_MAX_HOST_GROWTH
    #: allocate the holes QEMU would allocate before pausing the guest (shmem-backed RAM)
    preallocate: bool = True
    #: called before ``stop`` (the daemon journals its intent here) and after ``cont``
    hooks: PauseHooks = field(default_factory=PauseHooks)
    #: "qemu": QEMU's own pause is the instant, the notes come from the state it stashed
    #: (x86-64 guests in long mode); "stop": qmpdump stops the VM and reads QEMU's notes
    instant: Literal["qemu", "stop"] = "qemu"
    #: give up when the stream stands still this long (the guest's writes wait meanwhile)
    stall_s: float = 10.0


@dataclass(frozen=True, slots=True)
class SnapshotDumpResult:
    """A finished snapshot dump (committed by the caller)."""

    size: int
    sha256: str
    #: from QEMU's STOP to its RESUME event (QEMU's clock), or our own clock without events
    paused_s: float | None
    plan: CorePlan
    copied: int
    survey: Survey
    stream_bytes: int
    predicted_growth: int
    measured_growth: int
    qemu_downtime_ms: int | None
    zero_pages: int
    data_pages: int
    timings: dict[str, float] = field(default_factory=dict)


def snapshot_supported(qemu_version: str) -> tuple[bool, str]:
    """Whether this QEMU version may run a background snapshot without risk to the guest."""
    try:
        major, minor = (int(p) for p in qemu_version.split(".")[:2])
    except ValueError:
        return False, f"QEMU version {qemu_version!r} is not understood"
    if (major, minor) < MIN_QEMU:
        return False, (
            f"QEMU {qemu_version} leaves the guest blocked on its next write when a background "
            "snapshot fails or is cancelled (fixed in 8.1)"
        )
    return True, f"QEMU {qemu_version} supports background snapshots"


def predict_growth(before: Survey) -> int:
    """Bytes of host memory QEMU's pre-touch would allocate: holes of plugged fd-backed RAM.

    Main RAM is plugged whole; a virtio-mem device's plugged size is ``size`` (QEMU reads only
    plugged blocks: ``ram_block_populate_read`` follows the RamDiscardManager).
    """
    growth = 0
    layout = before.layout
    for backend in layout.backends:
        if not backend.type.has_fd:
            continue
        region = before.population.regions.get(backend.region)
        populated = region.offsets.total if region is not None else 0
        device = layout.device_for(backend.region)
        plugged = device.size if device is not None else backend.size
        growth += max(0, plugged - populated)
    return growth


def _plugged_holes(before: Survey, *, fd_only: bool = True) -> dict[str, RangeSet]:
    """Per region: the holes (region offsets) of plugged memory that QEMU's pre-touch faults in
    (allocating them on fd-backed RAM; mapping the zero page on anonymous RAM)."""
    holes: dict[str, RangeSet] = {}
    layout = before.layout
    for backend in layout.backends:
        region = before.population.regions.get(backend.region)
        if (fd_only and not backend.type.has_fd) or region is None or not region.known:
            continue
        device = next(
            (d for d in before.population.devices if d.device.memdev == backend.region), None
        )
        plugged = (
            layout.gpa_to_region(backend.region, device.plugged)
            if device is not None
            else RangeSet.of(0, backend.size)
        )
        found = plugged - region.offsets
        if found:
            holes[backend.region] = found
    return holes


def preallocate(before: Survey) -> int:
    """Fault in now, with the guest running, the holes QEMU's pre-touch would fault in during
    our pause (one page fault each: measured 3 s for 440 MiB of memfd holes, 0.5 s when only
    the allocation was done ahead with ``fallocate``; on anonymous RAM a read maps the shared
    zero page, which allocates nothing but still costs QEMU a fault per page); bytes touched.

    Reading through QEMU's own mapping (``process_vm_readv`` faults pages into QEMU's page
    tables, as its ``MADV_POPULATE_READ`` would) allocates the same pages QEMU would: only
    plugged memory (``before`` must know it exactly), holes only; the guest's concurrent
    writes are unaffected (a read fault on shmem allocates a zero page only where none is).
    """
    pid = before.facts.pid
    if pid is None:
        return 0
    buf = bytearray(_TOUCH_CHUNK)
    view = memoryview(buf)
    done = 0
    for region, holes in _plugged_holes(before, fd_only=False).items():
        access = before.access[region]
        if access.hva is None:
            continue
        for hole in holes:
            at = 0
            while at < hole.size:
                size = min(_TOUCH_CHUNK, hole.size - at)
                read_process_memory(pid, access.hva + hole.start + at, view[:size])
                at += size
            done += hole.size
    return done


def _fd_populated(result: Survey) -> int:
    total = 0
    for backend in result.layout.backends:
        region = result.population.regions.get(backend.region)
        if backend.type.has_fd and region is not None:
            total += region.offsets.total
    return total


# -- pure: stream pages to guest-physical addresses and file offsets -------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Block offsets ``[start, end)`` are guest-physical ``gpa + (offset - start)``.

    ``covered``: inside QEMU's dump coverage (else the pages are ignored: ROM blobs, parts of
    main RAM hidden by PCI holes). ``file_offset``: where the window's first byte goes in the
    core, or -1 where the plan has no bytes (zero-fill, or beyond a joined segment).
    """

    start: int
    end: int
    gpa: int
    covered: bool
    file_offset: int


def block_windows(
    layout: Layout, blocks: RamBlocks, coverage: RangeSet, plan: CorePlan
) -> dict[str, tuple[Window, ...]]:
    """For each stream block, its offsets cut into windows (pure; see :class:`Window`).

    A block's idstr is the region name, prefixed with the owning device's path (``0000:00:01.0/
    mem-vmem0``). Blocks of no region of the layout get no windows (their pages are ignored).
    Raises :class:`MigrationStreamError` when a region of the layout matches no block or
    several, or its block's size differs from the region's.
    """
    names = sorted(b.idstr for b in blocks.blocks)
    out: dict[str, tuple[Window, ...]] = {}
    for backend in layout.backends:
        matches = [
            b
            for b in blocks.blocks
            if b.idstr == backend.region or b.idstr.endswith("/" + backend.region)
        ]
        if len(matches) != 1:
            raise MigrationStreamError(
                f"RAM region {backend.region} matches {len(matches)} blocks of the stream "
                f"({', '.join(names)})"
            )
        block = matches[0]
        if block.used_length != backend.size:
            raise MigrationStreamError(
                f"RAM block {block.idstr} has {block.used_length:#x} bytes in the stream, "
                f"the region {backend.size:#x}"
            )
        windows: list[Window] = []
        for piece in sorted(layout.pieces_of(backend.region), key=lambda p: p.region_offset):
            windows += _piece_windows(piece.region_offset, piece.gpa, coverage, plan)
        out[block.idstr] = tuple(windows)
    return out


def _piece_windows(
    region_offset: int, gpas: Range, coverage: RangeSet, plan: CorePlan
) -> list[Window]:
    def offset_of(gpa: int) -> int:
        return region_offset + (gpa - gpas.start)

    windows: list[Window] = []
    at = gpas.start
    for run in coverage.clip(gpas):
        if run.start > at:
            windows.append(Window(offset_of(at), offset_of(run.start), at, False, -1))
        cut = run.start
        while cut < run.end:
            seg = segment_for(plan, cut)
            if seg is None:  # the planner dropped this zero-fill range (header cap)
                nxt = next((s.gpa for s in plan.segments if s.gpa > cut), run.end)
                end, file = min(run.end, nxt), -1
            elif seg.file_offset is not None and cut < seg.gpa + seg.filesz:
                end, file = min(run.end, seg.gpa + seg.filesz), seg.file_offset + cut - seg.gpa
            else:
                end, file = min(run.end, seg.end), -1
            windows.append(Window(offset_of(cut), offset_of(end), cut, True, file))
            cut = end
        at = run.end
    if at < gpas.end:
        windows.append(Window(offset_of(at), offset_of(gpas.end), at, False, -1))
    return windows


# -- the reader thread -------------------------------------------------------------------------


@dataclass
class _Reader:
    """Parses the stream and writes pages into the output (runs in a worker thread)."""

    read_fd: int
    out_fd: int
    layout: Layout
    stop: threading.Event = field(default_factory=threading.Event)
    #: set once the first page arrived (write-protection is on)
    first_page: threading.Event = field(default_factory=threading.Event)
    #: set by the owner once the plan is ready (pages wait for it)
    plan_ready: threading.Event = field(default_factory=threading.Event)
    plan: CorePlan | None = None
    coverage: RangeSet = field(default_factory=RangeSet.empty)
    base: int = 0
    seen: bytearray = field(default_factory=bytearray)
    received: int = 0
    stream_bytes: int = 0
    data_pages: int = 0
    zero_pages: int = 0
    copied: int = 0
    done: bool = False
    first_at: float = 0.0
    done_at: float = 0.0
    #: called (in the reader thread) when the first page arrived
    on_first_page: Callable[[], object] | None = None
    #: pages that arrived before the plan was ready: (block, offset, data)
    early: list[tuple[str, int, bytes | None]] = field(default_factory=list)
    #: the stream's early virtio-mem sections: which blocks were plugged at the snapshot point
    early_vmem: list[EarlyVirtioMem] = field(default_factory=list)
    #: the stream's tail: the device state at the snapshot point, with its description
    device_state: bytes = b""
    #: the hasher follows the part of the output that is final (every page of it received)
    hashing: CopyState = field(default_factory=CopyState)
    _data_segments: list[Segment] = field(default_factory=list)
    _front: int = 0  # guest-physical: every data page below it (in file order) was received
    _next_check: int = 0
    early_bytes: int = 0
    blocks: RamBlocks | None = None
    windows: dict[str, tuple[Window, ...]] | None = None
    starts: dict[str, list[int]] = field(default_factory=dict)
    _last: dict[str, Window] = field(default_factory=dict)
    pending: _Pending = field(init=False)

    def __post_init__(self) -> None:
        self.pending = _Pending(self.out_fd)

    def run(self) -> None:
        """Read the whole stream (raises :class:`MigrationStreamError` or ``OSError``)."""
        raw = io.FileIO(self.read_fd, "rb", closefd=False)
        source = _Counting(raw, self)
        parser = MigrationStream(source)
        for record in parser.feed(self):
            if isinstance(record, RamBlocks):
                self.blocks = record
            elif isinstance(record, EarlyVirtioMem):
                self.early_vmem.append(record)
            elif isinstance(record, RamDone):
                while not self.plan_ready.wait(0.1):
                    if self.stop.is_set():
                        raise _Stopped
                early, self.early = self.early, []
                for held in early:
                    self._place(*held)
                self._advance_frontier()
                self.done = True
                self.done_at = time.monotonic()
        self.pending.flush()
        self._check_complete()
        # The device state QEMU stashed at the snapshot point (the parser took the type byte
        # of its first section): kept for the notes of the instant, read to the end so that
        # QEMU completes.
        tail = bytearray(bytes([SECTION_FULL]) + parser.leftover())
        while chunk := source.read(_READ_BUFFER):
            if self.stop.is_set():
                raise _Stopped
            tail += chunk
            if len(tail) > _MAX_DEVICE_STATE:
                raise MigrationStreamError(
                    f"the device state is over {_MAX_DEVICE_STATE >> 20} MiB: not what a "
                    "background snapshot of a VM sends"
                )
        self.device_state = bytes(tail)

    def page(self, block: str, offset: int, data: bytes | None, /) -> None:
        """One page from the parser (the hot path: a cached window, a few comparisons).

        Until the plan is ready, pages are kept in memory rather than waited on: QEMU must never
        block on our socket then, because QEMU's main thread may itself be waiting, on a write
        to a protected page, for the migration thread that would be blocked (and our ``cont``
        is waiting for QEMU's main thread).
        """
        if self.windows is None and not self.plan_ready.is_set():
            self._hold(block, offset, data)
            return
        if self.early:
            early, self.early = self.early, []
            for held in early:
                self._place(*held)
        self._place(block, offset, data)

    def zero_run(self, block: str, offset: int, count: int, /) -> None:
        """``count`` zero pages from ``offset`` (the parser found them in order): marked seen
        window by window with slice operations, not a Python step per page."""
        if self.windows is None and not self.plan_ready.is_set():
            for i in range(count):
                self._hold(block, offset + i * PAGE_SIZE, None)
            return
        if self.early:
            early, self.early = self.early, []
            for held in early:
                self._place(*held)
        end = offset + count * PAGE_SIZE
        for w, at, stop in self._spans(block, offset, end):
            if w is None:  # outside every window: as _place, one page at a time
                self._place(block, at, None)
            elif w.covered:
                self._mark((w.gpa + at - w.start - self.base) >> 12, (stop - at) // PAGE_SIZE)
                self.zero_pages += (stop - at) // PAGE_SIZE

    def data_run(self, block: str, offset: int, count: int, data: bytes, /) -> None:
        """``count`` data pages from ``offset`` (the parser found them in order), placed window
        by window: one seen-check, one write per window."""
        if (self.windows is None and not self.plan_ready.is_set()) or self.early:
            for i in range(count):
                self.page(block, offset + i * PAGE_SIZE, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            return
        for w, at, stop in self._spans(block, offset, offset + count * PAGE_SIZE):
            if w is None:
                self._place(block, at, data[at - offset : at - offset + PAGE_SIZE])
            elif w.covered:
                gpa = w.gpa + at - w.start
                if w.file_offset < 0:
                    raise MigrationStreamError(
                        f"the page at {gpa:#x} holds data, but the host reported that memory "
                        "unpopulated at the snapshot point"
                    )
                n = (stop - at) // PAGE_SIZE
                self.pending.add(w.file_offset + at - w.start, data[at - offset : stop - offset])
                self.data_pages += n
                self.copied += n * PAGE_SIZE
                self._mark((gpa - self.base) >> 12, n)

    def _spans(self, block: str, offset: int, end: int) -> Iterator[tuple[Window | None, int, int]]:
        """Cut ``[offset, end)`` of a block at its windows: (window, start, stop), or (None,
        page, page + 4096) for a page outside every window."""
        at = offset
        while at < end:
            w = self._last.get(block)
            if w is None or not w.start <= at < w.end:
                w = self._window(block, at)
                if w is None:
                    yield None, at, at + PAGE_SIZE
                    at += PAGE_SIZE
                    continue
            stop = min(end, w.end)
            yield w, at, stop
            at = stop

    def _mark(self, index: int, n: int) -> None:
        """Pages ``index .. index + n`` (of the seen-map) arrived: each must arrive once."""
        twice = self.seen.find(1, index, index + n)
        if twice != -1:
            raise MigrationStreamError(f"the page at {self.base + (twice << 12):#x} was sent twice")
        self.seen[index : index + n] = b"\x01" * n
        self.received += n
        if self.received >= self._next_check:  # zero pages of the plan's data count too
            self._next_check = self.received + _HASH_STEP
            self._advance_frontier()

    def _hold(self, block: str, offset: int, data: bytes | None) -> None:
        if not self.first_page.is_set():
            self.first_at = time.monotonic()
            self.first_page.set()
            if self.on_first_page is not None:
                self.on_first_page()
        self.early.append((block, offset, data))
        self.early_bytes += PAGE_SIZE if data is not None else 0
        if self.early_bytes > _EARLY_LIMIT:  # bounded: only now wait for the plan
            while not self.plan_ready.wait(0.1):
                if self.stop.is_set():
                    raise _Stopped
        if self.stop.is_set():
            raise _Stopped

    def _place(self, block: str, offset: int, data: bytes | None) -> None:
        w = self._last.get(block)
        if w is None or not w.start <= offset < w.end:
            w = self._window(block, offset)
            if w is None:
                return
        if not w.covered:
            return  # ROM blobs, hidden parts of main RAM: not in QEMU's dump either
        delta = offset - w.start
        index = (w.gpa + delta - self.base) >> 12
        if data is None:
            self._mark(index, 1)
            self.zero_pages += 1
            return
        if w.file_offset < 0:
            raise MigrationStreamError(
                f"the page at {w.gpa + delta:#x} holds data, but the host reported that memory "
                "unpopulated at the snapshot point"
            )
        self.pending.add(w.file_offset + delta, data)  # before the mark: the hasher follows it
        self.data_pages += 1
        self.copied += PAGE_SIZE
        self._mark(index, 1)

    def _window(self, block: str, offset: int) -> Window | None:
        if self.stop.is_set():
            raise _Stopped
        if self.windows is None:
            assert self.plan is not None
            assert self.blocks is not None
            self.windows = block_windows(self.layout, self.blocks, self.coverage, self.plan)
            self.starts = {name: [w.start for w in ws] for name, ws in self.windows.items()}
        ws = self.windows.get(block)
        if not ws:
            return None
        i = bisect_right(self.starts[block], offset) - 1
        if i < 0 or offset >= ws[i].end:
            return None
        self._last[block] = ws[i]
        return ws[i]

    def start_hashing(self, plan: CorePlan) -> None:
        """The header is final: the hasher may start; the pages' part follows the frontier."""
        self._data_segments = sorted(
            (seg for seg in plan.segments if seg.file_offset is not None),
            key=lambda seg: seg.file_offset or 0,
        )
        self._front = self._data_segments[0].gpa if self._data_segments else 0
        self.hashing.advance(0, plan.data_offset)

    def _advance_frontier(self) -> None:
        """Move the hashed-to mark over the data pages received in file order (a C-speed scan
        of the seen-bitmap; pending writes are flushed first: the hasher reads them back)."""
        self.pending.flush()
        segments = self._data_segments
        while segments:
            seg = segments[0]
            start = (max(seg.gpa, self._front) - self.base) >> 12
            hole = self.seen.find(0, start, (seg.end - self.base) >> 12)
            if hole != -1:
                self._front = self.base + (hole << 12)
                assert seg.file_offset is not None
                self.hashing.advance(0, seg.file_offset + self._front - seg.gpa)
                return
            segments.pop(0)
            self._front = segments[0].gpa if segments else seg.end
        assert self.plan is not None
        self.hashing.advance(0, self.plan.notes_offset)

    def set_coverage(self, coverage: RangeSet) -> None:
        """The guest-physical pages QEMU's dump holds: each must arrive exactly once."""
        self.coverage = coverage
        bounds = coverage.bounds
        self.base = bounds.start if bounds is not None else 0
        self.seen = bytearray(bounds.size // PAGE_SIZE if bounds is not None else 0)

    def _check_complete(self) -> None:
        if not self.done:
            raise MigrationStreamError("the migration stream ended before every page was sent")
        expected = self.coverage.total // PAGE_SIZE
        if self.received != expected:
            missing = next(
                (
                    gpa
                    for rng in self.coverage
                    for gpa in range(rng.start, rng.end, PAGE_SIZE)
                    if not self.seen[(gpa - self.base) // PAGE_SIZE]
                ),
                None,
            )
            where = f", the first at {missing:#x}" if missing is not None else ""
            raise MigrationStreamError(
                f"QEMU sent {self.received} of the {expected} pages of its dump coverage{where}"
            )


class _Stopped(Exception):
    """The owner asked the reader to stop."""


class _Counting:
    def __init__(self, inner: io.FileIO, reader: _Reader) -> None:
        self.inner = inner
        self.reader = reader

    def read(self, size: int, /) -> bytes:
        data = self.inner.read(size)
        self.reader.stream_bytes += len(data)
        return data


class _Pending:
    """Joins pages that land next to each other in the file into one ``pwrite``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = -1
        self.buf = bytearray()

    def add(self, offset: int, data: bytes) -> None:
        if self.buf and (offset != self.offset + len(self.buf) or len(self.buf) >= _FLUSH):
            self.flush()
        if not self.buf:
            self.offset = offset
        self.buf += data

    def flush(self) -> None:
        view = memoryview(self.buf)
        offset = self.offset
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done
        self.buf = bytearray()


async def _devices_described(session: QMPSession) -> bool:
    """Whether QEMU will end the stream with its JSON description of the device state (not
    with the machine property ``suppress-vmdesc=on``; a QEMU without it always does)."""
    try:
        suppressed = await session.execute(
            "qom-get", {"path": "/machine", "property": "suppress-vmdesc"}
        )
    except QMPCommandError:
        return True
    return not suppressed


def _stream_order(layout: Layout, blocks: RamBlocks | None) -> Callable[[int], int] | None:
    """The rank, in the stream, of the RAM block that holds each guest-physical address (QEMU
    sends block after block, e.g. a virtio-mem device's before main RAM): the core's data is
    laid out in that order so that the hasher can follow the pages as they arrive."""
    if blocks is None:
        return None
    rank = {b.idstr: i for i, b in enumerate(blocks.blocks)}
    starts: list[tuple[int, int]] = []
    for backend in layout.backends:
        found = [
            i
            for name, i in rank.items()
            if name == backend.region or name.endswith("/" + backend.region)
        ]
        if len(found) != 1:
            return None  # block_windows reports it
        starts += [(piece.gpa.start, found[0]) for piece in layout.pieces_of(backend.region)]
    starts.sort()
    keys = [gpa for gpa, _ in starts]

    def order(gpa: int) -> int:
        i = bisect_right(keys, gpa) - 1
        return starts[i][1] if i >= 0 else -1

    return order


def _check_plugged(coverage: RangeSet, early: list[EarlyVirtioMem]) -> None:
    """Raise unless QEMU's coverage of each virtio-mem device is what was plugged at the
    snapshot point (the probe ran before ``migrate``; plugging is frozen only from there on)."""
    for device in early:
        region = coverage.clip(Range(device.addr, device.region_size))
        plugged = RangeSet.from_ranges((device.addr + at, size) for at, size in device.plugged)
        if region != plugged:
            raise MigrationStreamError(
                f"{device.idstr}: {plugged.total >> 20} MiB were plugged at the snapshot point, "
                f"QEMU's probe just before covered {region.total >> 20} MiB (a resize in "
                "between; try again)"
            )


def _read_guest(fd: int, plan: CorePlan, gpa: int, size: int) -> bytes:
    """Guest-physical bytes from the core being written (zeros where the plan has none)."""
    out = bytearray(size)
    at = 0
    while at < size:
        seg = segment_for(plan, gpa + at)
        if seg is None:
            return bytes(out[:at])
        inside = gpa + at - seg.gpa
        run = min(size - at, seg.size - inside)
        if seg.file_offset is not None and inside < seg.filesz:
            run = min(run, seg.filesz - inside)
            got = os.pread(fd, run, seg.file_offset + inside)
            out[at : at + len(got)] = got
        at += run
    return bytes(out)


# -- QMP side ----------------------------------------------------------------------------------


class _Migration:
    """Capabilities and parameters set for the snapshot, and put back as they were."""

    def __init__(self, session: QMPSession, hooks: PauseHooks | None = None) -> None:
        self.session = session
        self.hooks = hooks or PauseHooks()
        self.caps_before: dict[str, bool] = {}
        self.changed = False
        self.bandwidth_before: int | None = None
        self.journalled = False

    async def prepare(self) -> None:
        status = await self.session.execute("query-migrate")
        state = status.get("status") if isinstance(status, dict) else None
        if state in _ACTIVE:
            raise DumpBusy(f"a migration is already running on this VM (status {state})")
        caps = await self.session.execute("query-migrate-capabilities")
        self.caps_before = {c["capability"]: bool(c["state"]) for c in caps}
        on = sorted(c for c, v in self.caps_before.items() if v and c in _FORMAT_CAPS)
        if on:
            raise SnapshotRefused(
                f"migration capabilities {', '.join(on)} are on: the snapshot engine reads only "
                "plain RAM streams (turn them off, or use another engine)"
            )
        if "background-snapshot" not in self.caps_before:
            raise SnapshotRefused("this QEMU has no background-snapshot capability")
        # The default cap (128 MiB/s) would make the stream, and the guest's writes to pages
        # not yet sent, wait for no reason: the reader keeps up with QEMU.
        params = await self.session.execute("query-migrate-parameters")
        bandwidth = params.get("max-bandwidth") if isinstance(params, dict) else None
        set_caps = not self.caps_before["background-snapshot"]
        set_bandwidth = isinstance(bandwidth, int) and bandwidth < _BANDWIDTH
        if (set_caps or set_bandwidth) and self.hooks.before_migration_settings is not None:
            # Journalled first: a crash between here and restore() is undone on restart.
            await self.hooks.before_migration_settings(
                MigrationSettings(
                    {"background-snapshot": False} if set_caps else {},
                    {"max-bandwidth": bandwidth}
                    if set_bandwidth and isinstance(bandwidth, int)
                    else {},
                )
            )
            self.journalled = True
        if set_caps:
            await self._set_caps(True)
            self.changed = True
        if set_bandwidth and isinstance(bandwidth, int):
            await self.session.execute("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
            self.bandwidth_before = bandwidth

    async def _set_caps(self, state: bool) -> None:
        await self.session.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": state}]},
        )

    async def restore(self) -> None:
        if not self.session.connected:
            return
        with contextlib.suppress(QMPCommandError, QMPDisconnected, QMPTimeout):
            if self.changed:
                await self._set_caps(False)
                self.changed = False
            if self.bandwidth_before is not None:
                await self.session.execute(
                    "migrate-set-parameters", {"max-bandwidth": self.bandwidth_before}
                )
                self.bandwidth_before = None
        if (
            self.journalled
            and not self.changed
            and self.bandwidth_before is None
            and self.hooks.after_migration_settings is not None
        ):
            await self.hooks.after_migration_settings()
            self.journalled = False


async def _final_status(session: QMPSession, timeout_s: float) -> dict[str, Any]:
    """Wait until the migration is completed, failed or cancelled; its query-migrate reply."""
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = await session.execute("query-migrate")
        if status.get("status") in _FINAL:
            return status
        if time.monotonic() > deadline:
            raise QMPTimeout("the end of the background snapshot", timeout_s)
        await asyncio.sleep(POLL_S)


def _event_time(event: Mapping[str, Any]) -> float:
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


#: Run states a background snapshot may start from. QEMU takes the VM to 'paused' for the
#: snapshot point and back to the state it found. From any other state one of those transitions
#: is not allowed, and QEMU aborts (seen on 10.0: "invalid runstate transition: 'prelaunch' ->
#: 'paused'", QEMU gone); from 'suspended' it first wakes the guest up.
SNAPSHOT_RUN_STATES = ("running", "paused")


def run_state_refusal(state: str) -> SnapshotRefused | None:
    """Why a background snapshot must not start on a VM in run state ``state``, if it must not."""
    if state in SNAPSHOT_RUN_STATES:
        return None
    if state == "suspended":
        why = "QEMU's background snapshot would wake the suspended guest up"
    else:
        why = (
            "QEMU's background snapshot takes the VM through 'paused' and back, which QEMU "
            f"does not allow from {state!r} (it aborts)"
        )
    return SnapshotRefused(
        f"the snapshot engine will not run on a VM in run state {state!r}: {why}; "
        "--engine qemu or --engine backend dump it as it is"
    )


def _check_request(before: Survey, request: SnapshotDumpRequest) -> int:
    """Refuse what the engine will not do here; the predicted host memory growth (bytes)."""
    ok, why = snapshot_supported(before.facts.qemu_version)
    if not ok:
        raise SnapshotRefused(f"the snapshot engine will not run here: {why}")
    refusal = run_state_refusal(before.facts.run_state)
    if refusal is not None:
        raise refusal
    for backend in before.layout.backends:
        region = before.population.regions.get(backend.region)
        if region is None or not region.known:
            why = f": {region.note}" if region is not None and region.note else ""
            raise SnapshotRefused(
                f"the host memory QEMU's snapshot would allocate for {backend.region} cannot be "
                f"predicted: its populated pages are not known{why}"
            )
    predicted = predict_growth(before)
    if predicted > request.max_host_growth:
        raise SnapshotRefused(
            f"QEMU would allocate {predicted / 2**20:.0f} MiB of host memory for the holes of "
            f"shmem-backed RAM (limit {request.max_host_growth / 2**20:.0f} MiB)"
        )
    return predicted


class _Run:
    """One snapshot dump: the socket, the reader thread, the pause, and the unwinding."""

    def __init__(
        self, session: QMPSession, output: DumpTarget, request: SnapshotDumpRequest, before: Survey
    ) -> None:
        self.session = session
        self.output = output
        self.request = request
        self.before = before
        self.timings: dict[str, float] = {}
        # A socket, not a pipe: shutdown() unblocks both our reader and QEMU's writer on
        # abort (QEMU's migrate_cancel cannot shut a pipe down, and a blocked writer blocks
        # every guest write to a page not yet sent).
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fdname: str | None = None
        # The threads write and read through their own descriptor of the output: one stuck in
        # the kernel past unwinding must never touch a number the caller closed and reused.
        self.out_fd = os.dup(output.fd)
        self.reader = _Reader(self.ours.fileno(), self.out_fd, before.layout)
        self._threads = 0
        self._abandoned = False
        self._lock = threading.Lock()
        self.worker: asyncio.Task[None] | None = None
        self.hasher: asyncio.Task[str] | None = None
        self.migration = _Migration(session, request.hooks)
        self.running = before.facts.running
        self.stopped_at: float | None = None
        self.resumed = False
        self.migrating = False
        self.heard: list[Event] = []
        self.probe_events: list[Event] = []
        self.qemu_mode = False
        self.predicted_growth = 0
        self.paused_clock: float | None = None

    def _owned(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` in this thread; the last thread out of an abandoned run closes the
        descriptors the threads use."""
        with self._lock:
            self._threads += 1
        try:
            return work()
        finally:
            with self._lock:
                self._threads -= 1
                last = self._threads == 0 and self._abandoned
            if last:
                self._close()

    def _close(self) -> None:
        self.ours.close()
        self.theirs.close()
        with contextlib.suppress(OSError):
            os.close(self.out_fd)

    async def hand_over_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        self.fdname = await self.session.pass_fd(self.theirs.fileno(), prefix="qmpdump-snap")
        self.theirs.close()

    async def snapshot_point(self) -> tuple[Survey, CorePlan]:
        """Stop, read the instant's notes, start the snapshot, resume at its first page; then
        plan the core (the reader holds the pages until the plan is ready).

        Only what must describe the instant happens inside the pause: QEMU's notes and
        coverage. The populated set is read right after ``cont``: on anonymous RAM it can only
        have grown since the instant (a superset is a correct plan: pages that arrive as zero
        stay holes), and on shmem the holes were faulted in before the pause anyway.
        """
        t0 = time.monotonic()
        with (
            self.session.listen("STOP", "RESUME") as listener,
            self.session.listen(*PAUSE_BREAKERS) as breakers,
        ):
            if self.running:
                if self.request.hooks.before_pause is not None:
                    await self.request.hooks.before_pause()
                self.stopped_at = time.monotonic()
                await self.session.execute("stop")
            prefix = await probe_prefix_without_growth(
                self.session,
                replace(self.before.facts, running=False, run_state="paused"),
                self.before.layout,
                self.before.population.regions,
                self.before.access,
            )
            self.timings["probe_s"] = time.monotonic() - t0
            # Between the probe (the notes) and QEMU's snapshot point the VM must stay as it
            # was: a reset or a resume by another client would tear the two apart. A RESUME
            # counts only until ``migrate``: some QEMU versions resume after their snapshot
            # point themselves, which is harmless (the pages are write-protected by then).
            plugged = {d.id: d.size for d in self.before.layout.devices}
            _refuse_changes(changes_heard(breakers.drain(), plugged))
            await self._migrate(t0)
            _refuse_changes(c for c in changes_heard(breakers.drain(), plugged) if c != "RESUME")
            if self.running:
                await _resume(self.session)
                self.resumed = True
                self.paused_clock = time.monotonic() - t0
                if self.request.hooks.after_resume is not None:
                    await self.request.hooks.after_resume()
            self.timings["resumed_s"] = time.monotonic() - t0
            self.heard = listener.drain()
        result = await _rescan(self.before)
        plan = await self.planned(prefix, result)
        self.timings["planned_s"] = time.monotonic() - t0
        return result, plan

    async def _migrate(self, t0: float) -> None:
        """Start the reader and the snapshot; return once its first page arrived."""
        # Once more just before: the guest may have shut down, panicked or suspended since the
        # survey, and a snapshot from there would abort QEMU (SNAPSHOT_RUN_STATES).
        refusal = run_state_refusal((await query_status(self.session)).status)
        if refusal is not None:
            raise refusal
        self.worker = asyncio.create_task(
            asyncio.to_thread(self._owned, self.reader.run), name="snapshot-read"
        )
        deadline = time.monotonic() + _DUMP_BLOCKER_S
        while True:
            try:
                await self.session.execute("migrate", {"uri": f"fd:{self.fdname}"})
                break
            except QMPCommandError as err:
                # QEMU reports its probe dump finished a moment before it lifts the dump's
                # migration blocker (seen on a loaded host): that refusal is asked again.
                if _DUMP_BLOCKED not in str(err) or time.monotonic() > deadline:
                    raise DumpFailed(f"QEMU refused the background snapshot: {err}") from err
                await asyncio.sleep(0.01)
        self.migrating = True
        self.timings["migrate_s"] = time.monotonic() - t0
        # QEMU's setup faults in every hole of plugged RAM first (allocating shmem: measured
        # about 150 MiB/s here), so the first page may come late on a large shmem VM.
        wait_s = _FIRST_PAGE_S + self.predicted_growth / _PRETOUCH_RATE
        await _wait_first_page(self.reader, self.worker, self.session, timeout_s=wait_s)
        self.timings["first_page_s"] = time.monotonic() - t0

    async def qemu_instant(self, listener: EventQueue) -> tuple[Survey, CorePlan]:
        """QEMU's own pause is the snapshot point; qmpdump never stops the VM.

        QEMU's dump headers are read first (QEMU pauses the VM for a few milliseconds on its
        own): its PT_LOAD coverage, and notes of the right size to plan the core with. Then
        ``migrate``: QEMU stops the VM, stashes the device state (the vCPUs' registers among
        it), write-protects RAM and resumes, all inside its own pause. The notes of that
        instant are built from the stashed state once the stream has ended
        (:meth:`write_instant_notes`). The populated set is read once the first page arrived
        (after the instant: a superset on anonymous RAM; shmem holes were faulted in by QEMU's
        setup, before its pause).
        """
        t0 = time.monotonic()
        prefix = await read_dump_prefix(self.session, timeout_s=self.session.timeout_s)
        self.probe_events = listener.drain()
        self.timings["probe_s"] = time.monotonic() - t0
        if parse_header(prefix).machine != EM_X86_64 or not await _devices_described(self.session):
            # QEMU's core of this guest (another architecture, or x86 outside long mode) has
            # notes qmpdump does not build, or the stream will not describe the device state
            # they come from: the instant is a pause of qmpdump's own (the probe's pause still
            # counts).
            return await self.snapshot_point()
        self.qemu_mode = True
        await self._migrate(t0)
        result = await _rescan(self.before)
        plan = await self.planned(prefix, result)
        self.timings["planned_s"] = time.monotonic() - t0
        return result, plan

    async def _recheck_plugged(self) -> None:
        """Without the stream's early virtio-mem sections (QEMU before they were added), the
        plug state of the instant is not in hand: QEMU's coverage is read again after the
        stream (plugging was frozen from ``migrate`` on; a change between the first probe and
        ``migrate`` shows as a difference) and must be what the dump was planned with."""
        again = dump_loads(await read_dump_prefix(self.session, timeout_s=self.session.timeout_s))
        if again != self.reader.coverage:
            raise MigrationStreamError(
                "the plugged virtio-mem memory changed while the snapshot started; try again"
            )

    def write_instant_notes(self, plan: CorePlan) -> None:
        """Replace the probe's notes with those of the snapshot point (same size, or fail).

        The vCPUs' registers come from the device state QEMU stashed inside its pause, the
        guest's VMCOREINFO note from the snapshot's own pages; the plugged virtio-mem blocks
        at the instant (the stream's early sections) must be those of QEMU's coverage.
        """
        _check_plugged(self.reader.coverage, self.reader.early_vmem)
        state = parse_device_state(self.reader.device_state)
        cpus = cpus_from_state(state)
        ref = guest_note_ref(state)
        guest = None
        if ref is not None:
            guest = guest_note(_read_guest(self.output.fd, plan, ref.paddr, ref.size))
        notes = x86_64_notes(cpus, guest)
        expected = plan.notes_size
        if len(notes) != expected:
            raise MigrationStreamError(
                f"the notes of the snapshot point take {len(notes)} bytes, QEMU's probe "
                f"{expected}: the vCPUs or the guest's VMCOREINFO changed in between"
            )
        os.pwrite(self.output.fd, notes, plan.notes_offset)

    def _plan(self, prefix: bytes, result: Survey) -> CorePlan:
        coverage = dump_loads(prefix)
        data = (result.population.populated | result.population.unknown) & coverage
        notes = notes_payload(prefix)
        # The notes go last: those of QEMU's instant are known only after the pages, and
        # everything before them can be hashed while the pages arrive.
        plan = plan_core(
            notes,
            data,
            coverage - data,
            machine=parse_header(prefix).machine,
            max_phdrs=self.request.max_phdrs,
            notes_last=True,
            placement=_stream_order(self.before.layout, self.reader.blocks),
        )
        os.pwrite(self.output.fd, plan.header, 0)
        os.pwrite(self.output.fd, notes, plan.notes_offset)
        os.ftruncate(self.output.fd, plan.file_size)
        self.reader.plan = plan
        self.reader.set_coverage(coverage)
        self.reader.start_hashing(plan)
        self.reader.plan_ready.set()
        return plan

    async def planned(self, prefix: bytes, result: Survey) -> CorePlan:
        """Plan the core (off the loop) and start hashing what is final of it."""
        plan = await asyncio.to_thread(self._plan, prefix, result)
        self.hasher = asyncio.create_task(
            asyncio.to_thread(self._owned, lambda: hash_output(self.out_fd, self.reader.hashing)),
            name="snap-hash",
        )
        return plan

    async def digest(self, plan: CorePlan) -> str:
        """The sha256 of the finished output (the hasher has followed it), written back."""
        assert self.hasher is not None
        self.reader.hashing.finish(plan.file_size)
        _, digest = await asyncio.gather(
            asyncio.to_thread(os.fdatasync, self.output.fd), self.hasher
        )
        return digest

    async def stream(
        self,
        progress: ProgressCallback | None,
        cancel: asyncio.Event,
        timeout_s: float,
        t0: float,
    ) -> tuple[Survey, CorePlan, dict[str, Any]]:
        """The snapshot point, the pages, the notes: QEMU's final query-migrate reply."""
        with self.session.listen("STOP", "RESUME") as listener:
            if self.request.instant == "qemu":
                result, plan = await self.qemu_instant(listener)
            else:
                result, plan = await self.snapshot_point()
            assert self.worker is not None
            await _follow(
                self.reader,
                self.worker,
                plan,
                progress=progress,
                cancel=cancel,
                timeout_s=timeout_s,
                stall_s=self.request.stall_s,
            )
            self.timings["read_s"] = time.monotonic() - t0
            self.timings["pages_s"] = self.reader.done_at - self.reader.first_at
            if self.qemu_mode:
                await asyncio.to_thread(self.write_instant_notes, plan)
            final = await self.finish(timeout_s)
            if self.qemu_mode and self.before.layout.devices and not self.reader.early_vmem:
                await self._recheck_plugged()  # (a dump waits for the migration to end)
            if self.qemu_mode:
                self.heard = listener.drain()
        return result, plan, final

    def paused(self) -> float | None:
        """Seconds the guest stood still for this dump (QEMU's clock), the probe's pause
        included; each part is kept in the timings."""
        paused_s = paused_seconds(self.heard)
        probe_paused = paused_seconds(self.probe_events)
        self.timings["instant"] = 1.0 if self.qemu_mode else 0.0
        if paused_s is not None:
            self.timings["instant_paused_s"] = paused_s
        if probe_paused is not None:
            self.timings["probe_paused_s"] = probe_paused
            paused_s = (paused_s or 0.0) + probe_paused
        return paused_s

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for QEMU's verdict on the snapshot; its final query-migrate reply."""
        final = await _final_status(self.session, timeout_s)
        self.migrating = False
        if final.get("status") != "completed":
            raise DumpFailed(
                f"the background snapshot ended {final.get('status')}: "
                f"{final.get('error-desc', 'no reason given')}"
            )
        return final

    async def unwind(self) -> QmpdumpError | None:
        """Whatever happened: reader stopped, VM running as before, migration over, caps back.

        Every step runs even when an earlier one failed (QEMU gone, a timeout); the first
        failure is returned for the caller to raise when the dump itself succeeded.
        """
        failures: list[QmpdumpError] = []
        cancelled = False

        async def step(action: Awaitable[None]) -> None:
            # Each step to its end through any number of cancels (re-raised once all ran).
            nonlocal cancelled
            try:
                await uncancellable(action)
            except asyncio.CancelledError:
                cancelled = True
            except QmpdumpError as err:
                failures.append(err)

        self.reader.stop.set()
        self.reader.plan_ready.set()
        with contextlib.suppress(OSError):
            self.ours.shutdown(socket.SHUT_RDWR)
        if self.running and self.stopped_at is not None and not self.resumed:
            await step(_resume(self.session))
            if self.request.hooks.after_resume is not None:
                await step(self.request.hooks.after_resume())
        if self.migrating:
            await step(_cancel_migration(self.session))
        self.reader.hashing.stop.set()
        with self.reader.hashing.changed:
            self.reader.hashing.changed.notify_all()
        # Settings back before waiting for our threads: a reader stuck in a write to a hung
        # disk must not keep the VM's migration settings changed.
        await step(self.migration.restore())
        if self.fdname is not None:
            await self.session.close_fd(self.fdname)
        tasks = [t for t in (self.worker, self.hasher) if t is not None]
        if tasks:
            try:
                _, stuck = await asyncio.wait(tasks, timeout=_THREAD_GRACE_S)
            except asyncio.CancelledError:
                cancelled = True
                _, stuck = await asyncio.wait(tasks, timeout=_THREAD_GRACE_S)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()
            if stuck:
                # A thread blocked in the kernel (a write to a hung disk) cannot be stopped;
                # the descriptors it uses are closed when it returns (closing them under it
                # could hand their numbers to other files).
                with self._lock:
                    self._abandoned = self._threads > 0
                if self._abandoned:
                    log.warning("snapshot: a reader thread is still blocked; left to finish")
                    return self._outcome(failures, cancelled)
        self._close()
        return self._outcome(failures, cancelled)

    @staticmethod
    def _outcome(failures: list[QmpdumpError], cancelled: bool) -> QmpdumpError | None:
        if cancelled:
            raise asyncio.CancelledError
        return failures[0] if failures else None


async def dump_with_snapshot(
    session: QMPSession,
    output: DumpTarget,
    request: SnapshotDumpRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: asyncio.Event | None = None,
    before: Survey | None = None,
    timeout_s: float = 3600.0,
) -> SnapshotDumpResult:
    """Write a point-in-time ELF core of the VM into ``output`` (the caller commits it)."""
    cancel = cancel or asyncio.Event()
    t0 = time.monotonic()
    before = before or await survey(session)
    surveyed_s = time.monotonic() - t0
    predicted = _check_request(before, request)
    if predicted and any(
        d.device.memdev in _plugged_holes(before) and not d.plugged_exact
        for d in before.population.devices
    ):
        # Which virtio-mem blocks are plugged, exactly (a probe of a few milliseconds).
        before = await survey(session, exact_plug=True)
        predicted = _check_request(before, request)
    fd_before = _fd_populated(before)
    run = _Run(session, output, request, before)
    run.predicted_growth = predicted
    run.timings["surveyed_s"] = surveyed_s
    try:
        if request.preallocate and request.instant != "qemu":
            run.timings["preallocated_bytes"] = await asyncio.to_thread(preallocate, before)
            run.timings["preallocate_s"] = time.monotonic() - t0
        await run.migration.prepare()
        await run.hand_over_socket()
        result, plan, final = await run.stream(progress, cancel, timeout_s, t0)
        for key in ("setup-time", "downtime", "total-time"):
            if isinstance(final.get(key), int):
                run.timings[f"qemu_{key.replace('-', '_')}_ms"] = final[key]
        run.timings["stream_s"] = time.monotonic() - t0
        digest = await run.digest(plan)
        run.timings["hashed_s"] = time.monotonic() - t0
    except OSError as err:
        await run.unwind()
        raise write_error(err, output.final) from err
    except MigrationStreamError as err:
        await run.unwind()
        if not session.connected:
            raise QEMUGone(f"QEMU went away during the snapshot: {err}") from err
        raise
    except BaseException:
        await run.unwind()
        raise
    failure = await run.unwind()
    if failure is not None:
        raise failure
    after = await asyncio.to_thread(_rescan_fd_only, result)
    paused_s = run.paused()
    if progress is not None:
        progress(Progress(plan.file_size, run.reader.copied, run.reader.copied))
    return SnapshotDumpResult(
        size=plan.file_size,
        sha256=digest,
        paused_s=paused_s if paused_s is not None else run.paused_clock,
        plan=plan,
        copied=run.reader.copied,
        survey=result,
        stream_bytes=run.reader.stream_bytes,
        predicted_growth=predicted,
        measured_growth=max(0, after - fd_before),
        qemu_downtime_ms=final.get("downtime"),
        zero_pages=run.reader.zero_pages,
        data_pages=run.reader.data_pages,
        timings=run.timings,
    )


def _rescan_fd_only(result: Survey) -> int:
    """Populated bytes of fd-backed RAM now (after QEMU's pre-touch), from the host."""
    total = 0
    for backend in result.layout.backends:
        if not backend.type.has_fd:
            continue
        access = result.access.get(backend.region)
        pop, _ = region_population(
            result.facts.pid, backend, access.hva if access is not None else None
        )
        total += pop.offsets.total
    return total


async def _rescan(before: Survey) -> Survey:
    """The survey's population read again from the host (the layout is unchanged: stopped)."""
    pid = before.facts.pid
    found = await asyncio.gather(
        *(
            asyncio.to_thread(
                region_population,
                pid,
                b,
                before.access[b.region].hva if b.region in before.access else None,
            )
            for b in before.layout.backends
        )
    )
    regions = {pop.region: pop for pop, _ in found}
    for backend in before.layout.backends:
        region = regions[backend.region]
        if not region.known:
            raise SnapshotRefused(f"the population of {backend.region} is unknown: {region.note}")
    population = compute_population(before.layout, regions, None)
    facts = replace(before.facts, running=False, run_state="paused")
    return Survey(facts, population, before.access)


async def _wait_first_page(
    reader: _Reader, worker: asyncio.Task[None], session: QMPSession, *, timeout_s: float
) -> None:
    """Return once the reader has the first page; QMP is asked only every 50 ms (each round
    trip inside the pause costs the guest time when the host is busy)."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not arrived.done():
            arrived.set_result(None)

    reader.on_first_page = lambda: loop.call_soon_threadsafe(wake)
    if reader.first_page.is_set():
        return
    deadline = time.monotonic() + timeout_s
    while not reader.first_page.is_set():
        await asyncio.wait([arrived, worker], timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        if reader.first_page.is_set():
            return
        if worker.done():
            worker.result()
            raise MigrationStreamError("the migration stream ended before its first page")
        if time.monotonic() > deadline:
            raise QMPTimeout("the first page of the background snapshot", timeout_s)
        status = await session.execute("query-migrate")
        if status.get("status") in ("failed", "cancelled"):
            raise DumpFailed(
                f"the background snapshot {status.get('status')}: "
                f"{status.get('error-desc', 'no reason given')}"
            )


def _refuse_changes(heard: Iterable[str]) -> None:
    """Raise :class:`DumpFailed` if any change (:func:`changes_heard`) was heard."""
    changed = list(heard)
    if changed:
        raise DumpFailed(
            f"the VM changed between its notes and the snapshot point ({', '.join(changed)}; "
            "another QMP client or the guest did it): no dump was kept; dump again"
        )


async def _resume(session: QMPSession) -> None:
    """``cont``, and again if QEMU's own resume marked the running VM paused after ours."""
    for _ in range(3):
        try:
            await session.execute("cont")
        except QMPCommandError as err:
            raise DumpError(f"could not resume the VM after the snapshot point: {err}") from err
        if (await query_status(session)).running:
            return
        await asyncio.sleep(0.01)
    raise DumpError("the VM did not run again after the snapshot point")


async def _cancel_migration(session: QMPSession) -> None:
    if not session.connected:
        return
    with contextlib.suppress(QMPCommandError, QMPDisconnected, QMPTimeout):
        await session.execute("migrate_cancel")
        await _final_status(session, 30.0)


async def _follow(
    reader: _Reader,
    worker: asyncio.Task[None],
    plan: CorePlan,
    *,
    progress: Callable[[Progress], None] | None,
    cancel: asyncio.Event,
    timeout_s: float,
    stall_s: float,
) -> None:
    expected = plan.data.total
    deadline = time.monotonic() + timeout_s
    seen, moved = reader.stream_bytes, time.monotonic()
    try:
        while not worker.done():
            await asyncio.wait([worker], timeout=0.1)
            if cancel.is_set():
                raise DumpCancelled("the dump was cancelled")
            now = time.monotonic()
            if now > deadline:
                raise QMPTimeout("the background snapshot's stream", timeout_s)
            if reader.stream_bytes != seen:
                seen, moved = reader.stream_bytes, now
            elif now - moved > stall_s:
                # While nothing is read, QEMU cannot send, and the guest's writes to pages not
                # sent yet wait: stop the snapshot (unwinding shuts the socket) to free them.
                raise DumpFailed(
                    f"the snapshot stream stood still for {stall_s:g} s (the output's disk or "
                    "qmpdump's reader is stuck); stopped to release the guest"
                )
            if progress is not None:
                progress(Progress(reader.copied, reader.copied, expected))
        worker.result()
    except _Stopped as err:
        raise DumpCancelled("the dump was cancelled") from err


class SnapshotDetails(EngineDetails):
    """The snapshot engine's part of the sidecar."""

    mode: str
    program_headers: int
    pn_xnum: bool
    data_bytes: int
    zero_fill_bytes: int
    copied_bytes: int
    stream_bytes: int
    data_pages: int
    zero_pages: int
    qemu_downtime_ms: int | None
    host_growth: dict[str, int]
    timings_s: dict[str, float]


class SnapshotEngine:
    """Point-in-time dumps through QEMU's background snapshot (QEMU 8.1+)."""

    traits: EngineTraits = ENGINE_TRAITS[EngineName.SNAPSHOT]

    def assess(self, before: Survey) -> tuple[bool, str]:
        """Whether this QEMU may run a background snapshot (:func:`snapshot_supported`)."""
        return snapshot_supported(before.facts.qemu_version)

    async def run(self, job: EngineJob) -> EngineResult:
        """Write a point-in-time ELF core into ``job.output``."""
        request = SnapshotDumpRequest(
            max_phdrs=job.spec.max_program_headers,
            max_host_growth=job.spec.max_host_growth,
            hooks=job.hooks,
        )
        result = await dump_with_snapshot(
            job.session, job.output, request, progress=job.progress, before=job.before
        )
        details = SnapshotDetails(
            format="elf",
            mode="snapshot",
            program_headers=result.plan.phnum,
            pn_xnum=result.plan.uses_pn_xnum,
            data_bytes=result.plan.data.total,
            zero_fill_bytes=result.plan.zero_fill.total,
            copied_bytes=result.copied,
            stream_bytes=result.stream_bytes,
            data_pages=result.data_pages,
            zero_pages=result.zero_pages,
            qemu_downtime_ms=result.qemu_downtime_ms,
            host_growth={
                "predicted_bytes": result.predicted_growth,
                "measured_bytes": result.measured_growth,
                "limit_bytes": request.max_host_growth,
            },
            timings_s={k: round(v, 6) for k, v in result.timings.items()},
        )
        return EngineResult(result.size, result.sha256, result.paused_s, details, result.survey)


ENGINE = SnapshotEngine()
