"""Blocking work in worker threads, followed from the event loop: the one wait loop engines use.

The copy threads check a ``stop`` flag between bounded chunks. :func:`run_threads` waits for
them, calling ``tick`` every ``every_s`` (progress, liveness); when the waiting task is cancelled
or one thread fails, it sets the flag and waits until every thread has returned, so that no
thread outlives the fds it uses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

__all__ = ["run_threads", "uncancellable"]

_T = TypeVar("_T")


async def _settle(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Wait until every task is done, even through further cancels (re-raised after)."""
    cancelled = False
    while not all(t.done() for t in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    for task in tasks:
        # Mark every outcome retrieved: the error that matters is raised already, and an
        # unretrieved one (another thread's stop) would be logged by asyncio when collected.
        if not task.cancelled():
            task.exception()
    if cancelled:
        raise asyncio.CancelledError


async def uncancellable(action: Awaitable[_T]) -> _T:
    """Run ``action`` to its end even when the caller is cancelled, once or many times (a
    second Ctrl-C while ``cont`` is being sent again); the cancel is re-raised after."""
    task = asyncio.ensure_future(action)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # the task itself was cancelled (the loop is closing)
                raise
            cancelled = True
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


async def run_threads(
    works: Sequence[Callable[[], Any]],
    *,
    stop: threading.Event,
    every_s: float,
    tick: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> list[Any]:
    """Run each callable in a thread; return their results in order.

    ``tick`` runs every ``every_s`` while they run (its exception ends the run). On the first
    failure, a ``tick`` error or a cancel: ``stop`` is set, ``on_stop`` called (to wake threads
    waiting on a condition), every thread awaited, and the error (or the cancel) raised.
    """
    tasks = [asyncio.ensure_future(asyncio.to_thread(work)) for work in works]
    try:
        while True:
            done, _ = await asyncio.wait(
                tasks, timeout=every_s, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                task.result()  # the first failure ends the run
            if len(done) == len(tasks):
                return [t.result() for t in tasks]
            if tick is not None:
                await tick()
    finally:
        if not all(t.done() for t in tasks):
            stop.set()
            if on_stop is not None:
                on_stop()
        await _settle(tasks)
