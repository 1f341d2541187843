"""Engine 2: the sparse reader. Copy only populated memory into an ELF core every tool opens,
or into a kdump-compressed file (:mod:`qmpdump.kdump`, written by
:mod:`qmpdump.engines.kdump_writer`).

Consistent mode (default): ``stop`` the VM if it runs, survey, copy, ``cont`` only if it was
running; a ``finally`` resumes it whatever happens (exception, cancel, timeout). Live mode: no
``stop``; the dump is fuzzy (the guest keeps writing while we copy), and the VM is paused only by
QEMU's own header probe (a few milliseconds, reported as ``paused_s``).

1. Survey (:mod:`qmpdump.survey`): layout, populated memory per region, where to read it.
2. QEMU's dump headers (:func:`qmpdump.survey.probe_prefix_without_growth`): the CPU state and
   VMCOREINFO notes to copy verbatim, the ELF machine, and QEMU's PT_LOAD coverage (all RAM minus
   unplugged virtio-mem), so that our core covers exactly the addresses QEMU's would.
3. Plan (:mod:`qmpdump.elf.plan`): populated (or unknown) memory inside that coverage becomes
   data segments, the rest of the coverage zero-fill segments.
4. Copy (:mod:`qmpdump.engines.copier`) in worker threads, hashing on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping

from qmpdump.elf.format import parse_header
from qmpdump.elf.plan import EM_X86_64, CorePlan, notes_payload, plan_core
from qmpdump.engines.base import (
    EngineDetails,
    EngineJob,
    EngineResult,
    PauseHooks,
    Progress,
)
from qmpdump.engines.copier import (
    CopyState,
    FileSource,
    ProcessSource,
    Source,
    copy_ops_into,
    find_zero_pages,
    hash_output,
)
from qmpdump.engines.copyplan import CopyOp, copy_ops, region_runs
from qmpdump.engines.kdump_writer import KdumpWriteResult, read_source, write_kdump
from qmpdump.engines.spec import ENGINE_TRAITS, OWN_KDUMP_FORMATS, EngineName, EngineTraits, Mode
from qmpdump.engines.threads import run_threads, uncancellable
from qmpdump.errors import (
    DumpError,
    DumpFailed,
    HostAccessError,
    QEMUGone,
    QMPCommandError,
    QMPDisconnected,
    QmpdumpError,
    QMPTimeout,
    SourceUnproven,
)
from qmpdump.kdump.codecs import Codec, codec_for_format
from qmpdump.kdump.format import UTS_READ_SIZE, Utsname, init_uts_ns_gpa, utsname_from_memory
from qmpdump.kdump.plan import KdumpPlan, plan_kdump, vmcoreinfo_of
from qmpdump.memmap.ranges import RangeSet
from qmpdump.output import DumpTarget, write_error
from qmpdump.qmp.events import PAUSE_BREAKERS, changes_heard, paused_seconds
from qmpdump.qmp.plugged import dump_loads
from qmpdump.qmp.probe import query_status
from qmpdump.qmp.session import EventQueue, QMPSession
from qmpdump.survey import (
    ReadFrom,
    RegionAccess,
    Survey,
    probe_prefix_without_growth,
    survey,
)

__all__ = [
    "ENGINE",
    "RESUME_GIVE_UP_S",
    "BackendDetails",
    "BackendEngine",
    "KdumpDetails",
    "readable",
    "sources_record",
]

#: how long a ``cont`` that QEMU does not answer is sent again before qmpdump gives up (and
#: says that it left the VM paused)
RESUME_GIVE_UP_S = 300.0
#: how long the output may stand still before the dump is given up and the VM resumed (a hung
#: disk would otherwise keep a consistent dump's VM paused until the write returned)
STALL_S = 10.0

POLL_S = 0.1
#: what a dump says when QEMU's process is found gone (as when its QMP connection closed)
_EXITED = "QEMU went away during the dump (its process exited)"
log = logging.getLogger(__name__)


class BackendDetails(EngineDetails):
    """The sidecar's ``request`` for the backend engine."""

    mode: str
    zero_pages_left_out: bool
    program_headers: int
    pn_xnum: bool
    data_bytes: int
    zero_fill_bytes: int
    copied_bytes: int
    #: per RAM region: ``read_from`` (file or process) and the ``proof`` that it holds the
    #: guest's bytes (:mod:`qmpdump.survey`)
    sources: dict[str, dict[str, str | None]]


class KdumpDetails(EngineDetails):
    """The sidecar's ``request`` for the backend engine's kdump-compressed output."""

    codec: str
    mode: str
    zero_pages: str
    ram_pages: int
    read_pages: int
    zero_read_pages: int
    dumped_pages: int
    page_data_bytes: int
    copied_bytes: int


def readable(result: Survey) -> tuple[bool, str]:
    """Whether the sparse reader can read every RAM region of a surveyed VM, and if not why.

    Every region needs a source proven to hold the guest's bytes (:class:`RegionAccess.proof
    <qmpdump.survey.RegionAccess>`: a shared mapping of that very file, or QEMU's own address
    space) and a known population. Anything else is a refusal, never a guess.
    """
    for backend in result.layout.backends:
        access = result.access.get(backend.region)
        region = result.population.regions.get(backend.region)
        if access is None or access.read_from is None:
            why = access.proof if access is not None and access.proof else None
            why = why or (region.note if region is not None and region.note else "not inspected")
            return False, (
                f"{backend.region} cannot be read from the host: no source is proven to hold "
                f"the guest's bytes ({why})"
            )
        if region is None or not region.known:
            why = region.note if region is not None else "not inspected"
            return False, f"the population of {backend.region} is unknown: {why}"
    return True, "every RAM region can be read from the host"


def sources_record(result: Survey) -> dict[str, dict[str, str | None]]:
    """Per region: the source read and the proof that it holds the guest's bytes (sidecar)."""
    return {
        region: {"read_from": access.read_from, "proof": access.proof}
        for region, access in sorted(result.access.items())
    }


@contextlib.contextmanager
def _open_sources(result: Survey) -> Iterator[dict[str, Source]]:
    fds: list[int] = []
    sources: dict[str, Source] = {}
    try:
        for region, access in result.access.items():
            sources[region] = _source(access, result.facts.pid, fds)
        yield sources
    finally:
        for fd in fds:
            os.close(fd)


def _qemu_gone(pid: int | None) -> bool:
    """Whether QEMU's process has exited (gone, or a zombie not yet reaped)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


def _unproven(why: str, pid: int | None) -> QmpdumpError:
    """The second look's refusal: QEMUGone if QEMU died meanwhile (its threads and mappings
    vanished with it), else the unproven source."""
    if _qemu_gone(pid):
        return QEMUGone(_EXITED)
    return SourceUnproven(None, why)


def _source(access: RegionAccess, pid: int | None, fds: list[int]) -> Source:
    if access.read_from is None:
        if _qemu_gone(pid):  # its mappings vanished with it: not an unproven source
            raise QEMUGone(_EXITED)
        raise SourceUnproven(access.region, access.proof)
    if access.read_from is ReadFrom.FILE and access.path is not None:
        try:
            fd = os.open(access.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise HostAccessError(f"cannot open {access.path}: {err.strerror}") from err
        fds.append(fd)
        return FileSource(fd, access.file_offset)
    if pid is None or access.hva is None:
        raise HostAccessError(f"{access.region}: neither a file nor QEMU's memory can be read")
    return ProcessSource(pid, access.hva)


class _PauseGuard:
    """``stop`` now, ``cont`` at exit if we stopped it; the resume survives a cancel. While it
    holds the VM paused it listens for :data:`PAUSE_BREAKERS` (:meth:`held`)."""

    def __init__(
        self, session: QMPSession, pause: bool, hooks: PauseHooks, *, watch: str | None = None
    ) -> None:
        """``pause``: stop the VM (it runs). ``watch``: the run state the VM must keep through
        the copy when it is not paused by us (a VM found paused: consistent all the same, as
        long as nobody resumes it); None: nothing is watched (a live dump)."""
        self.session = session
        self.pause = pause
        self.hooks = hooks
        self.stopped_at: float | None = None
        self.resumed_at: float | None = None
        self._watch = contextlib.ExitStack()
        self._heard: EventQueue | None = None
        self._state = "paused" if pause else watch

    async def __aenter__(self) -> _PauseGuard:
        if self._state is not None:
            self._heard = self._watch.enter_context(self.session.listen(*PAUSE_BREAKERS))
        if self.pause:
            if self.hooks.before_pause is not None:
                await self.hooks.before_pause()
            self.stopped_at = time.monotonic()
            try:
                await self.session.execute("stop")
            except BaseException:
                # It may have taken effect all the same (a timeout): resume to be sure.
                await self.__aexit__()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    async def held(self, read: Survey) -> None:
        """Raise :class:`DumpFailed` unless the VM stayed stopped and unchanged through the
        copy: another QMP client (or the guest, before the stop landed) may have resumed, reset
        or resized it, and then what was copied is not the memory of one instant. ``read``: the
        survey the copy followed (the virtio-mem sizes it read)."""
        if self._heard is None:
            return
        state = (await query_status(self.session)).status
        # Drained after the answer: QEMU sends an event before the answer of a later command.
        plugged = {d.id: d.size for d in read.layout.devices}
        heard = changes_heard(self._heard.drain(), plugged)
        if heard or state != self._state:
            what = ", ".join(heard) or f"its run state is now {state!r}"
            held = "held it paused" if self.pause else "read the stopped VM"
            raise DumpFailed(
                f"the VM changed while the dump {held} ({what}; another QMP client or the "
                "guest did it): what was copied is not the memory of one instant, so no dump "
                "was kept; dump again"
            )

    async def release(self) -> None:
        """Resume now if we stopped the VM and have not resumed it yet (idempotent)."""
        self._watch.close()
        if self.stopped_at is None or self.resumed_at is not None:
            return
        # Through any number of cancels: a second Ctrl-C must not keep the VM paused.
        await uncancellable(self._resume())

    async def _resume(self) -> None:
        """``cont``, sent again each time it times out (a stopped or overloaded QEMU) until it
        lands, QEMU is gone, or :data:`RESUME_GIVE_UP_S` passed: then say plainly that the VM
        was left paused."""
        deadline = time.monotonic() + RESUME_GIVE_UP_S
        if not self.session.connected:
            self.resumed_at = time.monotonic()
            return  # QEMU is gone: no VM is left paused, and its QEMUGone says why
        try:
            while True:
                try:
                    await self.session.execute("cont")
                    break
                except QMPTimeout as err:
                    if time.monotonic() >= deadline:
                        raise DumpError(
                            f"QEMU did not answer 'cont' for {RESUME_GIVE_UP_S:g} s: qmpdump "
                            "gave up and LEFT THE VM PAUSED; resume it (QMP 'cont') once QEMU "
                            "answers again"
                        ) from err
                    log.warning(
                        "%s: QEMU did not answer 'cont'; sending it again "
                        "(the VM stays paused until it lands)",
                        self.session.where,
                    )
        except QMPCommandError as err:
            raise DumpError(f"could not resume the VM after the dump: {err}") from err
        except QMPDisconnected as err:
            raise QEMUGone(f"QEMU went away before the VM could be resumed: {err}") from err
        finally:
            self.resumed_at = time.monotonic()
        if self.hooks.after_resume is not None:
            await self.hooks.after_resume()

    @property
    def paused_s(self) -> float | None:
        if self.stopped_at is None or self.resumed_at is None:
            return None
        return self.resumed_at - self.stopped_at


class BackendEngine:
    """qmpdump's sparse reader: populated memory into an ELF core."""

    traits: EngineTraits = ENGINE_TRAITS[EngineName.BACKEND]

    def assess(self, before: Survey) -> tuple[bool, str]:
        """Whether the sparse reader can read every RAM region of this VM (:func:`readable`)."""
        return readable(before)

    async def run(self, job: EngineJob) -> EngineResult:
        """Write an ELF core of populated memory into ``job.output``."""
        session, spec, before, output = job.session, job.spec, job.before, job.output
        ok, why = self.assess(before)
        if not ok:
            raise SourceUnproven(None, why)
        live = spec.mode is Mode.LIVE
        guard = _PauseGuard(
            session,
            before.facts.running and not live,
            job.hooks,
            watch=None if live else before.facts.run_state,
        )
        if spec.format in OWN_KDUMP_FORMATS:
            return await _run_kdump(job, guard)
        async with guard:
            result = await survey(session) if guard.pause else before
            ok, why = self.assess(result)
            if not ok:  # the second look, with the VM stopped, must prove it again
                raise _unproven(why, before.facts.pid)
            prefix, probe_paused_s = await _probe(session, result, measure=result.facts.running)
            coverage = dump_loads(prefix)
            wanted = result.population.populated | result.population.unknown
            data = wanted & coverage
            if spec.zero_pages:
                data = data - await _zero_pages(result, data)
            plan = plan_core(
                notes_payload(prefix),
                data,
                coverage - data,
                machine=parse_header(prefix).machine,
                max_phdrs=spec.max_program_headers,
            )
            ops = copy_ops(plan, result.layout, wanted & plan.data)
            state = CopyState()
            total = sum(op.size for op in ops)
            with _open_sources(result) as sources:
                try:
                    os.pwrite(output.fd, plan.header, 0)
                    digest = await _copy(
                        output,
                        ops,
                        sources,
                        state=state,
                        plan=plan,
                        total=total,
                        job=job,
                        stall=_StallWatch(guard),
                    )
                except OSError as err:
                    raise write_error(err, output.final) from err
            await guard.held(result)
        job.report(Progress(plan.file_size, state.copied, total))
        paused_s = guard.paused_s if guard.pause else probe_paused_s
        details = BackendDetails(
            format=spec.format.value,
            mode=spec.mode.value,
            zero_pages_left_out=spec.zero_pages,
            program_headers=plan.phnum,
            pn_xnum=plan.uses_pn_xnum,
            data_bytes=plan.data.total,
            zero_fill_bytes=plan.zero_fill.total,
            copied_bytes=state.copied,
            sources=sources_record(result),
        )
        return EngineResult(plan.file_size, digest, paused_s, details, result)


class _StallWatch:
    """Gives the dump up when its threads make no progress for :data:`STALL_S`, resuming the
    VM first: a thread stuck in the kernel (a write to a hung disk) cannot be stopped, and the
    run waits for it before returning (it uses the dump's fds), but the guest must not."""

    def __init__(self, guard: _PauseGuard) -> None:
        self.guard = guard
        self.last = -1
        self.at = time.monotonic()

    async def check(self, progress: int, *, flushing: bool = False) -> None:
        """``flushing``: the threads are in the final ``fdatasync`` or hash, whose length
        depends on what the kernel holds unwritten, not on a stall: not counted."""
        now = time.monotonic()
        if progress != self.last or flushing:
            self.last, self.at = progress, now
            return
        if now - self.at > STALL_S:
            await self.guard.release()
            resumed = " (the VM was resumed)" if self.guard.stopped_at is not None else ""
            raise DumpFailed(
                f"the dump stood still for {STALL_S:g} s (the output's disk, or a source, does "
                f"not answer); given up{resumed}"
            )


async def _run_kdump(job: EngineJob, guard: _PauseGuard) -> EngineResult:
    """The kdump-compressed branch: the same survey, probe and coverage as the ELF path, then a
    plan (:mod:`qmpdump.kdump.plan`) written by threads (:mod:`qmpdump.engines.kdump_writer`),
    then the finished file hashed. Zero pages are found while compressing (no extra read)."""
    session, spec, before, output = job.session, job.spec, job.before, job.output
    codec = await asyncio.to_thread(codec_for_format, spec.format.value)
    async with guard:
        t0 = time.monotonic()
        result = await survey(session) if guard.pause else before
        ok, why = readable(result)
        if not ok:  # the second look, with the VM stopped, must prove it again
            raise _unproven(why, before.facts.pid)
        prefix, probe_paused_s = await _probe(session, result, measure=result.facts.running)
        coverage = dump_loads(prefix)
        wanted = result.population.populated | result.population.unknown
        notes = notes_payload(prefix)
        machine = parse_header(prefix).machine
        utsname = await asyncio.to_thread(_kernel_utsname, result, notes, machine, wanted)
        plan = plan_kdump(
            notes,
            coverage,
            region_runs(result.layout, wanted & coverage),
            codec_flag=codec.flag,
            zero_pages=spec.kdump_zero_pages,
            machine=machine,
            utsname=utsname,
            timestamp_s=int(time.time()),
        )
        t1 = time.monotonic()
        total = plan.read_pages * plan.block_size
        with _open_sources(result) as sources:
            try:
                written, digest = await _write_kdump(
                    output, plan, sources, codec, total=total, job=job, stall=_StallWatch(guard)
                )
            except OSError as err:
                raise write_error(err, output.final) from err
        await guard.held(result)
        log.debug(
            "kdump-%s: survey, probe and plan %.3f s, write and hash %.3f s",
            codec.name,
            t1 - t0,
            time.monotonic() - t1,
        )
    job.report(Progress(written.file_size, total, total))
    paused_s = guard.paused_s if guard.pause else probe_paused_s
    details = KdumpDetails(
        format=spec.format.value,
        codec=codec.name,
        mode=spec.mode.value,
        zero_pages=spec.kdump_zero_pages.value,
        ram_pages=plan.ram_pages,
        read_pages=written.read_pages,
        zero_read_pages=written.zero_read_pages,
        dumped_pages=written.dumped_pages,
        page_data_bytes=written.data_bytes,
        copied_bytes=total,
    )
    return EngineResult(written.file_size, digest, paused_s, details, result)


def _kernel_utsname(result: Survey, notes: bytes, machine: int, wanted: RangeSet) -> Utsname | None:
    """The guest kernel's own utsname (``init_uts_ns``), for the kdump header's version,
    nodename and domainname; ``None`` (the header then takes VMCOREINFO's release only) when
    it is not x86_64, not found, in memory the host does not hold, or does not check out."""
    info = vmcoreinfo_of(notes)
    gpa = init_uts_ns_gpa(info) if info is not None and machine == EM_X86_64 else None
    if info is None or gpa is None:
        return None
    if RangeSet.of(gpa, UTS_READ_SIZE) - wanted:
        return None  # never read (or fault in) what the host does not hold
    runs = region_runs(result.layout, RangeSet.of(gpa, UTS_READ_SIZE))
    try:
        with _open_sources(result) as sources:
            blob = b"".join(read_source(sources[r.region], r.region_offset, r.size) for r in runs)
    except OSError:
        return None
    return utsname_from_memory(blob, info.osrelease)


async def _write_kdump(
    output: DumpTarget,
    plan: KdumpPlan,
    sources: Mapping[str, Source],
    codec: Codec,
    *,
    total: int,
    job: EngineJob,
    stall: _StallWatch,
) -> tuple[KdumpWriteResult, str]:
    stop = threading.Event()
    flushing = threading.Event()
    done = [0, 0]  # guest bytes read, file bytes written

    def record(read: int, written: int) -> None:
        done[:] = [read, written]

    def write_and_hash() -> tuple[KdumpWriteResult, str]:
        written = write_kdump(plan, sources, output.fd, codec, stop=stop, progress=record)
        flushing.set()
        os.fdatasync(output.fd)
        # Headers and bitmaps are final only now: hash the whole file (small, page cache).
        state = CopyState(stop=stop)
        state.finish(written.file_size)
        return written, hash_output(output.fd, state)

    # Final once written (the writer's order, module docstring of kdump_writer): the prefix and
    # 1st bitmap from the start, page data below the cursor; the 2nd bitmap and the page
    # descriptors only at the end. Raw pages bound the size.
    head = RangeSet.of(0, plan.bitmap2_offset)
    bound = plan.first_page_offset + plan.read_pages * plan.block_size

    async def tick() -> None:
        if not job.session.connected:
            # QEMU is gone (killed, crashed): what is left to copy is no VM's memory any more
            raise QEMUGone("QEMU went away during the dump (QMP connection closed)")
        cursor = done[1]
        await stall.check(done[0] + cursor, flushing=flushing.is_set())
        settled = None
        if cursor > plan.data_offset:  # the writer has started, and written page data
            settled = head | RangeSet.of(plan.data_offset, cursor - plan.data_offset)
        job.report(Progress(cursor, done[0], total, settled, bound))

    (outcome,) = await run_threads([write_and_hash], stop=stop, every_s=POLL_S, tick=tick)
    written: KdumpWriteResult = outcome[0]
    digest: str = outcome[1]
    return written, digest


async def _zero_pages(result: Survey, data: RangeSet) -> RangeSet:
    """The all-zero pages of ``data`` (guest-physical), read from the host once."""
    runs = region_runs(result.layout, data)
    stop = threading.Event()
    with _open_sources(result) as sources:
        (found,) = await run_threads(
            [lambda: find_zero_pages(runs, sources, stop)], stop=stop, every_s=POLL_S
        )
    zero: RangeSet = found
    return zero


async def _probe(
    session: QMPSession, result: Survey, *, measure: bool
) -> tuple[bytes, float | None]:
    """QEMU's dump headers; with ``measure``, also how long the probe paused the running VM.

    Live mode does not stop the VM, but QEMU's header probe does (``save-vm``, and a ``stop`` of
    its own when pages must be checked): the pause is summed from the STOP/RESUME events' QEMU
    timestamps. QEMU emits RESUME before the run state reads ``running`` again, and the probe
    returns only once it does, so every RESUME has arrived by then.
    """
    args = (result.facts, result.layout, result.population.regions, result.access)
    if not measure:
        return await probe_prefix_without_growth(session, *args), None
    with session.listen("STOP", "RESUME") as events:
        prefix = await probe_prefix_without_growth(session, *args)
        heard = events.drain()
    return prefix, paused_seconds(heard)


async def _copy(
    output: DumpTarget,
    ops: list[CopyOp],
    sources: Mapping[str, Source],
    *,
    state: CopyState,
    plan: CorePlan,
    total: int,
    job: EngineJob,
    stall: _StallWatch,
) -> str:
    flushing = threading.Event()

    def copy_all() -> None:
        copy_ops_into(output.fd, ops, sources, state)
        os.ftruncate(output.fd, plan.file_size)
        flushing.set()
        state.finish(plan.file_size)
        # Write back while the hasher catches up: the commit's fsync then has little left.
        os.fdatasync(output.fd)

    def wake() -> None:
        with state.changed:
            state.changed.notify_all()

    async def tick() -> None:
        if not job.session.connected:
            # QEMU is gone (killed, crashed): what is left to copy is no VM's memory any more
            raise QEMUGone("QEMU went away during the dump (QMP connection closed)")
        # final_upto is the hasher's mark: nothing below it is written again
        upto = state.final_upto
        await stall.check(state.copied + upto + state.hashed_upto, flushing=flushing.is_set())
        settled = RangeSet.of(0, upto) if upto else None
        job.report(Progress(upto, state.copied, total, settled, plan.file_size))

    state.advance(0, len(plan.header))
    _, digest = await run_threads(
        [copy_all, lambda: hash_output(output.fd, state)],
        stop=state.stop,
        every_s=POLL_S,
        tick=tick,
        on_stop=wake,
    )
    hexdigest: str = digest
    return hexdigest


ENGINE = BackendEngine()
