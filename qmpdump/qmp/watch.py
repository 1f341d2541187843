"""Keep virtio-mem state current from ``MEMORY_DEVICE_SIZE_CHANGE``.

QEMU (``hw/virtio/virtio-mem.c``, ``virtio_mem_resize_usable_region`` /
``qapi_event_send_memory_device_size_change``) rate-limits this event to about one a second per
device and coalesces the sizes in between, so an event's ``size`` may already be stale when it
arrives. The watcher therefore treats an event only as "something changed" and re-queries
``query-memory-devices`` after each one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from qmpdump.qmp.models import VirtioMemInfo, parse_memory_devices
from qmpdump.qmp.session import QMPSession

__all__ = ["VM_EVENTS", "VirtioMemWatch"]

#: The events qmpdump follows.
VM_EVENTS = ("SHUTDOWN", "STOP", "RESUME", "MEMORY_DEVICE_SIZE_CHANGE", "DUMP_COMPLETED")


class VirtioMemWatch:
    """The current virtio-mem devices of one VM, refreshed after every size-change event.

    ``async with VirtioMemWatch(session) as watch:`` runs the watcher for the block; it is
    stopped (its task cancelled and awaited) on exit.
    """

    def __init__(self, session: QMPSession) -> None:
        self._session = session
        self._devices: dict[str, VirtioMemInfo] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        #: how many times the state was re-queried (for tests and metrics)
        self.refreshes = 0

    @property
    def devices(self) -> Mapping[str, VirtioMemInfo]:
        """The devices as of the last query, by id."""
        return dict(self._devices)

    async def refresh(self) -> None:
        """Query the devices now."""
        found = parse_memory_devices(await self._session.execute("query-memory-devices"))
        async with self._changed:
            self._devices = {d.id or f"@{d.memaddr:#x}": d for d in found}
            self.refreshes += 1
            self._changed.notify_all()

    async def _run(self) -> None:
        with self._session.listen("MEMORY_DEVICE_SIZE_CHANGE") as listener:
            await self.refresh()
            while True:
                await listener.get()
                await self.refresh()

    async def wait_for(
        self, predicate: Callable[[Mapping[str, VirtioMemInfo]], bool], timeout_s: float
    ) -> Mapping[str, VirtioMemInfo]:
        """Wait until the devices satisfy ``predicate``; TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self._devices))
            return dict(self._devices)

    async def __aenter__(self) -> VirtioMemWatch:
        self._task = asyncio.create_task(self._run(), name="virtio-mem-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # asyncio.wait, not await task: a cancel of *our* caller must still propagate.
        await asyncio.wait([task])
        if not task.cancelled() and (err := task.exception()) is not None:
            raise err
