"""Write a planned kdump-compressed file: read, zero-check and compress pages in threads.

The entry point is :func:`write_kdump` (blocking): a :class:`qmpdump.kdump.plan.KdumpPlan`, the
page sources (RAM regions, read only where the plan says: populated memory; nothing is faulted
in), an output fd and a codec. Batches of pages go to a pool of threads, each with its own
compressor (the codecs release the GIL); results are taken back in the plan's order, so the
file is the same whatever thread finishes first:

1. the prefix (header, sub header, notes) and the 1st bitmap, known from the plan;
2. page data appended in pfn order from ``plan.first_page_offset`` (after the raw zero page
   when zero pages are shared); a page whose compressed form is not smaller than the page is
   stored raw (flags 0), as makedumpfile and QEMU do; a page equal to the one before it in its
   batch (a fill) is neither compressed nor stored again: its descriptor points at the same
   bytes, as every zero page's points at the one zero page;
3. page descriptors appended in the same order (one per page in the 2nd bitmap);
4. the 2nd bitmap, last: which pages are zero is known only once they have been read.

At most ``threads * 4`` batches (1 MiB each by default) are in flight: memory stays bounded.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from qmpdump.engines.copier import FileSource, Source, Stopped
from qmpdump.host.procmem import read_process_memory
from qmpdump.kdump.codecs import Codec
from qmpdump.kdump.format import PAGE_DESC
from qmpdump.kdump.plan import Batch, KdumpPlan, ZeroSpan, set_bits

__all__ = ["KdumpWriteResult", "read_source", "write_kdump"]

_DESC_FLUSH = 1 << 20
_ZERO_RUN_DESCS = 1 << 16


@dataclass(frozen=True, slots=True)
class KdumpWriteResult:
    """What was written."""

    file_size: int
    #: pages with a descriptor (in the 2nd bitmap)
    dumped_pages: int
    #: pages read from the host
    read_pages: int
    #: read pages whose bytes were all zero
    zero_read_pages: int
    #: compressed page bytes written (the shared zero page excluded)
    data_bytes: int


#: In :attr:`_Done.sizes`: the page's bytes are those of the previous stored page of the batch.
_SAME = -1


@dataclass(frozen=True, slots=True)
class _Done:
    """A compressed batch: per page its stored size (0: all zero; ``_SAME``: as the page
    before) and flags, and the stored bytes."""

    sizes: list[int]
    flags: list[int]
    blob: bytes


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def read_source(src: Source, region_offset: int, size: int) -> bytes:
    """``size`` bytes of a RAM region at ``region_offset`` (blocking)."""
    if isinstance(src, FileSource):
        data = os.pread(src.fd, size, src.file_offset + region_offset)
        if len(data) != size:
            raise OSError(0, f"short read at region offset {region_offset:#x}")
        return data
    buf = bytearray(size)
    read_process_memory(src.pid, src.hva + region_offset, memoryview(buf))
    return bytes(buf)


class _Worker:
    """Per-thread state: the thread's compressor."""

    def __init__(self, codec: Codec, page: int) -> None:
        self.codec = codec
        self.page = page
        self.local = threading.local()

    def run(self, batch: Batch, src: Source, stop: threading.Event) -> _Done:
        if stop.is_set():
            raise Stopped
        compress: Callable[[bytes], bytes] | None = getattr(self.local, "compress", None)
        if compress is None:
            compress = self.codec.compressor(self.page)
            self.local.compress = compress
        page = self.page
        data = read_source(src, batch.region_offset, batch.pages * page)
        zeros: bytes = getattr(self.local, "zeros", b"")
        if len(zeros) != len(data):
            zeros = self.local.zeros = bytes(len(data))
        if data == zeros:  # the whole batch is zero: one memcmp (bytes.count(0) is 2x slower)
            return _Done([0] * batch.pages, [0] * batch.pages, b"")
        zero = bytes(page)
        sizes: list[int] = []
        flags: list[int] = []
        parts: list[bytes] = []
        flag = self.codec.flag
        last = zero
        for at in range(0, len(data), page):
            raw = data[at : at + page]
            if raw == zero:
                sizes.append(0)
                flags.append(0)
                continue
            if raw == last:  # a run of one fill: compressed and stored once
                sizes.append(_SAME)
                flags.append(0)
                continue
            last = raw
            packed = compress(raw)
            if len(packed) < page:
                parts.append(packed)
                sizes.append(len(packed))
                flags.append(flag)
            else:
                parts.append(raw)
                sizes.append(page)
                flags.append(0)
        return _Done(sizes, flags, b"".join(parts))


class _Descriptors:
    """Appends page descriptors at the plan's descriptor table, in bulk."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = 0
        self.pending: list[bytes] = []
        self.pending_size = 0

    def add(self, blob: bytes, count: int) -> None:
        self.pending.append(blob)
        self.pending_size += len(blob)
        self.count += count
        if self.pending_size >= _DESC_FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            blob = b"".join(self.pending)
            _pwrite_all(self.fd, blob, self.offset)
            self.offset += len(blob)
            self.pending.clear()
            self.pending_size = 0


class _Writer:
    """The consumer side of :func:`write_kdump`: takes results in plan order and appends."""

    def __init__(self, plan: KdumpPlan, out_fd: int) -> None:
        self.plan = plan
        self.fd = out_fd
        self.shared = plan.zero_pages.shares_read_zeros
        self.share_holes = plan.zero_pages.shares_holes
        self.bitmap2 = bytearray(plan.bitmap1 if self.share_holes else plan.bitmap_size)
        self.descs = _Descriptors(out_fd, plan.desc_offset)
        self.zero_desc = plan.zero_desc
        self.cursor = plan.first_page_offset
        self.read_bytes = 0
        self.zero_read = 0
        self.data_bytes = 0

    def start(self) -> None:
        _pwrite_all(self.fd, self.plan.prefix, 0)
        _pwrite_all(self.fd, self.plan.bitmap1, self.plan.bitmap_offset)
        if self.shared:
            _pwrite_all(self.fd, bytes(self.plan.block_size), self.plan.data_offset)

    def zero_span(self, span: ZeroSpan) -> None:
        if not self.share_holes:
            return  # excluded: in the 1st bitmap only
        left = span.pages
        while left:
            take = min(left, _ZERO_RUN_DESCS)
            self.descs.add(self.zero_desc * take, take)
            left -= take

    def batch(self, batch: Batch, done: _Done) -> None:
        _pwrite_all(self.fd, done.blob, self.cursor)
        packed: list[bytes] = []
        pack = PAGE_DESC.pack
        previous = self.zero_desc
        excluded_any = False
        for size, flags in zip(done.sizes, done.flags, strict=True):
            if size > 0:
                previous = pack(self.cursor, size, flags, 0)
                packed.append(previous)
                self.cursor += size
                self.data_bytes += size
            elif size == _SAME:
                packed.append(previous)
            else:
                self.zero_read += 1
                if self.shared:
                    packed.append(self.zero_desc)
                else:
                    excluded_any = True
        if not self.share_holes:  # the 2nd bitmap: the batch's pages, less the excluded
            if excluded_any:
                for index, size in enumerate(done.sizes):
                    if size:
                        set_bits(self.bitmap2, batch.pfn + index, 1)
            else:
                set_bits(self.bitmap2, batch.pfn, batch.pages)
        self.descs.add(b"".join(packed), len(packed))
        self.read_bytes += batch.pages * self.plan.block_size

    def finish(self) -> KdumpWriteResult:
        self.descs.flush()
        _pwrite_all(self.fd, bytes(self.bitmap2), self.plan.bitmap2_offset)
        file_size = max(self.cursor, self.plan.data_offset)
        os.ftruncate(self.fd, file_size)
        return KdumpWriteResult(
            file_size=file_size,
            dumped_pages=self.descs.count,
            read_pages=self.plan.read_pages,
            zero_read_pages=self.zero_read,
            data_bytes=self.data_bytes,
        )


def write_kdump(
    plan: KdumpPlan,
    sources: Mapping[str, Source],
    out_fd: int,
    codec: Codec,
    *,
    threads: int | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KdumpWriteResult:
    """Write the file ``plan`` describes into ``out_fd`` (blocking; see the module docstring).

    ``progress`` is called with the guest bytes read and the page data's end so far after
    each batch. Raises
    :class:`qmpdump.engines.copier.Stopped` when ``stop`` is set, or the ``OSError`` hit.
    """
    stop = stop or threading.Event()
    threads = max(1, threads or os.cpu_count() or 1)
    writer = _Writer(plan, out_fd)
    writer.start()
    worker = _Worker(codec, plan.block_size)
    window = threads * 4
    inflight: deque[tuple[Batch, Future[_Done]] | ZeroSpan] = deque()
    items = iter(plan.items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kdump") as pool:
        try:
            while True:
                for item in itertools.islice(items, window - len(inflight)):
                    if isinstance(item, Batch):
                        fut = pool.submit(worker.run, item, sources[item.region], stop)
                        inflight.append((item, fut))
                    else:
                        inflight.append(item)
                if not inflight:
                    break
                head = inflight.popleft()
                if stop.is_set():
                    raise Stopped
                if isinstance(head, ZeroSpan):
                    writer.zero_span(head)
                    continue
                writer.batch(head[0], head[1].result())
                if progress is not None:
                    progress(writer.read_bytes, writer.cursor)
        finally:
            if inflight:  # an error or a stop: let the running batches end early
                stop.set()
            for entry in inflight:
                if not isinstance(entry, ZeroSpan):
                    entry[1].cancel()
    return writer.finish()
